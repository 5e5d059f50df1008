"""Perplexity tables for a checkpoint (docs/design.md, "Perplexity protocol") with the baselines beside it.

Protocol: the corpus is tokenized once, cut into non-overlapping windows of
``context`` tokens, each a BOS token followed by ``context - 1`` text tokens; every
text token is scored given the tokens before it in its window; PPL = exp(sum of
token NLL / number of scored tokens). ``max_tokens`` keeps whole windows from the
start of the corpus until at least that many tokens are scored.

JSON (one object per corpus, in a list)::

    {"model", "corpus", "context", "tokens",
     "rows": [{"name", "target_bits", "avg_bits", "ppl"}, ...]}

Row names: ``fp32``; ``mobiquant`` and its control ``static-b`` (one row per budget); ``ptq-b``,
``rtn-b``, ``sliced8-b``, ``ptq3-read4``, ``random-b`` (see :mod:`.baselines`). ``avg_bits``
is the weight-weighted average bits read by the block linears (the LM head is the
checkpoint's, at its fixed depth, in every quantized row).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

from .qmodel import reads_kept


def eval_windows(tokenizer, corpus: str, context: int = 512, max_tokens: int | None = None) -> torch.Tensor:
    """[n, context] windows, BOS first (a model without BOS gets plain windows)."""
    from mobiquant.tools.corpora import load_corpus

    ids = tokenizer(load_corpus(corpus))["input_ids"]
    bos = tokenizer.bos_token_id
    body = context - (1 if bos is not None else 0)
    n = len(ids) // body
    if max_tokens:
        n = min(n, math.ceil(max_tokens / (body - (0 if bos is not None else 1))))
    if n == 0:
        raise ValueError(f"[eval] {corpus}: expected at least {body} tokens; got {len(ids)}")
    rows = [([bos] if bos is not None else []) + ids[i * body: (i + 1) * body] for i in range(n)]
    return torch.tensor(rows, dtype=torch.long)


LOGIT_ROWS = 64  # positions whose logits exist at once (a 262k vocabulary: 67 MB)


@torch.no_grad()
def nll_from_hidden(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed -log p(targets) from the decoder's final (normed) hidden states [T, H]: the LM head and any final
    soft cap over LOGIT_ROWS positions at a time, never a whole window's logits over the vocabulary."""
    cap = getattr(model.config, "final_logit_softcapping", None)
    total = 0.0
    with reads_kept(model.lm_head):  # a sliced head: decoded once, not per chunk
        for i in range(0, len(targets), LOGIT_ROWS):
            logits = model.lm_head(hidden[i: i + LOGIT_ROWS]).float()
            if cap:
                logits = torch.tanh(logits / cap) * cap
            total += torch.nn.functional.cross_entropy(logits, targets[i: i + LOGIT_ROWS], reduction="sum").item()
    return total


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch: int = 4, bos: bool = True) -> tuple[float, int]:
    """(PPL, scored tokens) of ``model`` on ``windows``."""
    nll, count = 0.0, 0
    for i in range(0, len(windows), batch):
        ids = windows[i: i + batch].to(next(model.parameters()).device)
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
        for h, row in zip(hidden, ids):
            nll += nll_from_hidden(model, h[:-1], row[1:])
        count += ids[:, 1:].numel()
    return math.exp(nll / count), count


def _row(name: str, target: float | None, avg: float | None, ppl: float) -> dict:
    return {"name": name, "target_bits": target, "avg_bits": None if avg is None else round(avg, 4), "ppl": round(ppl, 4)}


