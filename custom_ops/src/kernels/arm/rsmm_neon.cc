// ARM NEON kernels (aarch64): tiles of NR rows x NT tokens (NR*NT independent
// accumulator chains, so latency is hidden even for one token), 64 columns per step.
//
// Formula (kernels.h), per token and row, with ratio = 4^-(k-1):
//   y = bias + sum_g [ s1 ratio dot_g + s1 (c ratio - z1) xsum_g ],  c = 1/2,
// dot_g = sum_c x_c Q_c, Q(k) = sum_e 4^(k-e) qe; the second term in double
// as in the scalar kernels, the first in float.
// Per 64-column block the 16 packed bytes b of a slice give four vectors of
// codes, vector i = (b >> 2i) & 3 = block positions 16i..16i+15: the
// block-permuted order. Shift-left-and-insert (sli) over the k slices builds
// Q(k) as 64 unsigned bytes (k <= 4).
// rsmm_f32_4x64__neon: exact float mode. Q bytes widened to float, FMA with the
//   permuted float activations.
// rsmm_i8_4x64__neondot: int8 mode, ARMv8.2 dot product (sdot; Raspberry Pi 5).
//   Q bytes as int8 against the permuted int8 activations, dot_g scaled by
//   xq_scale. k <= 3: Q <= 63 fits int8. k = 4: the bytes hold Q - 128 and
//   c = 1/2 + 128 adds 128 s_k xsum_g back (xsum is the sum of the dequantized
//   activations, so this is exact up to float rounding).
// rsmm_i8_4x64__neon: the same on ARMv8.0 (Raspberry Pi 4): smull + smlal sum two
//   byte products in int16 (2 * 128 * 127 < 2^15 since prepare_activations keeps
//   xq in [-127, 127]), sadalp accumulates pairs into int32.
// All: group_size % 64 == 0, k <= 4, activations block-permuted, bytes of
// slices k+1..S never read.
#include <arm_neon.h>

#include <type_traits>

#include "../tiles.h"
#include "mobiq/format.h"
#include "mobiq/kernels.h"

// The dot-product kernel's entry points carry the ISA and `flatten`, so the shared
// plain-NEON code below is inlined into them and compiled with sdot available.
#define MOBIQ_DOTPROD __attribute__((target("arch=armv8.2-a+dotprod")))
#define MOBIQ_DOTPROD_ENTRY __attribute__((target("arch=armv8.2-a+dotprod"), flatten))

