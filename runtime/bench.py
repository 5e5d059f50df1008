"""``mobiq-bench``: measurements side by side, printed as a table and written as JSON.

    mobiq-bench layer [MODEL] [--layer NAME] [--threads N] [--json FILE]

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
from pathlib import Path

import numpy as np

from . import format as F
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

    from . import ops

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
    result = {"cpu": platform.processor() or platform.machine(), "model": entry.name,
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
    layer = sub.add_parser("layer", help="format error and op cost per depth on real weights")
    layer.add_argument("model", nargs="?", default="smollm2-135m", help="registry model (default: smollm2-135m)")
    layer.add_argument("--layer", action="append", help=f"weight name (repeatable; default: {', '.join(DEFAULT_LAYERS)})")
    layer.add_argument("--threads", type=int, default=1, help="intra-op threads (default: 1)")
    layer.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads expected >= 1; got {args.threads}")
    try:
        return _layer_command(args)
    except (ModelError, F.FormatError) as e:
        print(e, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
