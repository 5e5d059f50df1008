"""ResidualSliceMatMul with its router fused in, against numpy float64: the counts the router
definition gives, the output ``x @ dequant(W, k_t)``, constant threshold rows that must cost no
router work (poisoned router weights that may not be read), and errors that name the op."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from mobiquant.runtime import format as F
from mobiquant.runtime import ops
from rsmm_graph import attrs_for, rsmm_session

K, N, H, G, S, GROUP = 128, 48, 16, 5, 4, 32
ROUTER = ("router_w1", "router_w1_scale", "router_b1", "router_w2", "router_b2", "router_thresholds")
NEVER = np.float32(ops.THRESHOLD_NEVER)


def make_feeds(rng: np.random.Generator, lead: tuple[int, ...]) -> dict[str, np.ndarray]:
    sw = F.quantize(rng.standard_normal((N, K)).astype(np.float32), GROUP, S)
    feeds = {"X": rng.standard_normal((*lead, K)).astype(np.float32), "slices": sw.packed, "scales": sw.scales,
             "zero_points": sw.zero_points,
             "router_w1": rng.integers(-127, 128, (K, H)).astype(np.int8),
             "router_w1_scale": rng.uniform(1e-3, 3e-3, H).astype(np.float32),
             "router_b1": (rng.standard_normal(H) / 4).astype(np.float32),
             "router_w2": rng.standard_normal(H).astype(np.float32),
             "router_b2": np.array([0.1], np.float32),
             "threshold_row": np.array(2, np.int64)}
    scores = reference_scores(feeds)
    # token-dependent rows: thresholds at increasing score quantiles, so every count 1..S occurs
    table = [np.quantile(scores, np.linspace(0.2, 0.8, S - 1) + 0.02 * g) for g in range(G)]
    table[0] = [NEVER] * (S - 1)  # constant rows: every token reads 1 slice / 4 slices / 2 slices
    table[G - 1] = [-NEVER] * (S - 1)
    table[1] = [-NEVER, NEVER, NEVER]
    feeds["router_thresholds"] = np.array(table, np.float32)
    return feeds


def reference_scores(feeds: dict[str, np.ndarray]) -> np.ndarray:
    f = {k: v.astype(np.float64) for k, v in feeds.items()}
    hidden = np.maximum(f["X"] @ (f["router_w1"] * f["router_w1_scale"]) + f["router_b1"], 0)
    return hidden @ f["router_w2"] + f["router_b2"][0]


def reference(feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(counts, y, clear): the router's definition and x @ dequant(W, k_t)^T in float64; ``clear``
    marks tokens whose score is not within 1e-4 of a threshold (float32 may flip exact ties)."""
    scores = reference_scores(feeds)
    tau = feeds["router_thresholds"][int(feeds["threshold_row"])].astype(np.float64)
    counts = 1 + (scores[..., None] > tau).sum(-1)
    clear = np.abs(scores[..., None] - tau).min(-1) > 1e-4
    codes = F.unpack(feeds["slices"], N)
    reads = [F.dequantize(codes, feeds["scales"], feeds["zero_points"], GROUP, k).astype(np.float64)
             for k in range(1, S + 1)]
    x = feeds["X"].astype(np.float64)
    y = np.stack([x @ reads[k - 1].T for k in range(1, S + 1)], -2)  # [..., S, N]
    y = np.take_along_axis(y, (counts - 1)[..., None, None], -2)[..., 0, :]
    return counts, y, clear


def run(feeds, threads=1, constant_router=True, exact=True):
    constants = ("slices", "scales", "zero_points") + (ROUTER if constant_router else ())
    attrs = {**attrs_for(K, N, GROUP, S), "accuracy_level": ops.ACCURACY_F32 if exact else ops.ACCURACY_INT8}
    session = rsmm_session(feeds, attrs, threads, constants, counts_output=True)
    return session.run(None, {n: v for n, v in feeds.items() if n not in constants})


@pytest.mark.parametrize("lead", [(1,), (1, 1), (2, 7), (1, 37), (3, 50)])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("constant_router", [False, True], ids=["router-as-inputs", "router-as-initializers"])
def test_routed_op_matches_the_definition(lead, threads, constant_router):
    rng = np.random.default_rng(sum(lead) + threads)
    feeds = make_feeds(rng, lead)
    for row in range(G):
        feeds["threshold_row"] = np.array(row, np.int64)
        y, counts = run(feeds, threads, constant_router)
        want_counts, want_y, clear = reference(feeds)
        assert counts.dtype == np.int32 and counts.shape == lead and y.shape == (*lead, N)
        np.testing.assert_array_equal(counts[clear], want_counts[clear], err_msg=f"row {row}, lead {lead}")
        ok = clear & (counts == want_counts)
        np.testing.assert_allclose(y[ok], want_y[ok], rtol=1e-5, atol=1e-5 * np.abs(want_y).max(),
                                   err_msg=f"row {row}, lead {lead}")
        if row == 2 and lead[-1] >= 7:
            assert set(np.unique(counts)) == set(range(1, S + 1))


