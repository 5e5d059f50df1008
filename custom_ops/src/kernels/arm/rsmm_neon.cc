// ARM NEON kernels (aarch64) on layout v2 (format.h): the scheme of
// x86/rsmm_avx512.cc with 128-bit registers. A 16-row tile is four quarters of
// 4 rows (tile bytes 16j .. 16j+15 = rows 4j .. 4j+3), each quarter's rows in the
// 4 lanes of a register; tokens in tiles of up to 4 (../tiles.h). Per group the
// four quarters take turns over the group's tiles (their bytes stay in L1), so
// only one quarter's accumulators are live in the column loop (no spills there) and
// no horizontal sums are needed.
//
// Per quarter and tile: one 16-byte load per active slice; bit pair i of those bytes,
// shifted down (ushr) and stacked over the slices with shift-left-and-insert
// (sli), gives Q(k) of columns 4i .. 4i+3 for the 4 rows as unsigned bytes.
// rsmm_f32_16x4__neon: exact float mode (ARMv8.0, Raspberry Pi 4). Byte b = 1, 2 of
//   each dword masked in place and converted by a fixed-point ucvtf (#8b fraction
//   bits: exact, at most 8 significant bits; byte 0 masked, byte 3 shifted down),
//   then one FMA by element per (column, token) against the token's 4 floats of
//   the column quad.
// rsmm_i8_16x4__neon: int8 mode on ARMv8.0. smull/smlal multiply the Q bytes as
//   int8 with the token's four activations broadcast to every dword, addp adds
//   the products of a row's neighbour columns, sadalp accumulates a row's pair
//   into its int32 lane. For k <= 3 (Q <= 63) two column quads share the int16
//   sums: 4 products, at most 4 * 63 * 127 < 2^15.
// rsmm_i8_16x4__neondot: int8 mode with the ARMv8.2 dot product (Raspberry Pi 5):
//   one sdot by element per (column quad, token).
// int8, k = 4: Q(4) up to 255 does not fit int8, so the bytes hold Q - 128 and
//   the group's dot gets 128 * sum(xq) back (integer sum: exact); the int16 sums
//   of the plain-NEON kernel then hold 2 products, at most 2 * 128 * 127 < 2^15.
// Per group g and token: y += s1 * (s_k/s1 * (dot * dot_scale + xsum/2)) - (s1 z1)
// * xsum, with s1 and s1 z1 from the tile parameters (int8 mode: half precision in units of
// the row's scale, which the store multiplies in). Independent accumulator
// chains per quarter: 4 for a single token, 2 each for two, 1 each for more.
// All: group_size % 16 == 0, k <= 4, any N (rows past min(n1, N) never stored,
// bias past N never read), unaligned pointers, xq in [-127, 127] (as
// prepare_activations makes it), bytes of slices k+1..S never read.
#include <arm_neon.h>

#include <cstring>
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

constexpr int kQuarters = 4, kQuarterRows = 4, kQuarterBytes = 16;

constexpr int chains(int nt) { return nt == 1 ? 4 : nt == 2 ? 2 : 1; }

// Bit pair I of every byte moved to bits 0..1 (higher pairs above it).
template <int I>
inline uint8x16_t pair_down(uint8x16_t v) {
  if constexpr (I == 0) return v;
  else return vshrq_n_u8(v, 2 * I);
}

// Q(KS) of columns 4I .. 4I+3 of one quarter, 4 rows x 4 bytes, from its slice bytes
// v[0..KS) (most significant slice first): unsigned bytes < 4^KS.
template <int KS, int I>
inline uint8x16_t codes(const uint8x16_t* v) {
  uint8x16_t q = pair_down<I>(v[0]);
  for (int e = 1; e < KS; ++e) q = vsliq_n_u8(pair_down<I>(v[e]), q, 2);  // (q << 2) | low pair of slice e
  if constexpr (KS < 4 && I < 3) q = vandq_u8(q, vdupq_n_u8((1u << (2 * KS)) - 1));  // higher pairs of slice 1
  return q;
}

// The int8 operand: Q, or Q - 128 for KS = 4.
template <int KS, int I>
inline int8x16_t i8_codes(const uint8x16_t* v) {
  const uint8x16_t q = codes<KS, I>(v);
  return vreinterpretq_s8_u8(KS == 4 ? veorq_u8(q, vdupq_n_u8(0x80)) : q);
}

