"""Baselines for the MoBiQuant table, on the same calibration data and per-block budget.

* ``ptq-b`` (b in PTQ_WIDTHS): bit-specific PTQ, the usual asymmetric b-bit quantizer
  with an integer zero point per (row, group), same group size, learnable clipping
  (same parameterization, grid-search initialization, optimizer, steps and batch as
  MoBiQuant's stage 1, but one read: b bits), calibrated block by block OmniQuant
  style on its own quantized stream.
* ``rtn-b``: the same quantizer on each group's min/max (no calibration).
* ``sliced8-b``: the top b bits of the 8-bit PTQ code, reconstructed at the centre
  of the coarse bin (an elastic model without residual calibration).
* ``ptq3-read4``: the clipping calibrated for 3 bits, read with a 4-bit grid (the
  paper's "precision-dependent outlier migration").
* ``random-b``: our checkpoint with each router's scores replaced by uniform noise,
  thresholds at the same water-filling fractions: same average bits, no allocation, no routing.
* ``static-b``: our checkpoint's per-router allocation with no per-token information: each
  router reads its own width at b; a fractional width is split by a token-independent rule
  (a seeded Weyl sequence of the position: over a window, the fraction to within 1/window). The control
  for what per-token decisions add.

Fixed-width baselines are evaluated as float models whose block linears hold the
quantized weights; the LM head is the checkpoint's (the same for every row).
"""

from __future__ import annotations

import random
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import fakequant as fq
from .blockwise import (WorkDir, capture_block_inputs, check_finite, run_block, run_block_batched, swap_in,
                        swap_out)
from .calibrate import LINEAR_NAMES, NAN_HINT, Recipe, recipe_dict, water_fill
from .qmodel import QuantizedModel, Router, decoder_layers, grid_index

PTQ_WIDTHS = (2, 3, 4, 6, 8)
SLICED8_WIDTHS = (2, 3, 4, 6)
PTQ_FILE = "baselines-ptq.pt"


def _uniform(bits: int):
    return lambda w, lo, hi, g, k: fq.uniform_read(w, lo, hi, g, bits)


def _calibrate_ptq_block(index: int, block: nn.Module, kwargs: dict, x_fp: torch.Tensor, streams: dict[int, torch.Tensor],
                         recipe: Recipe, group_size: int, rng: random.Random, bar=None):
    tls = swap_in(block, LINEAR_NAMES)
    try:
        bs, n = recipe.batch, len(x_fp)
        for tl in tls.values():
            tl.mode, tl.stats, tl.stats_count = "float", torch.zeros(tl.weight.shape[1], dtype=torch.float64,
                                                                      device=tl.weight.device), 0
        y_fp = run_block_batched(block, x_fp, kwargs, 4 * bs)
        hess = {name: (tl.stats / max(tl.stats_count, 1)).float() for name, tl in tls.items()}
        for tl in tls.values():
            tl.stats = None
        factors, new_streams = {}, {}
        for bits, xs in streams.items():
            clips = {}
            for name, tl in tls.items():
                w = tl.weight.detach()
                clips[name] = fq.LearnableClip(w, group_size, *fq.grid_search_factors(w, hess[name], group_size,
                                                                                       _uniform(bits), [1.0]))
                tl.mode = "read"
                tl.read_fn = (lambda tl=tl, c=clips[name], b=bits: fq.uniform_read(tl.weight, *c.range(), group_size, b))
            opt = torch.optim.Adam([p for c in clips.values() for p in c.parameters()], lr=recipe.clip_lr)
            for step in range(recipe.clip_steps):
                idx = torch.tensor(rng.sample(range(n), min(bs, n)))
                opt.zero_grad()
                loss = ((run_block(block, xs[idx], kwargs) - y_fp[idx]) ** 2).mean()
                check_finite(loss, index, f"PTQ-{bits} clipping", step, NAN_HINT)
                loss.backward()
                opt.step()
                if bar is not None:
                    bar.set_postfix_str(f"block {index} ptq-{bits} {step + 1}/{recipe.clip_steps} loss {loss.item():.4g}")
            with torch.no_grad():
                factors[bits] = {name: tuple(f.detach().clone() for f in c.factors()) for name, c in clips.items()}
                for name, tl in tls.items():
                    tl.mode, tl.fixed = "fixed", fq.uniform_read(tl.weight, *clips[name].range(), group_size, bits)
                new_streams[bits] = run_block_batched(block, xs, kwargs, 4 * bs)
    finally:
        swap_out(block, tls)
    return factors, y_fp, new_streams


