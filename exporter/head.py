"""Whether the LM head follows the budget, decided per model at export (docs/design.md, "The LM head").

On a large vocabulary the head is most of what a decode step reads (Gemma-3-270M: 168 MB at 8 bits beside ~56 MB
for all its layers at 4.5 bits); on a small one it is not (SmolLM2: 28 MB beside 53 MB at 4 bits). For each named
budget below max, the validation perplexity with the head at k < S slices is measured in PyTorch on the windows
that chose the budgets (its ratio to the full head's, applied to the file's own perplexity), beside the share of
weight bytes per token it saves. A (bits, head depth) pair is admissible for a name when

- its perplexity stays within the name's band of max (:data:`budgets.BANDS`), and
- a head below full depth costs at most ``HEAD_PAYBACK`` x the share of bytes per token it saves (decode time
  follows the bytes read; a quarter is a policy: SmolLM2's 4-bit head, +8.5 % PPL for 17 % fewer bytes, does not
  pass it, its 6-bit head, +0.0-0.3 % for 7-9 %, does).

Bits and depth are chosen together: each name takes the admissible pair that reads the fewest weight bits per
token among the measured budgets from its fewest bits in band up to ``CANDIDATE_SPAN`` more. A name at the edge of
its band (Gemma-3-270M's mid: 5 bits at 1.098x max) cannot drop a head slice there, but half a bit more can, and
then reads fewer bytes in all (5.5 bits with a 6-bit head: 1,558 against 1,844 Mbit a token). A higher name never
reads fewer bits or a smaller head than a lower one. The depth per named budget becomes a constant router on the
head (``QuantizedModel.set_head_slices``): a budget between two names reads the lower name's depth, max reads
every slice.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch

from mobiquant.runtime import format as F

from .budgets import BANDS, CANDIDATES
from .evaluate import nll_from_hidden
from .qmodel import THRESHOLD_GRID, QuantizedModel

HEAD_PAYBACK = 0.25
MIN_HEAD_SLICES = 2  # a 2-bit head is never considered
CANDIDATE_SPAN = 1.0  # a name may read up to this many bits more than its fewest in band, where that reads less


@torch.no_grad()
def head_ratios(qmodel: QuantizedModel, windows: np.ndarray, budgets: list[float],
                depths: list[int]) -> dict[float, dict[int, float]]:
    """Per budget (bits) and head depth k: validation PPL with the head at k slices / with all S, in PyTorch."""
    model, head = qmodel.model, qmodel.linears["lm_head"]
    saved = head.router, head.fixed_slices
    ratios = {}
    try:
        head.router = None
        for bits in budgets:
            qmodel.set_target_bits(bits)
            ids = [torch.from_numpy(w) for w in windows]
            hidden = [model.model(input_ids=w[None]).last_hidden_state[0, :-1] for w in ids]
            nll = {}
            for k in [*depths, head.num_slices]:
                head.fixed_slices = k
                nll[k] = sum(nll_from_hidden(model, h, w[1:]) for h, w in zip(hidden, ids))
            count = sum(len(h) for h in hidden)
            ratios[bits] = {k: math.exp((nll[k] - nll[head.num_slices]) / count) for k in depths}
    finally:
        head.router, head.fixed_slices = saved
    return ratios


def _weights(qmodel: QuantizedModel) -> tuple[int, int]:
    """(weights of the LM head, weights of every other sliced linear)."""
    head = qmodel.linears["lm_head"].sliced
    layers = sum(lin.sliced.out_features * lin.sliced.in_features for name, lin in qmodel.linears.items()
                 if name != "lm_head")
    return head.out_features * head.in_features, layers


def step_bits(qmodel: QuantizedModel, bits: float, k: int) -> float:
    """Weight bits a decode step reads at ``bits`` with a k-slice head."""
    head, layers = _weights(qmodel)
    return layers * bits + head * F.SLICE_BITS * k


def byte_share_saved(qmodel: QuantizedModel, bits: float, k: int) -> float:
    """Share of the weight bytes a decode step reads at ``bits`` (head at all slices) that a k-slice head saves."""
    full = qmodel.linears["lm_head"].num_slices
    return 1.0 - step_bits(qmodel, bits, k) / step_bits(qmodel, bits, full)


def candidate_bits(named: dict[str, float], measured) -> dict[str, list[float]]:
    """Per name below max: the budgets in ``measured`` from its fewest bits in band up to CANDIDATE_SPAN more."""
    return {name: [b for b in sorted(measured) if bits - 1e-9 <= b <= bits + CANDIDATE_SPAN + 1e-9 and b < named["max"]]
            for name, bits in named.items() if name in BANDS and bits < named["max"]}


def budgets_to_measure(named: dict[str, float], measured, grid=CANDIDATES) -> list[float]:
    """Budgets of ``grid`` within some name's candidate span that ``measured`` lacks (the file's PPL is needed)."""
    return sorted(b for b in grid if b not in measured and b < named["max"] and
                  any(bits < b <= bits + CANDIDATE_SPAN + 1e-9 for name, bits in named.items() if name in BANDS))


def decide(qmodel: QuantizedModel, windows: np.ndarray, named: dict[str, float],
           ppl: dict[float, float]) -> tuple[dict[str, float], dict[str, int], dict]:
    """(named budgets, head slices per name, the measurements behind them). ``named``: each name's fewest bits in
    band; ``ppl``: the file's PPL per budget (bits), including every candidate (:func:`budgets_to_measure`)."""
    full = qmodel.linears["lm_head"].num_slices
    depths = list(range(MIN_HEAD_SLICES, full))
    candidates = candidate_bits(named, ppl)
    every = sorted({b for bits in candidates.values() for b in bits})
    ratios = head_ratios(qmodel, windows, every, depths) if depths and every else {}
    limit = {name: BANDS[name] * ppl[named["max"]] for name in candidates}
    chosen, choice, report = dict(named), {"max": full}, {}
    floor_bits, floor_k = 0.0, MIN_HEAD_SLICES
    for name in sorted(candidates, key=lambda n: named[n]):
        rows, options = {}, []
        for bits in candidates[name]:
            rows[bits] = {}
            for k in depths:
                cost, saved = ratios[bits][k] - 1, byte_share_saved(qmodel, bits, k)
                within = ppl[bits] * ratios[bits][k] <= limit[name]
                rows[bits][k] = {"ppl_ratio": round(ratios[bits][k], 4), "bytes_saved_share": round(saved, 4),
                                 "within_band": within, "pays": within and cost <= HEAD_PAYBACK * saved}
            if bits < floor_bits:
                continue
            admissible = [k for k in depths if rows[bits][k]["pays"]] + ([full] if ppl[bits] <= limit[name] else [])
            options += [(step_bits(qmodel, bits, k), ppl[bits] * (ratios[bits][k] if k < full else 1.0), bits, k)
                        for k in admissible if k >= floor_k]
        _, _, bits, k = min(options, default=(0, 0, max(named[name], floor_bits), full))
        chosen[name], choice[name] = bits, k
        floor_bits, floor_k = bits, k  # more bits never read fewer bits or a smaller head
        report[name] = {"bits": bits, "head_slices": k, "fewest_bits_in_band": named[name],
                        "by_bits": {f"{b:g}": {str(d): r for d, r in by.items()} for b, by in rows.items()}}
        print(f"[head] {name}: " + "; ".join(
            f"{b:g} bits (PPL {ppl[b]:.2f}): " + ", ".join(
                f"{2 * d}-bit head x{r['ppl_ratio']:.3f} for {100 * r['bytes_saved_share']:.0f} % fewer bytes"
                f"{' (pays)' if r['pays'] else ''}" for d, r in by.items()) for b, by in rows.items())
              + f" -> {bits:g} bits, {2 * k}-bit head", file=sys.stderr, flush=True)
    for name in named:
        choice.setdefault(name, full)
    return chosen, choice, report


def slices_per_row(choice: dict[str, int], named: dict[str, float], num_slices: int) -> np.ndarray:
    """Head slices at every threshold-grid row: the depth of the highest named budget at or below the row's bits
    (the lowest name's below all of them), every slice from max up."""
    steps = sorted((bits, choice[name]) for name, bits in named.items() if name != "max")
    rows = np.full(len(THRESHOLD_GRID), num_slices, np.int64)
    for g, bits in enumerate(THRESHOLD_GRID):
        if bits < named["max"] and steps:
            rows[g] = next((k for b, k in reversed(steps) if b <= bits + 1e-9), steps[0][1])
    return rows
