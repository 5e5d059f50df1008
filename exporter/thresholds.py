"""Fit each router's threshold table so that average bits hit every grid value.

For a target of b bits a token reads b/2 slices on average, i.e. E = b/2 - 1 slices
beyond the first. Thresholds are quantiles of the router's scores on calibration
tokens ("water filling"): the fraction p_j = clip(E - (j - 1), 0, 1) of tokens
scores above tau_j, so the top-scoring tokens get the most slices and the mean
number of extra slices is sum_j p_j = E.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from mobiquant.runtime import ops

from .qmodel import THRESHOLD_GRID, QuantizedModel, Router

NEVER = ops.THRESHOLD_NEVER  # a threshold no score passes (p_j = 0) — finite, so ONNX and torch agree


def fit_router(router: Router, scores: np.ndarray) -> None:
    """Fill router.thresholds [grid, S-1] from calibration scores."""
    table = threshold_rows(scores, router.num_slices, THRESHOLD_GRID)
    router.thresholds.copy_(torch.from_numpy(table).float())


def threshold_rows(scores: np.ndarray, num_slices: int, bits: np.ndarray) -> np.ndarray:
    """Water-filling thresholds [len(bits), S-1] for the targets ``bits`` from calibration ``scores``."""
    s = np.sort(np.asarray(scores, dtype=np.float64).reshape(-1))
    table = np.empty((len(bits), num_slices - 1))
    for row, b in enumerate(bits):
        extra = b / 2 - 1
        for j in range(1, num_slices):
            p = float(np.clip(extra - (j - 1), 0.0, 1.0))
            p = 0.0 if p < 1e-9 else 1.0 if p > 1 - 1e-9 else p  # float noise of an even width: a constant row
            if p <= 0:
                table[row, j - 1] = NEVER
            elif p >= 1:
                table[row, j - 1] = -NEVER
            else:
                # the (1-p) quantile: tokens strictly above it are the top p fraction
                idx = min(int(np.floor((1 - p) * len(s))), len(s) - 1)
                table[row, j - 1] = s[idx] if idx == 0 else 0.5 * (s[idx - 1] + s[idx])
    return table


def record_widths(qmodel: QuantizedModel, allocation) -> None:
    """Each router's own average bits at every grid row (the budget's bits without an allocation)."""
    rows = [allocation(float(b)) if allocation else None for b in THRESHOLD_GRID]
    for name, router in qmodel.routers.items():
        router.widths.copy_(torch.tensor([row[name] if row else b for row, b in zip(rows, THRESHOLD_GRID)]))


@torch.no_grad()
def fit_thresholds(qmodel, token_batches: list[torch.Tensor], record_bits: float = 8.0) -> None:
    """Record every router's scores over ``token_batches`` (at ``record_bits``) and fit its table."""
    qmodel.set_target_bits(record_bits)
    for r in qmodel.routers.values():
        r.record = []
    try:
        for ids in token_batches:
            qmodel.model.model(input_ids=ids)  # the decoder only: the LM head does not route
        for r in qmodel.routers.values():
            fit_router(r, torch.cat(r.record).cpu().numpy())
    finally:
        for r in qmodel.routers.values():
            r.record = None


@torch.no_grad()
def fit_thresholds_online(qmodel, tokens: torch.Tensor, anchors: tuple[float, ...],
                          allocation: Callable[[float], dict[str, float]] | None = None) -> dict[float, float]:
    """Fit every router's table with the routers upstream already running at the target.

    Scores recorded at 8 bits (:func:`fit_thresholds`) drift at low budgets: the input
    of block i changes when the blocks before it read fewer slices. Here, for each
    anchor budget b, one pass over ``tokens`` [n, T] (one batch, so each quantile is
    over all tokens) lets every router, in order, set its own row for b to the
    water-filling quantiles of its current scores before it is applied, and records
    those scores. Each grid row is then fitted from the scores of the nearest anchor
    in the same interval between even widths (2-4, 4-6, 6-8; rows at even widths
    need no scores). ``allocation(b)`` gives each router its own average bits for a budget b
    (:mod:`.allocation`); without it every router reads b. Returns {anchor: average bits
    measured in its pass}.
    """
    from .qmodel import BITS_MAX, THRESHOLD_GRID, grid_index

    routers = qmodel.routers
    allocation = allocation or (lambda b: {name: b for name in routers})
    recorded: dict[float, dict[str, np.ndarray]] = {}
    measured: dict[float, float] = {}
    for bits in anchors:
        row, own = grid_index(bits), allocation(bits)
        scores: dict[str, np.ndarray] = {}
        handles = []
        for name, router in routers.items():
            def hook(module, args, name=name):
                if name in scores:  # q/k/v call their shared router with the same input
                    return
                s = module.score(args[0]).reshape(-1).cpu().numpy()
                scores[name] = s
                module.thresholds[row] = torch.from_numpy(
                    threshold_rows(s, module.num_slices, np.array([own[name]]))[0]).float()
            handles.append(router.register_forward_pre_hook(hook))
        qmodel.set_target_bits(bits)
        qmodel.start_bits_log()
        try:
            qmodel.model.model(input_ids=tokens)  # the decoder only: the LM head does not route
        finally:
            for h in handles:
                h.remove()
        measured[bits] = qmodel.average_bits()
        recorded[bits] = scores
    for lin in qmodel.linears.values():
        lin.bits_log = None
    tables = {name: np.empty((len(THRESHOLD_GRID), router.num_slices - 1)) for name, router in routers.items()}
    for row, bits in enumerate(THRESHOLD_GRID):
        same = [a for a in anchors if np.floor(a / 2) == np.floor(bits / 2)] or list(anchors)
        src, own = recorded[min(same, key=lambda a: abs(a - bits))], allocation(float(bits))
        for name, router in routers.items():
            tables[name][row] = threshold_rows(src[name], router.num_slices, np.array([own[name]]))[0]
    for name, router in routers.items():
        router.thresholds.copy_(torch.from_numpy(tables[name]).float())
    qmodel.set_target_bits(BITS_MAX)
    return measured
