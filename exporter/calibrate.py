"""MoBiQuant calibration: learnable slice-1 clipping, then token-aware routers, block by block.

For each decoder block i (OmniQuant style; weights frozen, AdamW/Adam on a few
parameters, see :mod:`.blockwise` for inputs and targets):

1. **Targets.** The fp32 block on the fp32 stream gives the target output; the same
   pass records E[x_j^2] per input channel of every linear (diagonal Hessian).
2. **Stage 1, clipping of slice 1** per (row, group), lower/upper factors
   ``f = F_MAX sigmoid(theta)`` (:mod:`.fakequant`). Initialized by a separable grid
   search on the diagonal-Hessian-weighted weight error summed over every depth,
   then Adam on the block output error summed over the reads k = 1..S (each depth's
   MSE normalized by its value at the start, weighted by ``depth_weights``), so the
   8-bit read stays near fp32 while the 2- and 4-bit reads improve. The depth-k loss
   uses as block input the stream of the model read at depth max(k, 2) (a 2-bit-only
   stream is far from anything a routed model feeds a block).
3. **Stage 2, routers** (static routing only: token routing refits every router on per-token
   sensitivity after calibration, :mod:`.token_routing`; one per shared linear input) with all slices, straight-
   through prefix gates: forward ``1[score > tau_j]``, backward ``sigmoid((score -
   tau_j) / T)``, where tau_j is the in-batch quantile that gives the water-filling
   fraction of tokens for a target drawn from ``train_targets`` (so the router learns
   a ranking; the thresholds themselves are fitted afterwards), plus a budget term
   pulling the relaxed average bits to that target. The input is the stream of the
   model routed at that target.
4. **Streams** move on: fp32, each depth read, each routed target.

Each finished block is saved to a work dir; re-running resumes after the last one.
Then every linear is sliced with its calibrated (s1, z1) (runtime/format.py), the
routers are loaded, each router's sensitivity to a 2-bit read is measured and decides
where the 2-bit reads of budgets below 4 bits go (:mod:`.allocation`), and the
threshold tables are fitted on calibration text (:func:`.thresholds.fit_thresholds_online`).
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mobiquant.runtime import format as F

from . import fakequant as fq
from . import memory
from .blockwise import (CalibrationError, TrainLinear, WorkDir, calibration_windows, capture_block_inputs,
                        check_finite, run_block, run_block_batched, swap_in, swap_out)
from .qmodel import ROUTED_GROUPS, Router, decoder_layers

LINEAR_NAMES = [name for names in ROUTED_GROUPS.values() for name in names]


@dataclass(frozen=True)
class Recipe:
    name: str
    samples: int  # calibration windows
    seq_len: int  # tokens per window (BOS first)
    batch: int  # windows per optimizer step
    clip_steps: int  # stage-1 steps per block
    clip_lr: float
    router_steps: int  # stage-2 steps per block
    router_lr: float
    depth_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)  # stage-1 weight of the read at k = 1..S
    train_targets: tuple[float, ...] = (2.5, 3.0, 3.5, 5.0)  # stage-2 budgets (bits)
    budget_weight: float = 0.1
    gate_temperature: float = 0.5  # T in units of the batch's score std
    threshold_samples: int = 8  # windows used to fit the threshold tables
    threshold_seq_len: int = 512  # their length: the deployment context (scores drift with position)
    threshold_anchors: tuple[float, ...] = (2.5, 3.0, 3.5, 5.0, 7.0)
    sensitivity_samples: int = 1  # windows probing per-token sensitivity (0: every router reads the budget's bits;
    # each SmolLM2 window costs ~2.5 min of `make demo` on 2 cores; the README's file was refitted with 4)
    routing: str = "token"  # token: routers fitted to rank tokens by sensitivity (token_routing.py); static: none
    router_fit: str = "mlp"  # token routing: ridge (a linear score) or mlp (the router's MLP)
    router_hidden: int = 16  # hidden units of a fitted MLP router
    token_above_base: bool = False  # token routing above 4 bits too (measured: no gain there, router work at run time)
    check_routing: bool = True  # below 4 bits, token routing only at budgets where it beats static on validation text
    device: str = "cpu"  # cpu | cuda | auto (cuda when present); mobiq-export --device overrides it
    seed: int = 0


RECIPES = {
    # ~3 s per SmolLM2 block on 2 CPU cores: the grid search alone (no depth streams); 12 Adam steps on top took
    # ~12 s a block and gave the same PPL (0.99-1.01x at 2.5-8 bits; docs/calibration-log.md, "The fast recipe without gradient steps")
    "fast": Recipe("fast", samples=32, seq_len=256, batch=2, clip_steps=0, clip_lr=5e-3,
                   router_steps=24, router_lr=5e-3, router_fit="ridge"),
    # the paper's budget: 128 x 2048 tokens, 20 epochs (GPU when present)
    "paper": Recipe("paper", samples=128, seq_len=2048, batch=1, clip_steps=20 * 128, clip_lr=5e-3,
                    router_steps=20 * 128, router_lr=1e-3, threshold_samples=32, sensitivity_samples=8,
                    threshold_anchors=(2.25, 2.5, 2.75, 3.0, 3.25, 3.5, 3.75, 4.5, 5.0, 5.5, 6.5, 7.0, 7.5),
                    device="auto"),
}

NAN_HINT = ("try a lower learning rate (Recipe.clip_lr / router_lr), more calibration windows, "
            "or check the calibration text and the float model for NaN/Inf")


def resolve_device(device: str | None, recipe: Recipe) -> torch.device:
    """``device`` (cpu, cuda), else the recipe's; "auto" is cuda when present. CUDA asked for and absent: an error."""
    want = device or recipe.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want not in ("cpu", "cuda"):
        raise CalibrationError(f"[calibrate] device expected cpu, cuda or auto; got {want!r}")
    if want == "cuda" and not torch.cuda.is_available():
        raise CalibrationError("[calibrate] device cuda expected a CUDA GPU; got none (torch.cuda.is_available() is "
                               "False: a CPU build of torch, or no driver): use --device cpu")
    return torch.device(want)


