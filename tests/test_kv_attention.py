"""KVAttention (the KV cache at 32/16/8/4 bits and the attention that reads it) against numpy float64.

The reference is written here from the contract alone (runtime/kvcache.py, mobiq/attention.h): rotary
on the halves of each head, keys and values rounded as the cache stores them (float16, or symmetric
int8 / int4 codes with one scale per position and group of dims), causal (and sliding-window)
softmax attention in float64 with grouped key/value heads.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from mobiquant.runtime import kvcache, ops

from cpu_flags import INT8_QUERY_KERNELS, attention_kernels

KERNELS = [""] + attention_kernels()  # "": the one the library picks


def hadamard(g: int) -> np.ndarray:
    """The orthonormal Sylvester-ordered Walsh-Hadamard matrix of size ``g`` (symmetric, its own inverse)."""
    h = np.ones((1, 1))
    while h.shape[0] < g:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(g)


def through_groups(x: np.ndarray, g: int) -> np.ndarray:
    """``x`` [..., D] with each group of ``g`` dims taken through the Hadamard transform (float32)."""
    xg = x.reshape(*x.shape[:-1], x.shape[-1] // g, g).astype(np.float64)
    return (xg @ hadamard(g)).reshape(x.shape).astype(np.float32)


def stored(x: np.ndarray, bits: int) -> np.ndarray:
    """``x`` [..., D] as attention sees it from the cache: at 8 and 4 bits each group of dims is stored
    as codes of H x and read back through H."""
    if bits == 32:
        return x.astype(np.float64)
    if bits == 16:
        return x.astype(np.float16).astype(np.float64)
    levels = 127 if bits == 8 else 7
    d = x.shape[-1]
    g = kvcache.group(d)
    xg = through_groups(x, g).reshape(*x.shape[:-1], d // g, g)
    scale = (np.abs(xg).max(-1, keepdims=True) / np.float32(levels)).astype(np.float32)
    inv = np.where(scale > 0, np.float32(1) / np.where(scale > 0, scale, 1), 0).astype(np.float32)
    codes = np.clip(np.rint(xg * inv), -levels, levels)
    back = (codes.astype(np.float64) * scale).reshape(*x.shape[:-1], d // g, g) @ hadamard(g)
    return back.reshape(x.shape)


def rotary_tables(positions: int, d: int, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    angles = np.outer(np.arange(positions), inv)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [T, heads, D] at positions 0 .. T-1 (float32, as the op computes it)."""
    h = x.shape[-1] // 2
    c, s = cos[:x.shape[0], None, :], sin[:x.shape[0], None, :]
    x1, x2 = x[..., :h], x[..., h:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1).astype(np.float32)


def reference(q, k, v, bits, cos, sin, scale, window=-1, int8_queries=False):
    """Outputs [T, H*D] of every token of a sequence q [T, H, D], k, v [T, Hkv, D] (positions 0 .. T-1).
    ``int8_queries``: over 8- and 4-bit caches the scaled queries are coded as the cache codes 8-bit keys
    (the integer-dot kernels' contract)."""
    t, h, d = q.shape
    g = h // k.shape[1]
    if int8_queries and bits in (8, 4):
        qr = stored((rotate(q, cos, sin) * np.float32(scale)).astype(np.float32), 8)
    else:
        qr = rotate(q, cos, sin).astype(np.float64) * scale
    kr = stored(rotate(k, cos, sin), bits)
    vr = stored(v, bits)
    out = np.zeros((t, h, d))
    for i in range(t):
        lo = max(0, i + 1 - window) if window > 0 else 0
        for head in range(h):
            s = kr[lo:i + 1, head // g] @ qr[i, head]
            w = np.exp(s - s.max())
            out[i, head] = (w / w.sum()) @ vr[lo:i + 1, head // g]
    return out.reshape(t, h * d)


def session(heads, kv_heads, packed, window=-1, scale=None, threads=1, norm_eps=None, norms=("q_norm", "k_norm")):
    """One KVAttention node; ``norm_eps`` given: with the inputs ``norms`` ("" = absent) and that epsilon."""
    names = ["query", "", ""] if packed else ["query", "key", "value"]
    names += ["key_cache", "value_cache", "seqlens_k", "cos_cache", "sin_cache"]
    attrs = dict(num_heads=heads, kv_num_heads=kv_heads, local_window_size=window)
    if scale is not None:
        attrs["scale"] = scale
    if norm_eps is not None:
        names += list(norms)
        attrs["qk_norm_epsilon"] = norm_eps
    node = helper.make_node("KVAttention", names, ["output", "present_key", "present_value"], domain=ops.DOMAIN,
                            **attrs)
    types = dict(key_cache=TensorProto.UINT8, value_cache=TensorProto.UINT8, seqlens_k=TensorProto.INT32)
    inputs = [helper.make_tensor_value_info(n, types.get(n, TensorProto.FLOAT), None) for n in names if n]
    outputs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)] + [
        helper.make_tensor_value_info(n, TensorProto.UINT8, None) for n in ("present_key", "present_value")]
    graph = helper.make_graph([node], "kv_attention", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(ops.DOMAIN, 1)])
    return ort.InferenceSession(model.SerializeToString(), ops.session_options(threads))


