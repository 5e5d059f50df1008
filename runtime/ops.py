"""The ``ResidualSliceMatMul`` custom op from Python: library path, ONNX schema, session helper.

One routed linear is one node: given the router's inputs (``router_w1`` .. ``threshold_row``)
the op computes each token's slice count itself, and skips all router work at threshold
rows that are constant (docs/design.md, "The op").

The C++ library (``libmobiq_ops.so``) is built by the package build and installed
beside this module. :func:`library_path` finds it; :func:`register_schema` tells
``onnx`` about the op so that ``onnx.checker`` and shape inference accept graphs
that use it (ONNX Runtime itself only needs the library).
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

DOMAIN = "ai.mobiquant"
OP_TYPE = "ResidualSliceMatMul"
OP_VERSION = 1
LIBRARY_NAME = "libmobiq_ops.so"
LIBRARY_ENV = "MOBIQ_OPS_LIBRARY"

INPUTS = ("X", "slices", "scales", "zero_points", "slice_counts", "bias", "router_w1", "router_w1_scale", "router_b1",
          "router_w2", "router_b2", "router_thresholds", "threshold_row")
OUTPUTS = ("Y", "slice_counts")
THRESHOLD_NEVER = 1e30  # a threshold no finite score crosses (-: every score crosses); |tau| >= 1e29 counts as one
ATTRIBUTES = ("K", "N", "group_size", "num_slices", "slice_bits", "layout", "accuracy_level")
ACCURACY_F32, ACCURACY_INT8 = 0, 4


class OpLibraryError(RuntimeError):
    """The op library cannot be found or loaded."""


def library_path() -> str:
    """Absolute path of the op library, for ``SessionOptions.register_custom_ops_library``.

    ``$MOBIQ_OPS_LIBRARY`` overrides the lookup (a cross-built or debug library).
    """
    forced = os.environ.get(LIBRARY_ENV)
    if forced:
        if not Path(forced).is_file():
            raise OpLibraryError(f"[mobiq_ops] {LIBRARY_ENV} expected an existing file; got {forced!r}")
        return str(Path(forced).resolve())
    candidates = [Path(__file__).with_name(LIBRARY_NAME)]
    # Editable installs keep the sources in the clone and the built library in site-packages.
    for scheme_key in ("platlib", "purelib"):
        candidates.append(Path(sysconfig.get_paths()[scheme_key]) / "mobiquant" / "runtime" / LIBRARY_NAME)
    for path in candidates:
        if path.is_file():
            return str(path.resolve())
    raise OpLibraryError(
        f"[mobiq_ops] {LIBRARY_NAME} not found (looked in {', '.join(str(p.parent) for p in candidates)}); "
        f"build it with `make setup` or point {LIBRARY_ENV} at it (python: {sys.executable})"
    )


def session_options(threads: int | None = None):
    """``onnxruntime.SessionOptions`` with the op library registered (and ``threads`` intra-op threads)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.register_custom_ops_library(library_path())
    if threads is not None:
        opts.intra_op_num_threads = threads
    return opts


_schema_registered = False


