"""SliceRouter in ONNX Runtime against the router's definition computed in numpy float64."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from mobiquant.runtime import ops

NAMES = ("X", "W1", "W1_scale", "B1", "W2", "B2", "thresholds", "row")
TYPES = {"W1": TensorProto.INT8, "row": TensorProto.INT64}
K, H, G, S = 64, 16, 5, 4


WEIGHTS = ("W1", "W1_scale", "B1", "W2", "B2", "thresholds")


def router_model(shapes: dict[str, list] | None = None,
                 constants: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """One SliceRouter node; `constants` become initializers (as in exported models), the rest inputs."""
    shapes, constants = shapes or {}, constants or {}
    node = helper.make_node(ops.ROUTER_OP_TYPE, list(NAMES), ["counts"], domain=ops.DOMAIN)
    inputs = [helper.make_tensor_value_info(n, TYPES.get(n, TensorProto.FLOAT), shapes.get(n))
              for n in NAMES if n not in constants]
    output = helper.make_tensor_value_info("counts", TensorProto.INT32, shapes.get("counts"))
    inits = [numpy_helper.from_array(v, n) for n, v in constants.items()]
    graph = helper.make_graph([node], "router", inputs, [output], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(ops.DOMAIN, 1)])


def run(feeds: dict[str, np.ndarray], threads: int = 1, constant_weights: bool = False) -> np.ndarray:
    constants = {n: feeds[n] for n in WEIGHTS} if constant_weights else {}
    session = ort.InferenceSession(router_model(constants=constants).SerializeToString(), ops.session_options(threads))
    return session.run(None, {n: v for n, v in feeds.items() if n not in constants})[0]


def make_feeds(rng: np.random.Generator, lead: tuple[int, ...]) -> dict[str, np.ndarray]:
    feeds = {"X": rng.standard_normal((*lead, K)).astype(np.float32),
             "W1": rng.integers(-127, 128, (K, H)).astype(np.int8),
             "W1_scale": rng.uniform(1e-3, 3e-3, H).astype(np.float32),
             "B1": rng.standard_normal(H).astype(np.float32) / 4,
             "W2": rng.standard_normal(H).astype(np.float32),
             "B2": np.array([0.1], np.float32),
             "row": np.array(2, np.int64)}
    scores = reference_scores(feeds)
    # Each row: thresholds at increasing quantiles of the scores, so every count 1..S occurs.
    feeds["thresholds"] = np.stack([np.quantile(scores, np.linspace(0.2, 0.8, S - 1) + 0.02 * g)
                                    for g in range(G)]).astype(np.float32)
    return feeds


def reference_scores(feeds: dict[str, np.ndarray]) -> np.ndarray:
    f = {k: v.astype(np.float64) for k, v in feeds.items()}
    return np.maximum(f["X"] @ (f["W1"] * f["W1_scale"]) + f["B1"], 0) @ f["W2"] + f["B2"][0]


@pytest.mark.parametrize("lead", [(1,), (1, 1), (2, 7), (1, 37), (3, 50)])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("constant_weights", [False, True], ids=["weights-as-inputs", "weights-as-initializers"])
def test_counts_match_the_definition(lead, threads, constant_weights):
    rng = np.random.default_rng(sum(lead) + threads)
    feeds = make_feeds(rng, lead)
    counts = run(feeds, threads, constant_weights)
    assert counts.dtype == np.int32 and counts.shape == lead
    scores = reference_scores(feeds)
    tau = feeds["thresholds"][int(feeds["row"])].astype(np.float64)
    want = 1 + (scores[..., None] > tau).sum(-1)
    clear = np.abs(scores[..., None] - tau).min(-1) > 1e-4  # float32 rounding may flip exact ties only
    np.testing.assert_array_equal(counts[clear], want[clear])
    if lead[-1] >= 7:
        assert set(np.unique(counts)) == set(range(1, S + 1))


def test_schema_accepts_the_node():
    ops.register_schema()
    model = router_model({"X": [1, "T", K], "W1": [K, H], "W1_scale": [H], "B1": [H], "W2": [H], "B2": [1], "thresholds": [G, S - 1],
                          "row": [], "counts": [1, "T"]})
    onnx.checker.check_model(model, full_check=True)
    out = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph.output[0].type.tensor_type
    assert out.elem_type == TensorProto.INT32
    assert [d.dim_value or d.dim_param for d in out.shape.dim] == [1, "T"]


def test_wrong_weight_type_is_refused():
    feeds = make_feeds(np.random.default_rng(0), (1, 3))
    feeds["W1"] = feeds["W1"].astype(np.float32)
    with pytest.raises(Exception, match=r"expected: \(tensor\(int8\)\)"):
        run(feeds)


@pytest.mark.parametrize("change,message", [
    (lambda f: f.update(X=f["X"][..., :-1].copy()), "X expected shape [..., K=64]"),
    (lambda f: f.update(W1=f["W1"][0]), "W1 expected shape [K, H]"),
    (lambda f: f.update(W1_scale=f["W1_scale"][:-1].copy()), "W1_scale shape expected (16,)"),
    (lambda f: f.update(B1=f["B1"][:-1].copy()), "B1 shape expected (16,)"),
    (lambda f: f.update(W2=np.ones((H, 1), np.float32)), "W2 shape expected (16,)"),
    (lambda f: f.update(B2=np.zeros(2, np.float32)), "B2 expected one value"),
    (lambda f: f.update(row=np.array(G, np.int64)), "row expected in [0, 4]; got 5"),
    (lambda f: f.update(row=np.array(-1, np.int64)), "got -1"),
    (lambda f: f.update(thresholds=np.zeros(3, np.float32)), "thresholds expected shape [G >= 1, S-1]"),
])
@pytest.mark.parametrize("constant_weights", [False, True], ids=["weights-as-inputs", "weights-as-initializers"])
def test_bad_input_is_an_error_naming_the_op(change, message, constant_weights):
    """Constant weights are checked once when the session is created, inputs on every run; same message."""
    feeds = make_feeds(np.random.default_rng(0), (1, 3))
    change(feeds)
    with pytest.raises(Exception, match=r"\[SliceRouter\].*" + message.replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)").replace(".", r"\.")):
        run(feeds, constant_weights=constant_weights)
