// MoBiSlice packed weight format, layout version 1 — the C++ twin of
// runtime/format.py (keep both in step; the model file carries the version).
//
// A weight W [N out x K in] is stored as S residual 2-bit slices, one uint8
// tensor of shape [S, N, K/4], slice-major: every byte of slice e comes before
// any byte of slice e+1, so a token that reads k slices touches only the first
// k * N * K/4 bytes.
//
// Inside one slice, rows follow each other (row n at byte n * K/4), and byte j
// of a row holds the codes of input columns 4j .. 4j+3, lowest bits first:
//
//     bit   7 6 | 5 4 | 3 2 | 1 0
//     col  4j+3 | 4j+2| 4j+1| 4j
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

inline constexpr int64_t kLayoutVersion = 1;
inline constexpr int64_t kSliceBits = 2;
inline constexpr int64_t kCodesPerByte = 8 / kSliceBits;
inline constexpr int64_t kMaxSlices = 8;  // Q(k) stays exact in float32 (16 bits)

static_assert(kCodesPerByte * kSliceBits == 8, "2-bit codes must tile a byte");
static_assert(2 * kMaxSlices <= 24, "Q(k) must be exactly representable in float32");

// Bytes of one slice of an N x K weight.
inline constexpr size_t slice_bytes(int64_t n, int64_t k) {
  return static_cast<size_t>(n) * static_cast<size_t>(k / kCodesPerByte);
}

// The 2-bit code of column `col` in a packed row.
inline uint32_t code_at(const uint8_t* row, int64_t col) {
  return (row[col >> 2] >> ((col & 3) * 2)) & 3u;
}

// Step of slice k (1-based) relative to s1: 4^-(k-1).
inline constexpr float step_ratio(int k) {
  float r = 1.0f;
  for (int e = 1; e < k; ++e) r *= 0.25f;
  return r;
}

static_assert(step_ratio(1) == 1.0f && step_ratio(3) == 0.0625f, "step ratio is 4^-(k-1)");

}  // namespace mobiq