// Byte B of every dword as float.
template <int B>
inline float32x4_t byte_to_float(uint32x4_t q) {
  if constexpr (B == 0) return vcvtq_f32_u32(vandq_u32(q, vdupq_n_u32(0xFF)));
  else if constexpr (B == 3) return vcvtq_f32_u32(vshrq_n_u32(q, 24));
  else return vcvtq_n_f32_u32(vandq_u32(q, vdupq_n_u32(0xFFu << (8 * B))), 8 * B);
}

inline int32_t load4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Exact sum of n int8 activations (n % 16 == 0).
inline int32_t xq_sum(const int8_t* x, int64_t n) {
  int32x4_t s = vdupq_n_s32(0);
  for (int64_t c = 0; c < n; c += 16) s = vpadalq_s16(s, vpaddlq_s8(vld1q_s8(x + c)));
  return vaddvq_s32(s);
}

// Adds the group's dot products of quarter r (per token, rows in lanes) to its running outputs.
// Int8: in units of the row scales (the half-precision tile parameters).
template <int NT, bool Int8>
inline void group_epilogue(const RsmmArgs& a, const int32_t* tok, int64_t tile, int64_t g, int r, float ratio,
                           const float32x4_t (&dot)[NT], const float* dot_scale, float32x4_t (&out)[NT]) {
  const int64_t groups = a.K / a.group_size, line = (tile * groups + g) * kTileRows, at = line + kQuarterRows * r;
  float32x4_t s1, o1;
  if constexpr (Int8) {
    const uint16_t* halves = a.tile_halves + 2 * line + kQuarterRows * r;
    s1 = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(halves)));
    o1 = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(halves + kTileRows)));
  } else {
    s1 = vld1q_f32(a.tile_scales + at), o1 = vld1q_f32(a.tile_offsets + at);
  }
  for (int j = 0; j < NT; ++j) {
    const float xsum = a.x_group_sums[tok[j] * groups + g];
    const float32x4_t t = vfmaq_n_f32(vdupq_n_f32(0.5f * ratio * xsum), dot[j], ratio * dot_scale[j]);
    out[j] = vfmsq_f32(vfmaq_f32(out[j], s1, t), o1, vdupq_n_f32(xsum));
  }
}

// Rows n .. end-1 (end <= n + 16) of the outputs (Int8: times the row scales), plus bias.
template <int NT, bool Int8>
inline void store_tile(const RsmmArgs& a, const int32_t* tok, int64_t n, int64_t end,
                       const float32x4_t (&out)[kQuarters][NT]) {
  for (int r = 0; r < kQuarters; ++r) {
    const int64_t row = n + kQuarterRows * r, rows = end - row;
    if (rows <= 0) break;
    const float32x4_t unit = Int8 ? vld1q_f32(a.row_scales + row) : vdupq_n_f32(1.0f);
    float32x4_t y[NT];
    for (int j = 0; j < NT; ++j) y[j] = vmulq_f32(out[r][j], unit);
    if (rows >= kQuarterRows) {
      const float32x4_t bias = a.bias ? vld1q_f32(a.bias + row) : vdupq_n_f32(0.0f);
      for (int j = 0; j < NT; ++j) vst1q_f32(a.y + tok[j] * a.N + row, vaddq_f32(y[j], bias));
    } else {
      for (int j = 0; j < NT; ++j) {
        float v[kQuarterRows];
        vst1q_f32(v, y[j]);
        for (int64_t i = 0; i < rows; ++i) a.y[tok[j] * a.N + row + i] = v[i] + (a.bias ? a.bias[row + i] : 0.0f);
      }
    }
  }
}

