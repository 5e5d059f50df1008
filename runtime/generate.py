"""The generation loop: prefill, then one token at a time with the KV cache.

The budget is read from a :class:`BudgetControl` before every step, so another
thread (a UI) or the device policy (``auto``, re-evaluated every N tokens) can
change precision mid-generation; the next step simply feeds another
``target_bits``. Each step reports what it cost and the bits it read.

A :class:`PrefixCache` carries the KV cache from one generation to the next:
the new prompt's tokens shared with what the cache holds (a chat's earlier
turns, a fixed system prompt) are not computed again, only the rest is.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from .budget import DEFAULT_REEVALUATE_EVERY, AutoBudget, Decision
from .sampling import Sampler
from .session import ContextError, KVCache, ModelSession


class BudgetControl:
    """Current target bits: fixed, or driven by an AutoBudget. Thread-safe to read and set."""

    def __init__(self, bits: float | None = None, auto: AutoBudget | None = None,
                 every: int = DEFAULT_REEVALUATE_EVERY):
        self._lock = threading.Lock()
        self._bits, self.auto, self.every = bits, auto, every
        self.changes: list[tuple[int, Decision]] = []  # (token index, decision) for auto changes

    def set(self, bits: float) -> None:
        with self._lock:
            self._bits, self.auto = float(bits), None

    def bits_for(self, step: int) -> float:
        with self._lock:
            if self.auto is not None and (self._bits is None or step % self.every == 0):
                before = self.auto.decision
                decision = self.auto.update()
                if before is None or decision.target_bits != before.target_bits:
                    self.changes.append((step, decision))
                self._bits = decision.target_bits
            return 8.0 if self._bits is None else self._bits


@dataclass
class Step:
    token: int
    text: str
    target_bits: float
    avg_bits: float  # bits the step actually read (nan for non-elastic models)
    seconds: float


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens whose keys and values came from the PrefixCache
    prefill_seconds: float = 0.0
    steps: list[Step] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float:
        decode = self.steps[1:]  # the first token comes from the prefill
        return len(decode) / sum(s.seconds for s in decode) if decode else float("nan")

    @property
    def prefill_tokens_per_s(self) -> float:
        computed = self.prompt_tokens - self.reused_tokens
        return computed / self.prefill_seconds if self.prefill_seconds else float("nan")

    @property
    def avg_bits(self) -> float:
        bits = [s.avg_bits for s in self.steps if not np.isnan(s.avg_bits)]
        return float(np.mean(bits)) if bits else float("nan")


def fit_context(prompt: list[int], max_new: int, context: int) -> list[int]:
    """The prompt, left-truncated so that prompt + max_new fits; ContextError if max_new alone does not."""
    if max_new >= context:
        raise ContextError(f"[mobiq] max new tokens expected < context {context}; got {max_new}")
    room = context - max_new
    return prompt if len(prompt) <= room else prompt[-room:]


class PrefixCache:
    """The tokens whose keys and values a KV cache holds, kept between generations of one session."""

    def __init__(self):
        self.ids: list[int] = []
        self.cache: KVCache | None = None

    def start(self, session: ModelSession, prompt: list[int], room: int) -> KVCache:
        """A cache holding the longest prefix of ``prompt`` (all but its last token at most) it already
        has, with room for ``room`` positions in all (fresh buffers when nothing is shared)."""
        shared = 0
        for a, b in zip(self.ids, prompt[:-1]):
            if a != b:
                break
            shared += 1
        if self.cache is None or shared == 0:
            return session.empty_cache(room)
        return KVCache(self.cache.buffers, shared, self.cache.binding)

    def keep(self, ids: list[int], cache: KVCache) -> None:
        self.ids, self.cache = ids[:cache.length], cache


def generate(session: ModelSession, prompt: list[int], max_new: int, sampler: Sampler, budget: BudgetControl,
             stop_ids: frozenset[int], decode: Callable[[int], str], stats: GenerationStats | None = None,
             cancel: threading.Event | None = None, prefix: PrefixCache | None = None) -> Iterator[Step]:
    """Yield one Step per generated token until a stop token, max_new tokens or ``cancel``; with
    ``prefix``, start from the keys and values it holds and leave this generation's there."""
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(prompt)
    history = list(prompt)
    bits = budget.bits_for(0)
    t = time.perf_counter()
    room = len(prompt) + max_new
    cache = prefix.start(session, prompt, room) if prefix else session.empty_cache(room)
    stats.reused_tokens = cache.length
    logits, cache = session.forward(np.array([prompt[cache.length:]], np.int64), cache, bits)
    stats.prefill_seconds = time.perf_counter() - t
    if prefix:
        prefix.keep(history, cache)
    last_seconds = stats.prefill_seconds
    for i in range(max_new):
        token = sampler(logits[0, -1], history)
        if token in stop_ids:
            return
        step = Step(token, decode(token), bits, session.last_avg_bits, last_seconds)
        stats.steps.append(step)
        yield step
        history.append(token)
        if i + 1 == max_new or (cancel is not None and cancel.is_set()):
            return
        bits = budget.bits_for(i + 1)
        t = time.perf_counter()
        logits, cache = session.forward(np.array([[token]], np.int64), cache, bits)
        last_seconds = time.perf_counter() - t
        if prefix:
            prefix.keep(history, cache)
