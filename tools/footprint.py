"""``mobiq-bench footprint``: what a model costs a small device per named budget — file size, weight bytes read
per token, peak memory of ``mobiq-run``, and the decode ceiling memory bandwidth allows.

Bytes per token come from the file's own tensors and the bits the graph reports reading: every routed
``ResidualSliceMatMul`` reads ``count`` of its S slices (avg_bits / 2 slices on average, weighted by weight
size as the graph computes avg_bits) plus its group scales and zero points, as the op reads them (int8 mode,
``accuracy_level`` 4: binary16, half the file's float32, plus one float32 scale per row; docs/design.md "The
op"); the LM head reads its fixed slices and parameters; the embedding one row (codes, scales, zero points) unless a tied model reads it
from the head's slices, already counted. Activations, the KV cache
and norms are left out: the ceiling is an upper bound. Peak memory is ``mobiq-run``'s own report (a short
chat prompt, 32 new tokens) in a fresh process.

Bandwidths (GB/s): Raspberry Pi 4, STREAM copy measured 5.56 (sci-pi.org.uk/bench/stream.html, Pi 4 B,
headless); Raspberry Pi 5, 17.1 theoretical (LPDDR4X-4267 on a 32-bit bus, the board's specification;
STREAM reaches a fraction of it).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

BANDWIDTH_GBPS = {"pi4_stream": 5.56, "pi5_peak": 17.1}


def _tensors(model_path: Path) -> tuple[list, dict, dict]:
    """(nodes, initializer name -> bytes, initializer name -> dims) of a graph, without its external data."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    sizes, dims = {}, {}
    for t in model.graph.initializer:
        dims[t.name] = list(t.dims)
        sizes[t.name] = int(np.prod(t.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return list(model.graph.node), sizes, dims


def parameter_bytes(node, sizes: dict, dims: dict) -> float:
    """Bytes of slice-1 parameters one ResidualSliceMatMul reads per call (its scales and zero points)."""
    stored = sizes[node.input[2]] + sizes[node.input[3]]
    int8_mode = next((a.i for a in node.attribute if a.name == "accuracy_level"), 0) == 4
    return stored / 2 + 4 * dims[node.input[2]][0] if int8_mode else stored


def bytes_per_token(model_dir: Path, avg_bits: float, head_slices: int) -> float:
    """Weight bytes one decode step reads at ``avg_bits`` (see the module docstring)."""
    nodes, sizes, dims = _tensors(model_dir / "model.onnx")
    counted = {name for n in nodes if n.op_type == "ResidualSliceMatMul" for name in n.input[1:4]}
    total = 0.0
    for node in nodes:
        if node.op_type == "ResidualSliceMatMul":
            slices = next(a.i for a in node.attribute if a.name == "num_slices")
            reads = head_slices if "lm_head" in node.input[1] else avg_bits / 2
            total += reads * sizes[node.input[1]] / slices + parameter_bytes(node, sizes, dims)
        elif node.op_type == "GatherBlockQuantized":
            total += sum(sizes[node.input[i]] for i in (0, 2, 3)) / dims[node.input[0]][0]
        elif node.op_type == "Gather" and node.input[1] == "input_ids" and node.input[0] not in counted:
            total += sizes[node.input[0]] / dims[node.input[0]][0]
    return total


def measure(model_dir: Path, threads: int | None) -> dict:
    from mobiquant.runtime.session import ModelSession

    session = ModelSession(model_dir, threads)
    info = session.info
    prompt = np.arange(3, 35, dtype=np.int64)[None]
    rows = []
    for name, bits in info.named_budgets.items():
        logits, cache = session.forward(prompt, session.empty_cache(64), bits)
        session.forward(np.array([[int(logits[0, -1].argmax())]]), cache, bits)
        avg = session.last_avg_bits  # one decode step
        run = subprocess.run([sys.executable, "-m", "mobiquant.runtime.cli", str(model_dir), "--budget", name,
                              "-n", "32", "--stats", "-p", "Write a haiku about rain."] +
                             (["--threads", str(threads)] if threads else []), capture_output=True, text=True)
        peak = re.search(r"peak memory (\d+) MB", run.stderr)
        if run.returncode != 0 or not peak:
            raise RuntimeError(f"[footprint] mobiq-run at {name} failed: {run.stderr.strip()[-500:]}")
        head = info.meta.get("lm_head_slices_by_budget", {}).get(name, info.meta.get("lm_head_slices", 4))
        read = bytes_per_token(model_dir, avg, int(head))
        rows.append({"budget": name, "target_bits": bits, "avg_bits": avg, "bytes_per_token": read,
                     "peak_rss_mb": int(peak.group(1)),
                     **{f"ceiling_tok_s_{k}": v * 1e9 / read for k, v in BANDWIDTH_GBPS.items()}})
    data = sum(p.stat().st_size for p in model_dir.iterdir() if p.name.startswith("model.onnx"))
    return {"model": info.meta.get("source_model"), "file_mb": data / 1e6, "bandwidth_gbps": BANDWIDTH_GBPS,
            "rows": rows}


def markdown(result: dict) -> str:
    head = ("| budget | avg bits read | weight MB read per token | peak RSS of mobiq-run (MB) | Pi 4 ceiling tok/s "
            f"({BANDWIDTH_GBPS['pi4_stream']} GB/s) | Pi 5 ceiling tok/s ({BANDWIDTH_GBPS['pi5_peak']} GB/s) |\n"
            "|---|---|---|---|---|---|")
    rows = [f"| {r['budget']} ({r['target_bits']:g}) | {r['avg_bits']:.2f} | {r['bytes_per_token'] / 1e6:.1f} | "
            f"{r['peak_rss_mb']} | {r['ceiling_tok_s_pi4_stream']:.0f} | {r['ceiling_tok_s_pi5_peak']:.0f} |"
            for r in sorted(result["rows"], key=lambda r: r["target_bits"])]
    return "\n".join([f"{result['model']}: model.onnx + data {result['file_mb']:.0f} MB", head, *rows])


def run(args) -> int:
    result = measure(Path(args.model), args.threads)
    print(markdown(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0
