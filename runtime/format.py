"""MoBiSlice: a weight as S recursive residual 2-bit slices (numpy only).

The Python twin of ``custom_ops/include/mobiq/format.h``; both define packed
layout version :data:`LAYOUT_VERSION` and must change together.

Quantization of ``W`` [N out, K in], per row and group of ``g`` input columns
(docs/design.md, "The weight format")::

    slice 1:  q1 = clamp(floor(W / s1 + z1), 0, 3)       D1 = s1 (q1 - z1 + 1/2)
    slice e:  se = s1 / 4^(e-1)
              qe = clamp(floor(r / se) + 2, 0, 3)          De = se (qe - 3/2)
              r  = W - (D1 + ... + D(e-1))
    read k:   W^(k) = D1 + ... + Dk = s_k (Q(k) + 1/2) - s1 z1,  Q(k) = sum 4^(k-e) qe

With ``s1 = range / 4`` and the real-valued ``z1 = -min / s1`` the four bins of
slice 1 tile the group's range, so every residual stays within +-s_k/2 and each
added slice divides the error bound by four. No parameter depends on k.

Packed layout, version 2: one uint8 array ``[S, ceil(N/16), K/16, 64]``,
slice-major (all of slice 1, then all of slice 2, ...). A slice is cut into tiles
of 16 rows x 16 columns (rows padded to a multiple of 16 with code 0), 64 bytes
each; byte ``4 r + b`` of a tile holds row r's columns b, 4+b, 8+b, 12+b::

    bit    7 6  | 5 4  | 3 2  | 1 0
    column 12+b | 8+b  | 4+b  | b

Bit pair i of a tile's 64 bytes, read as 16 little-endian words, is the 16 rows'
codes of columns 4i..4i+3: one shift and mask gives the SIMD kernels a register
with output rows in lanes, ready for 4-way integer dot products.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LAYOUT_VERSION = 2
SLICE_BITS = 2
CODES_PER_BYTE = 8 // SLICE_BITS
TILE_ROWS = 16
TILE_COLS = 16
TILE_BYTES = TILE_ROWS * TILE_COLS // CODES_PER_BYTE
MAX_SLICES = 8
DEFAULT_NUM_SLICES = 4

# Scale used for a group whose values are all equal (range 0), relative to |value|
# (or absolute when the value is 0): keeps z1 finite and the error tiny.
_CONSTANT_GROUP_SCALE = 2.0**-20


class FormatError(ValueError):
    """A weight, a parameter or a packed array that the MoBiSlice format cannot take."""


@dataclass(frozen=True)
class SlicedWeight:
    """One quantized linear weight in packed layout version 2."""

    packed: np.ndarray  # uint8 [S, ceil(N/16), K/16, 64]
    scales: np.ndarray  # float32 [N, K/g]: s1
    zero_points: np.ndarray  # float32 [N, K/g]: z1, real-valued
    group_size: int

    def __post_init__(self) -> None:
        if self.packed.dtype != np.uint8 or self.packed.ndim != 4 or self.packed.shape[3] != TILE_BYTES:
            raise FormatError(f"[SlicedWeight] packed expected uint8 [S, ceil(N/16), K/16, {TILE_BYTES}]; "
                              f"got {self.packed.dtype} {self.packed.shape}")
        s, row_tiles, col_tiles, _ = self.packed.shape
        if not 1 <= s <= MAX_SLICES:
            raise FormatError(f"[SlicedWeight] number of slices expected 1..{MAX_SLICES}; got {s}")
        n, k = self.scales.shape[0], col_tiles * TILE_COLS
        if _row_tiles(n) != row_tiles:
            raise FormatError(f"[SlicedWeight] packed expected {_row_tiles(n)} row tiles for N={n} (rows of scales); "
                              f"got {row_tiles}")
        want = (n, _groups(k, self.group_size, "SlicedWeight"))
        for name in ("scales", "zero_points"):
            arr = getattr(self, name)
            if arr.dtype != np.float32 or arr.shape != want:
                raise FormatError(
                    f"[SlicedWeight] {name} expected float32 {want} for N={n}, K={k}, group_size={self.group_size}; "
                    f"got {arr.dtype} {arr.shape}"
                )

    @property
    def num_slices(self) -> int:
        return self.packed.shape[0]

    @property
    def out_features(self) -> int:
        return self.scales.shape[0]

    @property
    def in_features(self) -> int:
        return self.packed.shape[2] * TILE_COLS

    def codes(self) -> np.ndarray:
        """The 2-bit codes, uint8 [S, N, K] with values 0..3."""
        return unpack(self.packed, self.out_features)

    def prefix(self, k: int) -> "SlicedWeight":
        """The same weight holding only its first k slices (what a k-slice read touches)."""
        _check_depth(k, self.num_slices)
        return SlicedWeight(self.packed[:k], self.scales, self.zero_points, self.group_size)

    def dequantize(self, k: int) -> np.ndarray:
        """W^(k) as float64 [N, K]: the sum of the first k slices' reconstructions."""
        return dequantize(self.codes(), self.scales, self.zero_points, self.group_size, k)

    def step(self, k: int) -> np.ndarray:
        """Step of slice k per (row, group), float64 [N, K/g]: s1 / 4^(k-1)."""
        _check_depth(k, self.num_slices)
        return self.scales.astype(np.float64) / 4.0 ** (k - 1)


