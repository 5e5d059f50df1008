"""The ``ResidualSliceMatMul`` custom op from Python: library path, ONNX schema, session helper.

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

INPUTS = ("X", "slices", "scales", "zero_points", "slice_counts", "bias")
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
    """Register the op's ONNX schema (idempotent) so ``onnx.checker``/shape inference accept it."""
    global _schema_registered
    if _schema_registered:
        return
    from onnx import defs, helper

    if defs.has(OP_TYPE, DOMAIN):
        _schema_registered = True
        return
    P, A = defs.OpSchema.FormalParameter, defs.OpSchema.Attribute
    optional = defs.OpSchema.FormalParameterOption.Optional
    ints = defs.OpSchema.AttrType.INT
    schema = defs.OpSchema(
        OP_TYPE,
        DOMAIN,
        OP_VERSION,
        "Y[t] = X[t] @ W^(slice_counts[t])^T + bias, W stored as residual 2-bit slices (MoBiQuant).",
        inputs=[
            P("X", "T", "float32 [..., K] activations"),
            P("slices", "tensor(uint8)", "packed codes [S, N, K/4], slice-major, layout version `layout`"),
            P("scales", "T", "s1 per (row, group) [N, K/group_size]"),
            P("zero_points", "T", "real-valued z1 per (row, group) [N, K/group_size]"),
            P("slice_counts", "tensor(int32)", "active slices per token, in [1, S]", param_option=optional),
            P("bias", "T", "[N]", param_option=optional),
        ],
        outputs=[P("Y", "T", "float32 [..., N]")],
        type_constraints=[("T", ["tensor(float)"], "float32 only")],
        attributes=[
            A("K", ints, "input features"),
            A("N", ints, "output features"),
            A("group_size", ints, "input columns per (scale, zero point)"),
            A("num_slices", ints, "S, slices stored"),
            A("slice_bits", helper.make_attribute("slice_bits", 2), "bits per slice (2)"),
            A("layout", helper.make_attribute("layout", 1), "packed format version"),
            A("accuracy_level", helper.make_attribute("accuracy_level", 0),
              "0/1: exact float32 compute; 4: int8 activations (as MatMulNBits)"),
        ],
    )
    schema.set_type_and_shape_inference_function(_infer_output)
    defs.register_schema(schema)
    _schema_registered = True


def _infer_output(ctx) -> None:
    """Y: float32 with X's leading dims and N as the last one."""
    from onnx import TypeProto, helper

    x_type = ctx.get_input_type(0)
    n = helper.get_attribute_value(ctx.get_attribute("N"))
    out = TypeProto()
    out.tensor_type.elem_type = x_type.tensor_type.elem_type
    if x_type.tensor_type.HasField("shape"):
        dims = list(x_type.tensor_type.shape.dim)[:-1]
        for d in dims:
            out.tensor_type.shape.dim.add().CopyFrom(d)
        out.tensor_type.shape.dim.add().dim_value = n
    ctx.set_output_type(0, out)
