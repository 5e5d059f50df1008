"""Where the bits go below the uniform 4-bit read: a per-router allocation from measured sensitivity.

Below 4 bits some weights must be read with slice 1 alone (2 bits), and on a small
model a 2-bit read costs very different amounts in different places (layer 0's MLP
input costs ~10x a middle layer's attention input). One quantile per router (every
router at b bits) spends the 2-bit reads evenly; here each router's **sensitivity**
is measured once on calibration text — the KL divergence of the next-token
distribution when that router alone reads one slice while all others read the base
(4 bits) — and a budget b below the base is met by taking routers in order of
sensitivity per weight, least first, down to one slice until the saved bits cover
``base - b``; the router at the boundary keeps its top-scoring tokens at the base
(water-filling over its own scores). The order is fixed, so lowering b only ever
removes slices, and at and above the base the read stays uniform.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

from mobiquant.runtime import format as F

from .qmodel import ROUTED_GROUPS, QuantizedModel, grid_index
from .thresholds import NEVER

BASE_BITS = 4.0


def router_sizes(qmodel: QuantizedModel) -> dict[str, int]:
    """Weights each router's counts apply to (the weight of its reads in the average bits)."""
    sizes = {}
    for name in qmodel.routers:
        layer, group = name.rsplit(".", 1)
        sizes[name] = sum(int(np.prod(qmodel.linears[f"{layer}.{lin}"].deltas.shape[1:])) for lin in ROUTED_GROUPS[group])
    return sizes


@torch.no_grad()
def router_sensitivity(qmodel: QuantizedModel, tokens: torch.Tensor, base: float = BASE_BITS,
                       progress: bool = True) -> dict[str, float]:
    """KL(base read || base read with router r at one slice) per router, mean over ``tokens`` [n, T]."""
    row = grid_index(base)
    qmodel.set_target_bits(base)

    def log_probs() -> torch.Tensor:
        return torch.log_softmax(qmodel.model(input_ids=tokens).logits.float(), -1)

    reference = log_probs()
    p = reference.exp()
    sensitivity = {}
    t0 = time.time()
    try:
        for i, (name, router) in enumerate(qmodel.routers.items()):
            saved = router.thresholds[row].clone()
            router.thresholds[row] = NEVER  # no token passes: slice 1 only
            try:
                sensitivity[name] = float((p * (reference - log_probs())).sum(-1).mean())
            finally:
                router.thresholds[row] = saved
            if progress:
                print(f"\r[allocation] sensitivity {i + 1}/{len(qmodel.routers)} {name}: KL {sensitivity[name]:.4f} "
                      f"({time.time() - t0:.0f}s)", end="", file=sys.stderr, flush=True)
    finally:
        if progress:
            print(file=sys.stderr)
    return sensitivity


def allocation_order(sensitivity: dict[str, float], sizes: dict[str, int]) -> list[str]:
    """Routers in the order they give up slices: least KL per weight first."""
    return sorted(sensitivity, key=lambda name: (sensitivity[name] / sizes[name], name))


def allocate(order: list[str], sizes: dict[str, int], bits: float, base: float = BASE_BITS) -> dict[str, float]:
    """Average bits per router so that the weight-weighted average is ``bits`` (uniform at or above ``base``)."""
    if bits >= base:
        return {name: float(bits) for name in order}
    floor = float(F.SLICE_BITS)
    to_save = sum(sizes.values()) * (base - max(bits, floor))  # bit-weights below the base read
    out = {}
    for name in order:
        cut = min(to_save, sizes[name] * (base - floor))
        out[name] = base - cut / sizes[name]
        to_save -= cut
    return out
