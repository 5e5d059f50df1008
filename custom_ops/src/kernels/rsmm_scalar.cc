// Portable kernels, one token x one row at a time; run on any CPU and mirror
// the SIMD kernels' arithmetic (tests hold each SIMD kernel to these).
//
// rsmm_f32_1x1__scalar: exact float mode. Builds Q(k) = sum_e 4^(k-e) qe per
//   column from the packed codes of the first k slices; per (token, row, group)
//   s_k (sum_c x_c Q_c) + (s_k/2 - s1 z1) xsum, group partials in float32, the
//   sum over groups in float64.
// rsmm_i8_1x1__scalar: int8 mode. The same with x_c replaced by xq_c * xq_scale
//   in the first term, the integer dot product exact in int32, and the half-precision
//   tile parameters in units of the row scale (kernels.h, TileParams) for s1 and s1 z1.
// Neither reads bytes of slices k+1..S.
#include "mobiq/format.h"
#include "mobiq/kernels.h"

namespace mobiq {
namespace {

// Q(k) of row n, columns c .. c+3 (c % 4 == 0): bytes 4 (n % 16) + b of their tile, bit pair
// (c % 16) / 4, in each of the first k slices (planes `plane` bytes apart).
inline void codes4(const RsmmArgs& a, size_t plane, int64_t n, int64_t c, int k, uint32_t q[4]) {
  const uint8_t* tile = tile_at(a.slices, a.K, n, c - c % kTileCols) + 4 * (n % kTileRows);
  const int shift = static_cast<int>(2 * ((c % kTileCols) / 4));
  q[0] = q[1] = q[2] = q[3] = 0;
  for (int e = 0; e < k; ++e)
    for (int b = 0; b < 4; ++b) q[b] = (q[b] << 2) | ((tile[static_cast<size_t>(e) * plane + b] >> shift) & 3u);
}

template <Mode M>
void rsmm_1x1_scalar(const RsmmArgs& a, const int32_t* tokens, int64_t num_tokens, int k, int64_t n0, int64_t n1) {
  const int64_t groups = a.K / a.group_size;
  const size_t plane = slice_bytes(a.N, a.K);
  const float ratio = step_ratio(k);
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t i = 0; i < num_tokens; ++i) {
      const int64_t t = tokens[i];
      const float* xs = a.x_group_sums + t * groups;
      double acc = M == Mode::kF32 && a.bias ? a.bias[n] : 0.0;
      for (int64_t g = 0; g < groups; ++g) {
        float dot = 0.0f;
        if constexpr (M == Mode::kF32) {
          const float* x = a.x + t * a.K;
          for (int64_t c = g * a.group_size; c < (g + 1) * a.group_size; c += 4) {
            uint32_t q[4];
            codes4(a, plane, n, c, k, q);
            const float* xc = x + c;
            dot += xc[0] * static_cast<float>(q[0]) + xc[1] * static_cast<float>(q[1]) +
                   xc[2] * static_cast<float>(q[2]) + xc[3] * static_cast<float>(q[3]);
          }
        } else {
          const int8_t* xq = a.xq + t * a.K;
          int64_t idot = 0;  // Q(k) < 4^k: int64 keeps k up to kMaxSlices exact
          for (int64_t c = g * a.group_size; c < (g + 1) * a.group_size; c += 4) {
            uint32_t q[4];
            codes4(a, plane, n, c, k, q);
            const int8_t* xc = xq + c;
            for (int j = 0; j < 4; ++j) idot += static_cast<int64_t>(xc[j]) * static_cast<int64_t>(q[j]);
          }
          dot = static_cast<float>(idot) * a.xq_scale[t * groups + g];
        }
        if constexpr (M == Mode::kF32) {
          const float s1 = a.scales[n * groups + g];
          const float z1 = a.zero_points[n * groups + g];
          acc += static_cast<double>(s1 * ratio) * dot + static_cast<double>(s1 * (0.5f * ratio - z1)) * xs[g];
        } else {  // the tile parameters, in units of the row scale
          const uint16_t* line = a.tile_halves + 2 * ((n / kTileRows) * groups + g) * kTileRows + n % kTileRows;
          const float s1 = from_half(line[0]), o1 = from_half(line[kTileRows]);
          acc += static_cast<double>(s1 * ratio) * dot + static_cast<double>(s1 * 0.5f * ratio - o1) * xs[g];
        }
      }
      if constexpr (M == Mode::kInt8) acc = acc * a.row_scales[n] + (a.bias ? a.bias[n] : 0.0);
      a.y[t * a.N + n] = static_cast<float>(acc);
    }
  }
}

}  // namespace

void rsmm_f32_1x1__scalar(const RsmmArgs& a, const int32_t* tokens, int64_t num_tokens, int k, int64_t n0,
                          int64_t n1) {
  rsmm_1x1_scalar<Mode::kF32>(a, tokens, num_tokens, k, n0, n1);
}

void rsmm_i8_1x1__scalar(const RsmmArgs& a, const int32_t* tokens, int64_t num_tokens, int k, int64_t n0,
                         int64_t n1) {
  rsmm_1x1_scalar<Mode::kInt8>(a, tokens, num_tokens, k, n0, n1);
}

}  // namespace mobiq
