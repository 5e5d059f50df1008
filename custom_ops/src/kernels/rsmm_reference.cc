// rsmm_f32_reference — the executable spec of ResidualSliceMatMul.
// Builds each row of W^(k) = D1 + ... + Dk slice by slice in float64, exactly as
// docs/design.md ("The weight format") defines it (D1 = s1 (q1 - z1 + 1/2), De = s1 4^-(e-1) (qe - 3/2)),
// then takes float64 dot products. A token with a NaN or an infinity in x gets NaN in every row
// (docs/design.md, "The op"). Slow on purpose; used by tests and MOBIQ_KERNEL=reference.
#include <cmath>
#include <vector>

#include "mobiq/format.h"
#include "mobiq/kernels.h"

namespace mobiq {

void rsmm_f32_reference(const RsmmArgs& a, const int32_t* tokens, int64_t num_tokens, int k,
                        int64_t n0, int64_t n1) {
  const int64_t groups = a.K / a.group_size;
  std::vector<double> w(static_cast<size_t>(a.K));
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t c = 0; c < a.K; ++c) {
      const int64_t g = c / a.group_size;
      const double s1 = a.scales[n * groups + g];
      const double z1 = a.zero_points[n * groups + g];
      double value = 0.0;
      for (int e = 1; e <= k; ++e) {
        const uint8_t* slice = a.slices + static_cast<size_t>(e - 1) * slice_bytes(a.N, a.K);
        const double q = code_at(slice, a.K, n, c);
        value += (e == 1) ? s1 * (q - z1 + 0.5) : s1 * step_ratio(e) * (q - 1.5);
      }
      w[static_cast<size_t>(c)] = value;
    }
    for (int64_t i = 0; i < num_tokens; ++i) {
      const float* x = a.x + static_cast<int64_t>(tokens[i]) * a.K;
      double acc = a.bias ? a.bias[n] : 0.0;
      bool finite = true;
      for (int64_t c = 0; c < a.K; ++c) {
        acc += static_cast<double>(x[c]) * w[static_cast<size_t>(c)];
        finite = finite && std::isfinite(x[c]);
      }
      a.y[static_cast<int64_t>(tokens[i]) * a.N + n] = finite ? static_cast<float>(acc) : NAN;
    }
  }
}

}  // namespace mobiq
