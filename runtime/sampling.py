"""Next-token choice: greedy, temperature, top-k, top-p, repetition penalty, seeded."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class SamplingError(ValueError):
    """A sampling setting out of range."""


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.1  # 1 = off; divides positive logits of tokens already present
    seed: int | None = None

    def __post_init__(self):
        if not self.temperature >= 0:
            raise SamplingError(f"[sampling] temperature expected >= 0; got {self.temperature}")
        if self.top_k < 0:
            raise SamplingError(f"[sampling] top_k expected >= 0; got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise SamplingError(f"[sampling] top_p expected in (0, 1]; got {self.top_p}")
        if not self.repetition_penalty >= 1:
            raise SamplingError(f"[sampling] repetition_penalty expected >= 1; got {self.repetition_penalty}")


class Sampler:
    def __init__(self, config: SamplingConfig):
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray, history: list[int]) -> int:
        c = self.config
        z = logits.astype(np.float64)
        if c.repetition_penalty != 1 and history:
            seen = np.unique(np.asarray(history))
            z[seen] = np.where(z[seen] > 0, z[seen] / c.repetition_penalty, z[seen] * c.repetition_penalty)
        if c.temperature == 0:
            return int(z.argmax())
        z = z / c.temperature
        if c.top_k:
            kth = np.partition(z, -c.top_k)[-c.top_k]
            z = np.where(z < kth, -np.inf, z)
        p = np.exp(z - z.max())
        p /= p.sum()
        if c.top_p < 1:
            order = np.argsort(-p)
            keep = np.cumsum(p[order]) - p[order] < c.top_p  # smallest set whose mass reaches top_p
            mask = np.zeros_like(p, dtype=bool)
            mask[order[keep]] = True
            p = np.where(mask, p, 0.0)
            p /= p.sum()
        return int(self.rng.choice(len(p), p=p))