def register_schema() -> None:
    """Register the ops' ONNX schemas (idempotent) so ``onnx.checker``/shape inference accept them."""
    global _schema_registered
    if _schema_registered:
        return
    from onnx import defs, helper

    if defs.has(OP_TYPE, DOMAIN):
        _schema_registered = True
        return
    _register_attention_schema()
    P, A = defs.OpSchema.FormalParameter, defs.OpSchema.Attribute
    optional = defs.OpSchema.FormalParameterOption.Optional
    ints = defs.OpSchema.AttrType.INT
    schema = defs.OpSchema(
        OP_TYPE,
        DOMAIN,
        OP_VERSION,
        "Y[t] = X[t] @ W^(k_t)^T + bias, W stored as residual 2-bit slices (MoBiQuant); k_t = slice_counts[t], or "
        "1 + #(relu(X[t] (router_w1 * router_w1_scale) + router_b1) . router_w2 + router_b2 > "
        "router_thresholds[threshold_row, j]) with a router, or S.",
        inputs=[
            P("X", "T", "float32 [..., K] activations"),
            P("slices", "tensor(uint8)", "packed codes [S, ceil(N/16), K/16, 64], slice-major, layout version `layout`"),
            P("scales", "T", "s1 per (row, group) [N, K/group_size]"),
            P("zero_points", "T", "real-valued z1 per (row, group) [N, K/group_size]"),
            P("slice_counts", "tensor(int32)", "active slices per token, in [1, S]", param_option=optional),
            P("bias", "T", "[N]", param_option=optional),
            P("router_w1", "tensor(int8)", "[K, H] router hidden weights, int8 per hidden unit", param_option=optional),
            P("router_w1_scale", "T", "[H]", param_option=optional),
            P("router_b1", "T", "[H]", param_option=optional),
            P("router_w2", "T", "[H]", param_option=optional),
            P("router_b2", "T", "[1]", param_option=optional),
            P("router_thresholds", "T", "[G, S-1] score thresholds, one row per budget grid point "
              "(+-1e30: never/always)", param_option=optional),
            P("threshold_row", "tensor(int64)", "[] the current budget's row", param_option=optional),
        ],
        outputs=[P("Y", "T", "float32 [..., N]"),
                 P("slice_counts", "tensor(int32)", "[...] the slices each token read", param_option=optional)],
        type_constraints=[("T", ["tensor(float)"], "float32 only")],
        attributes=[
            A("K", ints, "input features"),
            A("N", ints, "output features"),
            A("group_size", ints, "input columns per (scale, zero point)"),
            A("num_slices", ints, "S, slices stored"),
            A("slice_bits", helper.make_attribute("slice_bits", 2), "bits per slice (2)"),
            A("layout", helper.make_attribute("layout", 2), "packed format version"),
            A("accuracy_level", helper.make_attribute("accuracy_level", 0),
              "0/1: exact float32 compute; 4: int8 activations (as MatMulNBits)"),
        ],
    )
    schema.set_type_and_shape_inference_function(_infer_output)
    defs.register_schema(schema)
    _schema_registered = True


def _leading_dims_output(ctx, elem_type: int, last: int | None = None, index: int = 0) -> None:
    """Output ``index``: ``elem_type`` with X's leading dims, then ``last`` when given."""
    from onnx import TypeProto

    x_type = ctx.get_input_type(0)
    out = TypeProto()
    out.tensor_type.elem_type = elem_type
    if x_type.tensor_type.HasField("shape"):
        for d in list(x_type.tensor_type.shape.dim)[:-1]:
            out.tensor_type.shape.dim.add().CopyFrom(d)
        if last is not None:
            out.tensor_type.shape.dim.add().dim_value = last
    ctx.set_output_type(index, out)


ATTENTION_OP_TYPE = "KVAttention"


def _register_attention_schema() -> None:
    """KVAttention (custom_ops/src/ort/attention_op.h): attention over a KV cache of uint8 blocks."""
    from onnx import defs, helper

    P, A = defs.OpSchema.FormalParameter, defs.OpSchema.Attribute
    optional = defs.OpSchema.FormalParameterOption.Optional
    schema = defs.OpSchema(
        ATTENTION_OP_TYPE, DOMAIN, OP_VERSION,
        "Causal grouped-query attention with rotary over a KV cache stored at 32/16/8/4 bits (the precision is "
        "the cache buffers' block size); stores the new positions, then reads the cache as stored.",
        inputs=[P("query", "T", "[B, S, H*D], or q|k|v packed when key and value are absent"),
                P("key", "T", "[B, S, Hkv*D]", param_option=optional),
                P("value", "T", "[B, S, Hkv*D]", param_option=optional),
                P("key_cache", "tensor(uint8)", "[B, Hkv, blocks, block_bytes]"),
                P("value_cache", "tensor(uint8)", "[B, Hkv, blocks, block_bytes]"),
                P("seqlens_k", "tensor(int32)", "[B] tokens so far - 1"),
                P("cos_cache", "T", "[positions, D/2]"), P("sin_cache", "T", "[positions, D/2]"),
                P("q_norm", "T", "[D] per-head RMSNorm weight of the queries, before rotary", param_option=optional),
                P("k_norm", "T", "[D] per-head RMSNorm weight of the new keys, before rotary", param_option=optional)],
        outputs=[P("output", "T", "[B, S, H*D]"), P("present_key", "tensor(uint8)", "key_cache, new positions stored"),
                 P("present_value", "tensor(uint8)", "value_cache, new positions stored")],
        type_constraints=[("T", ["tensor(float)"], "float32 only")],
        attributes=[A("num_heads", defs.OpSchema.AttrType.INT, "query heads"),
                    A("kv_num_heads", defs.OpSchema.AttrType.INT, "key/value heads"),
                    A("scale", defs.OpSchema.AttrType.FLOAT, "on q.k (default 1/sqrt(D))", required=False),
                    A("local_window_size", helper.make_attribute("local_window_size", -1),
                      "keys a query sees, its own included; -1 = all"),
                    A("qk_norm_epsilon", helper.make_attribute("qk_norm_epsilon", 1e-6),
                      "epsilon of the q/k norms (with q_norm and k_norm)")])
    schema.set_type_and_shape_inference_function(_infer_attention)
    defs.register_schema(schema)


