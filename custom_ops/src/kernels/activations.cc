// prepare_activations — the per-call activation step shared by every kernel.
// kFloat: float group sums. kInt8: per (token, group) scale = max|x| / 127,
//   xq = round-to-nearest-even(x / scale). kDigits: the same with 2^22 - 1 levels,
//   the integer split into signed base-256 digits (|d2| <= 64). Integer operands get
//   the group sums of the *dequantized* activations, so that both terms of
//   s_k (sum x Q + xsum/2) - s1 z1 xsum see the same x: the quantization error is
//   then that of x against W^(k), not against the un-centred codes.
#include <cmath>

#include "mobiq/kernels.h"

namespace mobiq {
namespace {

// Round to nearest, ties to even, for |v| < 2^22 — inline and vectorizable, unlike std::nearbyint,
// which is a libm call per element on baseline x86-64 (20 us per 4096-column token).
inline int32_t round_even(float v) {
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23: adding it leaves no fraction bits
  return static_cast<int32_t>((v + kMagic) - kMagic);
}

}  // namespace

void prepare_activations(Operand operand, const float* x, int64_t M, int64_t K, int64_t group_size,
                         ActivationBuffers& buf, RsmmArgs& args) {
  const int64_t groups = K / group_size;
  buf.group_sums.resize(static_cast<size_t>(M * groups));
  args.x_group_sums = buf.group_sums.data();
  args.x = x;
  args.xq = nullptr;
  args.xq_scale = nullptr;

  if (operand == Operand::kFloat) {
    for (int64_t t = 0; t < M; ++t)
      for (int64_t g = 0; g < groups; ++g) {
        const float* xg = x + t * K + g * group_size;
        float s = 0.0f;
        for (int64_t c = 0; c < group_size; ++c) s += xg[c];
        buf.group_sums[static_cast<size_t>(t * groups + g)] = s;
      }
    return;
  }

  const bool digits = operand == Operand::kDigits;
  const int64_t planes = digits ? 3 : 1;
  const float levels = digits ? static_cast<float>((1 << 22) - 1) : 127.0f;
  buf.xq.resize(static_cast<size_t>(M * planes * K));
  buf.xq_scale.resize(static_cast<size_t>(M * groups));
  for (int64_t t = 0; t < M; ++t)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t c0 = g * group_size;
      const float* xg = x + t * K + c0;
      float amax = 0.0f;
      for (int64_t c = 0; c < group_size; ++c) amax = std::fabs(xg[c]) > amax ? std::fabs(xg[c]) : amax;
      const float scale = amax / levels;
      const float inv = amax > 0.0f ? levels / amax : 0.0f;
      buf.xq_scale[static_cast<size_t>(t * groups + g)] = scale;
      int8_t* out = buf.xq.data() + t * planes * K + c0;
      int64_t sum = 0;
      for (int64_t c = 0; c < group_size; ++c) {
        const int32_t v = round_even(xg[c] * inv);
        sum += v;
        if (!digits) {
          out[c] = static_cast<int8_t>(v);
          continue;
        }
        int32_t rest = v;
        for (int64_t d = 0; d < 3; ++d) {
          const int32_t digit = ((rest + 128) & 255) - 128;
          out[d * K + c] = static_cast<int8_t>(digit);
          rest = (rest - digit) / 256;
        }
      }
      buf.group_sums[static_cast<size_t>(t * groups + g)] = static_cast<float>(static_cast<double>(scale) * sum);
    }
  args.xq = buf.xq.data();
  args.xq_scale = buf.xq_scale.data();
}

}  // namespace mobiq
