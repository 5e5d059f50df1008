"""Block-by-block machinery shared by MoBiQuant calibration and the PTQ baselines.

* :func:`calibration_windows` cuts calibration text into BOS-first token windows.
* :func:`capture_block_inputs` runs the embedding once and catches the first
  decoder block's input and keyword arguments (position embeddings, mask), so
  every block can then be called on its own, on any batch of cached inputs.
* :class:`TrainLinear` stands in for a block linear during calibration: float,
  a fixed weight, a learnable-clipping read (:mod:`.fakequant`) or routed slices
  with a straight-through gate.
* :class:`WorkDir` stores each finished block so an interrupted run resumes.

Inputs and targets follow OmniQuant: a block's input comes from the already
quantized blocks before it (one stream per read, see calibrate.py), the target is
the fp32 model's output of the same block on the fp32 stream (so a block also
learns to correct the error accumulated before it).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


class CalibrationError(RuntimeError):
    """Calibration cannot go on (NaN loss, bad input); the message names the block and the fix to try."""


def calibration_windows(ids: list[int], bos: int | None, samples: int, seq_len: int) -> torch.Tensor:
    """``samples`` windows [samples, seq_len] spread evenly over ``ids``, BOS first when the model has one."""
    body = seq_len - (1 if bos is not None else 0)
    if len(ids) < body:
        raise CalibrationError(f"[calibrate] calibration text expected at least {body} tokens; got {len(ids)}")
    span = len(ids) - body
    starts = [round(i * span / max(samples - 1, 1)) for i in range(samples)] if samples > 1 else [0]
    rows = [([bos] if bos is not None else []) + ids[s: s + body] for s in starts]
    return torch.tensor(rows, dtype=torch.long)


class _Caught(Exception):
    pass


@torch.no_grad()
def capture_block_inputs(model: nn.Module, tokens: torch.Tensor, batch: int = 8) -> tuple[torch.Tensor, list[dict]]:
    """Hidden states entering block 0 for every window [n, T, d], and each block's kwargs (batch-1 shaped).

    Kwargs are per block: Gemma 3 alternates sliding-window and global layers with their own
    rotary tables and masks, so block i must run with block i's kwargs."""
    layers = list(model.model.layers)
    per_layer: list[dict | None] = [None] * len(layers)
    first: dict = {}

    def keep(i):
        def hook(module, args, kwargs):
            if per_layer[i] is None:
                per_layer[i] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            if i == 0:
                first["x"] = args[0] if args else kwargs["hidden_states"]
            if all(p is not None for p in per_layer):
                raise _Caught  # every block's kwargs are known: stop (the first batch before the last block and
                # the head, whose logits over a 262k vocabulary were gigabytes; the others at block 0's input)
        return hook

    handles = [layer.register_forward_pre_hook(keep(i), with_kwargs=True) for i, layer in enumerate(layers)]
    xs = []
    try:
        for i in range(0, len(tokens), batch):
            try:
                model(input_ids=tokens[i: i + batch], use_cache=False)
            except _Caught:
                pass
            xs.append(first["x"].detach().clone())
    finally:
        for h in handles:
            h.remove()
    drop = ("cache", "past_key_values", "use_cache")
    return torch.cat(xs), [_first_row({k: v for k, v in kw.items() if k not in drop}) for kw in per_layer]


def _first_row(value):
    """Block kwargs captured for a batch, cut to batch 1 (they broadcast over any batch)."""
    if isinstance(value, torch.Tensor):
        return value[:1] if value.dim() > 0 and value.shape[0] > 1 else value
    if isinstance(value, tuple):
        return tuple(_first_row(v) for v in value)
    if isinstance(value, dict):
        return {k: _first_row(v) for k, v in value.items()}
    return value


