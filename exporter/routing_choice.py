"""Per budget, token routing only where it beats static allocation on validation text.

Below the base width token routing splits each router's tokens around its allocated width (token_routing.py,
allocation.py); static allocation gives every router its width with no per-token information (one fractional
router). Which is better depends on the model and the budget: on Gemma-3-270M token routing won at 2.5 and
3.5 bits and lost at 3 bits on every corpus (1.08-1.15x static's PPL; README, "Per-token routing against static
allocation"). So the quantizer fits both tables, measures the validation perplexity of each at CHECK_BITS on
VALIDATION_TEXTS (never a test split), and every grid row below the base takes the token tables only where their
mean log-perplexity over those texts (each text weighs the same) is no higher than static's, else the static ones,
from the nearest checked budget. The texts span three genres because routers trained on Austen can win on Austen
and lose elsewhere: Gemma-3-270M's four-window routers at 2.5 bits won on Austen's validation text and lost 1.11x
and 1.28x on the Brown and Lee tests (docs/design.md, "Token routing or static allocation, per budget"). Rows at or
above the base are the token fit's (static there unless the recipe routes above the base).
"""

from __future__ import annotations

import math
import sys

import torch

from . import memory
from .allocation import BASE_BITS
from .budgets import VALIDATION, VALIDATION_CONTEXT, VALIDATION_WINDOWS
from .evaluate import perplexity
from .qmodel import THRESHOLD_GRID, QuantizedModel
from .thresholds import fit_thresholds_online, record_widths

CHECK_BITS = (2.5, 3.0, 3.5)
# Literature (the export's validation text), news and Usenet (tools/corpora.py): disjoint from every test corpus.
VALIDATION_TEXTS = (VALIDATION, "lee-validation", "newsgroups")


def validation_windows(tokenizer) -> dict[str, torch.Tensor]:
    """The windows the choice is measured on, per text of VALIDATION_TEXTS: as many as the export's budget
    measurements use (exporter/budgets.py), tokenized here."""
    from .evaluate import eval_windows

    return {text: eval_windows(tokenizer, text, VALIDATION_CONTEXT, VALIDATION_WINDOWS * (VALIDATION_CONTEXT - 1))
            for text in VALIDATION_TEXTS}


def tables_of(qmodel: QuantizedModel) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A copy of every router's (thresholds, widths)."""
    return {n: (r.thresholds.clone(), r.widths.clone()) for n, r in qmodel.routers.items()}


def _load(qmodel: QuantizedModel, tables: dict, rows: torch.Tensor | slice = slice(None)) -> None:
    for name, router in qmodel.routers.items():
        router.thresholds[rows], router.widths[rows] = tables[name][0][rows], tables[name][1][rows]


@torch.no_grad()
def keep_better_rows(qmodel: QuantizedModel, tokens: torch.Tensor, anchors: tuple[float, ...], static_allocation,
                     windows: dict[str, torch.Tensor], log=None) -> dict:
    """With the token tables fitted in ``qmodel``: fit the static ones (``static_allocation``) from ``tokens`` at the
    ``anchors`` below the base, measure both at CHECK_BITS on each text of ``windows``; per grid row below the base
    keep token routing where its mean log-PPL over the texts is no higher, else static (:func:`compose`).
    Returns {bits: {"token": {text: PPL}, "static": {text: PPL}, "kept": name}}."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    memory.release()  # a threshold pass's freed blocks (Gemma-3-270M: 1.4 GB), else the next step's peak adds to them
    token = tables_of(qmodel)
    fit_thresholds_online(qmodel, tokens, tuple(a for a in anchors if a < BASE_BITS) or CHECK_BITS, static_allocation)
    record_widths(qmodel, static_allocation)
    static = tables_of(qmodel)
    memory.release()  # again: measuring decodes the LM head (671 MB) on top
    device = next(qmodel.model.parameters()).device
    windows = {text: w.to(device) for text, w in windows.items()}
    choice = {}
    for bits in CHECK_BITS:
        ppl = {}
        for name, tables in (("token", token), ("static", static)):
            _load(qmodel, tables)
            qmodel.set_target_bits(bits)
            ppl[name] = {text: round(perplexity(qmodel.model, w)[0], 4) for text, w in windows.items()}
        kept = "token" if token_validates(ppl["token"], ppl["static"]) else "static"
        choice[f"{bits:g}"] = {**ppl, "kept": kept}
        log(f"[quantize] {bits:g} bits, validation PPL token / static: "
            + ", ".join(f"{t} {ppl['token'][t]:.2f} / {ppl['static'][t]:.2f}" for t in windows) + f" -> {kept}")
    compose(qmodel, token, static, {float(b): c["kept"] for b, c in choice.items()})
    return choice


def token_validates(token: dict[str, float], static: dict[str, float]) -> bool:
    """Token routing's mean log-perplexity over the texts (each weighs the same) is no higher than static's."""
    return sum(math.log(token[t] / static[t]) for t in token) <= 0


def compose(qmodel: QuantizedModel, token: dict, static: dict, kept: dict[float, str]) -> None:
    """Load ``token``'s tables, then ``static``'s rows below the base whose nearest key of ``kept`` says static."""
    _load(qmodel, token)
    checked = sorted(kept)
    nearest = [min(checked, key=lambda c: abs(c - b)) for b in THRESHOLD_GRID]
    rows = [i for i, (b, c) in enumerate(zip(THRESHOLD_GRID, nearest)) if b < BASE_BITS and kept[c] == "static"]
    _load(qmodel, static, torch.tensor(rows, dtype=torch.long))
    qmodel.set_target_bits(float(THRESHOLD_GRID[-1]))