namespace mobiq {
namespace {

// Q(KS) of the 64-column block whose slice-1 bytes start at p: q[i] = block positions 16i..16i+15.
template <int KS>
inline void codes(const uint8_t* p, size_t plane, uint8x16_t q[4]) {
  const uint8x16_t three = vdupq_n_u8(3), b = vld1q_u8(p);
  q[0] = vandq_u8(b, three);
  q[1] = vandq_u8(vshrq_n_u8(b, 2), three);
  q[2] = vandq_u8(vshrq_n_u8(b, 4), three);
  q[3] = vshrq_n_u8(b, 6);
  for (int e = 1; e < KS; ++e) {  // Q = (Q << 2) | qe: sli keeps the low 2 bits of its first operand
    const uint8x16_t c = vld1q_u8(p + e * plane);
    q[0] = vsliq_n_u8(c, q[0], 2);
    q[1] = vsliq_n_u8(vshrq_n_u8(c, 2), q[1], 2);
    q[2] = vsliq_n_u8(vshrq_n_u8(c, 4), q[2], 2);
    q[3] = vsliq_n_u8(vshrq_n_u8(c, 6), q[3], 2);
  }
}

// bias + sum_g s1 (half - z1) xsum_g for one (row, token): the zero-point term, in double.
inline double offset_term(const RsmmArgs& a, int64_t row, int64_t t, float half) {
  const int64_t groups = a.K / a.group_size;
  const float *s1 = a.scales + row * groups, *z1 = a.zero_points + row * groups, *xs = a.x_group_sums + t * groups;
  double acc = a.bias ? a.bias[row] : 0.0;
  for (int64_t g = 0; g < groups; ++g) acc += static_cast<double>(s1[g] * (half - z1[g])) * xs[g];
  return acc;
}

template <int NR, int NT>
inline void store_rows(const RsmmArgs& a, const int32_t* tok, int64_t n, const float32x4_t* facc, float half) {
  for (int r = 0; r < NR; ++r)
    for (int j = 0; j < NT; ++j)
      a.y[tok[j] * a.N + n + r] = static_cast<float>(offset_term(a, n + r, tok[j], half) +
                                                     static_cast<double>(vaddvq_f32(facc[r * NT + j])));
}

struct F32 {};  // exact float mode

// int8 x int8 -> int32, 16 bytes: ARMv8.0 (two products per int16 lane, then pairwise into int32).
struct Mull {
  static inline int32x4_t dot(int32x4_t acc, int8x16_t q, int8x16_t x) {
    return vpadalq_s16(acc, vmlal_high_s8(vmull_s8(vget_low_s8(q), vget_low_s8(x)), q, x));
  }
};

// int8 x int8 -> int32, 16 bytes: ARMv8.2 dot product.
struct Dot {
  MOBIQ_DOTPROD static inline int32x4_t dot(int32x4_t acc, int8x16_t q, int8x16_t x) { return vdotq_s32(acc, q, x); }
};

template <int KS, int NR, int NT>
inline void f32_rows(const RsmmArgs& a, const int32_t* tok, int64_t n) {
  const int64_t groups = a.K / a.group_size;
  const size_t plane = slice_bytes(a.N, a.K), row_bytes = static_cast<size_t>(a.K / 4);
  const float ratio = step_ratio(KS);
  float32x4_t facc[NR * NT];
  for (auto& f : facc) f = vdupq_n_f32(0.0f);
  for (int64_t g = 0; g < groups; ++g) {
    float32x4_t gacc[NR * NT];
    for (auto& v : gacc) v = vdupq_n_f32(0.0f);
    for (int64_t c = g * a.group_size; c < (g + 1) * a.group_size; c += 64) {
      for (int r = 0; r < NR; ++r) {
        uint8x16_t q[4];
        codes<KS>(a.slices + static_cast<size_t>(n + r) * row_bytes + static_cast<size_t>(c) / 4, plane, q);
        for (int i = 0; i < 4; ++i) {
          const uint16x8_t lo = vmovl_u8(vget_low_u8(q[i])), hi = vmovl_high_u8(q[i]);
          const float32x4_t w[4] = {vcvtq_f32_u32(vmovl_u16(vget_low_u16(lo))), vcvtq_f32_u32(vmovl_high_u16(lo)),
                                    vcvtq_f32_u32(vmovl_u16(vget_low_u16(hi))), vcvtq_f32_u32(vmovl_high_u16(hi))};
          for (int j = 0; j < NT; ++j) {
            const float* x = a.x + tok[j] * a.K + c + 16 * i;
            float32x4_t s = vmulq_f32(w[0], vld1q_f32(x));
            s = vfmaq_f32(s, w[1], vld1q_f32(x + 4));
            s = vfmaq_f32(s, w[2], vld1q_f32(x + 8));
            s = vfmaq_f32(s, w[3], vld1q_f32(x + 12));
            gacc[r * NT + j] = vaddq_f32(gacc[r * NT + j], s);
          }
        }
      }
    }
    for (int r = 0; r < NR; ++r) {
      const float sk = a.scales[(n + r) * groups + g] * ratio;
      for (int j = 0; j < NT; ++j) facc[r * NT + j] = vfmaq_n_f32(facc[r * NT + j], gacc[r * NT + j], sk);
    }
  }
  store_rows<NR, NT>(a, tok, n, facc, 0.5f * ratio);
}

template <class Step, int KS, int NR, int NT>
inline void i8_rows(const RsmmArgs& a, const int32_t* tok, int64_t n) {
  const int64_t groups = a.K / a.group_size;
  const size_t plane = slice_bytes(a.N, a.K), row_bytes = static_cast<size_t>(a.K / 4);
  const float ratio = step_ratio(KS);
  constexpr bool kShifted = KS == 4;  // Q < 256 does not fit int8: bytes hold Q - 128
  float32x4_t facc[NR * NT];
  for (auto& f : facc) f = vdupq_n_f32(0.0f);
  for (int64_t g = 0; g < groups; ++g) {
    int32x4_t acc[NR * NT];
    for (auto& v : acc) v = vdupq_n_s32(0);
    for (int64_t c = g * a.group_size; c < (g + 1) * a.group_size; c += 64) {
      for (int r = 0; r < NR; ++r) {
        uint8x16_t q[4];
        codes<KS>(a.slices + static_cast<size_t>(n + r) * row_bytes + static_cast<size_t>(c) / 4, plane, q);
        for (int i = 0; i < 4; ++i) {
          const int8x16_t qs = vreinterpretq_s8_u8(kShifted ? veorq_u8(q[i], vdupq_n_u8(0x80)) : q[i]);
          for (int j = 0; j < NT; ++j)
            acc[r * NT + j] = Step::dot(acc[r * NT + j], qs, vld1q_s8(a.xq + tok[j] * a.K + c + 16 * i));
        }
      }
    }
    for (int r = 0; r < NR; ++r) {
      const float sk = a.scales[(n + r) * groups + g] * ratio;
      for (int j = 0; j < NT; ++j)
        facc[r * NT + j] = vfmaq_n_f32(facc[r * NT + j], vcvtq_f32_s32(acc[r * NT + j]),
                                       sk * a.xq_scale[tok[j] * groups + g]);
    }
  }
  store_rows<NR, NT>(a, tok, n, facc, (kShifted ? 128.5f : 0.5f) * ratio);
}

// Rows in tiles of NR (then single rows) for one token tile of NT.
template <class Step, int KS, int NT>
inline void rows(const RsmmArgs& a, const int32_t* tok, int64_t n0, int64_t n1) {
  constexpr int NR = NT == 1 ? 4 : 2;
  int64_t n = n0;
  if constexpr (std::is_same_v<Step, F32>) {
    for (; n + NR <= n1; n += NR) f32_rows<KS, NR, NT>(a, tok, n);
    for (; n < n1; ++n) f32_rows<KS, 1, NT>(a, tok, n);
  } else {
    for (; n + NR <= n1; n += NR) i8_rows<Step, KS, NR, NT>(a, tok, n);
    for (; n < n1; ++n) i8_rows<Step, KS, 1, NT>(a, tok, n);
  }
}

template <class Step, int NT>
inline void tile(const RsmmArgs& a, const int32_t* tok, int k, int64_t n0, int64_t n1) {
  switch (k) {
    case 1: rows<Step, 1, NT>(a, tok, n0, n1); break;
    case 2: rows<Step, 2, NT>(a, tok, n0, n1); break;
    case 3: rows<Step, 3, NT>(a, tok, n0, n1); break;
    default: rows<Step, 4, NT>(a, tok, n0, n1); break;
  }
}

template <int NT>
void f32_tile(const RsmmArgs& a, const int32_t* tok, int k, int64_t n0, int64_t n1) {
  tile<F32, NT>(a, tok, k, n0, n1);
}

template <int NT>
void i8_tile(const RsmmArgs& a, const int32_t* tok, int k, int64_t n0, int64_t n1) {
  tile<Mull, NT>(a, tok, k, n0, n1);
}

template <int NT>
MOBIQ_DOTPROD_ENTRY void dot_tile(const RsmmArgs& a, const int32_t* tok, int k, int64_t n0, int64_t n1) {
  tile<Dot, NT>(a, tok, k, n0, n1);
}

}  // namespace

void rsmm_f32_4x64__neon(const RsmmArgs& a, const int32_t* tokens, int64_t num_tokens, int k, int64_t n0,
                         int64_t n1) {
  run_tiles<f32_tile<1>, f32_tile<2>, f32_tile<3>, f32_tile<4>>(a, tokens, num_tokens, k, n0, n1);
}

void rsmm_i8_4x64__neon(const RsmmArgs& a, const int32_t* tokens, int64_t num_tokens, int k, int64_t n0,
                        int64_t n1) {
  run_tiles<i8_tile<1>, i8_tile<2>, i8_tile<3>, i8_tile<4>>(a, tokens, num_tokens, k, n0, n1);
}

void rsmm_i8_4x64__neondot(const RsmmArgs& a, const int32_t* tokens, int64_t num_tokens, int k, int64_t n0,
                           int64_t n1) {
  run_tiles<dot_tile<1>, dot_tile<2>, dot_tile<3>, dot_tile<4>>(a, tokens, num_tokens, k, n0, n1);
}

}  // namespace mobiq