// Columns 4I .. 4I+3 of one quarter for NT tokens (x: their activations at the tile's first column).
template <int KS, int NT, int I, int A>
inline void f32_columns(const uint8x16_t* v, const float* const* x, float32x4_t (&acc)[NT][A]) {
  const uint32x4_t q = vreinterpretq_u32_u8(codes<KS, I>(v));
  const float32x4_t w0 = byte_to_float<0>(q), w1 = byte_to_float<1>(q), w2 = byte_to_float<2>(q),
                    w3 = byte_to_float<3>(q);
  for (int j = 0; j < NT; ++j) {
    const float32x4_t xv = vld1q_f32(x[j] + 4 * I);
    acc[j][(4 * I) % A] = vfmaq_laneq_f32(acc[j][(4 * I) % A], w0, xv, 0);
    acc[j][(4 * I + 1) % A] = vfmaq_laneq_f32(acc[j][(4 * I + 1) % A], w1, xv, 1);
    acc[j][(4 * I + 2) % A] = vfmaq_laneq_f32(acc[j][(4 * I + 2) % A], w2, xv, 2);
    acc[j][(4 * I + 3) % A] = vfmaq_laneq_f32(acc[j][(4 * I + 3) % A], w3, xv, 3);
  }
}

// int8 dots of one quarter with one token: acc (rows in lanes, A chains) += sum over the
// 16 columns of q[I] (columns 4I .. 4I+3) times the activations x[0..16).
struct Mull {  // ARMv8.0
  template <int KS, int A>
  static inline void quarter(int32x4_t (&acc)[A], const int8x16_t (&q)[4], const int8_t* x) {
    constexpr int P = KS < 4 ? 2 : 1;  // column quads per int16 sum
    for (int i = 0; i < 4; i += P) {
      const int8x16_t x0 = vreinterpretq_s8_s32(vdupq_n_s32(load4(x + 4 * i)));
      int16x8_t lo = vmull_s8(vget_low_s8(q[i]), vget_low_s8(x0)), hi = vmull_high_s8(q[i], x0);  // rows 0-1, 2-3
      if constexpr (P == 2) {
        const int8x16_t x1 = vreinterpretq_s8_s32(vdupq_n_s32(load4(x + 4 * i + 4)));
        lo = vmlal_s8(lo, vget_low_s8(q[i + 1]), vget_low_s8(x1));
        hi = vmlal_high_s8(hi, q[i + 1], x1);
      }
      int32x4_t& s = acc[(i / P) % A];
      s = vpadalq_s16(s, vpaddq_s16(lo, hi));
    }
  }
};

struct Dot {  // ARMv8.2 dot product
  template <int KS, int A>
  MOBIQ_DOTPROD static inline void quarter(int32x4_t (&acc)[A], const int8x16_t (&q)[4], const int8_t* x) {
    const int8x16_t xv = vld1q_s8(x);
    acc[0] = vdotq_laneq_s32(acc[0], q[0], xv, 0);
    acc[1 % A] = vdotq_laneq_s32(acc[1 % A], q[1], xv, 1);
    acc[2 % A] = vdotq_laneq_s32(acc[2 % A], q[2], xv, 2);
    acc[3 % A] = vdotq_laneq_s32(acc[3 % A], q[3], xv, 3);
  }
};

struct F32 {};  // exact float mode

