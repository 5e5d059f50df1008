"""``mobiq-eval``: quality, speed and memory per budget, through ONNX Runtime (no torch).

For each budget, in its own process (so peak memory is that budget's alone):
perplexity on a corpus (docs/design.md, "Perplexity protocol": non-overlapping windows of ``context``
tokens, BOS first, PPL = exp(mean NLL) over the scored tokens), the average bits
actually read, prefill tokens/s (one window) and decode tokens/s (one token at a
time with the KV cache), and peak resident memory. ``--baselines`` adds an fp32
and a MatMulNBits-int4 export of the same source model (built once, cached).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .bench import compare_label, cpu_name, decode_run
from mobiquant.runtime.budget import BudgetError, parse_budget
from mobiquant.runtime.modelfile import ModelFileError, locate

DEFAULT_BUDGETS = "low,mid,high,max"
DECODE_TOKENS = 64


def corpus_ids(codec, corpus: str, context: int, max_tokens: int | None) -> np.ndarray:
    """Windows [n, context] int64: BOS then context-1 text tokens each (non-overlapping)."""
    from .corpora import load_corpus

    ids = codec.encode(load_corpus(corpus), bos=False)
    per = context - 1
    n = len(ids) // per
    if max_tokens:
        n = min(n, -(-max_tokens // per))
    if n == 0:
        raise ValueError(f"[mobiq-eval] corpus {corpus!r} expected at least {per} tokens; got {len(ids)}")
    body = np.array(ids[: n * per], np.int64).reshape(n, per)
    bos = codec.bos_id if codec.bos_id is not None else body[:, :1]
    return np.concatenate([np.full((n, 1), bos, np.int64), body], axis=1)


def log_softmax_nll(logits: np.ndarray, targets: np.ndarray, rows: int = 32) -> float:
    """Summed -log softmax(logits)[targets] in float64, ``rows`` positions at a time (a 262k vocabulary's
    float64 copy of a whole window would be gigabytes)."""
    total = 0.0
    for i in range(0, len(targets), rows):
        z = logits[i: i + rows].astype(np.float64)
        z -= z.max(-1, keepdims=True)
        lse = np.log(np.exp(z).sum(-1))
        total += float((lse - z[np.arange(len(z)), targets[i: i + rows]]).sum())
    return total


def window_nll(session, window: np.ndarray, bits: float | None) -> tuple[float, float, float]:
    """(summed NLL of window[1:], each token given the ones before it; average bits read over the window; seconds
    in the model), the window fed through ``session.prefill`` so a large vocabulary's logits are never all held."""
    nll, bits_read, done, seconds = 0.0, 0.0, 0, 0.0
    t = time.perf_counter()
    for logits, _ in session.prefill(window[None], session.empty_cache(len(window)), bits):
        seconds += time.perf_counter() - t  # the piece's forward, not the loss below
        n = logits.shape[1]
        scored = min(n, len(window) - 1 - done)
        nll += log_softmax_nll(logits[0, :scored], window[done + 1: done + 1 + scored])
        bits_read += session.last_avg_bits * n
        done += n
        t = time.perf_counter()
    return nll, bits_read / len(window), seconds


def measure(model_dir: Path, bits: float | None, corpus: str, context: int, max_tokens: int | None,
            threads: int | None, progress: bool = False, kv_bits: int | None = None, hold: bool = True) -> dict:
    """One row: ppl, avg bits, prefill and decode tok/s, peak RSS (of this process), and the KV cache's
    precision and size for one window (``kv_bits``: the session's default when None)."""
    from mobiquant.runtime.session import ModelSession
    from mobiquant.runtime.text import TextCodec

    session = ModelSession(model_dir, threads, kv_bits, hold=hold)
    codec = TextCodec(session.info.directory, session.info.meta)
    windows = corpus_ids(codec, corpus, context, max_tokens)
    nll, scored, bits_read, prefill_s = 0.0, 0, [], []
    iterator = range(len(windows))
    if progress:
        iterator = _progress(iterator, f"{session.info.meta.get('kind')} {bits if bits else ''}")
    for w in iterator:
        window_loss, window_bits, seconds = window_nll(session, windows[w], bits)
        prefill_s.append(seconds)
        nll += window_loss
        scored += context - 1
        bits_read.append(window_bits)
    decode_ms = decode_run(session, bits, windows[0:1, :32], DECODE_TOKENS)
    return {"target_bits": bits, "avg_bits": float(np.mean(bits_read)) if session.elastic else None,
            "ppl": float(np.exp(nll / scored)), "tokens": scored,
            "prefill_tok_s": context / float(np.median(prefill_s)), "decode_tok_s": 1e3 / decode_ms,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "kv_bits": session.kv_bits,
            "kv_mb": session.cache_bytes_per_position() * context / 2**20}