def test_int8_mode_routes_on_the_float_activations():
    """The router reads X as given (float); only the matmul quantizes activations."""
    feeds = make_feeds(np.random.default_rng(3), (2, 33))
    _, counts = run(feeds, exact=False)
    want, _, clear = reference(feeds)
    np.testing.assert_array_equal(counts[clear], want[clear])


@pytest.mark.parametrize("row,count", [(0, 1), (1, 2), (G - 1, S)])
@pytest.mark.parametrize("constant_router", [False, True], ids=["router-as-inputs", "router-as-initializers"])
def test_a_constant_row_reads_no_router_weight(row, count, constant_router):
    """Poisoned router weights give every token count 1 if the MLP runs: at a constant row the op must
    not run it, so every token reads the row's count and Y is finite and exact. As graph inputs the poison
    is NaN (NaN > tau is false); initializers of NaN are refused at load (test_bad_constant_router_value),
    so there router_b2 = -3e38 puts every score below every threshold, -1e30 included."""
    feeds = make_feeds(np.random.default_rng(5), (1, 40))
    clean = dict(feeds, threshold_row=np.array(row, np.int64))
    if constant_router:
        feeds["router_b2"] = np.array([-3e38], np.float32)
    else:
        for name in ("router_w1_scale", "router_b1", "router_w2", "router_b2"):
            feeds[name] = np.full_like(feeds[name], np.nan)
    feeds["threshold_row"] = np.array(row, np.int64)
    y, counts = run(feeds, constant_router=constant_router)
    assert (counts == count).all(), f"row {row}: counts {np.unique(counts)}; expected all {count}"
    _, want_y, _ = reference(clean)
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5 * np.abs(want_y).max())
    feeds["threshold_row"] = np.array(2, np.int64)  # a token-dependent row does run the poisoned MLP
    _, counts = run(feeds, constant_router=constant_router)
    assert (counts == 1).all()


def test_schema_accepts_the_fused_node():
    ops.register_schema()
    feeds = make_feeds(np.random.default_rng(0), (1, 3))
    names = [n if n in feeds else "" for n in ops.INPUTS]
    node = helper.make_node(ops.OP_TYPE, names, ["Y", "counts"], domain=ops.DOMAIN, **attrs_for(K, N, GROUP, S))
    types = {"slices": TensorProto.UINT8, "router_w1": TensorProto.INT8, "threshold_row": TensorProto.INT64}
    inputs = [helper.make_tensor_value_info(n, types.get(n, TensorProto.FLOAT), list(feeds[n].shape) if n != "X"
                                            else [1, "T", K]) for n in names if n]
    outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, "T", N]),
               helper.make_tensor_value_info("counts", TensorProto.INT32, [1, "T"])]
    graph = helper.make_graph([node], "routed", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(ops.DOMAIN, 1)])
    onnx.checker.check_model(model, full_check=True)
    outs = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph.output
    assert [d.dim_value or d.dim_param for d in outs[0].type.tensor_type.shape.dim] == [1, "T", N]
    assert outs[1].type.tensor_type.elem_type == TensorProto.INT32
    assert [d.dim_value or d.dim_param for d in outs[1].type.tensor_type.shape.dim] == [1, "T"]


