// MoBiSlice packed weight format, layout version 2 — the C++ twin of
// runtime/format.py (keep both in step; the model file carries the version).
//
// A weight W [N out x K in] is stored as S residual 2-bit slices, one uint8
// tensor of shape [S, ceil(N/16), K/16, 64], slice-major: every byte of slice e
// comes before any byte of slice e+1, so a token that reads k slices touches only
// the first k * slice_bytes(N, K) bytes.
//
// Inside one slice, the weight is cut into tiles of 16 rows x 16 columns (rows
// padded to a multiple of 16 with code 0), row tile by row tile, each row tile
// column tile by column tile, 64 bytes per tile. In a tile, byte 4 r + b holds the
// codes of row r, columns b, 4 + b, 8 + b, 12 + b, lowest bits first:
//
//     bit   7 6  | 5 4  | 3 2  | 1 0
//     col  12+b  | 8+b  | 4+b  | b
//
// so bit pair i of the 64 bytes, read as 16 dwords, is the 16 rows' codes of
// columns 4i .. 4i+3: one shift and mask gives a SIMD register with rows in lanes
// and 4 consecutive columns per lane (the operand of a 4-way dot product).
//
// Per (row, group of g columns) there is one scale s1 and one real-valued zero
// point z1 (float32 [N, K/g]). Slice e has step s_e = s1 / 4^(e-1):
//   D1 = s1 * (q1 - z1 + 1/2),  De = s_e * (qe - 3/2)   (e >= 2)
//   W^(k) = D1 + ... + Dk = s_k * (Q(k) + 1/2) - s1 * z1,
//   Q(k) = sum_e 4^(k-e) * qe   (a 2k-bit integer code).
#pragma once

#include <cstddef>
#include <cstdint>

namespace mobiq {

inline constexpr int64_t kLayoutVersion = 2;
inline constexpr int64_t kSliceBits = 2;
inline constexpr int64_t kCodesPerByte = 8 / kSliceBits;
inline constexpr int64_t kTileRows = 16;
inline constexpr int64_t kTileCols = 16;
inline constexpr int64_t kTileBytes = kTileRows * kTileCols / kCodesPerByte;
inline constexpr int64_t kMaxSlices = 8;  // Q(k) stays exact in float32 (16 bits)

static_assert(kCodesPerByte * kSliceBits == 8, "2-bit codes must tile a byte");
static_assert(kTileBytes == 64, "a tile is one 64-byte line");
static_assert(2 * kMaxSlices <= 24, "Q(k) must be exactly representable in float32");

inline constexpr int64_t row_tiles(int64_t n) { return (n + kTileRows - 1) / kTileRows; }

// Bytes of one slice of an N x K weight (rows padded to whole tiles).
inline constexpr size_t slice_bytes(int64_t n, int64_t k) {
  return static_cast<size_t>(row_tiles(n)) * static_cast<size_t>(k / kTileCols) * static_cast<size_t>(kTileBytes);
}

// The tile holding row n, columns c .. c+15 (c a multiple of 16) inside one slice.
inline const uint8_t* tile_at(const uint8_t* slice, int64_t k, int64_t n, int64_t c) {
  return slice + static_cast<size_t>(((n / kTileRows) * (k / kTileCols) + c / kTileCols) * kTileBytes);
}

// The 2-bit code of (row n, column c) in one slice of a K-column weight.
inline uint32_t code_at(const uint8_t* slice, int64_t k, int64_t n, int64_t c) {
  const uint8_t byte = tile_at(slice, k, n, c - c % kTileCols)[4 * (n % kTileRows) + c % 4];
  return (byte >> (2 * ((c % kTileCols) / 4))) & 3u;
}

// Step of slice k (1-based) relative to s1: 4^-(k-1).
inline constexpr float step_ratio(int k) {
  float r = 1.0f;
  for (int e = 1; e < k; ++e) r *= 0.25f;
  return r;
}

static_assert(step_ratio(1) == 1.0f && step_ratio(3) == 0.0625f, "step ratio is 4^-(k-1)");

}  // namespace mobiq
