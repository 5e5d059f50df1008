// prepare_activations — the per-call activation step shared by every kernel.
// kF32: float group sums, and a block-permuted float copy for SIMD kernels.
// kInt8: per (token, group) scale = max|x| / 127, xq = round-to-nearest-even(x / scale)
//   (block-permuted for SIMD kernels), and the group sums of the *dequantized*
//   activations, so that both terms of s_k (sum x Q + xsum/2) - s1 z1 xsum see the
//   same x: the int8 error is then that of x against W^(k), not against the
//   un-centred codes.
#include <cmath>
#include <cstring>

#include "mobiq/kernels.h"

namespace mobiq {
namespace {

// Position 16 i + j of a 64-column block holds column 4 j + i.
inline int64_t permuted_column(int64_t p) { return 4 * (p & 15) + (p >> 4); }

}  // namespace

void prepare_activations(const KernelInfo& kernel, const float* x, int64_t M, int64_t K, int64_t group_size,
                         ActivationBuffers& buf, RsmmArgs& args) {
  const int64_t groups = K / group_size;
  buf.group_sums.resize(static_cast<size_t>(M * groups));
  args.x_group_sums = buf.group_sums.data();
  args.x = x;
  args.xq = nullptr;
  args.xq_scale = nullptr;

  if (kernel.mode == Mode::kF32) {
    for (int64_t t = 0; t < M; ++t)
      for (int64_t g = 0; g < groups; ++g) {
        const float* xg = x + t * K + g * group_size;
        float s = 0.0f;
        for (int64_t c = 0; c < group_size; ++c) s += xg[c];
        buf.group_sums[static_cast<size_t>(t * groups + g)] = s;
      }
    if (!kernel.permuted) return;
    buf.x_perm.resize(static_cast<size_t>(M * K));
    for (int64_t t = 0; t < M; ++t)
      for (int64_t b = 0; b < K; b += 64)
        for (int64_t p = 0; p < 64; ++p) buf.x_perm[static_cast<size_t>(t * K + b + p)] = x[t * K + b + permuted_column(p)];
    args.x = buf.x_perm.data();
    return;
  }

  buf.xq.resize(static_cast<size_t>(M * K));
  buf.xq_scale.resize(static_cast<size_t>(M * groups));
  for (int64_t t = 0; t < M; ++t)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t c0 = g * group_size;
      const float* xg = x + t * K + c0;
      float amax = 0.0f;
      for (int64_t c = 0; c < group_size; ++c) amax = std::fmax(amax, std::fabs(xg[c]));
      const float scale = amax / 127.0f;
      const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
      buf.xq_scale[static_cast<size_t>(t * groups + g)] = scale;
      int8_t* out = buf.xq.data() + t * K + c0;
      int32_t sum = 0;
      for (int64_t c = 0; c < group_size; ++c) {
        const int64_t src = kernel.permuted ? (c & ~int64_t{63}) + permuted_column(c & 63) : c;
        out[c] = static_cast<int8_t>(std::nearbyint(xg[src] * inv));
        sum += out[c];
      }
      buf.group_sums[static_cast<size_t>(t * groups + g)] = scale * static_cast<float>(sum);
    }
  args.xq = buf.xq.data();
  args.xq_scale = buf.xq_scale.data();
}

}  // namespace mobiq
