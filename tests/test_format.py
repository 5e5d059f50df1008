"""MoBiSlice format properties (runtime/format.py) against docs/design.md ("The weight format"), in float64."""

import numpy as np
import pytest

from mobiquant.runtime import format as F

RNG = np.random.default_rng(1234)


def weights():
    """Random and adversarial weight matrices, N x K with K a multiple of 64."""
    yield "gaussian", RNG.standard_normal((33, 128))
    yield "heavy-tailed", RNG.standard_t(2, size=(16, 256))
    yield "outlier-column", np.where(np.arange(128) == 5, 40.0, 1.0) * RNG.standard_normal((8, 128))
    yield "tiny", 1e-30 * RNG.standard_normal((4, 64))
    yield "huge", 1e30 * RNG.standard_normal((4, 64))
    yield "positive", RNG.uniform(3, 4, (5, 64))
    yield "two-values", RNG.choice([-1.0, 2.0], size=(6, 128))


@pytest.mark.parametrize("name,w", list(weights()), ids=[n for n, _ in weights()])
@pytest.mark.parametrize("group_size", [32, 64])
def test_error_within_half_step_and_shrinks_with_each_slice(name, w, group_size):
    sw = F.quantize(w, group_size, num_slices=4)
    prev = np.inf
    for k in range(1, 5):
        err = np.abs(w - sw.dequantize(k))
        bound = np.repeat(sw.step(k), group_size, axis=1) / 2
        worst = np.unravel_index(np.argmax(err - bound), err.shape)
        assert np.all(err <= bound * (1 + 1e-6) + 1e-300), (
            f"{name} g={group_size} k={k}: |W-W^(k)|={err[worst]:.3e} > s_k/2={bound[worst]:.3e} at {worst}")
        total = np.linalg.norm(err)
        assert total <= prev, f"{name} g={group_size}: error grew from {prev} to {total} at k={k}"
        prev = total


def test_relative_error_falls_about_fourfold_per_slice():
    w = RNG.standard_normal((64, 512))
    sw = F.quantize(w, 64)
    rel = [np.linalg.norm(w - sw.dequantize(k)) / np.linalg.norm(w) for k in range(1, 5)]
    for k in range(1, 4):
        assert 3.0 < rel[k - 1] / rel[k] < 5.0, f"k={k}->{k + 1}: relative errors {rel}"


def test_slice_one_matches_spec_formula():
    w = RNG.standard_normal((3, 64))
    sw = F.quantize(w, 64, num_slices=1)
    lo, hi = w.min(axis=1, keepdims=True), w.max(axis=1, keepdims=True)
    s1 = sw.scales.astype(np.float64)
    np.testing.assert_allclose(s1, (hi - lo) / 4, rtol=1e-6)
    q1 = np.clip(np.floor(w / s1 + sw.zero_points.astype(np.float64)), 0, 3)
    np.testing.assert_array_equal(sw.codes()[0], q1)
    assert set(np.unique(q1)) == {0, 1, 2, 3}, "min/max bins must tile the range"


def test_clipped_scale_bounds_error_inside_the_clipping_range_only():
    w = RNG.standard_normal((8, 64))
    lo, hi = -1.0, 1.0
    scales = np.full((8, 1), (hi - lo) / 4, np.float32)
    zeros = np.full((8, 1), -lo / ((hi - lo) / 4), np.float32)
    sw = F.quantize(w, 64, scales=scales, zero_points=zeros)
    inside = (w >= lo) & (w < hi)
    for k in range(1, 5):
        err = np.abs(w - sw.dequantize(k))
        assert np.all(err[inside] <= (hi - lo) / 4 / 4 ** (k - 1) / 2 * (1 + 1e-6)), f"k={k}"
    assert np.abs(w - sw.dequantize(4))[~inside].max() > 0.1, "values outside the clip saturate"


