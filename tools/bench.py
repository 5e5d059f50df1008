"""``mobiq-bench``: measurements side by side, printed as a table and written as JSON.

    mobiq-bench kernel [--threads 1,2] [--shapes ...] [--json FILE]
    mobiq-bench layer [MODEL] [--layer NAME] [--threads N] [--json FILE]
    mobiq-bench decode MODEL_DIR [--baseline DIR ...] [--bits B ...] [--depths 32,1024,4096] [--kv-bits 16,8,4]
                      [--llamacpp MODEL_NAME] [--threads N] [--json FILE]
    mobiq-bench footprint MODEL_DIR [--threads N] [--json FILE]

``kernel`` times, in one process on identical inputs, ResidualSliceMatMul at
k = 1..4 slices (int8-activation mode: rsmm_k; exact float mode: rsmm_f32_k),
ONNX Runtime's MatMulNBits at 2, 4 and 8 bits (block size = our group size,
accuracy_level=4) and an fp32 MatMul; median microseconds per run.

``layer`` quantizes real linear weights of a registry model (the fp32 folder made
by ``make setup``) into residual slices and reports, per read depth k: the
relative Frobenius error of W^(k) against W, the op's error in ONNX Runtime
against a float64 ``x @ W^(k)^T``, weight bytes read per token and the op's
median time for one token.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mobiquant.runtime import format as F
from .models import ModelError, load_entry

DEFAULT_LAYERS = ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight")


def _median_us(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e6)


def layer_report(weight: np.ndarray, group_size: int, num_slices: int, threads: int, seed: int = 0) -> list[dict]:
    """Per-depth error and cost rows for one weight [N, K]."""
    from onnx import TensorProto, helper

    import onnxruntime as ort

    from mobiquant.runtime import ops

    n, k = weight.shape
    sw = F.quantize(weight, group_size, num_slices)
    x = np.random.default_rng(seed).standard_normal((1, k)).astype(np.float32)
    node = helper.make_node(ops.OP_TYPE, ["X", "slices", "scales", "zero_points", "slice_counts"], ["Y"],
                            domain=ops.DOMAIN, K=k, N=n, group_size=group_size, num_slices=num_slices,
                            slice_bits=F.SLICE_BITS, layout=F.LAYOUT_VERSION)
    graph = helper.make_graph(
        [node], "layer",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, k]),
         helper.make_tensor_value_info("slice_counts", TensorProto.INT32, [1])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, n])],
        initializer=[helper.make_tensor("slices", TensorProto.UINT8, sw.packed.shape, sw.packed.tobytes(), raw=True),
                     helper.make_tensor("scales", TensorProto.FLOAT, sw.scales.shape, sw.scales.tobytes(), raw=True),
                     helper.make_tensor("zero_points", TensorProto.FLOAT, sw.zero_points.shape,
                                        sw.zero_points.tobytes(), raw=True)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(ops.DOMAIN, 1)])
    session = ort.InferenceSession(model.SerializeToString(), ops.session_options(threads))
    rows = []
    w64 = weight.astype(np.float64)
    for depth in range(1, num_slices + 1):
        feeds = {"X": x, "slice_counts": np.array([depth], np.int32)}
        w_hat = sw.dequantize(depth)
        ref = x.astype(np.float64) @ w_hat.T
        y = session.run(None, feeds)[0]
        rows.append({
            "k": depth,
            "bits": depth * F.SLICE_BITS,
            "weight_rel_error": float(np.linalg.norm(w64 - w_hat) / np.linalg.norm(w64)),
            "op_rel_error": float(np.abs(y - ref).max() / np.abs(ref).max()),
            "bytes_per_token": int(depth * sw.packed[0].nbytes + sw.scales.nbytes + sw.zero_points.nbytes),
            "us_per_token": _median_us(lambda: session.run(None, feeds), repeat=50),
        })
    return rows


KERNEL_SHAPES = ((4096, 4096, 128), (4096, 11008, 128), (11008, 4096, 128),
                 (576, 576, 64), (576, 1536, 64), (1536, 576, 64))  # (K, N, group size)


def _timed_together(runs: dict[str, tuple], budget_s: float = 0.4, rounds: int = 8) -> dict[str, float]:
    """Median microseconds of session.run per variant ({name: (session, feeds)}).

    Variants take turns in ``rounds`` rounds of about ``budget_s / rounds`` seconds each, so a
    slow phase of a shared machine hits all of them alike instead of whichever ran then.
    """
    times: dict[str, list[float]] = {name: [] for name in runs}
    for session, feeds in runs.values():
        session.run(None, feeds)
    for _ in range(rounds):
        for name, (session, feeds) in runs.items():
            start = time.perf_counter()
            while True:
                t = time.perf_counter()
                session.run(None, feeds)
                times[name].append(time.perf_counter() - t)
                if t - start > budget_s / rounds:
                    break
    return {name: float(np.median(ts) * 1e6) for name, ts in times.items()}


def _single_node_session(node, inits: list, inputs: list, threads: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from mobiquant.runtime import ops

    graph = helper.make_graph([node], "bench", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(ops.DOMAIN, 1),
                                                    helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), ops.session_options(threads))


def kernel_results(m: int, k: int, n: int, group_size: int, threads: int, kernels: dict[int, str],
                   rng: np.random.Generator) -> dict[str, float]:
    """Median us per run of every variant on one shape (same X for all)."""
    import os

    from onnx import TensorProto, helper
    from onnx.numpy_helper import from_array

    from mobiquant.runtime import ops

    x = rng.standard_normal((m, k)).astype(np.float32)
    x_info = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [m, k])]
    runs: dict[str, tuple] = {}
    sw = F.SlicedWeight(rng.integers(0, 256, (4, -(-n // F.TILE_ROWS), k // F.TILE_COLS, F.TILE_BYTES), dtype=np.uint8),
                        rng.uniform(1e-3, 1e-2, (n, k // group_size)).astype(np.float32),
                        rng.uniform(0, 4, (n, k // group_size)).astype(np.float32), group_size)
    inits = [from_array(sw.packed, "slices"), from_array(sw.scales, "scales"), from_array(sw.zero_points, "zero_points")]
    inputs = x_info + [helper.make_tensor_value_info("slice_counts", TensorProto.INT32, [m])]
    for accuracy, prefix in ((ops.ACCURACY_INT8, "rsmm"), (ops.ACCURACY_F32, "rsmm_f32")):
        os.environ["MOBIQ_KERNEL"] = kernels[accuracy]
        try:
            node = helper.make_node(ops.OP_TYPE, ["X", "slices", "scales", "zero_points", "slice_counts"], ["Y"],
                                    domain=ops.DOMAIN, K=k, N=n, group_size=group_size, num_slices=4,
                                    accuracy_level=accuracy)
            session = _single_node_session(node, inits, inputs, threads)
        finally:
            del os.environ["MOBIQ_KERNEL"]
        for depth in range(1, 5):
            runs[f"{prefix}_{depth}"] = (session, {"X": x, "slice_counts": np.full(m, depth, np.int32)})
    for bits in (2, 4, 8):
        blob = rng.integers(0, 256, (n, k // group_size, group_size * bits // 8), dtype=np.uint8)
        scales = rng.uniform(1e-3, 1e-2, n * k // group_size).astype(np.float32)
        node = helper.make_node("MatMulNBits", ["X", "B", "scales"], ["Y"], domain="com.microsoft", K=k, N=n,
                                bits=bits, block_size=group_size, accuracy_level=4)
        session = _single_node_session(node, [from_array(blob, "B"), from_array(scales, "scales")], x_info, threads)
        runs[f"matmulnbits_{bits}"] = (session, {"X": x})
    w = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
    session = _single_node_session(helper.make_node("MatMul", ["X", "W"], ["Y"]), [from_array(w, "W")], x_info, threads)
    runs["matmul_fp32"] = (session, {"X": x})
    return _timed_together(runs)


TARGETS = (  # (description, numerator, denominator, max ratio) on M=1, 4096x4096, int8 mode
    ("rsmm_2 <= 1.0 x matmulnbits_4", "rsmm_2", "matmulnbits_4", 1.0),
    ("rsmm_1 <= 0.6 x matmulnbits_4", "rsmm_1", "matmulnbits_4", 0.6),
    ("rsmm_1 <= 0.35 x matmulnbits_2", "rsmm_1", "matmulnbits_2", 0.35),
    ("rsmm_4 <= 1.0 x matmulnbits_8", "rsmm_4", "matmulnbits_8", 1.0),
    ("rsmm_4 <= 0.5 x matmul_fp32", "rsmm_4", "matmul_fp32", 0.5),
    ("rsmm_1 <= 0.4 x rsmm_4", "rsmm_1", "rsmm_4", 0.4),
    ("rsmm_f32_2 <= 2.0 x matmulnbits_4", "rsmm_f32_2", "matmulnbits_4", 2.0),
)


def _kernel_command(args: argparse.Namespace) -> int:
    from mobiquant.runtime import ops

    shapes = [s for s in KERNEL_SHAPES if not args.small or s[0] < 4096 or s == (4096, 4096, 128)]
    rng = np.random.default_rng(0)
    kernels = {acc: ops.usable_kernels(acc)[0] for acc in (ops.ACCURACY_INT8, ops.ACCURACY_F32)}
    if args.kernel:
        usable = ops.usable_kernels(ops.ACCURACY_INT8)
        if args.kernel not in usable:
            raise SystemExit(f"[mobiq-bench] --kernel expected one of {', '.join(usable)}; got {args.kernel}")
        kernels[ops.ACCURACY_INT8] = args.kernel
    result = {"cpu": cpu_name(), "kernel": kernels[ops.ACCURACY_INT8], "kernel_f32": kernels[ops.ACCURACY_F32],
              "results": []}
    print(f"cpu: {result['cpu']}; kernels: {kernels[ops.ACCURACY_INT8]} (int8), {kernels[ops.ACCURACY_F32]} (f32)")
    cols = ["rsmm_1", "rsmm_2", "rsmm_3", "rsmm_4", "rsmm_f32_2", "matmulnbits_2", "matmulnbits_4", "matmulnbits_8",
            "matmul_fp32"]
    print(f"{'M':>3} {'K':>6} {'N':>6} {'thr':>3} " + " ".join(f"{c:>13}" for c in cols))
    for m in args.m:
        for k, n, g in shapes:
            for threads in args.threads:
                us = kernel_results(m, k, n, g, threads, kernels, rng)
                result["results"].append({"M": m, "K": k, "N": n, "group_size": g, "threads": threads, "us": us})
                print(f"{m:>3} {k:>6} {n:>6} {threads:>3} " + " ".join(f"{us[c]:>13.1f}" for c in cols), flush=True)
    checks = []
    for r in result["results"]:
        if (r["M"], r["K"], r["N"]) != (1, 4096, 4096):
            continue
        for desc, num, den, limit in TARGETS:
            ratio = r["us"][num] / r["us"][den]
            checks.append({"threads": r["threads"], "target": desc, "ratio": ratio, "ok": ratio <= limit})
    by_threads = {r["threads"]: r["us"]["rsmm_2"] for r in result["results"] if (r["M"], r["K"], r["N"]) == (1, 4096, 4096)}
    if 1 in by_threads and 2 in by_threads:
        speedup = by_threads[1] / by_threads[2]
        checks.append({"threads": 2, "target": "2 threads >= 1.6x faster (rsmm_2)", "ratio": speedup, "ok": speedup >= 1.6})
    result["targets"] = checks
    for c in checks:
        print(f"{'PASS' if c['ok'] else 'MISS'} threads={c['threads']} {c['target']}: {c['ratio']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


DEPTHS = (32, 1024, 4096)  # decode is timed after this many tokens of context


def probe_prompt(session, tokens: int) -> np.ndarray:
    """A fixed prompt of ``tokens`` ids [1, tokens] for timing."""
    return np.arange(100, 100 + tokens, dtype=np.int64)[None] % session.vocab


def greedy_step(session, logits: np.ndarray, cache, bits: float | None):
    """One decode step feeding the argmax of the last logits: (logits, cache)."""
    return session.forward(np.array([[int(logits[0, -1].argmax())]], np.int64), cache, bits)


@dataclass
class Variant:
    """One timed configuration: a session at a budget (None: a fixed-precision baseline) and a KV precision."""

    model: str
    session: object
    bits: float | None
    kv_bits: int
    budget: str | None = None
    prefilled: dict = field(default_factory=dict)  # depth -> (logits, KVCache at that depth)

    def start(self, depth: int, steps: int):
        """(logits, cache) after ``depth`` prompt tokens, prefilled once: each run decodes from the same
        cache (a step writes only past the cache's length, so the prefilled positions stay valid)."""
        if depth not in self.prefilled:
            self.session.set_kv_bits(self.kv_bits)
            self.prefilled[depth] = self.session.prefill_last(probe_prompt(self.session, depth),
                                                              self.session.empty_cache(depth + steps), self.bits)
        return self.prefilled[depth]


def decode_steps(session, logits: np.ndarray, cache, bits: float | None, steps: int) -> float:
    """Milliseconds per token of ``steps`` greedy tokens from (logits, cache)."""
    t = time.perf_counter()
    for _ in range(steps):
        logits, cache = greedy_step(session, logits, cache, bits)
    return (time.perf_counter() - t) / steps * 1e3


def decode_run(session, bits: float | None, prompt: np.ndarray, steps: int = 64) -> float:
    """Decode milliseconds per token at ``bits`` over ``steps`` greedy tokens after ``prompt`` [1, P] (one run)."""
    logits, cache = session.prefill_last(prompt, session.empty_cache(prompt.shape[1] + steps), bits)
    return decode_steps(session, logits, cache, bits, steps)


def decode_speeds(variants: list[Variant], depths: tuple[int, ...], rounds: int = 5) -> list[list[float]]:
    """Median ms/token of every variant after each depth. The variants take turns in every round, so a
    slow phase of a shared machine hits all of them alike."""
    times = [[[] for _ in depths] for _ in variants]
    for _ in range(rounds):
        for v, variant in enumerate(variants):
            for d, depth in enumerate(depths):
                times[v][d].append(decode_steps(variant.session, *variant.start(depth, 64), variant.bits, 64))
    return [[float(np.median(t)) for t in per_variant] for per_variant in times]


def switch_cost(session, before: float, after: float, steps: int = 32, steady_steps: int = 8) -> float:
    """First decode step after switching budget, relative to a steady step at the new budget (median of 5)."""
    prompt = probe_prompt(session, 32)
    ratios = []
    for _ in range(5):
        logits, cache = session.forward(prompt, session.empty_cache(32 + steps + 1 + steady_steps), before)
        for _ in range(steps):
            logits, cache = greedy_step(session, logits, cache, before)
        t = time.perf_counter()
        logits, cache = greedy_step(session, logits, cache, after)
        first = time.perf_counter() - t
        steady = []
        for _ in range(steady_steps):
            t = time.perf_counter()
            logits, cache = greedy_step(session, logits, cache, after)
            steady.append(time.perf_counter() - t)
        ratios.append(first / float(np.median(steady)))
    return float(np.median(ratios))


def compare_label(meta: dict) -> str:
    """Rows of a second MoBiQuant file, named by what sets it apart: mobiquant-<routing>, or mobiquant-gqa for a file
    with ONNX Runtime's attention and float32 cache (``mobiq-export onnx --attention gqa``: no kv_cache record);
    ``-fixed-head`` when its LM head reads every slice at every budget (``--fixed-head``, or a file from before);
    ``-v<N>`` for an older format version this runtime still reads."""
    from mobiquant.runtime.modelfile import FORMAT_VERSION

    label = f"mobiquant-{meta.get('routing', 'other')}" if "kv_cache" in meta else "mobiquant-gqa"
    heads = meta.get("lm_head_slices_by_budget", {}).values()
    label += "" if any(k < meta.get("num_slices", 4) for k in heads) else "-fixed-head"
    return label + ("" if meta.get("format_version") == FORMAT_VERSION else f"-v{meta.get('format_version')}")


def _variants(args: argparse.Namespace, session) -> list[Variant]:
    """The named budgets (and --bits) at the default cache precision, ``mid`` at every --kv-bits, and the
    baselines (another MoBiQuant file at our budgets; a fixed-precision file once, with its float32 cache)."""
    from mobiquant.runtime import kvcache
    from mobiquant.runtime.session import ModelSession

    named = dict(session.info.named_budgets)
    for bits in args.bits or []:  # budgets between the named ones (e.g. where routers decide per token)
        named[f"{bits:g}"] = bits
    variants = [Variant("mobiquant", session, bits, kvcache.DEFAULT_BITS, name) for name, bits in named.items()]
    variants += [Variant("mobiquant", session, named["mid"], kv, "mid") for kv in args.kv_bits
                 if kv != kvcache.DEFAULT_BITS]
    for directory in args.baseline or []:
        base = ModelSession(directory, args.threads)
        if base.elastic:  # e.g. the same checkpoint with static routing, or with ONNX Runtime's attention
            label = compare_label(base.info.meta)
            variants += [Variant(label, base, bits, base.kv_bits, name) for name, bits in named.items()]
        else:
            variants.append(Variant(base.info.meta.get("kind"), base, None, 32))
    return variants


def _llamacpp_rows(model_name: str, depths: tuple[int, ...], threads: int) -> list[dict]:
    """llama.cpp's llama-bench on the model's GGUF requantized to Q4_0 (f16 and q8_0 caches) and Q8_0 (f16)."""
    from . import llamacpp

    llamacpp.build()
    source = llamacpp.model_gguf(model_name)
    rows = []
    for qtype, cache in (("Q4_0", "f16"), ("Q4_0", "q8_0"), ("Q8_0", "f16")):
        runs = llamacpp.bench(llamacpp.quantized_gguf(source, qtype), list(depths), threads, cache, n_gen=64,
                              repetitions=5)
        rows.append({"model": f"llama.cpp {qtype}", "budget": None, "bits": None, "kv_bits": cache,
                     "ms_per_token": {str(r["depth"]): r["ms_per_token"] for r in runs}})
    return rows


def _decode_command(args: argparse.Namespace) -> int:
    import subprocess

    from mobiquant.runtime.session import ModelSession

    session = ModelSession(args.model, args.threads)
    depths = tuple(d for d in args.depths if d + 64 <= session.info.context)
    result = {"cpu": cpu_name(), "threads": args.threads, "depths": depths, "rows": []}
    variants = _variants(args, session)
    rows = [{"model": v.model, "budget": v.budget, "bits": v.bits, "kv_bits": v.kv_bits} for v in variants]
    for row, ms in zip(rows, decode_speeds(variants, depths)):
        row["ms_per_token"] = {str(d): t for d, t in zip(depths, ms)}
        row["cache_mb_at_deepest"] = (variants[rows.index(row)].session.cache_bytes_per_position(row["kv_bits"])
                                      * (depths[-1] + 64) / 2**20)
    del variants  # the prefilled caches
    if args.llamacpp:
        rows += _llamacpp_rows(args.llamacpp, depths, args.threads or 2)
    result["rows"] = rows
    named = session.info.named_budgets
    session.set_kv_bits(8)
    result["switch_low_to_max"] = switch_cost(session, named["low"], named["max"])
    result["switch_max_to_low"] = switch_cost(session, named["max"], named["low"])
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mobiquant.runtime.cli", str(args.model), "--budget", "low", "-n", "1",
                    "-p", "Hi"], check=True, capture_output=True)
    result["first_token_s"] = time.perf_counter() - t
    print(f"{'model':>18} {'budget':>6} {'bits':>4} {'kv':>4} " +
          " ".join(f"{'after ' + str(d):>16}" for d in depths) + "   (ms/token, tok/s)")
    for r in rows:
        print(f"{r['model']:>18} {str(r['budget'] or ''):>6} {str(r['bits'] or ''):>4} {str(r['kv_bits']):>4} " +
              " ".join(f"{r['ms_per_token'][str(d)]:7.2f} {1e3 / r['ms_per_token'][str(d)]:7.1f} " for d in depths))
    _print_ratios(result, rows, depths)
    print(f"switch cost (first step / steady step): low->max {result['switch_low_to_max']:.2f}, "
          f"max->low {result['switch_max_to_low']:.2f}")
    print(f"mobiq-run start to first token (low): {result['first_token_s']:.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def _print_ratios(result: dict, rows: list[dict], depths: tuple[int, ...]) -> None:
    """The targets' ratios (speed = 1 / ms per token), printed and stored in ``result``."""
    ms = {(r["model"], r["budget"], r["kv_bits"]): r["ms_per_token"] for r in rows}
    short = str(depths[0])
    mid8 = ms.get(("mobiquant", "mid", 8))

    def ratio(key: str, ours, theirs, depth: str, target: str) -> None:
        if ours and theirs:
            result[key] = theirs[depth] / ours[depth]
            print(f"{key}: {result[key]:.2f}x ({target})")

    for kind, target in (("fp32", "target >= 1.5"), ("matmulnbits-int4", "target >= 1.2")):
        ratio(f"low_vs_{kind}", ms.get(("mobiquant", "low", 8)), ms.get((kind, None, 32)), short, target)
    for d in depths:
        ratio(f"mid_vs_matmulnbits-int4_at_{d}", mid8, ms.get(("matmulnbits-int4", None, 32)), str(d),
              "target >= 1.1 short, >= 1.0 after 1,024")
        ratio(f"mid_vs_llama.cpp_Q4_0_q8_0_at_{d}", mid8, ms.get(("llama.cpp Q4_0", None, "q8_0")), str(d),
              "target > 1 after 1,024 and 4,096")
    for (model, budget, kv), times in ms.items():  # slowdown with depth at each cache precision
        for d in depths[1:]:
            key = f"{model}_{budget or ''}_kv{kv}_{d}_over_{short}"
            result[key] = times[str(d)] / times[short]
            if model == "mobiquant" and budget == "mid" or model.startswith(("matmul", "llama")):
                print(f"{model} {budget or ''} kv {kv}: after {d} / after {short}: {result[key]:.2f}x"
                      + (" (target <= 1.25 at 1,024, <= 1.6 at 4,096 with 8 bits)" if kv == 8 else ""))
    for r in rows:  # a second MoBiQuant file at the same budgets: the cost of what differs (e.g. its routers)
        own = ms.get(("mobiquant", r["budget"], 8))
        if r["model"].startswith("mobiquant-") and own:
            key = f"{r['budget']}_vs_{r['model']}"
            result[key] = r["ms_per_token"][short] / own[short]
            print(f"decode {r['budget']}: mobiquant / {r['model']}: {result[key]:.3f}x")


def _layer_command(args: argparse.Namespace) -> int:
    from safetensors.numpy import load_file

    entry = load_entry(args.model)
    folder = entry.hf_dir
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError(f"[mobiq-bench] fp32 weights expected in {folder}; got none (run `make setup`)")
    tensors = {}
    for f in files:
        tensors.update(load_file(f))
    names = args.layer or list(DEFAULT_LAYERS)
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ModelError(f"[mobiq-bench] layer expected a 2-D weight of {entry.name}; got unknown {missing}")
    result = {"cpu": cpu_name(), "model": entry.name,
              "group_size": entry.group_size, "threads": args.threads, "layers": {}}
    print(f"{entry.name}: g={entry.group_size}, S={entry.num_slices}, threads={args.threads}")
    print(f"{'layer':44} {'k':>2} {'bits':>4} {'rel err W':>10} {'op err':>9} {'KiB/token':>10} {'us/token':>9}")
    for name in names:
        rows = layer_report(tensors[name].astype(np.float32), entry.group_size, entry.num_slices, args.threads)
        result["layers"][name] = {"shape": list(tensors[name].shape), "rows": rows}
        for r in rows:
            print(f"{name:44} {r['k']:>2} {r['bits']:>4} {r['weight_rel_error']:>10.4f} {r['op_rel_error']:>9.1e} "
                  f"{r['bytes_per_token'] / 1024:>10.1f} {r['us_per_token']:>9.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mobiq-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    decode = sub.add_parser("decode", help="decode speed per named budget, budget-switch cost, time to first token")
    decode.add_argument("model", help="exported model directory")
    decode.add_argument("--baseline", action="append", help="baseline model directory to time too (repeatable)")
    decode.add_argument("--threads", type=int, default=None, help="intra-op threads (default: ONNX Runtime's)")
    decode.add_argument("--bits", type=float, action="append",
                        help="also time this budget (bits) beside the named ones, in every MoBiQuant file (repeatable)")
    decode.add_argument("--depths", type=lambda t: tuple(int(x) for x in t.split(",")), default=DEPTHS,
                        help=f"decode after these many tokens of context (default: {','.join(map(str, DEPTHS))})")
    decode.add_argument("--kv-bits", type=lambda t: tuple(int(x) for x in t.split(",")), default=(16, 8, 4),
                        help="also time mid at these KV cache precisions (default: 16,8,4; 8 is the default cache)")
    decode.add_argument("--llamacpp", metavar="MODEL_NAME",
                        help="also run llama.cpp's llama-bench on this registry model's GGUF as Q4_0 (f16 and q8_0 "
                             "caches) and Q8_0 (builds llama.cpp once: make llamacpp)")
    decode.add_argument("--json", help="also write the results to this JSON file")
    kernel = sub.add_parser("kernel", help="ResidualSliceMatMul against MatMulNBits and fp32 MatMul")
    kernel.add_argument("--threads", default="1,2", help="comma-separated intra-op thread counts (default: 1,2)")
    kernel.add_argument("--m", default="1,64", help="comma-separated token counts M (default: 1,64)")
    kernel.add_argument("--small", action="store_true", help="skip the 4096x11008 and 11008x4096 shapes")
    kernel.add_argument("--kernel", help="int8 kernel to time instead of the fastest usable one "
                                         "(e.g. rsmm_i8_16x4__avx2 on a CPU that has better)")
    kernel.add_argument("--json", help="also write the results to this JSON file")
    footprint = sub.add_parser("footprint", help="per named budget: file size, weight bytes read per token, "
                                                 "peak RSS of mobiq-run, decode ceiling at a Pi's bandwidth")
    footprint.add_argument("model", help="exported model directory")
    footprint.add_argument("--threads", type=int, default=None, help="intra-op threads (default: ONNX Runtime's)")
    footprint.add_argument("--json", help="also write the results to this JSON file")
    layer = sub.add_parser("layer", help="format error and op cost per depth on real weights")
    layer.add_argument("model", nargs="?", default="smollm2-135m", help="registry model (default: smollm2-135m)")
    layer.add_argument("--layer", action="append", help=f"weight name (repeatable; default: {', '.join(DEFAULT_LAYERS)})")
    layer.add_argument("--threads", type=int, default=1, help="intra-op threads (default: 1)")
    layer.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.command == "decode":
        return _decode_command(args)
    if args.command == "footprint":
        from .footprint import run

        return run(args)
    if args.command == "kernel":
        try:
            args.threads = [int(t) for t in args.threads.split(",")]
            args.m = [int(m) for m in args.m.split(",")]
        except ValueError:
            parser.error(f"--threads/--m expected comma-separated integers; got {args.threads!r}/{args.m!r}")
        if min(args.threads) < 1 or min(args.m) < 1:
            parser.error("--threads/--m expected values >= 1")
        return _kernel_command(args)
    if args.threads < 1:
        parser.error(f"--threads expected >= 1; got {args.threads}")
    try:
        return _layer_command(args)
    except (ModelError, F.FormatError) as e:
        print(e, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
