// prepare_activations — the per-call activation step shared by every kernel.
// kFloat: float group sums. kInt8: per (token, group) scale = max|x| / 127,
//   xq = round-to-nearest-even(x / scale). kDigits: the same with 2^22 - 1 levels,
//   the integer split into signed base-256 digits (|d2| <= 64). Integer operands get
//   the group sums of the *dequantized* activations, so that both terms of
//   s_k (sum x Q + xsum/2) - s1 z1 xsum see the same x: the quantization error is
//   then that of x against W^(k), not against the un-centred codes.
// Non-finite activations (docs/design.md, "The op"): a group holding a NaN or an infinity gets
//   xq = 0 (no float-to-int conversion of it), scale NaN and sum NaN, so every kernel's output row
//   of that token is NaN; its token is listed in buffers.nonfinite. Found at no extra cost: the
//   group's max |x| is taken on the float bits (NaN and infinities have the largest), and for
//   float operands a non-finite group sum is the only case that rescans the group. A group whose
//   max |x| is so small that levels / max overflows (below ~1e-36 in int8) quantizes to 0.
#include <cfloat>
#include <cmath>
#include <cstring>

#include "mobiq/kernels.h"

namespace mobiq {
namespace {

// Round to nearest, ties to even, for |v| < 2^22 — inline and vectorizable, unlike std::nearbyint,
// which is a libm call per element on baseline x86-64 (20 us per 4096-column token).
inline int32_t round_even(float v) {
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23: adding it leaves no fraction bits
  return static_cast<int32_t>((v + kMagic) - kMagic);
}

// |v| as its float bits: for non-negative floats the integer order is the float order, and every
// NaN or infinity is >= kNonFiniteBits (an integer max vectorizes; a float one skips NaN).
constexpr uint32_t kNonFiniteBits = 0x7f800000u;
inline uint32_t abs_bits(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return bits & 0x7fffffffu;
}

inline uint32_t max_abs_bits(const float* x, int64_t n) {
  uint32_t top = 0;
  for (int64_t c = 0; c < n; ++c) top = abs_bits(x[c]) > top ? abs_bits(x[c]) : top;
  return top;
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
  buf.nonfinite.clear();

  if (operand == Operand::kFloat) {
    for (int64_t t = 0; t < M; ++t) {
      float* sums = buf.group_sums.data() + t * groups;
      for (int64_t g = 0; g < groups; ++g) {
        const float* xg = x + t * K + g * group_size;
        float s = 0.0f;
        for (int64_t c = 0; c < group_size; ++c) s += xg[c];
        sums[g] = s;
      }
      if (max_abs_bits(sums, groups) < kNonFiniteBits) continue;
      // A sum is finite when every term is; an infinite one may also be an overflow of finite terms.
      bool finite = true;
      for (int64_t g = 0; g < groups; ++g)
        if (max_abs_bits(x + t * K + g * group_size, group_size) >= kNonFiniteBits) sums[g] = NAN, finite = false;
      if (!finite) buf.nonfinite.push_back(static_cast<int32_t>(t));
    }
    return;
  }

  const bool digits = operand == Operand::kDigits;
  const int64_t planes = digits ? 3 : 1;
  const float levels = digits ? static_cast<float>((1 << 22) - 1) : 127.0f;
  buf.xq.resize(static_cast<size_t>(M * planes * K));
  buf.xq_scale.resize(static_cast<size_t>(M * groups));
  for (int64_t t = 0; t < M; ++t) {
    bool finite = true;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t c0 = g * group_size;
      const float* xg = x + t * K + c0;
      int8_t* out = buf.xq.data() + t * planes * K + c0;
      const uint32_t amax_bits = max_abs_bits(xg, group_size);
      if (amax_bits >= kNonFiniteBits) {
        for (int64_t d = 0; d < planes; ++d) std::memset(out + d * K, 0, static_cast<size_t>(group_size));
        buf.xq_scale[static_cast<size_t>(t * groups + g)] = NAN;
        buf.group_sums[static_cast<size_t>(t * groups + g)] = NAN;
        finite = false;
        continue;
      }
      float amax;
      std::memcpy(&amax, &amax_bits, sizeof amax);
      const float scale = amax / levels;
      float inv = amax > 0.0f ? levels / amax : 0.0f;
      if (!(inv <= FLT_MAX)) inv = 0.0f;  // max |x| below levels / FLT_MAX: x * inv would overflow
      buf.xq_scale[static_cast<size_t>(t * groups + g)] = scale;
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
    if (!finite) buf.nonfinite.push_back(static_cast<int32_t>(t));
  }
  args.xq = buf.xq.data();
  args.xq_scale = buf.xq_scale.data();
}

}  // namespace mobiq
