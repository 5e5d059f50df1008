// Raw-pointer ResidualSliceMatMul kernels: no ONNX Runtime in here.
//
// Every kernel computes, for the tokens listed in `tokens` (all reading the
// same k slices) and the output rows n in [n0, n1):
//   Y[t, n] = sum_c X[t, c] * W^(k)[n, c] + bias[n]
// with W^(k) as defined in format.h. Operands:
//   x            float32 [M, K], row-major
//   slices       uint8   [S, N, K/4], layout version 1 (format.h)
//   scales, zps  float32 [N, K/g]
//   x_group_sums float32 [M, K/g]: sum of X[t, :] over each group (fill_group_sums)
//   bias         float32 [N] or nullptr
//   y            float32 [M, N]
// Preconditions (checked once by the ORT glue): K % g == 0, g % 4 == 0,
// 1 <= k <= S <= kMaxSlices, 0 <= n0 <= n1 <= N, token indices in [0, M).
#pragma once

#include <cstdint>

namespace mobiq {

struct RsmmArgs {
  const float* x;
  const uint8_t* slices;
  const float* scales;
  const float* zero_points;
  const float* x_group_sums;
  const float* bias;
  float* y;
  int64_t M, K, N, group_size, num_slices;
};

using RsmmKernelFn = void (*)(const RsmmArgs& a, const int32_t* tokens, int64_t num_tokens, int k,
                              int64_t n0, int64_t n1);

// Dequantize W^(k) in float64 then multiply: the executable spec.
void rsmm_f32_reference(const RsmmArgs& a, const int32_t* tokens, int64_t num_tokens, int k,
                        int64_t n0, int64_t n1);

// Portable kernel reading the packed codes directly; runs on any CPU.
void rsmm_f32_1x1__scalar(const RsmmArgs& a, const int32_t* tokens, int64_t num_tokens, int k,
                          int64_t n0, int64_t n1);

// x_group_sums[t, g] = sum of x[t, g*group_size .. (g+1)*group_size).
void fill_group_sums(const float* x, int64_t M, int64_t K, int64_t group_size, float* out);

struct KernelChoice {
  RsmmKernelFn fn;
  const char* name;
};

// The kernel for this process, chosen once from the CPU and the environment:
// MOBIQ_KERNEL=reference|scalar forces a variant (debugging); unknown values
// are rejected by throwing std::invalid_argument.
KernelChoice select_kernel();

}  // namespace mobiq
