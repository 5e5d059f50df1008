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
// Operands (RsmmArgs): weights as in format.h, their slice-1 parameters also
// as tile parameters (build_tile_params: per row tile and group, 16 rows in
// lanes, the order of the SIMD accumulators; float32 in the kF32 mode, half
// precision per row in the kInt8 mode, see TileParams); activations prepared
// once per call by prepare_activations().
// Preconditions (checked by the ORT glue / select_kernel): K % g == 0,
// g % 16 == 0, g <= kMaxGroupSize, 1 <= k <= min(S, max_slices),
// 0 <= n0 <= n1 <= N with n0 % 16 == 0, token indices in [0, M).
// Non-finite activations: a token with a NaN or an infinity in x gets NaN in every output it
// computes (the reference by definition; the others because prepare_activations makes that
// token's group operands NaN, see activations.cc); other tokens are unaffected.
#pragma once

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace mobiq {

// The largest group: the integer kernels sum a group's products of a code byte (<= 255) and a signed
// activation byte (|.| <= 128) in int32.
inline constexpr int64_t kMaxGroupSize = 65536;
static_assert(kMaxGroupSize * 255 * 128 <= std::numeric_limits<int32_t>::max(), "a group's dot must fit int32");

enum class Mode { kF32, kInt8 };

// The activations a kernel reads (prepare_activations makes them):
//   kFloat   x as given;
//   kInt8    per (token, group) int8 with one scale (the kInt8 mode);
//   kDigits  per (token, group) 23-bit block floating point, x = scale (d2 2^16 + d1 2^8 + d0)
//            with signed int8 digits stored as three planes [M, 3, K] (d0, d1, d2): kF32
//            accuracy (|error| <= 2^-23 max|x_group|) through integer dot products.
enum class Operand { kFloat, kInt8, kDigits };

struct RsmmArgs {
  const uint8_t* slices;       // [S, ceil(N/16), K/16, 64], format.h
  const float* scales;         // [N, G]: s1
  const float* zero_points;    // [N, G]: z1
  const float* tile_scales;    // kF32: [ceil(N/16), G, 16]: s1, rows in lanes, 0 past row N
  const float* tile_offsets;   // kF32: [ceil(N/16), G, 16]: s1 * z1, same order
  const uint16_t* tile_halves; // kInt8: [ceil(N/16), G, 2, 16] binary16: s1 / r_n, then s1 * z1 / r_n
  const float* row_scales;     // kInt8: [ceil(N/16) * 16]: r_n (1 past row N)
  const float* bias;           // [N] or nullptr
  const float* x;              // [M, K] float32 activations
  const int8_t* xq;            // kInt8: [M, K] quantized activations; kDigits: [M, 3, K]
  const float* xq_scale;       // kInt8, kDigits: [M, G] dequantization scale of xq
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
  Operand operand;
  int max_slices;        // largest k it reads (Q(k) must fit its integer type)
  bool (*supported)();   // this CPU can run it
};

// All kernels compiled into this library (scalar ones first), for tests and benchmarks.
const std::vector<KernelInfo>& all_kernels();

// The kernel for one op instance, chosen once: MOBIQ_KERNEL=<name>|reference|portable
// forces a variant (invalid_argument if unknown or unusable here), otherwise the
// fastest supported one for this mode and slice count.
const KernelInfo& select_kernel(Mode mode, int64_t num_slices);

// Activation buffers for one call: fills x_group_sums (of the activations as the
// kernel sees them) and xq / xq_scale for integer operands. Storage is owned by `buffers`;
// `nonfinite` lists (ascending) the tokens with a NaN or an infinity in x.
struct ActivationBuffers {
  std::vector<float> xq_scale, group_sums;
  std::vector<int8_t> xq;
  std::vector<int32_t> nonfinite;
};
void prepare_activations(Operand operand, const float* x, int64_t M, int64_t K, int64_t group_size,
                         ActivationBuffers& buffers, RsmmArgs& args);

// Slice-1 parameters regrouped by row tile, built once per weight for one mode; points args at them.
//   kF32: float32 s1 and s1 z1 (RsmmArgs::tile_scales / tile_offsets), exact.
//   kInt8: binary16 s1 / r_n and s1 z1 / r_n in one 64-byte line per (row tile, group)
//     (tile_halves), r_n = the largest |s1|, |s1 z1| of row n (row_scales): a kernel sums a row's
//     groups in units of r_n and multiplies once by r_n. Half the bytes a decode step reads for
//     parameters (at 4 bits and g = 64 they were 20 % of all it reads), for a relative rounding of
//     2^-11 of r_n per parameter, below the int8 activations' 2^-8.
struct TileParams {
  std::vector<float> scales, offsets, row_scales;
  std::vector<uint16_t> halves;
};
void build_tile_params(Mode mode, const float* scales, const float* zero_points, int64_t N, int64_t groups,
                       TileParams& params);
void use_tile_params(const TileParams& params, RsmmArgs& args);

// binary16 <-> float32 (round to nearest even; subnormals kept; overflow to infinity).
uint16_t to_half(float v);
float from_half(uint16_t h);

// Kernel implementations (see their files for the contracts).
void rsmm_f32_reference(const RsmmArgs&, const int32_t*, int64_t, int, int64_t, int64_t);
void rsmm_f32_1x1__scalar(const RsmmArgs&, const int32_t*, int64_t, int, int64_t, int64_t);
void rsmm_i8_1x1__scalar(const RsmmArgs&, const int32_t*, int64_t, int, int64_t, int64_t);
#if defined(__x86_64__)
void rsmm_f32_16x4__avx512vnni(const RsmmArgs&, const int32_t*, int64_t, int, int64_t, int64_t);
void rsmm_i8_16x4__avx512vnni(const RsmmArgs&, const int32_t*, int64_t, int, int64_t, int64_t);
void rsmm_f32_16x4__avx2(const RsmmArgs&, const int32_t*, int64_t, int, int64_t, int64_t);
void rsmm_i8_16x4__avx2(const RsmmArgs&, const int32_t*, int64_t, int, int64_t, int64_t);
void rsmm_i8_16x4__avxvnni(const RsmmArgs&, const int32_t*, int64_t, int, int64_t, int64_t);
#endif
#if defined(__aarch64__)
void rsmm_f32_16x4__neon(const RsmmArgs&, const int32_t*, int64_t, int, int64_t, int64_t);
void rsmm_i8_16x4__neon(const RsmmArgs&, const int32_t*, int64_t, int, int64_t, int64_t);
void rsmm_i8_16x4__neondot(const RsmmArgs&, const int32_t*, int64_t, int, int64_t, int64_t);
#endif

}  // namespace mobiq
