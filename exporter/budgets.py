"""Named budgets per model: what low / mid / high mean, measured on the exported file.

A tiny model degrades much faster with fewer bits than a large one, so a fixed
"low = 3 bits" can mean fluent text on one model and noise on another. After
export, the file's own perplexity is measured through ONNX Runtime on validation
text (never the test split) at candidate budgets, and each name gets the fewest
bits whose perplexity stays within its quality band of the max-bits read:

    low  <= 1.25 x PPL(max)     mid <= 1.10 x     high <= 1.03 x     max = all slices
"""

from __future__ import annotations

import sys

import numpy as np

CANDIDATES = (2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0, 7.0)
BANDS = {"low": 1.25, "mid": 1.10, "high": 1.03}
VALIDATION = "austen-validation"
VALIDATION_WINDOWS, VALIDATION_CONTEXT = 4, 512  # every validation measurement: the export's and the quantizer's


def file_perplexities(model_dir, budgets: list[float]) -> dict[float, float]:
    """Validation PPL of the file in ``model_dir`` at each of ``budgets`` (bits)."""
    from mobiquant.runtime.session import ModelSession

    session, ids = ModelSession(model_dir, threads=2), validation_windows(model_dir)
    return {bits: perplexity(session, ids, bits) for bits in budgets}


def perplexity(session, windows: np.ndarray, bits: float) -> float:
    from mobiquant.tools.evaluate import window_nll

    nll = sum(window_nll(session, w, bits)[0] for w in windows)
    return float(np.exp(nll / (windows.shape[0] * (windows.shape[1] - 1))))


def validation_windows(model_dir, windows: int = VALIDATION_WINDOWS, context: int = VALIDATION_CONTEXT,
                       corpus: str = VALIDATION) -> np.ndarray:
    """The validation token windows [windows, context] every export measurement of a file uses."""
    from mobiquant.runtime.modelfile import locate
    from mobiquant.runtime.text import TextCodec
    from mobiquant.tools.evaluate import corpus_ids

    info = locate(model_dir)
    return corpus_ids(TextCodec(info.directory, info.meta), corpus, min(context, info.context), windows * (context - 1))


def measure_named_budgets(model_dir, max_bits: float) -> tuple[dict[str, float], dict[float, float]]:
    """(named budgets, PPL per measured budget) for the exported model in ``model_dir``."""
    from mobiquant.runtime.session import ModelSession

    session = ModelSession(model_dir, threads=2)
    ids = validation_windows(model_dir)
    ppl = {max_bits: perplexity(session, ids, max_bits)}
    named = {"max": max_bits}
    for bits in CANDIDATES:
        if bits >= max_bits:
            break
        ppl[bits] = perplexity(session, ids, bits)
        print(f"[budgets] {bits:g} bits: validation PPL {ppl[bits]:.2f} ({ppl[bits] / ppl[max_bits]:.2f} x max)",
              file=sys.stderr, flush=True)
        if ppl[bits] <= min(BANDS.values()) * ppl[max_bits]:
            break  # within every band: each name is this budget or a lower one already measured
    for name, band in BANDS.items():
        named[name] = next((b for b in sorted(ppl) if ppl[b] <= band * ppl[max_bits]), max_bits)
    return named, ppl