// One row tile (rows n .. n+15, stored up to `end`) for NT tokens reading KS slices. Per
// group the quarters take turns (their tile bytes stay in L1), so only one quarter's
// accumulators are live in the column loop.
template <class Dots, int KS, int NT>
inline void row_tile(const RsmmArgs& a, const int32_t* tok, int64_t n, int64_t end) {
  constexpr int A = chains(NT);
  constexpr bool kF32 = std::is_same_v<Dots, F32>;
  using Acc = std::conditional_t<kF32, float32x4_t, int32x4_t>;
  const int64_t groups = a.K / a.group_size, tile = n / kTileRows;
  const size_t plane = slice_bytes(a.N, a.K);
  const uint8_t* tiles = tile_at(a.slices, a.K, n, 0);
  float32x4_t out[kQuarters][NT];
  for (auto& quarter : out)
    for (auto& o : quarter) o = vdupq_n_f32(0.0f);
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t c0 = g * a.group_size, c1 = c0 + a.group_size;
    float dot_scale[NT];
    int32_t centre[NT];  // int8, KS = 4: 128 * sum(xq) of the group
    for (int j = 0; j < NT; ++j) {
      dot_scale[j] = kF32 ? 1.0f : a.xq_scale[tok[j] * groups + g];
      centre[j] = !kF32 && KS == 4 ? 128 * xq_sum(a.xq + tok[j] * a.K + c0, a.group_size) : 0;
    }
    for (int r = 0; r < kQuarters; ++r) {
      Acc acc[NT][A];
      for (auto& token : acc)
        for (auto& s : token) s = Acc{};
      const uint8_t* p = tiles + (c0 / kTileCols) * kTileBytes + kQuarterBytes * r;
      for (int64_t c = c0; c < c1; c += kTileCols, p += kTileBytes) {
        uint8x16_t v[KS];
        for (int e = 0; e < KS; ++e) v[e] = vld1q_u8(p + e * plane);
        if constexpr (kF32) {
          const float* x[NT];
          for (int j = 0; j < NT; ++j) x[j] = a.x + tok[j] * a.K + c;
          f32_columns<KS, NT, 0, A>(v, x, acc);
          f32_columns<KS, NT, 1, A>(v, x, acc);
          f32_columns<KS, NT, 2, A>(v, x, acc);
          f32_columns<KS, NT, 3, A>(v, x, acc);
        } else {
          const int8x16_t q[4] = {i8_codes<KS, 0>(v), i8_codes<KS, 1>(v), i8_codes<KS, 2>(v), i8_codes<KS, 3>(v)};
          for (int j = 0; j < NT; ++j) Dots::template quarter<KS, A>(acc[j], q, a.xq + tok[j] * a.K + c);
        }
      }
      float32x4_t dot[NT];
      for (int j = 0; j < NT; ++j) {
        if constexpr (kF32) {
          dot[j] = acc[j][0];
          for (int h = 1; h < A; ++h) dot[j] = vaddq_f32(dot[j], acc[j][h]);
        } else {
          int32x4_t s = vaddq_s32(acc[j][0], vdupq_n_s32(centre[j]));
          for (int h = 1; h < A; ++h) s = vaddq_s32(s, acc[j][h]);
          dot[j] = vcvtq_f32_s32(s);
        }
      }
      group_epilogue<NT, !kF32>(a, tok, tile, g, r, step_ratio(KS), dot, dot_scale, out[r]);
    }
  }
  store_tile<NT, !kF32>(a, tok, n, end, out);
}

template <class Dots, int NT>
inline void tile(const RsmmArgs& a, const int32_t* tok, int k, int64_t n0, int64_t n1) {
  switch (k) {
    case 1: row_tile<Dots, 1, NT>(a, tok, n0, n1); break;
    case 2: row_tile<Dots, 2, NT>(a, tok, n0, n1); break;
    case 3: row_tile<Dots, 3, NT>(a, tok, n0, n1); break;
    default: row_tile<Dots, 4, NT>(a, tok, n0, n1); break;
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

// Row tiles outermost: a prefill reads each row tile's slice bytes from cache for every token tile.
template <TileFn T1, TileFn T2, TileFn T3, TileFn T4>
void run(const RsmmArgs& a, const int32_t* tokens, int64_t num_tokens, int k, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n += kTileRows)
    run_tiles<T1, T2, T3, T4>(a, tokens, num_tokens, k, n, n + kTileRows < n1 ? n + kTileRows : n1);
}

}  // namespace

void rsmm_f32_16x4__neon(const RsmmArgs& a, const int32_t* tokens, int64_t num_tokens, int k, int64_t n0,
                         int64_t n1) {
  run<f32_tile<1>, f32_tile<2>, f32_tile<3>, f32_tile<4>>(a, tokens, num_tokens, k, n0, n1);
}

void rsmm_i8_16x4__neon(const RsmmArgs& a, const int32_t* tokens, int64_t num_tokens, int k, int64_t n0,
                        int64_t n1) {
  run<i8_tile<1>, i8_tile<2>, i8_tile<3>, i8_tile<4>>(a, tokens, num_tokens, k, n0, n1);
}

void rsmm_i8_16x4__neondot(const RsmmArgs& a, const int32_t* tokens, int64_t num_tokens, int k, int64_t n0,
                           int64_t n1) {
  run<dot_tile<1>, dot_tile<2>, dot_tile<3>, dot_tile<4>>(a, tokens, num_tokens, k, n0, n1);
}

}  // namespace mobiq