def calibrate_ptq(model: nn.Module, tokens: torch.Tensor, recipe: Recipe, group_size: int,
                  widths: tuple[int, ...] = PTQ_WIDTHS, work: WorkDir | None = None,
                  progress: bool = True) -> dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Clip factors {bits: {"layers.i.linear": (f_lo, f_hi)}} of a bit-specific PTQ per width."""
    from tqdm import tqdm

    rng = random.Random(recipe.seed)
    layers = decoder_layers(model)
    x0, layer_kwargs = capture_block_inputs(model, tokens)
    start, state = work.resume() if work is not None else (0, None)
    if state is None:
        start, state = 0, {"fp": x0, "streams": {b: x0 for b in widths}}
    blocks = [work.load_block(i) for i in range(start)] if work is not None else []
    t0 = time.time()
    bar = tqdm(range(len(layers)), initial=start, total=len(layers), desc="ptq baselines", unit="block",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for i in range(start, len(layers)):
        for p in layers[i].parameters():
            p.requires_grad_(False)
        factors, y_fp, streams = _calibrate_ptq_block(i, layers[i], layer_kwargs[i], state["fp"], state["streams"], recipe,
                                                      group_size, rng, bar)
        state = {"fp": y_fp, "streams": streams}
        blocks.append(factors)
        if work is not None:
            work.save_block(i, factors, state)
        bar.update(1)
        bar.set_postfix_str(f"block {i} elapsed {time.time() - t0:.0f}s")
    bar.close()
    return {b: {f"layers.{i}.{name}": f for i, blk in enumerate(blocks) for name, f in blk[b].items()} for b in widths}


def load_or_calibrate_ptq(path: Path, model: nn.Module, tokens: torch.Tensor, recipe: Recipe, group_size: int,
                          identity: str, progress: bool = True):
    """PTQ factors cached beside the checkpoint (``path/baselines-ptq.pt``), calibrated once."""
    used = ("samples", "seq_len", "batch", "clip_steps", "clip_lr", "seed")  # what PTQ calibration reads
    fingerprint = {"source": identity, "recipe": {k: v for k, v in recipe_dict(recipe).items() if k in used},
                   "group_size": group_size,
                   "widths": list(PTQ_WIDTHS), "tokens": list(tokens.shape)}
    cache = path / PTQ_FILE
    if cache.is_file():
        saved = torch.load(cache, weights_only=False, map_location="cpu")
        if saved.get("fingerprint") == fingerprint:
            return saved["factors"]
    work = WorkDir(path / "baselines.work", fingerprint)
    factors = calibrate_ptq(model, tokens, recipe, group_size, PTQ_WIDTHS, work, progress)
    factors = {b: {n: tuple(f.cpu() for f in fs) for n, fs in per.items()} for b, per in factors.items()}
    torch.save({"fingerprint": fingerprint, "factors": factors}, cache)
    import shutil

    shutil.rmtree(work.path, ignore_errors=True)
    return factors


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {f"layers.{i}.{name}": layer.get_submodule(name)
            for i, layer in enumerate(decoder_layers(model)) for name in LINEAR_NAMES}


@torch.no_grad()
def fixed_weights(model: nn.Module, group_size: int, kind: str, bits: int,
                  factors: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] | None = None,
                  read_bits: int | None = None) -> dict[str, torch.Tensor]:
    """Quantized block weights by name: kind "rtn", "ptq" (clipping of ``bits``, read at ``read_bits``) or "sliced8"."""
    out = {}
    for name, lin in _linears(model).items():
        w = lin.weight.detach()
        wmin, wmax = fq.group_minmax(w, group_size)
        if kind == "rtn":
            out[name] = fq.uniform_read(w, wmin, wmax, group_size, bits)
        elif kind == "ptq":
            lo, hi = fq.clip_range(wmin, wmax, *(f.to(w.device) for f in factors[bits][name]))
            out[name] = fq.uniform_read(w, lo, hi, group_size, read_bits or bits)
        elif kind == "sliced8":
            lo, hi = fq.clip_range(wmin, wmax, *(f.to(w.device) for f in factors[8][name]))
            out[name] = fq.top_bits_read(w, lo, hi, group_size, bits)
        else:
            raise ValueError(kind)
    return out


@contextmanager
def swapped_weights(model: nn.Module, weights: dict[str, torch.Tensor]):
    """Temporarily give ``model``'s block linears the ``weights`` (by name)."""
    linears = _linears(model)
    saved = {name: linears[name].weight for name in weights}
    try:
        for name, w in weights.items():
            linears[name].weight = nn.Parameter(w, requires_grad=False)
        yield model
    finally:
        for name, w in saved.items():
            linears[name].weight = w