@pytest.mark.parametrize("n", [1, 7, 16, 20, 33])
def test_pack_unpack_round_trip_and_bit_layout(n):
    codes = RNG.integers(0, 4, size=(4, n, 64), dtype=np.uint8)
    packed = F.pack(codes)
    assert packed.shape == (4, -(-n // 16), 4, 64)
    np.testing.assert_array_equal(F.unpack(packed, n), codes)
    # Documented layout: tile (row tile, column tile) of 64 bytes; byte 4r+b holds row r's
    # columns b, 4+b, 8+b, 12+b at bit pairs 0..3; padding rows hold 0.
    for row, col in [(0, 0), (n - 1, 63), (n // 2, 37)]:
        byte = packed[2, row // 16, col // 16, 4 * (row % 16) + col % 4]
        assert (byte >> (2 * ((col % 16) // 4))) & 3 == codes[2, row, col]
    rows = np.arange(-(-n // 16) * 16)
    assert not packed[:, -1].reshape(4, -1, 16, 4)[:, :, rows[-16:] >= n].any()


def test_concat_rows_and_layout1_migration():
    ws = [RNG.standard_normal((n, 64)) for n in (16, 7, 20)]
    parts = [F.quantize(w, 32) for w in ws]
    joined = F.concat_rows(parts)
    np.testing.assert_array_equal(joined.codes(), np.concatenate([p.codes() for p in parts], axis=1))
    np.testing.assert_allclose(joined.dequantize(3), np.concatenate([p.dequantize(3) for p in parts]))
    codes = parts[1].codes()  # layout 1: byte j of a row = columns 4j..4j+3, lowest bits first
    v1 = sum(codes[..., i::4] << (2 * i) for i in range(4)).astype(np.uint8)
    np.testing.assert_array_equal(F.from_layout1(v1), parts[1].packed)


def test_slices_are_independent_of_read_depth():
    w = RNG.standard_normal((4, 128))
    full, fewer = F.quantize(w, 64, num_slices=4), F.quantize(w, 64, num_slices=2)
    np.testing.assert_array_equal(full.packed[:2], fewer.packed)
    np.testing.assert_allclose(full.dequantize(2), fewer.dequantize(2))


def test_affine_form_of_k_slices_matches_the_slice_sum():
    """W^(k) = s_k (Q(k) + 1/2) - s1 z1 with Q(k) = sum 4^(k-e) qe: what the kernels compute."""
    w = RNG.standard_normal((5, 128))
    sw = F.quantize(w, 64)
    codes = sw.codes().astype(np.float64)
    s1 = np.repeat(sw.scales.astype(np.float64), 64, axis=1)
    z1 = np.repeat(sw.zero_points.astype(np.float64), 64, axis=1)
    for k in range(1, 5):
        q = sum(4.0 ** (k - e) * codes[e - 1] for e in range(1, k + 1))
        np.testing.assert_allclose(s1 / 4 ** (k - 1) * (q + 0.5) - s1 * z1, sw.dequantize(k), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("value", [0.0, 3.25, -1e-3])
def test_zero_and_constant_groups(value):
    w = np.full((2, 64), value)
    w[1, :] = RNG.standard_normal(64)  # a normal row beside it
    sw = F.quantize(w, 64)
    assert np.all(np.isfinite(sw.scales)) and np.all(sw.scales > 0) and np.all(np.isfinite(sw.zero_points))
    for k in range(1, 5):
        assert np.abs(sw.dequantize(k)[0] - value).max() <= abs(value) * 1e-6 + 1e-6


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_rejected_by_position(bad):
    w = RNG.standard_normal((3, 64))
    w[2, 17] = bad
    with pytest.raises(F.FormatError, match=r"finite.*\(2, 17\)"):
        F.quantize(w, 64)


def test_bad_shapes_and_parameters_are_rejected_with_sizes_that_fit():
    with pytest.raises(F.FormatError, match=r"K=576, group_size=128.*\[32, 64\]"):
        F.quantize(np.zeros((4, 576)), 128)
    with pytest.raises(F.FormatError, match="2-D"):
        F.quantize(np.zeros(64), 64)
    with pytest.raises(F.FormatError, match="num_slices"):
        F.quantize(np.zeros((1, 64)), 64, num_slices=9)
    with pytest.raises(F.FormatError, match="together"):
        F.quantize(np.zeros((1, 64)), 64, scales=np.ones((1, 1), np.float32))
    with pytest.raises(F.FormatError, match="> 0"):
        F.quantize(np.zeros((1, 64)), 64, scales=np.zeros((1, 1), np.float32), zero_points=np.zeros((1, 1), np.float32))
    with pytest.raises(F.FormatError, match="slice count"):
        F.quantize(np.ones((1, 64)), 64, num_slices=2).dequantize(3)


def test_quantizing_a_few_tiles_of_rows_at_a_time_gives_the_same_packed_weight(monkeypatch):
    from mobiquant.exporter.qmodel import full_depth_levels

    w = np.random.default_rng(7).standard_normal((1000, 256)).astype(np.float32)  # 1000 rows: a short last tile
    whole = F.quantize(w, 64, 4)
    monkeypatch.setattr(F, "QUANTIZE_CHUNK_ELEMENTS", 48 * 256)  # chunks of 48 rows (3 tiles)
    chunked = F.quantize(w, 64, 4)
    np.testing.assert_array_equal(chunked.packed, whole.packed)
    codes = whole.codes().astype(np.int64)
    want = ((codes[0] * 4 + codes[1]) * 4 + codes[2]) * 4 + codes[3]
    np.testing.assert_array_equal(full_depth_levels(chunked, tiles=5), want)