def _measure_in_subprocess(model_dir: Path, bits: float | None, args, kv_bits: int | None = None,
                           hold: bool = True) -> dict:
    cmd = [sys.executable, "-m", "mobiquant.tools.evaluate", "--worker", str(model_dir), "--corpus", args.corpus,
           "--context", str(args.context), "--max-tokens", str(args.max_tokens or 0)]
    if bits is not None:
        cmd += ["--bits", str(bits)]
    if kv_bits is not None:
        cmd += ["--kv-bits", str(kv_bits)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if not hold:
        cmd += ["--no-hold"]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"[mobiq-eval] measuring {model_dir} at {bits} bits failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def baseline_dir(info, kind: str) -> Path:
    """The fp32 / MatMulNBits-int4 export of the model's source, built once beside it (again when
    the cached one is of another format version)."""
    out = info.directory / "baselines" / kind
    if (out / "model.onnx").is_file():
        try:
            locate(out)
            return out
        except ModelFileError:
            pass
    print(f"[mobiq-eval] building the {kind} baseline of {info.meta['source_model']} (once)", file=sys.stderr)
    cmd = [sys.executable, "-m", "mobiquant.exporter.cli", "baseline", info.meta["source_model"], kind, "-o", str(out),
           "--context", str(info.context)]
    if subprocess.run(cmd).returncode != 0:
        raise RuntimeError(f"[mobiq-eval] could not build the {kind} baseline (needs `pip install mobiquant[export]`)")
    return out


def _progress(items, desc: str):
    """``items``, with "desc i/n" kept up to date on stderr (a terminal line; nothing but the end otherwise)."""
    items = list(items)
    live = sys.stderr.isatty()
    for i, item in enumerate(items):
        if live:
            print(f"\r[{desc}] {i}/{len(items)}", end="", file=sys.stderr, flush=True)
        yield item
    print(f"\r[{desc}] {len(items)}/{len(items)}", file=sys.stderr, flush=True)


def markdown(result: dict) -> str:
    head = ("| name | target bits | avg bits | KV bits | KV MB | PPL | prefill tok/s | decode tok/s | peak RSS MB |\n"
            "|---|---|---|---|---|---|---|---|---|")
    rows = [f"| {r['name']} | {_fmt(r['target_bits'])} | {_fmt(r['avg_bits'])} | {r['kv_bits']} | {r['kv_mb']:.1f} | "
            f"{r['ppl']:.2f} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | {r['peak_rss_mb']:.0f} |"
            for r in result["rows"]]
    return "\n".join([head, *rows])


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.2f}"