@pytest.mark.parametrize("change,message", [
    (lambda f: f.update(router_w1=f["router_w1"][:-1].copy()), "router_w1 shape expected [K=128, H >= 1]; got (127, 16)"),
    (lambda f: f.update(router_w1_scale=f["router_w1_scale"][:-1].copy()),
     "router_w1_scale shape expected (16,) (H=16 from router_w1); got (15,)"),
    (lambda f: f.update(router_b1=f["router_b1"][:-1].copy()), "router_b1 shape expected (16,)"),
    (lambda f: f.update(router_w2=np.ones((H, 1), np.float32)), "router_w2 shape expected (16,)"),
    (lambda f: f.update(router_b2=np.zeros(2, np.float32)), "router_b2 expected one value"),
    (lambda f: f.update(threshold_row=np.array(G, np.int64)), "threshold_row expected in [0, 4]; got 5"),
    (lambda f: f.update(threshold_row=np.array(-1, np.int64)), "threshold_row expected in [0, 4]; got -1"),
    (lambda f: f.update(threshold_row=np.array([1, 2], np.int64)), "threshold_row expected one int64 value"),
    (lambda f: f.update(router_thresholds=np.zeros((G, S), np.float32)),
     "router_thresholds shape expected [G >= 1, num_slices - 1 = 3]; got (5, 4)"),
    (lambda f: f.pop("router_b2"), "router inputs router_w1 .. threshold_row expected all 7 or none; got 6"),
    (lambda f: f.update(slice_counts=np.ones(3, np.int32)), "slice_counts expected absent when the node has a router"),
])
@pytest.mark.parametrize("constant_router", [False, True], ids=["router-as-inputs", "router-as-initializers"])
def test_bad_router_input_is_an_error_naming_the_op(change, message, constant_router):
    """Constant router weights are checked once when the session is created, inputs on every run; same message."""
    feeds = make_feeds(np.random.default_rng(0), (1, 3))
    change(feeds)
    pattern = r"\[ResidualSliceMatMul\].*" + "".join("\\" + c if c in "[]().+" else c for c in message)
    with pytest.raises(Exception, match=pattern):
        constants = tuple(n for n in ("slices", "scales", "zero_points") + (ROUTER if constant_router else ())
                          if n in feeds)
        attrs = {**attrs_for(K, N, GROUP, S), "accuracy_level": ops.ACCURACY_F32}
        session = rsmm_session(feeds, attrs, 1, constants, counts_output=True)
        session.run(None, {n: v for n, v in feeds.items() if n not in constants})


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize("exact", [True, False], ids=["float32", "int8"])
@pytest.mark.parametrize("constant_router", [False, True], ids=["router-as-inputs", "router-as-initializers"])
def test_a_nonfinite_token_reads_one_slice_and_gives_nan(value, exact, constant_router):
    """docs/design.md, "The op": where the router decides (a token-dependent row), a token with a NaN or an
    infinity reads 1 slice; at a constant row it reads the row's count. Its Y is NaN; other tokens keep
    their counts and their Y (float rounding aside: their tiles of tokens may differ)."""
    feeds = make_feeds(np.random.default_rng(11), (2, 9))
    bad = (1, 4)
    clean_y, clean_counts = run(feeds, constant_router=constant_router, exact=exact)
    x = feeds["X"].copy()
    x[bad][17] = value
    y, counts = run({**feeds, "X": x}, constant_router=constant_router, exact=exact)
    assert counts[bad] == 1 and np.isnan(y[bad]).all(), (counts[bad], y[bad])
    others = np.ones(counts.shape, bool)
    others[bad] = False
    np.testing.assert_array_equal(counts[others], clean_counts[others])
    np.testing.assert_allclose(y[others], clean_y[others], rtol=1e-6, atol=1e-6 * np.abs(clean_y).max())
    for row, count in ((0, 1), (1, 2), (G - 1, S)):
        y, counts = run({**feeds, "X": x, "threshold_row": np.array(row, np.int64)}, constant_router=constant_router,
                        exact=exact)
        assert (counts == count).all() and np.isnan(y[bad]).all() and np.isfinite(y[others]).all(), f"row {row}"


@pytest.mark.parametrize("name,value,rule,shown", [
    ("router_w1_scale", 0.0, "finite values > 0", "0"),
    ("router_w1_scale", -1e-3, "finite values > 0", "-0.001"),
    ("router_w1_scale", np.inf, "finite values > 0", "inf"),
    ("router_b1", np.nan, "finite values", "nan"),
    ("router_w2", -np.inf, "finite values", "-inf"),
    ("router_b2", np.nan, "finite values", "nan"),
    ("router_thresholds", np.nan, "no NaN", "nan"),
])
def test_bad_constant_router_value_is_refused_at_load(name, value, rule, shown):
    """Constant router parameters are value-checked once at session creation (thresholds may be infinite)."""
    feeds = make_feeds(np.random.default_rng(0), (1, 3))
    feeds[name] = feeds[name].copy()
    at = (3, 1) if name == "router_thresholds" else (0,)
    feeds[name][at] = value
    index = ops.INPUTS.index(name)
    constants = ("slices", "scales", "zero_points") + ROUTER
    attrs = {**attrs_for(K, N, GROUP, S), "accuracy_level": ops.ACCURACY_F32}
    with pytest.raises(Exception) as info:
        rsmm_session(feeds, attrs, 1, constants, counts_output=True, node_name="layers.3.mlp.gate_up")
    want = (f"[ResidualSliceMatMul] node 'layers.3.mlp.gate_up': {name} (input {index}, initializer '{name}') "
            f"expected {rule}; got {shown} at [{', '.join(map(str, at))}]")
    assert want in str(info.value), str(info.value)


def test_infinite_constant_thresholds_are_accepted():
    feeds = make_feeds(np.random.default_rng(0), (1, 3))
    feeds["router_thresholds"] = feeds["router_thresholds"].copy()
    feeds["router_thresholds"][0] = np.inf  # never crossed, as +1e30
    feeds["threshold_row"] = np.array(0, np.int64)
    _, counts = run(feeds)
    assert (counts == 1).all()
