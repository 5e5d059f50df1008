"""Per budget, token routing only where it beats static allocation on validation text.

Below the base width token routing splits each router's tokens around its allocated width (token_routing.py,
allocation.py); static allocation gives every router its width with no per-token information (one fractional
router). Which is better depends on the model and the budget: on Gemma-3-270M token routing won at 2.5 and
3.5 bits and lost at 3 bits on every corpus (1.08-1.15x static's PPL; README, "Per-token routing against static
allocation"). So the quantizer fits both tables, measures the validation perplexity of each at CHECK_BITS
(``budgets.VALIDATION``, never a test split), and every grid row below the base takes the tables of the better
one at the nearest checked budget. Rows at or above the base are the token fit's (static there unless the recipe
routes above the base).
"""

from __future__ import annotations

import sys

import torch

from . import memory
from .allocation import BASE_BITS
from .evaluate import perplexity
from .qmodel import THRESHOLD_GRID, QuantizedModel
from .thresholds import fit_thresholds_online, record_widths

CHECK_BITS = (2.5, 3.0, 3.5)


def validation_windows(tokenizer) -> torch.Tensor:
    """The validation windows the choice is measured on: the export's (exporter/budgets.py), tokenized here."""
    from .budgets import VALIDATION, VALIDATION_CONTEXT, VALIDATION_WINDOWS
    from .evaluate import eval_windows

    return eval_windows(tokenizer, VALIDATION, VALIDATION_CONTEXT, VALIDATION_WINDOWS * (VALIDATION_CONTEXT - 1))


def tables_of(qmodel: QuantizedModel) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A copy of every router's (thresholds, widths)."""
    return {n: (r.thresholds.clone(), r.widths.clone()) for n, r in qmodel.routers.items()}


def _load(qmodel: QuantizedModel, tables: dict, rows: torch.Tensor | slice = slice(None)) -> None:
    for name, router in qmodel.routers.items():
        router.thresholds[rows], router.widths[rows] = tables[name][0][rows], tables[name][1][rows]


@torch.no_grad()
def keep_better_rows(qmodel: QuantizedModel, tokens: torch.Tensor, anchors: tuple[float, ...], static_allocation,
                     windows: torch.Tensor, log=None) -> dict:
    """With the token tables fitted in ``qmodel``: fit the static ones (``static_allocation``) from ``tokens`` at the
    ``anchors`` below the base, measure both at CHECK_BITS on ``windows``, keep the better per grid row below the
    base (:func:`compose`). Returns {bits: {"token": PPL, "static": PPL, "kept": name}}."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    memory.release()  # a threshold pass's freed blocks (Gemma-3-270M: 1.4 GB), else the next step's peak adds to them
    token = tables_of(qmodel)
    fit_thresholds_online(qmodel, tokens, tuple(a for a in anchors if a < BASE_BITS) or CHECK_BITS, static_allocation)
    record_widths(qmodel, static_allocation)
    static = tables_of(qmodel)
    memory.release()  # again: measuring decodes the LM head (671 MB) on top
    windows = windows.to(next(qmodel.model.parameters()).device)
    choice = {}
    for bits in CHECK_BITS:
        ppl = {}
        for name, tables in (("token", token), ("static", static)):
            _load(qmodel, tables)
            qmodel.set_target_bits(bits)
            ppl[name] = perplexity(qmodel.model, windows)[0]
        kept = "token" if ppl["token"] <= ppl["static"] else "static"
        choice[f"{bits:g}"] = {"token": round(ppl["token"], 4), "static": round(ppl["static"], 4), "kept": kept}
        log(f"[quantize] {bits:g} bits, validation PPL: token routing {ppl['token']:.2f}, static {ppl['static']:.2f} "
            f"-> {kept}")
    compose(qmodel, token, static, {float(b): c["kept"] for b, c in choice.items()})
    return choice


def compose(qmodel: QuantizedModel, token: dict, static: dict, kept: dict[float, str]) -> None:
    """Load ``token``'s tables, then ``static``'s rows below the base whose nearest key of ``kept`` says static."""
    _load(qmodel, token)
    checked = sorted(kept)
    nearest = [min(checked, key=lambda c: abs(c - b)) for b in THRESHOLD_GRID]
    rows = [i for i, (b, c) in enumerate(zip(THRESHOLD_GRID, nearest)) if b < BASE_BITS and kept[c] == "static"]
    _load(qmodel, static, torch.tensor(rows, dtype=torch.long))
    qmodel.set_target_bits(float(THRESHOLD_GRID[-1]))