def get_recipe(name: str, **overrides) -> Recipe:
    if name not in RECIPES:
        raise CalibrationError(f"[calibrate] recipe expected one of {', '.join(RECIPES)}; got {name!r}")
    return replace(RECIPES[name], **overrides)


@dataclass
class Calibrated:
    params: dict[str, tuple[np.ndarray, np.ndarray]]  # linear name -> (scales, zero_points) float32
    routers: dict[str, dict[str, torch.Tensor]]  # router name -> state dict
    block_losses: list[dict]  # per block: losses at start/end of each stage
    resumed_at: int = 0  # first block computed by this call (earlier ones came from the work dir)


def stage2_steps(recipe: Recipe) -> int:
    """Stage 2 trains routers only for static routing: token routing refits every router afterwards."""
    return recipe.router_steps if recipe.routing == "static" else 0


def water_fill(bits: float, num_slices: int) -> list[float]:
    """Fraction of tokens that read slice j+1 (j = 1..S-1) for a target of ``bits``."""
    extra = bits / F.SLICE_BITS - 1
    return [float(np.clip(extra - (j - 1), 0.0, 1.0)) for j in range(1, num_slices)]


class StraightThroughGate:
    """Prefix gates of one router for the current target: hard forward, sigmoid backward."""

    def __init__(self, router: Router, num_slices: int, temperature: float):
        self.router, self.num_slices, self.temperature = router, num_slices, temperature
        self.bits = 8.0
        self.soft_bits: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        s = self.router.score(x)
        flat = s.detach().reshape(-1)
        temp = self.temperature * flat.std().clamp_min(1e-6)
        gates, soft_sum = [], torch.zeros((), dtype=s.dtype, device=s.device)
        for p in water_fill(self.bits, self.num_slices):
            if p <= 0 or p >= 1:
                gates.append(torch.full_like(s, float(p >= 1)))
                soft_sum = soft_sum + float(p >= 1)
                continue
            tau = torch.quantile(flat, 1 - p)
            soft = torch.sigmoid((s - tau) / temp)
            hard = (s > tau).to(s.dtype)
            gates.append(hard + soft - soft.detach())
            soft_sum = soft_sum + soft.mean()
        self.soft_bits.append(F.SLICE_BITS * (1 + soft_sum))
        return torch.stack(gates, -1)


def _reads_from_params(w: torch.Tensor, s1: torch.Tensor, z1: torch.Tensor, group_size: int, depth: int) -> torch.Tensor:
    """Exact reads [depth, N, K] (float32) of the float32 slice-1 parameters, as format.py computes them."""
    s64 = s1.double()
    lo = -z1.double() * s64
    return torch.stack([fq.slice_read(w.double(), lo, lo + 4 * s64, group_size, k).float() for k in range(1, depth + 1)])


def _mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b) ** 2).mean()