def plot(result: dict, path: Path) -> None:
    """PPL and decode speed against average bits: our curve, baselines as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours = [r for r in result["rows"] if r["name"] == "mobiquant"]
    others = [r for r in result["rows"] if r["name"] != "mobiquant"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    xs = [r["avg_bits"] for r in ours]
    a.plot(xs, [r["ppl"] for r in ours], "o-", label="MoBiQuant (one file)")
    b.plot(xs, [r["decode_tok_s"] for r in ours], "o-", label="MoBiQuant (one file)")
    for r in others:  # fixed-precision baselines: fp32 as a reference line, the others at their bits
        bits = {"matmulnbits-int4": 4.0}.get(r["name"], r.get("avg_bits"))
        if bits is None:
            a.axhline(r["ppl"], ls="--", color="gray", label=r["name"])
            b.axhline(r["decode_tok_s"], ls="--", color="gray", label=r["name"])
        else:
            a.plot([bits], [r["ppl"]], "s", label=r["name"])
            b.plot([bits], [r["decode_tok_s"]], "s", label=r["name"])
    a.set(xlabel="average weight bits", ylabel=f"perplexity ({result['corpus']}, ctx {result['context']})",
          yscale="log", title="quality")
    b.set(xlabel="average weight bits", ylabel="decode tokens/s", title=f"speed ({result['threads'] or 'all'} threads)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['model']} on {result['cpu']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mobiq-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model directory or its model.onnx")
    p.add_argument("--corpus", default="austen-test", help="austen-test|brown|lee|a text file (default: austen-test)")
    p.add_argument("--budgets", default=DEFAULT_BUDGETS, help=f"comma-separated (default: {DEFAULT_BUDGETS})")
    p.add_argument("--baselines", action="store_true", help="also fp32 and MatMulNBits-int4 exports (built once)")
    p.add_argument("--compare", action="append", type=Path, default=[],
                   help="another MoBiQuant model directory measured at the same budgets, rows named by its routing "
                        "(e.g. the same checkpoint exported with `mobiq-export thresholds --routing static`: "
                        "mobiquant-static), or mobiquant-gqa for a file exported with --attention gqa; -fixed-head "
                        "added when its LM head reads every slice at every budget (--fixed-head); repeatable")
    p.add_argument("--context", type=int, default=512, help="window length in tokens (default: 512)")
    p.add_argument("--max-tokens", type=int, default=16384,
                   help="scored tokens per budget, rounded up to whole windows (default: 16384; 0 = whole corpus)")
    p.add_argument("--threads", type=int, help="intra-op threads (default: ONNX Runtime's choice)")
    p.add_argument("--kv-bits", default=None,
                   help="comma-separated KV cache precisions (32,16,8,4) to measure each MoBiQuant budget with "
                        "(default: the runtime's default, 8); the KV MB column is one window's cache")
    p.add_argument("--unheld", action="store_true",
                   help="also each MoBiQuant budget with every step at the budget itself (rows mobiquant-unheld): "
                        "the control for holding the bits read at the budget (runtime/bits_hold.py)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--plot", type=Path, help="write a PNG plot here (needs matplotlib)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--bits", type=float, help=argparse.SUPPRESS)
    p.add_argument("--no-hold", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        if args.worker:
            print(json.dumps(measure(Path(args.model), args.bits, args.corpus, args.context, args.max_tokens or None,
                                     args.threads, kv_bits=int(args.kv_bits) if args.kv_bits else None,
                                     hold=not args.no_hold)))
            return 0
        info = locate(args.model)
        if args.context < 2 or args.context > info.context:
            p.error(f"--context expected 2..{info.context}; got {args.context}")
        budgets = [parse_budget(b.strip(), info.named_budgets) for b in args.budgets.split(",") if b.strip()]
        if "auto" in budgets:
            p.error("--budgets expected names or bits; got auto (evaluate fixed budgets)")
        try:
            kv_list = [int(k) for k in args.kv_bits.split(",")] if args.kv_bits else [None]
        except ValueError:
            p.error(f"--kv-bits expected comma-separated integers; got {args.kv_bits!r}")
        jobs = [("mobiquant", info.directory, float(b), kv, True) for b in budgets for kv in kv_list] if info.elastic \
            else [(info.meta["kind"], info.directory, None, None, True)]
        if args.unheld and info.elastic:
            jobs += [("mobiquant-unheld", info.directory, float(b), None, False) for b in budgets]
        for other in map(locate, args.compare):
            if not other.elastic:
                p.error(f"--compare expected a MoBiQuant model directory; got {other.meta.get('kind')} ({other.directory})")
            jobs += [(compare_label(other.meta), other.directory, float(b), None, True) for b in budgets]
        if args.baselines:
            jobs += [(kind, baseline_dir(info, kind), None, None, True) for kind in ("fp32", "matmulnbits-int4")]
        result = {"model": info.meta.get("source_model"), "corpus": args.corpus, "context": args.context,
                  "tokens": None, "cpu": cpu_name(), "threads": args.threads, "rows": []}
        for name, directory, bits, kv, hold in _progress(jobs, "mobiq-eval"):
            row = _measure_in_subprocess(directory, bits, args, kv, hold)
            result["tokens"] = row.pop("tokens")
            result["rows"].append({"name": name, **row})
        print(markdown(result))
        print(f"\n{result['model']}, {args.corpus}, context {args.context}, {result['tokens']} tokens, "
              f"{result['cpu']}, threads {args.threads or 'default'}")
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
        if args.plot:
            plot(result, args.plot)
        return 0
    except (ModelFileError, BudgetError, ValueError, RuntimeError) as e:
        print(str(e).splitlines()[0], file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