def evaluate_checkpoint(path: Path, corpora: list[str], budgets: list[float], baselines: bool = False,
                        context: int = 512, max_tokens: int | None = 40960, json_path: Path | None = None,
                        rows: list[str] | None = None, log=None, device: str | None = None) -> list[dict]:
    from transformers import AutoTokenizer

    from . import baselines as B
    from . import checkpoint as ckpt
    from .calibrate import get_recipe, resolve_device
    from .quantize import calibration_tokens
    from .source import load_float_model, resolve

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    _, config = ckpt.read_meta(path)
    source = resolve(config.model)
    if source.identity != config.source_identity:
        raise ckpt.CheckpointError(f"[checkpoint] source model expected identity {config.source_identity[:16]}… "
                                   f"({config.model}); got {source.identity[:16]}…")
    device = resolve_device(device, get_recipe(config.recipe))
    tokenizer = AutoTokenizer.from_pretrained(source.folder)
    windows = {c: eval_windows(tokenizer, c, context, max_tokens) for c in corpora}
    tables = {c: {"model": config.model, "corpus": c, "context": context,
                  "tokens": int(windows[c].shape[0] * (windows[c].shape[1] - 1)), "rows": []} for c in corpora}
    wanted = (lambda name: rows is None or name in rows or name.split("-")[0] in rows)

    def measure(name, target, model, avg_fn=None):
        if not wanted(name):
            return
        for c in corpora:
            t = time.time()
            if avg_fn is not None:
                avg_fn("start")
            ppl, _ = perplexity(model, windows[c])
            avg = avg_fn("read") if avg_fn is not None else target
            tables[c]["rows"].append(_row(name, target, avg, ppl))
            log(f"[eval] {c:18s} {name:12s} target {str(target):5s} avg {avg if avg is None else round(avg, 3)!s:6s} "
                f"ppl {ppl:9.3f}  ({time.time() - t:.0f}s)")
            if json_path is not None:
                _write(json_path, tables)

    # fp32 and fixed-width baselines on one float model
    float_model = load_float_model(source).to(device)
    if baselines:
        measure("fp32", None, float_model)
    # the quantized model (its LM head is reused by the fixed-width rows)
    qmodel, _ = ckpt.load(path, load_float_model(source), config.source_identity)
    qmodel.model.to(device)

    def avg_bits(what, q=qmodel):
        if what == "start":
            q.start_bits_log()
            return None
        return q.average_bits()

    for b in budgets:
        qmodel.set_target_bits(b)
        measure("mobiquant", b, qmodel.model, avg_bits)
    with B.static_routing(qmodel, seed=0) as sq:
        for b in budgets:
            if wanted(f"static-{b:g}"):
                sq.set_target_bits(b)
                measure(f"static-{b:g}", b, sq.model, avg_bits)
    if baselines:
        with B.random_routing(qmodel, seed=0) as rq:
            for b in budgets:
                if b % 2 and wanted(f"random-{b:g}"):  # at even widths water-filling is already uniform
                    rq.set_target_bits(b)
                    measure(f"random-{b:g}", b, rq.model, avg_bits)
        head = nn.Linear(float_model.config.hidden_size, float_model.config.vocab_size, bias=False)
        head.weight = nn.Parameter(qmodel.linears["lm_head"].read(config.lm_head_slices).clone(),
                                   requires_grad=False)
        float_model.lm_head = head
        float_model.config.tie_word_embeddings = False
        for b in B.PTQ_WIDTHS:
            with B.swapped_weights(float_model, B.fixed_weights(float_model, config.group_size, "rtn", b)):
                measure(f"rtn-{b}", b, float_model)
        need_ptq = any(wanted(f"{k}-{b}") for k in ("ptq", "sliced8") for b in B.PTQ_WIDTHS) or wanted("ptq3-read4")
        if need_ptq:
            recipe = get_recipe(config.recipe)
            tokens = calibration_tokens(tokenizer, config.calibration, recipe)
            calib_model = load_float_model(source).to(device)
            factors = B.load_or_calibrate_ptq(path, calib_model, tokens.to(device), recipe, config.group_size,
                                              source.identity)
            del calib_model
            for b in B.PTQ_WIDTHS:
                with B.swapped_weights(float_model, B.fixed_weights(float_model, config.group_size, "ptq", b, factors)):
                    measure(f"ptq-{b}", b, float_model)
            with B.swapped_weights(float_model, B.fixed_weights(float_model, config.group_size, "ptq", 3, factors, 4)):
                measure("ptq3-read4", 4, float_model)
            for b in B.SLICED8_WIDTHS:
                with B.swapped_weights(float_model,
                                       B.fixed_weights(float_model, config.group_size, "sliced8", b, factors)):
                    measure(f"sliced8-{b}", b, float_model)
    out = [tables[c] for c in corpora]
    for t in out:
        _print_table(t)
    return out


def _write(path: Path, tables: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".partial")
    tmp.write_text(json.dumps(list(tables.values()), indent=1))
    tmp.replace(path)


def _print_table(t: dict) -> None:
    print(f"\n{t['model']} on {t['corpus']}: context {t['context']}, {t['tokens']} tokens")
    print(f"{'name':14s} {'target':>7s} {'avg bits':>9s} {'ppl':>10s}")
    for r in t["rows"]:
        tb = "" if r["target_bits"] is None else f"{r['target_bits']:g}"
        ab = "" if r["avg_bits"] is None else f"{r['avg_bits']:.3f}"
        print(f"{r['name']:14s} {tb:>7s} {ab:>9s} {r['ppl']:10.3f}")