class Runner:
    """Feeds a sequence to one KVAttention session in chunks, the cache carried between calls."""

    def __init__(self, sess, heads, kv_heads, d, bits, capacity, cos, sin, packed, **constant_feeds):
        self.sess, self.h, self.kv, self.d, self.packed = sess, heads, kv_heads, d, packed
        self.constant_feeds = constant_feeds
        shape = (1, kv_heads, kvcache.blocks(capacity), kvcache.block_bytes(bits, d))
        self.kc, self.vc = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
        self.cos, self.sin, self.length = cos, sin, 0

    def __call__(self, q, k, v):
        s = q.shape[0]
        feeds = dict(key_cache=self.kc, value_cache=self.vc, cos_cache=self.cos, sin_cache=self.sin,
                     seqlens_k=np.array([self.length + s - 1], np.int32), **self.constant_feeds)
        flat = [x.reshape(1, s, -1) for x in (q, k, v)]
        if self.packed:
            feeds["query"] = np.concatenate(flat, -1)
        else:
            feeds.update(query=flat[0], key=flat[1], value=flat[2])
        out, self.kc, self.vc = self.sess.run(None, feeds)
        self.length += s
        return out[0]


def problem(t, heads, kv_heads, d, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(t, heads, d)).astype(np.float32)
    k = rng.normal(size=(t, kv_heads, d)).astype(np.float32)
    k[:, :, 3] *= 8  # an outlier channel, as real keys have
    v = rng.normal(size=(t, kv_heads, d)).astype(np.float32)
    return q, k, v


# Tolerances against the float64 reference of the same stored values: float32 sums, the polynomial exp,
# and (8 / 4 bits) a code that rounds the other way when float32 rotation lands on a rounding boundary.
TOL = {32: 2e-5, 16: 2e-5, 8: 2e-3, 4: 2e-2}


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("bits", kvcache.BITS)
@pytest.mark.parametrize("heads,kv_heads,d,packed,window", [
    (4, 2, 16, True, -1), (9, 3, 64, True, -1), (4, 1, 32, False, 7), (2, 2, 256, False, -1)])
def test_prefill_then_decode_match_float64(monkeypatch, kernel, bits, heads, kv_heads, d, packed, window):
    if kernel:
        monkeypatch.setenv("MOBIQ_ATTENTION_KERNEL", kernel)
    t = 300  # past several 16-position blocks and one 256-position decode chunk
    q, k, v = problem(t, heads, kv_heads, d)
    cos, sin = rotary_tables(t + 5, d)
    scale = 0.3
    want = reference(q, k, v, bits, cos, sin, scale, window, (kernel or attention_kernels()[-1]) in INT8_QUERY_KERNELS)
    run = Runner(session(heads, kv_heads, packed, window, scale), heads, kv_heads, d, bits, t + 20, cos, sin, packed)
    got = [run(q[:37], k[:37], v[:37]), run(q[37:290], k[37:290], v[37:290])]
    got += [run(q[i:i + 1], k[i:i + 1], v[i:i + 1]) for i in range(290, t)]
    got = np.concatenate(got)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < TOL[bits], f"{bits} bits, {kernel or 'default'}: max relative error {err:.2e}"


