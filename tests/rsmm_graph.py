"""Single-node ResidualSliceMatMul graphs for tests: every operand a graph input."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from mobiquant.runtime import format as F
from mobiquant.runtime import ops

_TYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float64): TensorProto.DOUBLE,
          np.dtype(np.uint8): TensorProto.UINT8, np.dtype(np.int8): TensorProto.INT8,
          np.dtype(np.int32): TensorProto.INT32, np.dtype(np.int64): TensorProto.INT64}


def rsmm_session(feeds: dict[str, np.ndarray], attrs: dict[str, int], threads: int = 1,
                 constants: tuple[str, ...] = (), counts_output: bool = False,
                 node_name: str = "") -> ort.InferenceSession:
    """A session running one ResidualSliceMatMul node (named ``node_name``) over ``feeds`` (names from
    ops.INPUTS); the ``constants`` among them become initializers (as in exported models), so run it with
    the others. ``counts_output``: the node also returns the slice counts it used (output 1)."""
    names = [n if n in feeds else "" for n in ops.INPUTS]
    while names and not names[-1]:
        names.pop()
    outputs = ["Y", "counts"] if counts_output else ["Y"]
    node = helper.make_node(ops.OP_TYPE, names, outputs, name=node_name or None, domain=ops.DOMAIN, **attrs)
    inputs = [helper.make_tensor_value_info(n, _TYPES[feeds[n].dtype], None) for n in names if n and n not in constants]
    inits = [numpy_helper.from_array(feeds[n], n) for n in constants]
    outs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)]
    if counts_output:
        outs.append(helper.make_tensor_value_info("counts", TensorProto.INT32, None))
    graph = helper.make_graph([node], "rsmm", inputs, outs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(ops.DOMAIN, 1)])
    return ort.InferenceSession(model.SerializeToString(), ops.session_options(threads))


def run_rsmm(feeds: dict[str, np.ndarray], attrs: dict[str, int], threads: int = 1) -> np.ndarray:
    return rsmm_session(feeds, attrs, threads).run(None, feeds)[0]


def attrs_for(k: int, n: int, group_size: int, num_slices: int) -> dict[str, int]:
    return dict(K=k, N=n, group_size=group_size, num_slices=num_slices, slice_bits=2, layout=F.LAYOUT_VERSION)