def _row_tiles(n: int) -> int:
    return -(-n // TILE_ROWS)


def _groups(k: int, group_size: int, where: str) -> int:
    if group_size <= 0 or group_size % TILE_COLS:
        raise FormatError(f"[{where}] group_size expected a positive multiple of {TILE_COLS}; got {group_size}")
    if k % group_size:
        fits = [g for g in (32, 64, 128, 256) if k % g == 0]
        raise FormatError(f"[{where}] K % group_size expected 0; got K={k}, group_size={group_size} (sizes that fit: {fits})")
    return k // group_size


def _check_depth(k: int, num_slices: int) -> None:
    if not 1 <= k <= num_slices:
        raise FormatError(f"[MoBiSlice] slice count expected 1..{num_slices}; got {k}")


def minmax_params(weight: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Slice-1 parameters from each group's min and max: s1 = range/4, z1 = -min/s1 (float32 [N, K/g]).

    Both are rounded up to float32 so that the four bins, as the kernel sees them
    (from lo' = -z1 s1 to lo' + 4 s1), still cover [min, max]: otherwise float32
    rounding leaves the extreme weights a hair outside +-s_k/2 at every depth.
    """
    w = _checked_weight(weight, group_size)
    n, k = w.shape
    grouped = w.reshape(n, k // group_size, group_size)
    lo, hi = grouped.min(axis=2), grouped.max(axis=2)
    span = hi - lo
    flat = span == 0
    span[flat] = np.where(lo[flat] != 0, np.abs(lo[flat]), 1.0) * 4 * _CONSTANT_GROUP_SCALE
    scale = _f32_up(span / 4)
    for _ in range(4):  # each pass widens s1 by the gap left by z1's rounding; converges in 1-2
        zero = _f32_up(-lo / scale)
        start = -zero.astype(np.float64) * scale
        short = start + 4 * scale.astype(np.float64) < hi
        if not short.any():
            return scale, zero
        scale = np.where(short, _f32_up((hi - start) / 4 * (1 + 2.0**-22)), scale)
    raise FormatError("[minmax_params] could not fit float32 scale/zero point to a group range")


def _f32_up(x: np.ndarray) -> np.ndarray:
    """x rounded up to the next float32 (never below x)."""
    y = np.asarray(x, dtype=np.float32)
    return np.where(y.astype(np.float64) < x, np.nextafter(y, np.float32(np.inf)), y).astype(np.float32)


def quantize(
    weight: np.ndarray,
    group_size: int,
    num_slices: int = DEFAULT_NUM_SLICES,
    scales: np.ndarray | None = None,
    zero_points: np.ndarray | None = None,
) -> SlicedWeight:
    """Quantize ``weight`` [N, K] into ``num_slices`` residual 2-bit slices.

    ``scales``/``zero_points`` (float32 [N, K/g]) give slice 1's calibrated (possibly
    clipped) parameters; without them the min/max of each group is used. Weights
    outside a clipped range saturate in slice 1 and stay outside the error bound.
    """
    w = _checked_weight(weight, group_size)
    if not 1 <= num_slices <= MAX_SLICES:
        raise FormatError(f"[quantize] num_slices expected 1..{MAX_SLICES}; got {num_slices}")
    if (scales is None) != (zero_points is None):
        raise FormatError("[quantize] scales and zero_points expected together; got only one")
    if scales is None:
        scales, zero_points = minmax_params(w, group_size)
    n, k = w.shape
    want = (n, k // group_size)
    scales = np.asarray(scales, dtype=np.float32)
    zero_points = np.asarray(zero_points, dtype=np.float32)
    if scales.shape != want or zero_points.shape != want:
        raise FormatError(f"[quantize] scales/zero_points expected shape {want}; got {scales.shape}/{zero_points.shape}")
    if not (np.all(np.isfinite(scales)) and np.all(scales > 0) and np.all(np.isfinite(zero_points))):
        raise FormatError("[quantize] scales expected finite and > 0, zero_points finite; got other values")

    # Rows are independent: a few tiles of rows at a time keep the float64 work small (an LM head of a 128k
    # vocabulary would need ~10 GB at once).
    step = max(TILE_ROWS, QUANTIZE_CHUNK_ELEMENTS // k // TILE_ROWS * TILE_ROWS)
    packed = [pack(_codes(w[i: i + step], scales[i: i + step], zero_points[i: i + step], group_size, num_slices))
              for i in range(0, n, step)]
    return SlicedWeight(np.concatenate(packed, axis=1), scales, zero_points, group_size)


QUANTIZE_CHUNK_ELEMENTS = 1 << 20  # weights quantized at once (float64 temporaries of 8 MB)


def _codes(w: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, group_size: int, num_slices: int) -> np.ndarray:
    """uint8 codes [S, n, K] of rows ``w`` [n, K], derived from the float32 parameters the kernel will see."""
    s1 = np.repeat(scales.astype(np.float64), group_size, axis=1)
    z1 = np.repeat(zero_points.astype(np.float64), group_size, axis=1)
    codes = np.empty((num_slices, *w.shape), dtype=np.uint8)
    q = np.clip(np.floor(w / s1 + z1), 0, 3)
    codes[0] = q
    recon = s1 * (q - z1 + 0.5)
    for e in range(1, num_slices):
        step = s1 / 4.0**e
        q = np.clip(np.floor((w - recon) / step) + 2, 0, 3)
        codes[e] = q
        recon = recon + step * (q - 1.5)
    return codes


def dequantize(codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, group_size: int, k: int) -> np.ndarray:
    """W^(k) = D1 + ... + Dk in float64 from unpacked codes uint8 [S, N, K]."""
    _check_depth(k, codes.shape[0])
    s1 = np.repeat(scales.astype(np.float64), group_size, axis=1)
    z1 = np.repeat(zero_points.astype(np.float64), group_size, axis=1)
    w = s1 * (codes[0] - z1 + 0.5)
    for e in range(1, k):
        w += s1 / 4.0**e * (codes[e].astype(np.float64) - 1.5)
    return w


def pack(codes: np.ndarray) -> np.ndarray:
    """uint8 codes [S, N, K] (values 0..3, K % 16 == 0) -> packed uint8 [S, ceil(N/16), K/16, 64], layout 2."""
    if codes.ndim != 3 or codes.shape[2] % TILE_COLS:
        raise FormatError(f"[pack] codes expected [S, N, K] with K % {TILE_COLS} == 0; got {codes.shape}")
    if codes.size and codes.max() > 3:
        raise FormatError(f"[pack] codes expected values 0..3; got max {int(codes.max())}")
    s, n, k = codes.shape
    padded = np.zeros((s, _row_tiles(n) * TILE_ROWS, k), dtype=np.uint8)
    padded[:, :n] = codes
    # [S, row tile, r, col tile, i, b] -> [S, row tile, col tile, r, b, i]: byte 4r+b, bit pair i = column 4i+b
    t = padded.reshape(s, -1, TILE_ROWS, k // TILE_COLS, 4, 4).transpose(0, 1, 3, 2, 5, 4)
    packed = t[..., 0] | (t[..., 1] << 2) | (t[..., 2] << 4) | (t[..., 3] << 6)
    return np.ascontiguousarray(packed.reshape(s, -1, k // TILE_COLS, TILE_BYTES), dtype=np.uint8)


def unpack(packed: np.ndarray, n: int) -> np.ndarray:
    """packed uint8 [S, ceil(N/16), K/16, 64] -> codes uint8 [S, N, K] (padding rows dropped)."""
    s, row_tiles, col_tiles, _ = packed.shape
    shifts = np.arange(4, dtype=np.uint8) * SLICE_BITS
    t = (packed.reshape(s, row_tiles, col_tiles, TILE_ROWS, 4)[..., None] >> shifts) & 3  # [.., r, b, i]
    codes = t.transpose(0, 1, 3, 2, 5, 4).reshape(s, row_tiles * TILE_ROWS, col_tiles * TILE_COLS)
    return np.ascontiguousarray(codes[:, :n], dtype=np.uint8)


def concat_rows(parts: list[SlicedWeight]) -> SlicedWeight:
    """One weight whose rows are those of ``parts`` in order (same K, group size and slice count)."""
    if len(parts) == 1:
        return parts[0]
    if all(p.out_features % TILE_ROWS == 0 for p in parts[:-1]):  # whole row tiles: stack them as they are
        packed = np.concatenate([p.packed for p in parts], axis=1)
    else:
        packed = pack(np.concatenate([p.codes() for p in parts], axis=1))
    return SlicedWeight(packed, np.concatenate([p.scales for p in parts]),
                        np.concatenate([p.zero_points for p in parts]), parts[0].group_size)


def from_layout1(packed: np.ndarray) -> np.ndarray:
    """Packed layout 1 ([S, N, K/4], byte j of a row = columns 4j..4j+3) repacked as layout 2."""
    shifts = np.arange(4, dtype=np.uint8) * SLICE_BITS
    codes = ((packed[..., None] >> shifts) & 3).reshape(*packed.shape[:2], -1)
    return pack(codes)


def _checked_weight(weight: np.ndarray, group_size: int) -> np.ndarray:
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 2:
        raise FormatError(f"[quantize] weight expected 2-D [N, K]; got shape {w.shape}")
    _groups(w.shape[1], group_size, "quantize")
    bad = ~np.isfinite(w)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise FormatError(f"[quantize] weight expected finite values; got {int(bad.sum())} NaN/Inf, first at {first}")
    return w