def _infer_attention(ctx) -> None:
    """output: float32 [B, S, H*D] (H*D from the query's width, packed or not); presents: the caches' types."""
    from onnx import TensorProto, TypeProto, helper

    q = ctx.get_input_type(0).tensor_type
    out = TypeProto()
    out.tensor_type.elem_type = TensorProto.FLOAT
    if q.HasField("shape") and len(q.shape.dim) == 3:
        heads = helper.get_attribute_value(ctx.get_attribute("num_heads"))
        kv_heads = helper.get_attribute_value(ctx.get_attribute("kv_num_heads"))
        packed = ctx.get_num_inputs() < 3 or not ctx.has_input(1)
        for d in list(q.shape.dim)[:2]:
            out.tensor_type.shape.dim.add().CopyFrom(d)
        width = q.shape.dim[2]
        last = out.tensor_type.shape.dim.add()
        if width.HasField("dim_value"):
            last.dim_value = width.dim_value * heads // (heads + 2 * kv_heads) if packed else width.dim_value
    ctx.set_output_type(0, out)
    for i in (1, 2):
        ctx.set_output_type(i, ctx.get_input_type(2 + i))


def _infer_output(ctx) -> None:
    """Y: X's type with X's leading dims and N as the last one; slice_counts: int32 with X's leading dims."""
    from onnx import TensorProto, helper

    _leading_dims_output(ctx, ctx.get_input_type(0).tensor_type.elem_type,
                         helper.get_attribute_value(ctx.get_attribute("N")))
    if ctx.get_num_outputs() > 1:
        _leading_dims_output(ctx, TensorProto.INT32, index=1)


# Kernel variants by numeric mode, fastest first (names as in custom_ops/include/mobiq/kernels.h).
KERNELS = {
    ACCURACY_INT8: ("rsmm_i8_16x4__avx512vnni", "rsmm_i8_16x4__avxvnni", "rsmm_i8_16x4__avx2", "rsmm_i8_16x4__neondot",
                    "rsmm_i8_16x4__neon", "rsmm_i8_1x1__scalar"),
    ACCURACY_F32: ("rsmm_f32_16x4__avx512vnni", "rsmm_f32_16x4__avx2", "rsmm_f32_16x4__neon", "rsmm_f32_1x1__scalar"),
}


def usable_kernels(accuracy: int, group_size: int = 64) -> list[str]:
    """The kernel variants of ``accuracy`` that this library and CPU can run, fastest first.

    Probes the library by forcing each name through ``MOBIQ_KERNEL`` on a tiny graph.
    """
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    node = helper.make_node(OP_TYPE, ["X", "slices", "scales", "zero_points"], ["Y"], domain=DOMAIN, K=group_size,
                            N=1, group_size=group_size, num_slices=1, accuracy_level=accuracy)
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, group_size])]
    inits = [helper.make_tensor("slices", TensorProto.UINT8, [1, 1, group_size // 16, 64], bytes(group_size * 4),
                                raw=True),
             helper.make_tensor("scales", TensorProto.FLOAT, [1, 1], [1.0]),
             helper.make_tensor("zero_points", TensorProto.FLOAT, [1, 1], [0.0])]
    graph = helper.make_graph([node], "probe", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)])
    usable, saved = [], os.environ.get("MOBIQ_KERNEL")
    quiet = session_options()
    quiet.log_severity_level = 4  # the refusals are expected
    try:
        for name in KERNELS[accuracy]:
            os.environ["MOBIQ_KERNEL"] = name
            try:
                ort.InferenceSession(model.SerializeToString(), quiet).run(
                    None, {"X": np.zeros((1, group_size), np.float32)})
                usable.append(name)
            except Exception:  # noqa: BLE001 — an unusable variant is what we probe for
                continue
    finally:
        if saved is None:
            os.environ.pop("MOBIQ_KERNEL", None)
        else:
            os.environ["MOBIQ_KERNEL"] = saved
    return usable
