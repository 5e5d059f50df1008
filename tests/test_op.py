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
# (accuracy_level, MOBIQ_KERNEL): "" is the kernel the library picks for this CPU and shape.
VARIANTS = [(0, "reference"), (0, "portable"), (0, ""), (4, "portable"), (4, "")]


def problem(m, k, n, g, counts, bias, seed=0, accuracy=0):
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
    return feeds, dict(attrs_for(k, n, g, S), accuracy_level=accuracy), ref


def rel_err(y, ref):
    return float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-30))


def rel_frobenius(y, ref):
    return float(np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-30))


def check(y, ref, accuracy, context):
    """Exact mode: max error <= 1e-5 of max |ref|; int8 activations: relative Frobenius <= 2e-2."""
    err = rel_err(y, ref) if accuracy == 0 else rel_frobenius(y, ref)
    worst = np.unravel_index(np.argmax(np.abs(y - ref)), y.shape)
    assert err <= (1e-5 if accuracy == 0 else 2e-2), f"{context}: relative error {err:.2e}, worst at {worst}"


GRID = [(m, mult * g, n, g, counts)
        for m, (g, mult), n, counts in itertools.product(
            [1, 2, 7, 64], itertools.product([32, 64, 128], [1, 2, 5]), [17, 24], ["mixed", "all-1", f"all-{S}", "absent"])]


@pytest.mark.parametrize("accuracy,kernel", VARIANTS, ids=[f"acc{a}-{k or 'auto'}" for a, k in VARIANTS])
@pytest.mark.parametrize("m,k,n,g,counts", GRID)
def test_op_matches_float64_reference(monkeypatch, accuracy, kernel, m, k, n, g, counts):
    if kernel:
        monkeypatch.setenv("MOBIQ_KERNEL", kernel)
    case = (m + k + n) % 4  # threads and bias vary across the grid
    threads, bias = 1 + case % 2, case >= 2
    feeds, attrs, ref = problem(m, k, n, g, counts, bias, seed=m * 1000 + k + n, accuracy=accuracy)
    y = run_rsmm(feeds, attrs, threads)
    assert y.shape == (m, n)
    check(y, ref, accuracy, f"accuracy_level={accuracy} kernel={kernel or 'auto'} M={m} K={k} N={n} g={g} "
                            f"counts={counts} threads={threads} bias={bias}")


@pytest.mark.parametrize("accuracy", [0, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_threads_give_identical_results(bias, accuracy):
    feeds, attrs, _ = problem(64, 640, 333, 64, "mixed", bias, accuracy=accuracy)
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


@pytest.mark.parametrize("accuracy", [0, 4])
def test_tokens_at_k_never_read_later_slices(accuracy):
    """Garbage in slices k+1..S must not change a batch that reads k slices."""
    for k in range(1, S + 1):
        feeds, attrs, _ = problem(5, 128, 9, 64, "all-1", False, accuracy=accuracy)
        feeds["slice_counts"] = np.full(5, k, np.int32)
        clean = run_rsmm(feeds, attrs)
        feeds["slices"] = feeds["slices"].copy()
        feeds["slices"][k:] = 0xFF ^ feeds["slices"][k:]
        np.testing.assert_array_equal(run_rsmm(feeds, attrs), clean, err_msg=f"k={k}")


# Every kernel this CPU runs, per mode (NEON runs under qemu in test_kernels_native.py, whose native kernel
# test covers non-finite tokens for every kernel), and the float64 reference.
ALL_KERNELS = [(0, "reference")] + [(acc, name) for acc in (0, 4) for name in reversed(ops.KERNELS[acc])
                                    if name in ops.usable_kernels(acc)]


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize("accuracy,kernel", ALL_KERNELS, ids=[f"acc{a}-{k}" for a, k in ALL_KERNELS])
@pytest.mark.parametrize("m,bad,counts", [(1, 0, "all-1"), (7, 3, "mixed"), (9, 8, "absent")])
def test_a_nonfinite_token_gives_a_nan_row(monkeypatch, accuracy, kernel, value, m, bad, counts):
    """docs/design.md, "The op": a token with a NaN or an infinity gets Y all NaN; every other token's Y is
    bitwise what it is with that token finite (and matches float64 as the grid test checks)."""
    monkeypatch.setenv("MOBIQ_KERNEL", kernel)
    feeds, attrs, ref = problem(m, 192, 40, 64, counts, True, seed=m, accuracy=accuracy)
    clean = run_rsmm(feeds, attrs)
    for column in (0, 100, 191):
        x = feeds["X"].copy()
        x[bad, column] = value
        y = run_rsmm({**feeds, "X": x}, attrs)
        context = f"accuracy_level={accuracy} kernel={kernel} X[{bad}, {column}]={value} M={m} counts={counts}"
        assert np.isnan(y[bad]).all(), f"{context}: row {bad} = {y[bad]}"
        others = np.arange(m) != bad
        np.testing.assert_array_equal(y[others], clean[others], err_msg=context)
        if others.any():
            check(y[others], ref[others], accuracy, context)


@pytest.mark.parametrize("accuracy", [0, 4])
def test_nonfinite_tokens_anywhere_in_a_prefill(accuracy):
    """Several bad tokens, each value kind, some wholly non-finite, across 2 threads: exactly those rows are NaN."""
    feeds, attrs, _ = problem(64, 640, 333, 64, "mixed", True, accuracy=accuracy)
    clean = run_rsmm(feeds, attrs, 2)
    x = feeds["X"].copy()
    bad = {5: np.nan, 17: np.inf, 40: -np.inf, 63: np.nan}
    for t, v in bad.items():
        x[t, (t * 37) % 640] = v
    x[30] = np.inf
    x[31, ::2], x[31, 1::2] = np.inf, -np.inf
    y = run_rsmm({**feeds, "X": x}, attrs, 2)
    rows = sorted([*bad, 30, 31])
    assert np.isnan(y[rows]).all()
    others = np.setdiff1d(np.arange(64), rows)
    assert np.isfinite(y[others]).all()
    np.testing.assert_array_equal(y[others], clean[others])


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
