"""The ResidualSliceMatMul op in ONNX Runtime against x @ W^(k)^T computed in numpy float64."""

import itertools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from mobiquant.runtime import format as F
from mobiquant.runtime import ops
from rsmm_graph import attrs_for, rsmm_session, run_rsmm

S = 4
KERNELS = ["scalar", "reference"]
TOLERANCE = {"scalar": 1e-5, "reference": 1e-6}


def problem(m, k, n, g, counts, bias, seed=0):
    rng = np.random.default_rng(seed)
    sw = F.quantize(rng.standard_normal((n, k)), g, S)
    x = rng.standard_normal((m, k)).astype(np.float32)
    feeds = {"X": x, "slices": sw.packed, "scales": sw.scales, "zero_points": sw.zero_points}
    per_token = {"mixed": rng.integers(1, S + 1, m), "all-1": np.ones(m), f"all-{S}": np.full(m, S)}.get(counts)
    if per_token is not None:
        feeds["slice_counts"] = per_token.astype(np.int32)
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    if bias:
        feeds["bias"] = b
    ks = per_token if per_token is not None else np.full(m, S)
    ref = np.stack([x[t].astype(np.float64) @ sw.dequantize(int(ks[t])).T for t in range(m)])
    if bias:
        ref += b
    return feeds, attrs_for(k, n, g, S), ref


def rel_err(y, ref):
    return float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-30))


GRID = [(m, mult * g, n, g, counts)
        for m, (g, mult), n, counts in itertools.product(
            [1, 2, 7, 64], itertools.product([32, 64, 128], [1, 2, 5]), [17, 24], ["mixed", "all-1", f"all-{S}", "absent"])]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("m,k,n,g,counts", GRID)
def test_op_matches_float64_reference(monkeypatch, kernel, m, k, n, g, counts):
    monkeypatch.setenv("MOBIQ_KERNEL", kernel)
    case = (m + k + n) % 4  # threads and bias vary across the grid
    threads, bias = 1 + case % 2, case >= 2
    feeds, attrs, ref = problem(m, k, n, g, counts, bias, seed=m * 1000 + k + n)
    y = run_rsmm(feeds, attrs, threads)
    assert y.shape == (m, n)
    err = rel_err(y, ref)
    worst = np.unravel_index(np.argmax(np.abs(y - ref)), y.shape)
    assert err <= TOLERANCE[kernel], (
        f"kernel={kernel} M={m} K={k} N={n} g={g} counts={counts} threads={threads} bias={bias}: "
        f"relative error {err:.2e} at {worst}, slice count {feeds.get('slice_counts', [S] * m)[worst[0]]}")


@pytest.mark.parametrize("bias", [False, True])
def test_threads_give_identical_results(bias):
    feeds, attrs, _ = problem(64, 640, 333, 64, "mixed", bias)
    one, two = run_rsmm(feeds, attrs, 1), run_rsmm(feeds, attrs, 2)
    np.testing.assert_array_equal(one, two)


def test_leading_dims_are_kept():
    feeds, attrs, ref = problem(6, 128, 10, 64, "mixed", True)
    feeds["X"] = feeds["X"].reshape(2, 3, 128)
    feeds["slice_counts"] = feeds["slice_counts"].reshape(2, 3)
    y = run_rsmm(feeds, attrs)
    assert y.shape == (2, 3, 10)
    assert rel_err(y.reshape(6, 10), ref) < 1e-5


def test_zero_tokens():
    feeds, attrs, _ = problem(1, 64, 8, 64, "mixed", False)
    feeds["X"] = feeds["X"][:0]
    feeds["slice_counts"] = feeds["slice_counts"][:0]
    assert run_rsmm(feeds, attrs).shape == (0, 8)


def test_tokens_at_k_never_read_later_slices():
    """Garbage in slices k+1..S must not change a batch that reads k slices."""
    for k in range(1, S + 1):
        feeds, attrs, _ = problem(5, 128, 9, 64, "all-1", False)
        feeds["slice_counts"] = np.full(5, k, np.int32)
        clean = run_rsmm(feeds, attrs)
        feeds["slices"] = feeds["slices"].copy()
        feeds["slices"][k:] = 0xFF ^ feeds["slices"][k:]
        np.testing.assert_array_equal(run_rsmm(feeds, attrs), clean, err_msg=f"k={k}")


def test_schema_passes_checker_and_shape_inference():
    ops.register_schema()
    n, k, g = 10, 128, 64
    sw = F.quantize(np.random.default_rng(0).standard_normal((n, k)), g)
    node = helper.make_node(ops.OP_TYPE, ["X", "slices", "scales", "zero_points", "slice_counts"], ["Y"],
                            domain=ops.DOMAIN, **attrs_for(k, n, g, S))
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", "seq", k]),
         helper.make_tensor_value_info("slice_counts", TensorProto.INT32, ["batch", "seq"])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", "seq", n])],
        initializer=[onnx.numpy_helper.from_array(a, name) for name, a in
                     [("slices", sw.packed), ("scales", sw.scales), ("zero_points", sw.zero_points)]])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(ops.DOMAIN, 1)])
    onnx.checker.check_model(model, full_check=True)
    model.graph.output[0].type.tensor_type.ClearField("shape")
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph.output[0].type.tensor_type
    assert [d.dim_param or d.dim_value for d in inferred.shape.dim] == ["batch", "seq", n]
