"""Fit each router's threshold table so that average bits hit every grid value.

For a target of b bits a token reads b/2 slices on average, i.e. E = b/2 - 1 slices
beyond the first. Thresholds are quantiles of the router's scores on calibration
tokens ("water filling"): the fraction p_j = clip(E - (j - 1), 0, 1) of tokens
scores above tau_j, so the top-scoring tokens get the most slices and the mean
number of extra slices is sum_j p_j = E.
"""

from __future__ import annotations

import numpy as np
import torch

from .qmodel import THRESHOLD_GRID, Router

NEVER = 1e30  # a threshold no score passes (p_j = 0) — finite, so ONNX and torch agree


def fit_router(router: Router, scores: np.ndarray) -> None:
    """Fill router.thresholds [grid, S-1] from calibration scores."""
    s = np.sort(scores.astype(np.float64))
    table = np.empty((len(THRESHOLD_GRID), router.num_slices - 1))
    for row, bits in enumerate(THRESHOLD_GRID):
        extra = bits / 2 - 1
        for j in range(1, router.num_slices):
            p = float(np.clip(extra - (j - 1), 0.0, 1.0))
            if p <= 0:
                table[row, j - 1] = NEVER
            elif p >= 1:
                table[row, j - 1] = -NEVER
            else:
                # the (1-p) quantile: tokens strictly above it are the top p fraction
                idx = min(int(np.floor((1 - p) * len(s))), len(s) - 1)
                table[row, j - 1] = s[idx] if idx == 0 else 0.5 * (s[idx - 1] + s[idx])
    router.thresholds.copy_(torch.from_numpy(table).float())


@torch.no_grad()
def fit_thresholds(qmodel, token_batches: list[torch.Tensor], record_bits: float = 8.0) -> None:
    """Record every router's scores over ``token_batches`` (at ``record_bits``) and fit its table."""
    qmodel.set_target_bits(record_bits)
    for r in qmodel.routers.values():
        r.record = []
    try:
        for ids in token_batches:
            qmodel.model(input_ids=ids)
        for r in qmodel.routers.values():
            fit_router(r, torch.cat(r.record).numpy())
    finally:
        for r in qmodel.routers.values():
            r.record = None