def calibrate_block(index: int, block: nn.Module, kwargs: dict, x_fp: torch.Tensor, depth_streams: dict[int, torch.Tensor],
                    target_streams: dict[float, torch.Tensor], recipe: Recipe, group_size: int, num_slices: int,
                    router_seed: int, rng: random.Random, bar=None) -> tuple[dict, dict]:
    """Calibrate one block; returns (block params, new streams)."""
    tls = swap_in(block, LINEAR_NAMES)
    try:
        for name, tl in tls.items():
            k = tl.weight.shape[1]
            if k % group_size:
                fits = [g for g in (32, 64, 128, 256) if k % g == 0]
                raise CalibrationError(f"[calibrate] layer layers.{index}.{name} (K={k}) cannot be quantized with "
                                       f"group size {group_size} (sizes that fit: {fits})")
        bs = recipe.batch
        n = len(x_fp)
        # 1. fp32 targets and diagonal Hessians
        for tl in tls.values():
            tl.mode, tl.stats, tl.stats_count = "float", torch.zeros(tl.weight.shape[1], dtype=torch.float64,
                                                                      device=tl.weight.device), 0
        y_fp = run_block_batched(block, x_fp, kwargs, 4 * bs)
        hess = {}
        for name, tl in tls.items():
            hess[name] = (tl.stats / max(tl.stats_count, 1)).float()
            tl.stats = None
        # 2. stage 1: clipping
        clips = {}
        for name, tl in tls.items():
            w = tl.weight.detach()
            f_lo, f_hi = fq.grid_search_factors(w, hess[name], group_size, fq.slice_read, list(recipe.depth_weights))
            clips[name] = fq.LearnableClip(w, group_size, f_lo, f_hi)
        depth = [1]
        for name, tl in tls.items():
            clip = clips[name]
            tl.mode = "read"
            tl.read_fn = (lambda tl=tl, clip=clip: fq.slice_read(tl.weight, *clip.range(), group_size, depth[0]))
        depths = [k for k in range(1, num_slices + 1) if recipe.depth_weights[k - 1] > 0]
        stream_of = {k: depth_streams[min(max(k, 2), num_slices)] for k in depths} if recipe.clip_steps else {}
        opt = torch.optim.Adam([p for c in clips.values() for p in c.parameters()], lr=recipe.clip_lr)
        norms: dict[int, float] = {}
        losses = {"clip_start": None, "clip_end": None, "router_start": None, "router_end": None}
        for step in range(recipe.clip_steps):
            idx = torch.tensor(rng.sample(range(n), min(bs, n)))
            opt.zero_grad()
            total = 0.0
            for k in depths:
                depth[0] = k
                out = run_block(block, stream_of[k][idx], kwargs)
                raw = _mse(out, y_fp[idx])
                if k not in norms:
                    norms[k] = max(raw.item(), 1e-12)
                loss = recipe.depth_weights[k - 1] * raw / norms[k]
                check_finite(loss, index, f"stage-1 (clipping, depth {k})", step, NAN_HINT)
                loss.backward()
                total += loss.item()
            opt.step()
            losses["clip_start"] = losses["clip_start"] if losses["clip_start"] is not None else total
            losses["clip_end"] = total
            if bar is not None:
                bar.set_postfix_str(f"block {index} clip {step + 1}/{recipe.clip_steps} loss {total:.3f}")
        params, reads = {}, {}
        with torch.no_grad():
            for name, tl in tls.items():
                lo, hi = clips[name].range()
                s1, z1 = fq.slice1_params(lo, hi)
                params[name] = (s1, z1)
                reads[name] = _reads_from_params(tl.weight.detach(), s1, z1, group_size, num_slices)
        # 3. stage 2: routers
        routers, gates = {}, {}
        for j, (group, names) in enumerate(ROUTED_GROUPS.items()):
            router = Router(tls[names[0]].weight.shape[1], num_slices, seed=router_seed + j).to(tls[names[0]].weight.device)
            gate = StraightThroughGate(router, num_slices, recipe.gate_temperature)
            routers[group], gates[group] = router, gate
            for name in names:
                tls[name].mode, tls[name].reads, tls[name].gate_fn = "routed", reads[name], gate
        ropt = torch.optim.Adam([p for r in routers.values() for p in r.parameters()], lr=recipe.router_lr)
        rnorms: dict[float, float] = {}
        for step in range(stage2_steps(recipe)):
            bits = recipe.train_targets[step % len(recipe.train_targets)]
            idx = torch.tensor(rng.sample(range(n), min(bs, n)))
            for g in gates.values():
                g.bits, g.soft_bits = bits, []
            ropt.zero_grad()
            out = run_block(block, target_streams[bits][idx], kwargs)
            raw = _mse(out, y_fp[idx])
            if bits not in rnorms:
                rnorms[bits] = max(raw.item(), 1e-12)
            soft = torch.stack([b for g in gates.values() for b in g.soft_bits])
            budget = (((soft - bits) / F.SLICE_BITS) ** 2).mean()
            loss = raw / rnorms[bits] + recipe.budget_weight * budget
            check_finite(loss, index, f"stage-2 (routers, {bits} bits)", step, NAN_HINT)
            loss.backward()
            ropt.step()
            losses["router_start"] = losses["router_start"] if losses["router_start"] is not None else loss.item()
            losses["router_end"] = loss.item()
            if bar is not None:
                bar.set_postfix_str(f"block {index} router {step + 1}/{recipe.router_steps} loss {loss.item():.3f}")
        # 4. streams move on
        with torch.no_grad():
            new_depth = {}
            for k, xs in depth_streams.items():
                for name, tl in tls.items():
                    tl.mode, tl.fixed = "fixed", reads[name][k - 1]
                new_depth[k] = run_block_batched(block, xs, kwargs, 4 * bs)
            new_target = {}
            for name, tl in tls.items():
                tl.mode = "routed"
            for bits, xs in target_streams.items():
                for g in gates.values():
                    g.bits = bits
                new_target[bits] = run_block_batched(block, xs, kwargs, 4 * bs)
    finally:
        swap_out(block, tls)
        for tl in tls.values():  # read_fn and gate_fn close over tl: a cycle that would keep this block's reads
            tl.read_fn = tl.gate_fn = tl.reads = tl.fixed = None  # (4 floats per weight) until a full gc pass
    block_params = {
        "params": {name: (s1.cpu().numpy(), z1.cpu().numpy()) for name, (s1, z1) in params.items()},
        "routers": {group: {k: v.detach().clone() for k, v in r.state_dict().items()} for group, r in routers.items()},
        "losses": losses,
    }
    return block_params, {"fp": y_fp, "depth": new_depth, "target": new_target}