class RandomRouter(nn.Module):
    """Same interface as qmodel.Router, but each token's slice count is drawn at random
    with the water-filling fractions of the current target (one draw per input tensor,
    so linears sharing a router share the draw)."""

    def __init__(self, num_slices: int, seed: int):
        super().__init__()
        self.num_slices = num_slices
        self.target_bits = 8.0
        self.gen = torch.Generator().manual_seed(seed)
        self._last: tuple | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.data_ptr(), tuple(x.shape))
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        u = torch.rand(x.shape[:-1], generator=self.gen).to(x.device)
        counts = torch.ones(x.shape[:-1], dtype=torch.long, device=x.device)
        for p in water_fill(self.target_bits, self.num_slices):
            counts = counts + (u < p).long()  # nested: u < p_j implies u < p_(j-1)
        self._last = (key, counts)
        return counts


class StaticRouter(nn.Module):
    """Same interface as qmodel.Router: every token reads the router's own width at the current target
    (its ``widths`` row); of a fractional width w between 2j and 2j+2 bits, positions t with
    frac(t * phi + seed * c) < w/2 - j read the extra slice — the same split for any text."""

    GOLDEN, SEED_STEP = 0.6180339887498949, 0.7548776662466927

    def __init__(self, router: Router, seed: int):
        super().__init__()
        self.num_slices, self.widths, self.seed = router.num_slices, router.widths.clone(), seed
        self.target_bits = 8.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = float(self.widths[grid_index(self.target_bits)])
        positions = (torch.arange(x.shape[-2], dtype=torch.float64, device=x.device) if x.dim() >= 2
                     else torch.zeros(1, device=x.device))
        u = torch.remainder(positions * self.GOLDEN + self.seed * self.SEED_STEP, 1.0)
        whole = int(np.floor(width / 2 + 1e-9))
        counts = torch.full(x.shape[:-1], min(whole, self.num_slices), dtype=torch.long, device=x.device)
        return counts + (u < width / 2 - whole).long().expand_as(counts) * (whole < self.num_slices)


@contextmanager
def replaced_routers(qmodel: QuantizedModel, make):
    """Every router of ``qmodel`` replaced by ``make(index, router)`` (restored on exit)."""
    saved = {}
    replaced = {}
    try:
        for i, (name, router) in enumerate(qmodel.routers.items()):
            replaced[id(router)] = make(i, router)
        for name, lin in qmodel.linears.items():
            if lin.router is not None:
                saved[name] = lin.router
                lin.router = replaced[id(lin.router)]
        originals = dict(qmodel.routers)
        qmodel.routers = {name: replaced[id(r)] for name, r in originals.items()}
        yield qmodel
    finally:
        for name, router in saved.items():
            qmodel.linears[name].router = router
        if replaced:
            qmodel.routers = originals


def random_routing(qmodel: QuantizedModel, seed: int = 0):
    """Every router a RandomRouter (restored on exit)."""
    return replaced_routers(qmodel, lambda i, r: RandomRouter(r.num_slices, seed + i))


def static_routing(qmodel: QuantizedModel, seed: int = 0):
    """Every router a StaticRouter of its own allocation (restored on exit)."""
    return replaced_routers(qmodel, lambda i, r: StaticRouter(r, seed + i))
