"""Every malformed input of the op (docs/design.md) fails with an ORT error naming the op, what was expected and what came."""

import numpy as np
import pytest

from mobiquant.runtime import format as F
from rsmm_graph import attrs_for, rsmm_session

N, K, G, S = 12, 128, 64, 4


def good():
    rng = np.random.default_rng(3)
    sw = F.quantize(rng.standard_normal((N, K)), G, S)
    feeds = {"X": rng.standard_normal((3, K)).astype(np.float32), "slices": sw.packed, "scales": sw.scales,
             "zero_points": sw.zero_points, "slice_counts": np.array([1, 2, 4], np.int32),
             "bias": np.zeros(N, np.float32)}
    return feeds, attrs_for(K, N, G, S)


WEIGHTS = ("slices", "scales", "zero_points", "bias")


def fails(feeds, attrs, *patterns, constants=()):
    with pytest.raises(Exception) as info:
        rsmm_session(feeds, attrs, constants=constants).run(None, {n: v for n, v in feeds.items() if n not in constants})
    text = str(info.value)
    assert "ResidualSliceMatMul" in text, text
    for p in patterns:
        assert p in text, f"{p!r} not in: {text}"


def test_good_inputs_run():
    feeds, attrs = good()
    assert rsmm_session(feeds, attrs).run(None, feeds)[0].shape == (3, N)


def test_constant_weights_give_the_same_output():
    """Weights as initializers take the checked-once path; it must compute what the per-run path does."""
    feeds, attrs = good()
    feeds["bias"] = np.linspace(-1, 1, N, dtype=np.float32)
    want = rsmm_session(feeds, attrs).run(None, feeds)[0]
    got = rsmm_session(feeds, attrs, constants=WEIGHTS).run(None, {"X": feeds["X"], "slice_counts": feeds["slice_counts"]})[0]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name,dtype", [("X", np.float64), ("slices", np.int8), ("scales", np.float64),
                                        ("zero_points", np.int32), ("slice_counts", np.int64), ("bias", np.float64)])
def test_wrong_dtype(name, dtype):
    feeds, attrs = good()
    feeds[name] = feeds[name].astype(dtype)
    fails(feeds, attrs)


