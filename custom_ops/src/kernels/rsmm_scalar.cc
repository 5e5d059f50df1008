// rsmm_f32_1x1__scalar — portable kernel, one token x one row at a time.
// Reads the packed codes of the first k slices, builds the 2k-bit integer code
// Q(k) = sum_e 4^(k-e) qe per column, and uses the affine form
//   W^(k) = s_k (Q(k) + 1/2) - s1 z1,   s_k = s1 4^-(k-1)
// so that per (token, row, group):
//   sum_c x_c W^(k)_c = s_k (sum_c x_c Q_c + xsum/2) - s1 z1 xsum.
// Group partial sums are float32, the sum over groups float64. Bytes of slices
// k+1..S are never read.
#include "mobiq/format.h"
#include "mobiq/kernels.h"

namespace mobiq {

void fill_group_sums(const float* x, int64_t M, int64_t K, int64_t group_size, float* out) {
  const int64_t groups = K / group_size;
  for (int64_t t = 0; t < M; ++t) {
    for (int64_t g = 0; g < groups; ++g) {
      const float* xg = x + t * K + g * group_size;
      float s = 0.0f;
      for (int64_t c = 0; c < group_size; ++c) s += xg[c];
      out[t * groups + g] = s;
    }
  }
}

void rsmm_f32_1x1__scalar(const RsmmArgs& a, const int32_t* tokens, int64_t num_tokens, int k,
                          int64_t n0, int64_t n1) {
  const int64_t groups = a.K / a.group_size;
  const int64_t row_bytes = a.K / kCodesPerByte;
  const int64_t group_bytes = a.group_size / kCodesPerByte;
  const size_t plane = slice_bytes(a.N, a.K);
  const float ratio = step_ratio(k);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* rows = a.slices + static_cast<size_t>(n * row_bytes);
    for (int64_t i = 0; i < num_tokens; ++i) {
      const int64_t t = tokens[i];
      const float* x = a.x + t * a.K;
      const float* xs = a.x_group_sums + t * groups;
      double acc = a.bias ? a.bias[n] : 0.0;
      for (int64_t g = 0; g < groups; ++g) {
        float dot = 0.0f;
        for (int64_t b = 0; b < group_bytes; ++b) {
          const int64_t byte = g * group_bytes + b;
          uint32_t q[4] = {0, 0, 0, 0};
          for (int e = 0; e < k; ++e) {
            const uint32_t packed = rows[static_cast<size_t>(e) * plane + static_cast<size_t>(byte)];
            for (int j = 0; j < 4; ++j) q[j] = (q[j] << 2) | ((packed >> (2 * j)) & 3u);
          }
          const float* xc = x + byte * 4;
          dot += xc[0] * static_cast<float>(q[0]) + xc[1] * static_cast<float>(q[1]) +
                 xc[2] * static_cast<float>(q[2]) + xc[3] * static_cast<float>(q[3]);
        }
        const float s1 = a.scales[n * groups + g];
        const float z1 = a.zero_points[n * groups + g];
        acc += static_cast<double>(s1 * ratio) * (static_cast<double>(dot) + 0.5 * xs[g]) -
               static_cast<double>(s1) * static_cast<double>(z1) * xs[g];
      }
      a.y[t * a.N + n] = static_cast<float>(acc);
    }
  }
}

}  // namespace mobiq