def rms_normed(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """Each head of x [T, heads, D] RMS-normed in float64, times w [D] (HF's RMSNorm)."""
    x = x.astype(np.float64)
    return (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w).astype(np.float32)


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("packed", [True, False])
def test_head_norms_before_rotary_match_float64(bits, packed):
    """Gemma 3's and Qwen3's q/k norms inside the op: the reference norms q and k itself, then attends."""
    heads, kv_heads, d, t, eps = 4, 1, 256, 40, 1e-6
    q, k, v = problem(t, heads, kv_heads, d, seed=5)
    q, k = q * 30, k * 0.01  # the norm, not the raw scale, sets what attention sees
    rng = np.random.default_rng(6)
    wq, wk = (1 + rng.normal(size=d) * 0.3).astype(np.float32), (1 + rng.normal(size=d) * 0.3).astype(np.float32)
    cos, sin = rotary_tables(t, d)
    want = reference(rms_normed(q, wq, eps), rms_normed(k, wk, eps), v, bits, cos, sin, 0.0625, -1,
                     attention_kernels()[-1] in INT8_QUERY_KERNELS)
    run = Runner(session(heads, kv_heads, packed, scale=0.0625, norm_eps=eps), heads, kv_heads, d, bits, t, cos, sin,
                 packed, q_norm=wq, k_norm=wk)
    got = [run(q[:30], k[:30], v[:30])] + [run(q[i:i + 1], k[i:i + 1], v[i:i + 1]) for i in range(30, t)]
    got = np.concatenate(got)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < TOL[bits], f"{bits} bits: max relative error {err:.2e}"


@pytest.mark.parametrize("bits", kvcache.BITS)
def test_a_token_gets_the_same_output_in_a_prompt_as_one_at_a_time(bits):
    heads, kv_heads, d, t = 6, 2, 64, 70
    q, k, v = problem(t, heads, kv_heads, d, seed=1)
    cos, sin = rotary_tables(t, d)
    sess = session(heads, kv_heads, True)
    whole = Runner(sess, heads, kv_heads, d, bits, t, cos, sin, True)(q, k, v)
    steps = Runner(sess, heads, kv_heads, d, bits, t, cos, sin, True)
    one = np.concatenate([steps(q[i:i + 1], k[i:i + 1], v[i:i + 1]) for i in range(t)])
    np.testing.assert_allclose(one, whole, rtol=0, atol=1e-5)


def test_quantized_error_against_the_unquantized_attention():
    """What the precision costs, in the reference's own terms: 16 < 8 < 4 bits, each small."""
    heads, kv_heads, d, t = 4, 2, 64, 200
    q, k, v = problem(t, heads, kv_heads, d, seed=2)
    cos, sin = rotary_tables(t, d)
    exact = reference(q, k, v, 32, cos, sin, 0.125)
    errs = {}
    for bits in (16, 8, 4):
        got = Runner(session(heads, kv_heads, True, scale=0.125), heads, kv_heads, d, bits, t, cos, sin, True)(q, k, v)
        errs[bits] = np.abs(got - exact).max() / np.abs(exact).max()
    print(errs)
    assert errs[16] < 1e-3 and errs[8] < 2e-2 and errs[4] < 0.2 and errs[16] < errs[8] < errs[4], errs


def test_threads_give_the_same_result():
    heads, kv_heads, d, t = 9, 3, 64, 600
    q, k, v = problem(t, heads, kv_heads, d, seed=3)
    cos, sin = rotary_tables(t, d)
    outs = []
    for threads in (1, 2):
        run = Runner(session(heads, kv_heads, True, threads=threads), heads, kv_heads, d, 8, t, cos, sin, True)
        outs.append(np.concatenate([run(q[:599], k[:599], v[:599]), run(q[599:], k[599:], v[599:])]))
    np.testing.assert_array_equal(outs[0], outs[1])


def test_nonfinite_values_give_nan_rows_not_crashes():
    heads, kv_heads, d, t = 2, 1, 16, 20
    q, k, v = problem(t, heads, kv_heads, d, seed=4)
    v[5, 0, 2] = np.nan
    cos, sin = rotary_tables(t, d)
    for bits in kvcache.BITS:
        out = Runner(session(heads, kv_heads, True), heads, kv_heads, d, bits, t, cos, sin, True)(q, k, v)
        assert np.isfinite(out[:5]).all() and np.isnan(out[5:]).any(axis=1).all(), bits


@pytest.mark.parametrize("change,message", [
    (dict(block_bytes=100), "key_cache block_bytes expected one of 4096 (32 bits), 2048 (16 bits), 1088 (8 bits), "
                            "576 (4 bits) for head size 64; got 100"),
    (dict(seqlen=40), "seqlens_k[0] + 1 = 41 tokens expected in [S=2, min(cache capacity 32, rotary positions 64)]"),
    (dict(query_width=101), "query width expected a multiple of 5 (H + 2 Hkv, packed); got 101"),
    (dict(q_norm=np.ones(64, np.float32)), "q_norm and k_norm expected both or neither; got one"),
    (dict(q_norm=np.ones(64, np.float32), k_norm=np.ones(32, np.float32)),
     "k_norm shape expected (64,) ([head size]); got (32,)"),
])
def test_bad_inputs_are_named(change, message):
    d = 64
    kc = np.zeros((1, 1, 2, change.get("block_bytes", kvcache.block_bytes(8, d))), np.uint8)
    cos, sin = rotary_tables(64, d)
    feeds = dict(query=np.zeros((1, 2, change.get("query_width", 5 * d)), np.float32), key_cache=kc,
                 value_cache=kc.copy(), seqlens_k=np.array([change.get("seqlen", 1)], np.int32), cos_cache=cos,
                 sin_cache=sin, **{n: change[n] for n in ("q_norm", "k_norm") if n in change})
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument, match=r"\[KVAttention\] " +
                       message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("+", r"\+")):
        norms = tuple(n if n in change else "" for n in ("q_norm", "k_norm"))
        session(3, 1, True, norm_eps=1e-6 if any(norms) else None, norms=norms).run(None, feeds)