@pytest.mark.parametrize("name,shape,expected", [
    ("X", (3, K + 4), "X expected shape [..., K=128]; got (3, 132)"),
    ("slices", (S, 1, K // 16, 65), "slices shape expected (4, 1, 8, 64)"),
    ("slices", (S - 1, 1, K // 16, 64), "got (3, 1, 8, 64)"),
    ("scales", (N, 3), "scales shape expected (12, 2)"),
    ("zero_points", (N + 1, 2), "zero_points shape expected (12, 2)"),
    ("bias", (N - 1,), "bias shape expected (12,)"),
    ("slice_counts", (2,), "slice_counts expected one count per token (3"),
])
@pytest.mark.parametrize("constant_weights", [False, True], ids=["weights-as-inputs", "weights-as-initializers"])
def test_wrong_shape(name, shape, expected, constant_weights):
    """Constant weights are checked once when the session is created, inputs on every run; same message."""
    feeds, attrs = good()
    feeds[name] = np.zeros(shape, feeds[name].dtype)
    fails(feeds, attrs, expected, constants=WEIGHTS if constant_weights else ())


@pytest.mark.parametrize("bad", [0, 5, -1])
def test_slice_count_out_of_range_is_an_error_not_a_clamp(bad):
    feeds, attrs = good()
    feeds["slice_counts"] = np.array([1, bad, 2], np.int32)
    fails(feeds, attrs, "slice_counts expected values in [1, 4]", f"got {bad} at token 1")


@pytest.mark.parametrize("attr,value,expected", [
    ("group_size", 48, "K % group_size expected 0; got K=128, group_size=48"),
    ("group_size", 24, "group_size expected a positive multiple of 16"),
    ("group_size", 65536 + 16, "group_size expected <= 65536 (a group's integer dot products must fit int32); got 65552"),
    ("group_size", 1 << 20, "group_size expected <= 65536"),
    ("layout", 1, "unknown version 1"),
    ("slice_bits", 3, "slice_bits expected 2; got 3"),
    ("num_slices", 0, "num_slices expected 1..8; got 0"),
    ("num_slices", 9, "num_slices expected 1..8; got 9"),
    ("K", -128, "K and N expected > 0"),
    ("accuracy_level", 2, "accuracy_level expected 0 or 1 (float32) or 4 (int8 activations); got 2"),
])
def test_bad_attributes(attr, value, expected):
    feeds, attrs = good()
    attrs[attr] = value
    fails(feeds, attrs, expected)


def test_missing_attribute():
    feeds, attrs = good()
    del attrs["N"]
    fails(feeds, attrs, "attribute 'N' expected an int; got none")


def test_unknown_forced_kernel(monkeypatch):
    monkeypatch.setenv("MOBIQ_KERNEL", "avx9000")
    feeds, attrs = good()
    fails(feeds, attrs, "MOBIQ_KERNEL expected one of", "got 'avx9000'")


def test_the_largest_group_size_runs():
    """group_size 65536 (the bound: int32 sums of int8 x code products) is accepted and exact in both modes."""
    k, n = 65536, 16
    rng = np.random.default_rng(4)
    sw = F.quantize(rng.standard_normal((n, k)), k, S)
    x = rng.standard_normal((2, k)).astype(np.float32)
    feeds = {"X": x, "slices": sw.packed, "scales": sw.scales, "zero_points": sw.zero_points}
    ref = x.astype(np.float64) @ sw.dequantize(S).T
    for accuracy, tolerance in ((0, 1e-4), (4, 2e-2)):
        y = rsmm_session(feeds, dict(attrs_for(k, n, k, S), accuracy_level=accuracy)).run(None, feeds)[0]
        assert np.linalg.norm(y - ref) / np.linalg.norm(ref) <= tolerance, f"accuracy_level={accuracy}"


def refused_at_load(feeds, attrs, constants, message, node_name="layers.0.q_proj"):
    """Session creation (not a run) fails with exactly ``message`` after the op's name."""
    with pytest.raises(Exception) as info:
        rsmm_session(feeds, attrs, constants=constants, node_name=node_name)
    text = str(info.value)
    assert "[ResidualSliceMatMul] " + message in text, text


@pytest.mark.parametrize("name,value,shown", [
    ("scales", 0.0, "0"), ("scales", -0.25, "-0.25"), ("scales", np.nan, "nan"), ("scales", np.inf, "inf"),
    ("scales", -np.inf, "-inf"), ("zero_points", np.nan, "nan"), ("zero_points", -np.inf, "-inf"),
    ("bias", np.inf, "inf"),
])
@pytest.mark.parametrize("constants", [WEIGHTS, ("scales", "zero_points", "bias")],
                         ids=["all-weights-constant", "slices-as-input"])
def test_bad_constant_parameter_is_refused_at_load(name, value, shown, constants):
    """Constant scales (finite, > 0), zero points and bias (finite) are checked once at session creation; the
    error names the node, the input, its initializer and the first bad value's index."""
    feeds, attrs = good()
    feeds[name] = feeds[name].copy()
    at = (7,) if name == "bias" else (7, 1)
    feeds[name][at] = value
    feeds[name][(9,) if name == "bias" else (9, 0)] = value  # a later bad value: the first one is reported
    rule = "finite values > 0" if name == "scales" else "finite values"
    index = WEIGHTS.index(name) + 1 + (name == "bias")  # inputs 2, 3, 5
    refused_at_load(feeds, attrs, constants,
                    f"node 'layers.0.q_proj': {name} (input {index}, initializer '{name}') expected {rule}; "
                    f"got {shown} at [{', '.join(map(str, at))}]")


def test_bad_constant_scale_without_a_node_name():
    feeds, attrs = good()
    feeds["scales"] = np.zeros_like(feeds["scales"])
    refused_at_load(feeds, attrs, WEIGHTS, "scales (input 2, initializer 'scales') expected finite values > 0; "
                                           "got 0 at [0, 0]", node_name="")


def test_bad_parameters_given_as_inputs_are_not_value_checked():
    """Only constant initializers are value-checked (once); per-run inputs are the caller's: a zero scale runs."""
    feeds, attrs = good()
    feeds["scales"] = np.zeros_like(feeds["scales"])
    y = rsmm_session(feeds, attrs).run(None, feeds)[0]
    assert np.isfinite(y).all()
