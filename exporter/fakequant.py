"""Differentiable (fake) quantizers in torch: MoBiSlice reads and uniform b-bit PTQ/RTN.

MoBiSlice read at depth k, in closed form. With slice 1's range starting at
``lo = -z1 s1`` and ``s_k = s1 / 4^(k-1)``, the recursive residual slices of
runtime/format.py reconstruct exactly a floor-aligned uniform 2k-bit quantizer
over ``[lo, lo + 4 s1]`` with bin-centre levels (weights outside the range
saturate to the end codes at every depth)::

    W^(k) = lo + s_k (clamp(floor((W - lo) / s_k), 0, 4^k - 1) + 1/2)

``floor`` uses a straight-through gradient, so the range (learnable clipping) gets
gradients from the saturated weights and from the rounding error, as in
OmniQuant's LWC. The test suite checks this against ``format.quantize``.

Clipping is parameterized per (row, group) around the group midpoint::

    lo = mid - f_lo (mid - min),   hi = mid + f_hi (max - mid),   f = F_MAX sigmoid(theta)

F_MAX > 1 lets the range also widen a little (a bin-centre grid can then align
with an end-point grid), f = 1 is plain min/max.

The uniform b-bit baseline (PTQ with learned clipping, RTN without) is the usual
asymmetric quantizer with an integer zero point: ``s = (hi - lo) / (2^b - 1)``,
``z = round(-lo / s)``, ``W^ = s (clamp(round(W / s) + z, 0, 2^b - 1) - z)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

F_MAX = 1.1  # upper bound of a clip factor (1 = min/max)
_EPS = 1e-8


def _floor_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.floor(x) - x).detach()


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K] -> [N, K/g, g]."""
    n, k = w.shape
    return w.reshape(n, k // group_size, group_size)


def group_minmax(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = grouped(w, group_size)
    return g.amin(-1), g.amax(-1)


def factor_to_theta(f: torch.Tensor) -> torch.Tensor:
    """Inverse of f = F_MAX sigmoid(theta)."""
    p = (f / F_MAX).clamp(1e-4, 1 - 1e-4)
    return torch.log(p / (1 - p))


def clip_range(wmin: torch.Tensor, wmax: torch.Tensor, f_lo: torch.Tensor, f_hi: torch.Tensor):
    mid = 0.5 * (wmin + wmax)
    lo = mid - f_lo * (mid - wmin)
    hi = mid + f_hi * (wmax - mid)
    return lo, torch.maximum(hi, lo + _EPS)


def slice_read(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    """MoBiSlice read W^(k) [N, K] for slice-1 range [lo, hi] per (row, group) [N, K/g]."""
    s = ((hi - lo) / 4.0 / 4.0 ** (k - 1)).unsqueeze(-1)
    lo = lo.unsqueeze(-1)
    g = grouped(w, group_size)
    q = torch.clamp(_floor_ste((g - lo) / s), 0, 4**k - 1)
    return (lo + s * (q + 0.5)).reshape(w.shape)


def slice_reads(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, group_size: int, depth: int) -> list[torch.Tensor]:
    return [slice_read(w, lo, hi, group_size, k) for k in range(1, depth + 1)]


def uniform_read(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, group_size: int, bits: int) -> torch.Tensor:
    """Asymmetric b-bit quantizer with integer zero point over [lo, hi] (PTQ/RTN baseline)."""
    levels = 2**bits - 1
    s = ((hi - lo) / levels).clamp_min(_EPS).unsqueeze(-1)
    z = _round_ste(-lo.unsqueeze(-1) / s)
    g = grouped(w, group_size)
    q = torch.clamp(_round_ste(g / s) + z, 0, levels)
    return (s * (q - z)).reshape(w.shape)


def top_bits_read(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, group_size: int, bits: int,
                  of_bits: int = 8) -> torch.Tensor:
    """The top ``bits`` of an ``of_bits`` uniform code, reconstructed at the centre of the coarse bin."""
    levels = 2**of_bits - 1
    s = ((hi - lo) / levels).clamp_min(_EPS).unsqueeze(-1)
    z = torch.round(-lo.unsqueeze(-1) / s)
    g = grouped(w, group_size)
    q = torch.clamp(torch.round(g / s) + z, 0, levels)
    shift = 2 ** (of_bits - bits)
    coarse = torch.floor(q / shift) * shift + (shift - 1) / 2.0
    return (s * (coarse - z)).reshape(w.shape)


def slice1_params(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """format.py parameters (s1, z1) float32 for the range [lo, hi]: s1 = range/4, z1 = -lo/s1."""
    lo64, hi64 = lo.double(), hi.double()
    s1 = ((hi64 - lo64) / 4).clamp_min(1e-30)
    z1 = -lo64 / s1
    return s1.float(), z1.float()


class LearnableClip(nn.Module):
    """Per (row, group) lower/upper clip factors of one weight, f = F_MAX sigmoid(theta)."""

    def __init__(self, weight: torch.Tensor, group_size: int, f_lo: torch.Tensor | None = None,
                 f_hi: torch.Tensor | None = None):
        super().__init__()
        self.group_size = group_size
        wmin, wmax = group_minmax(weight.detach(), group_size)
        self.register_buffer("wmin", wmin)
        self.register_buffer("wmax", wmax)
        one = torch.ones_like(wmin)
        self.theta_lo = nn.Parameter(factor_to_theta(one if f_lo is None else f_lo))
        self.theta_hi = nn.Parameter(factor_to_theta(one if f_hi is None else f_hi))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return F_MAX * torch.sigmoid(self.theta_lo), F_MAX * torch.sigmoid(self.theta_hi)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        f_lo, f_hi = self.factors()
        return clip_range(self.wmin, self.wmax, f_lo, f_hi)


@torch.no_grad()
def grid_search_factors(w: torch.Tensor, h: torch.Tensor, group_size: int, read, weights: list[float],
                        grid: tuple[float, ...] = (0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0, 1.033, 1.067, 1.1),
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (row, group) clip factors minimizing sum_k weights[k] * E_k / E_k(minmax), E_k the
    diagonal-Hessian-weighted error sum_j h_j (W - W^_k)^2 of read(w, lo, hi, k) (k = 1..len(weights)).

    A cheap, separable initialization for the gradient stage: first one shared factor
    for both ends, then each end on its own.
    """
    wmin, wmax = group_minmax(w, group_size)
    hg = grouped(h.expand_as(w), group_size)
    wg = grouped(w, group_size)
    depths = [i for i, c in enumerate(weights) if c > 0]

    def errors(f_lo, f_hi):  # [len(depths), N, G]
        lo, hi = clip_range(wmin, wmax, f_lo, f_hi)
        return torch.stack([((grouped(read(w, lo, hi, group_size, d + 1), group_size) - wg) ** 2 * hg).sum(-1)
                            for d in depths])

    one = torch.ones_like(wmin)
    base = errors(one, one)
    norm = torch.tensor([weights[d] for d in depths], device=base.device).view(-1, 1, 1) / base.sum((1, 2), keepdim=True).clamp_min(1e-30)

    def objective(f_lo, f_hi):
        return (errors(f_lo, f_hi) * norm).sum(0)

    best_lo, best_hi = one.clone(), one.clone()
    best = objective(one, one)
    for f in grid:  # shared factor
        obj = objective(one * f, one * f)
        better = obj < best
        best = torch.where(better, obj, best)
        best_lo = torch.where(better, one * f, best_lo)
        best_hi = torch.where(better, one * f, best_hi)
    for side in (0, 1):  # each end alone
        for f in grid:
            cand_lo = one * f if side == 0 else best_lo
            cand_hi = one * f if side == 1 else best_hi
            obj = objective(cand_lo, cand_hi)
            better = obj < best
            best = torch.where(better, obj, best)
            best_lo = torch.where(better, cand_lo, best_lo)
            best_hi = torch.where(better, cand_hi, best_hi)
    return best_lo, best_hi


def num_groups(k: int, group_size: int) -> int:
    return math.ceil(k / group_size)
