// Raw-pointer ResidualSliceMatMul kernels: no ONNX Runtime in here.
//
// Every kernel computes, for the tokens listed in `tokens` (all reading the
// same k slices) and the output rows n in [n0, n1):
//   Y[t, n] = sum_c X[t, c] * W^(k)[n, c] + bias[n]
// with W^(k) = s_k (Q(k) + 1/2) - s1 z1 as defined in format.h, i.e. per group
//   s_k * sum_c X[t,c] Q_c  +  (s_k / 2 - s1 z1) * sum_c X[t,c].
// Two numeric modes:
//   kF32   exact float: the first term from float32 activations;
//   kInt8  activations quantized per (token, group) to int8 with one scale
//          (like MatMulNBits accuracy_level=4); integer dot products with the
//          2k-bit codes, the second term still from the float sums.
// Operands (RsmmArgs): weights as in format.h; activations prepared once per
// call by prepare_activations() for the chosen kernel. "Block-permuted" means:
// inside each 64-column block, position 16 i + j holds column 4 j + i — the
// order in which SIMD kernels unpack 2-bit codes (lane i = bit pair i).
// Preconditions (checked by the ORT glue / select_kernel): K % g == 0,
// g % KernelInfo::group_multiple == 0, 1 <= k <= min(S, max_slices),
// 0 <= n0 <= n1 <= N, token indices in [0, M).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace mobiq {

enum class Mode { kF32, kInt8 };

struct RsmmArgs {
  const uint8_t* slices;       // [S, N, K/4]
  const float* scales;         // [N, G]
  const float* zero_points;    // [N, G]
  const float* bias;           // [N] or nullptr
  const float* x;              // [M, K] float32 activations (kF32: block-permuted if the kernel says so)
  const int8_t* xq;            // kInt8: [M, K] quantized activations (block-permuted if the kernel says so)
  const float* xq_scale;       // kInt8: [M, G] dequantization scale of xq
  const float* x_group_sums;   // [M, G] float sums of the original activations per group
  float* y;                    // [M, N]
  int64_t M, K, N, group_size, num_slices;
};

using RsmmKernelFn = void (*)(const RsmmArgs& a, const int32_t* tokens, int64_t num_tokens, int k,
                              int64_t n0, int64_t n1);

struct KernelInfo {
  RsmmKernelFn fn;
  const char* name;      // XNNPACK style: rsmm_<mode>_<tile>__<isa>
  Mode mode;
  bool permuted;         // activations block-permuted
  int64_t group_multiple;
  int max_slices;        // largest k it reads (Q(k) must fit its integer type)
  bool (*supported)();   // this CPU can run it
};

// All kernels compiled into this library (scalar ones first), for tests and benchmarks.
const std::vector<KernelInfo>& all_kernels();

// The kernel for one op instance, chosen once: MOBIQ_KERNEL=<name>|reference|portable
// forces a variant (invalid_argument if unknown or unusable here), otherwise the
// fastest supported one for this mode, group size and slice count.
const KernelInfo& select_kernel(Mode mode, int64_t group_size, int64_t num_slices);

// Activation buffers for one call: fills x_group_sums and, per the kernel, the
// permuted float copy or the int8 quantization. Storage is owned by `buffers`.
struct ActivationBuffers {
  std::vector<float> x_perm, xq_scale, group_sums;
  std::vector<int8_t> xq;
};
void prepare_activations(const KernelInfo& kernel, const float* x, int64_t M, int64_t K, int64_t group_size,
                         ActivationBuffers& buffers, RsmmArgs& args);

// Kernel implementations (see their files for the contracts).
void rsmm_f32_reference(const RsmmArgs&, const int32_t*, int64_t, int, int64_t, int64_t);
void rsmm_f32_1x1__scalar(const RsmmArgs&, const int32_t*, int64_t, int, int64_t, int64_t);
void rsmm_i8_1x1__scalar(const RsmmArgs&, const int32_t*, int64_t, int, int64_t, int64_t);
#if defined(__x86_64__)
void rsmm_f32_4x64__avx512(const RsmmArgs&, const int32_t*, int64_t, int, int64_t, int64_t);
void rsmm_i8_4x64__avx512vnni(const RsmmArgs&, const int32_t*, int64_t, int, int64_t, int64_t);
void rsmm_f32_4x64__avx2(const RsmmArgs&, const int32_t*, int64_t, int, int64_t, int64_t);
void rsmm_i8_4x64__avx2(const RsmmArgs&, const int32_t*, int64_t, int, int64_t, int64_t);
#endif
#if defined(__aarch64__)
void rsmm_f32_4x64__neon(const RsmmArgs&, const int32_t*, int64_t, int, int64_t, int64_t);
void rsmm_i8_4x64__neon(const RsmmArgs&, const int32_t*, int64_t, int, int64_t, int64_t);
void rsmm_i8_4x64__neondot(const RsmmArgs&, const int32_t*, int64_t, int, int64_t, int64_t);
#endif

}  // namespace mobiq
