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


GRID_CHUNK_ELEMENTS = 1 << 16  # weights searched at once: a chunk's temporaries stay in cache (256 KB each)


@torch.no_grad()
def grid_search_factors(w: torch.Tensor, h: torch.Tensor, group_size: int, read, weights: list[float],
                        grid: tuple[float, ...] = (0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0, 1.033, 1.067, 1.1),
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (row, group) clip factors minimizing sum_k weights[k] * E_k / E_k(minmax), E_k the
    diagonal-Hessian-weighted error sum_j h_j (W - W^_k)^2 of read(w, lo, hi, k) (k = 1..len(weights)).

    A cheap, separable initialization for the gradient stage: first one shared factor
    for both ends, then each end on its own. Every (row, group) is independent but for the
    normalization E_k(minmax) over the whole weight, so the search runs over chunks of rows
    (GRID_CHUNK_ELEMENTS weights) with that normalization computed first: the same result,
    with a chunk's temporaries in cache instead of memory (a 1B model's MLP weights are 67 MB).
    """
    h = h.expand_as(w)
    depths = [i for i, c in enumerate(weights) if c > 0]
    rows = max(1, GRID_CHUNK_ELEMENTS // w.shape[1])
    chunks = [(w[i: i + rows], h[i: i + rows]) for i in range(0, w.shape[0], rows)]

    def errors(wc, hc, f_lo, f_hi):  # [len(depths), n, G]
        wmin, wmax = group_minmax(wc, group_size)
        lo, hi = clip_range(wmin, wmax, f_lo, f_hi)
        wg, hg = grouped(wc, group_size), grouped(hc, group_size)
        return torch.stack([((grouped(read(wc, lo, hi, group_size, d + 1), group_size) - wg) ** 2 * hg).sum(-1)
                            for d in depths])

    ones = [torch.ones(wc.shape[0], wc.shape[1] // group_size, dtype=w.dtype, device=w.device) for wc, _ in chunks]
    base = sum(errors(wc, hc, one, one).sum((1, 2)) for (wc, hc), one in zip(chunks, ones))
    norm = torch.tensor([weights[d] for d in depths], device=w.device).view(-1, 1, 1) / base.view(-1, 1, 1).clamp_min(1e-30)
    found = [_grid_search_chunk(lambda lo, hi, wc=wc, hc=hc: (errors(wc, hc, lo, hi) * norm).sum(0), one, grid)
             for (wc, hc), one in zip(chunks, ones)]
    return torch.cat([lo for lo, _ in found]), torch.cat([hi for _, hi in found])


def _grid_search_chunk(objective, one: torch.Tensor, grid: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
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