def calibrate_model(model: nn.Module, tokens: torch.Tensor, recipe: Recipe, group_size: int,
                    num_slices: int = F.DEFAULT_NUM_SLICES, work: WorkDir | None = None,
                    progress: bool = True, max_blocks: int | None = None) -> Calibrated:
    """Calibrate every decoder block of the float ``model`` (left unchanged) on ``tokens`` [n, T].

    ``max_blocks`` stops after that many blocks (as an interrupted run would; the
    work dir then holds them and the next call resumes)."""
    from tqdm import tqdm

    if len(recipe.depth_weights) != num_slices:
        raise CalibrationError(f"[calibrate] depth_weights expected {num_slices} values; got {recipe.depth_weights}")
    torch.manual_seed(recipe.seed)
    rng = random.Random(recipe.seed)
    layers = decoder_layers(model)
    with torch.no_grad():
        x0, layer_kwargs = capture_block_inputs(model, tokens)
    start, state = work.resume() if work is not None else (0, None)
    if state is None:
        start = 0
        state = {"fp": x0, "depth": {k: x0 for k in range(2, num_slices + 1)} if recipe.clip_steps else {},
                 "target": {b: x0 for b in recipe.train_targets} if stage2_steps(recipe) else {}}
    else:
        rng.seed(recipe.seed + start)
    blocks = [work.load_block(i) for i in range(start)] if work is not None else []
    t0 = time.time()
    bar = tqdm(range(len(layers)), initial=start, total=len(layers), desc="calibrate", unit="block",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    if start:
        bar.write(f"[calibrate] resuming at block {start} from {work.path}")
    for i in range(start, len(layers) if max_blocks is None else min(max_blocks, len(layers))):
        for p in layers[i].parameters():
            p.requires_grad_(False)
        bp, state = calibrate_block(i, layers[i], layer_kwargs[i], state["fp"], state["depth"], state["target"], recipe,
                                    group_size, num_slices, router_seed=4 * i, rng=rng, bar=bar)
        blocks.append(bp)
        if work is not None:
            work.save_block(i, bp, state)
        bar.update(1)
        clip_loss, router_loss = bp['losses']['clip_end'], bp['losses']['router_end']
        bar.set_postfix_str(f"block {i} {'' if clip_loss is None else f'clip {clip_loss:.3f} '}"
                            f"{'' if router_loss is None else f'router {router_loss:.3f} '}"
                            f"elapsed {time.time() - t0:.0f}s, peak {memory.peak_mb():.0f} MiB")
    bar.close()
    params, routers = {}, {}
    for i, bp in enumerate(blocks):
        for name, p in bp["params"].items():
            params[f"layers.{i}.{name}"] = p
        for group, st in bp["routers"].items():
            routers[f"layers.{i}.{group}"] = st
    return Calibrated(params, routers, [bp["losses"] for bp in blocks], resumed_at=start)


def recipe_dict(recipe: Recipe) -> dict:
    return asdict(recipe)