def run_block(block: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def run_block_batched(block: nn.Module, x: torch.Tensor, kwargs: dict, batch: int) -> torch.Tensor:
    return torch.cat([run_block(block, x[i: i + batch], kwargs) for i in range(0, len(x), batch)])


class TrainLinear(nn.Module):
    """A block linear during calibration. ``mode`` picks the weight:

    * ``"float"``: the original weight (records sum of x^2 per input channel when ``stats`` is set);
    * ``"fixed"``: ``self.fixed`` (a read computed outside, no gradient);
    * ``"read"``: ``self.read_fn()`` — a differentiable read of learnable clipping;
    * ``"routed"``: ``self.reads`` [S, N, K] under per-token prefix gates from ``self.gate_fn(x)``
      ([..., S-1] straight-through gates in {0, 1}).
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = linear.weight  # frozen, shared with the float model
        self.bias = linear.bias
        self.mode = "float"
        self.fixed: torch.Tensor | None = None
        self.read_fn: Callable[[], torch.Tensor] | None = None
        self.reads: torch.Tensor | None = None
        self.gate_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.stats: torch.Tensor | None = None
        self.stats_count = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "float":
            if self.stats is not None:
                flat = x.detach().reshape(-1, x.shape[-1])
                self.stats += (flat * flat).sum(0)
                self.stats_count += flat.shape[0]
            w = self.weight
        elif self.mode == "fixed":
            w = self.fixed
        elif self.mode == "read":
            w = self.read_fn()
        elif self.mode == "routed" and not torch.is_grad_enabled():  # one matmul per slice count
            counts = 1 + self.gate_fn(x).sum(-1).round().long()
            flat_x, flat_k = x.reshape(-1, x.shape[-1]), counts.reshape(-1)
            y = x.new_empty(flat_x.shape[0], self.reads.shape[1])
            for k in range(1, self.reads.shape[0] + 1):
                rows = (flat_k == k).nonzero().squeeze(-1)
                if rows.numel():
                    y[rows] = flat_x[rows] @ self.reads[k - 1].T
            y = y.reshape(*x.shape[:-1], -1)
            return y if self.bias is None else y + self.bias
        elif self.mode == "routed":
            deltas = torch.cat([self.reads[:1], self.reads[1:] - self.reads[:-1]])  # [S, N, K]
            s, n, _ = deltas.shape
            parts = (x @ deltas.reshape(s * n, -1).T).reshape(*x.shape[:-1], s, n)
            gates = self.gate_fn(x)  # [..., S-1]
            y = parts[..., 0, :] + (gates.unsqueeze(-1) * parts[..., 1:, :]).sum(-2)
            return y if self.bias is None else y + self.bias
        else:
            raise ValueError(self.mode)
        return nn.functional.linear(x, w, self.bias)


def swap_in(block: nn.Module, names: list[str]) -> dict[str, TrainLinear]:
    """Replace ``block``'s linears named ``names`` by TrainLinears (in place); returns them by name."""
    out = {}
    for name in names:
        *parents, last = name.split(".")
        parent = block
        for p in parents:
            parent = getattr(parent, p)
        lin = getattr(parent, last)
        if not isinstance(lin, nn.Linear):
            raise CalibrationError(f"[calibrate] {name}: expected nn.Linear; got {type(lin).__name__}")
        tl = TrainLinear(lin)
        tl._orig = lin  # type: ignore[attr-defined]
        setattr(parent, last, tl)
        out[name] = tl
    return out


def swap_out(block: nn.Module, linears: dict[str, TrainLinear]) -> None:
    for name, tl in linears.items():
        *parents, last = name.split(".")
        parent = block
        for p in parents:
            parent = getattr(parent, p)
        setattr(parent, last, tl._orig)


def check_finite(loss: torch.Tensor, block: int, stage: str, step: int, hint: str) -> None:
    if not torch.isfinite(loss):
        raise CalibrationError(f"[calibrate] block {block}: {stage} loss is {loss.item()} at step {step}; {hint}")


class WorkDir:
    """Finished blocks of an interrupted run: ``block_XXX.pt`` plus ``state.pt`` (streams after the last one)."""

    def __init__(self, path: Path, fingerprint: dict):
        self.path = path
        self.fingerprint = fingerprint
        path.mkdir(parents=True, exist_ok=True)
        meta = path / "run.json"
        key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
        if meta.is_file() and json.loads(meta.read_text()).get("key") != key:
            for f in path.glob("*.pt"):  # another run's blocks: never mix them
                f.unlink()
        meta.write_text(json.dumps({"key": key, "fingerprint": fingerprint}, indent=1))

    def resume(self) -> tuple[int, dict | None]:
        """(first block to run, saved state or None)."""
        state = self.path / "state.pt"
        if not state.is_file():
            return 0, None
        saved = torch.load(state, weights_only=False)
        return saved["next_block"], saved

    def save_block(self, index: int, params: dict, state: dict) -> None:
        _atomic_save(params, self.path / f"block_{index:03d}.pt")
        _atomic_save({**state, "next_block": index + 1}, self.path / "state.pt")

    def load_block(self, index: int) -> dict:
        return torch.load(self.path / f"block_{index:03d}.pt", weights_only=False)


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(".partial")
    torch.save(obj, tmp)
    tmp.replace(path)
