"""Whether the LM head follows the budget, decided per model at export (docs/design.md, "The LM head").

On a large vocabulary the head is most of what a decode step reads (Gemma-3-270M: 168 MB at 8 bits beside ~56 MB
for all its layers at 4.5 bits); on a small one it is not (SmolLM2: 28 MB beside 53 MB at 4 bits). For each named
budget below max, the validation perplexity with the head at k < S slices is measured in PyTorch on the windows
that chose the budgets (its ratio to the full head's, applied to the file's own perplexity), beside the share of
weight bytes per token it saves. The head reads k slices at that budget when

- the budget's perplexity stays within its band of max (:data:`budgets.BANDS`), and
- the perplexity it costs is at most ``HEAD_PAYBACK`` x the share of bytes per token it saves (decode time follows
  the bytes read; a quarter is a policy: SmolLM2's 4-bit head, +8.5 % PPL for 17 % fewer bytes, does not pass it,
  its 6-bit head, +0.0-0.3 % for 7-9 %, does).

The depth per named budget becomes a constant router on the head (``QuantizedModel.set_head_slices``): a budget
between two names reads the lower name's depth, max reads every slice.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch

from mobiquant.runtime import format as F

from .budgets import BANDS
from .evaluate import nll_from_hidden
from .qmodel import THRESHOLD_GRID, QuantizedModel

HEAD_PAYBACK = 0.25
MIN_HEAD_SLICES = 2  # a 2-bit head is never considered


@torch.no_grad()
def head_ratios(qmodel: QuantizedModel, windows: np.ndarray, budgets: dict[str, float],
                depths: list[int]) -> dict[str, dict[int, float]]:
    """Per budget name and head depth k: validation PPL with the head at k slices / with all S, in PyTorch."""
    model, head = qmodel.model, qmodel.linears["lm_head"]
    saved = head.router, head.fixed_slices
    ratios = {}
    try:
        head.router = None
        for name, bits in budgets.items():
            qmodel.set_target_bits(bits)
            ids = [torch.from_numpy(w) for w in windows]
            hidden = [model.model(input_ids=w[None]).last_hidden_state[0, :-1] for w in ids]
            nll = {}
            for k in [*depths, head.num_slices]:
                head.fixed_slices = k
                nll[k] = sum(nll_from_hidden(model, h, w[1:]) for h, w in zip(hidden, ids))
            count = sum(len(h) for h in hidden)
            ratios[name] = {k: math.exp((nll[k] - nll[head.num_slices]) / count) for k in depths}
    finally:
        head.router, head.fixed_slices = saved
    return ratios


def byte_share_saved(qmodel: QuantizedModel, bits: float, k: int) -> float:
    """Share of the weight bytes a decode step reads at ``bits`` (head at all slices) that a k-slice head saves."""
    head = qmodel.linears["lm_head"].sliced
    head_weights = head.out_features * head.in_features
    layer_weights = sum(lin.sliced.out_features * lin.sliced.in_features for name, lin in qmodel.linears.items()
                        if name != "lm_head")
    full = head_weights * F.SLICE_BITS * head.num_slices
    return head_weights * F.SLICE_BITS * (head.num_slices - k) / (layer_weights * bits + full)


def decide(qmodel: QuantizedModel, windows: np.ndarray, named: dict[str, float],
           ppl: dict[float, float]) -> tuple[dict[str, int], dict]:
    """(head slices per named budget, the measurements behind it). ``ppl``: the file's PPL per budget (bits)."""
    full = qmodel.linears["lm_head"].num_slices
    depths = list(range(MIN_HEAD_SLICES, full))
    below = {name: bits for name, bits in named.items() if name in BANDS and bits < named["max"]}
    ratios = head_ratios(qmodel, windows, below, depths) if depths and below else {}
    choice, report, floor = {"max": full}, {}, MIN_HEAD_SLICES
    for name, bits in sorted(below.items(), key=lambda item: item[1]):
        rows = {}
        for k in depths:
            cost, saved = ratios[name][k] - 1, byte_share_saved(qmodel, bits, k)
            within = ppl[bits] * ratios[name][k] <= BANDS[name] * ppl[named["max"]]
            rows[k] = {"ppl_ratio": round(ratios[name][k], 4), "bytes_saved_share": round(saved, 4),
                       "within_band": within, "pays": within and cost <= HEAD_PAYBACK * saved}
        choice[name] = max(floor, next((k for k in depths if rows[k]["pays"]), full))
        floor = choice[name]  # more bits never read a smaller head
        report[name] = {"bits": bits, "head_slices": choice[name], "by_slices": {str(k): r for k, r in rows.items()}}
        print(f"[head] {name} ({bits:g} bits): " + ", ".join(
            f"{2 * k}-bit head PPL x{r['ppl_ratio']:.3f} for {100 * r['bytes_saved_share']:.0f} % fewer bytes"
            f"{' (pays)' if r['pays'] else ''}" for k, r in rows.items()) + f" -> {2 * choice[name]}-bit head",
              file=sys.stderr, flush=True)
    for name in named:
        choice.setdefault(name, full)
    return choice, report


def slices_per_row(choice: dict[str, int], named: dict[str, float], num_slices: int) -> np.ndarray:
    """Head slices at every threshold-grid row: the depth of the highest named budget at or below the row's bits
    (the lowest name's below all of them), every slice from max up."""
    steps = sorted((bits, choice[name]) for name, bits in named.items() if name != "max")
    rows = np.full(len(THRESHOLD_GRID), num_slices, np.int64)
    for g, bits in enumerate(THRESHOLD_GRID):
        if bits < named["max"] and steps:
            rows[g] = next((k for b, k in reversed(steps) if b <= bits + 1e-9), steps[0][1])
    return rows
