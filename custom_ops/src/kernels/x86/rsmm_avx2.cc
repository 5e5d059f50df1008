// 256-bit kernels on layout v2 (format.h), for x86 CPUs without AVX-512: the
// scheme of rsmm_avx512.cc with 256-bit registers. A 16-row tile is two halves
// of 8 rows (tile bytes 0..31 = rows 0..7, 32..63 = rows 8..15), each half's rows
// in the 8 lanes of a register; tokens in tiles of up to 4, so the group scales
// apply to whole registers and no horizontal sum is ever needed.
//
// Per half tile: one 32-byte load per active slice; bit pair i of those bytes,
// moved to bit pair (m - 1 - e) by a 16-bit shift, masked and or-ed over slices
// e < m, gives Q(m) of columns 4i .. 4i+3 for the 8 rows as unsigned bytes (the
// int8 kernel builds Q(2) of quads i and i+2 together in the two nibbles, then
// splits them).
// rsmm_i8_16x4__avx2: int8 mode, exact int32 dots: vpmaddubsw (u8 codes x s8
//   activations broadcast per column quad, pairs summed into saturating int16),
//   vpaddw, vpmaddwd. A pair is at most 2 * Q * 128, so for Q < 16 (k <= 2) the
//   four quads of a tile sum in int16 (<= 15360) before one vpmaddwd, for Q < 64
//   (k = 3) two quads (<= 32256). Q(4) (up to 255) would saturate: it is taken as
//   16 Q(2) of slices 1, 2 (vpmaddwd by 16) + Q(2) of slices 3, 4 — exact.
// rsmm_f32_16x4__avx2: exact float mode; byte b of each dword (vpshufb) widened
//   to float, one FMA per (column, token, half) with the broadcast activation;
//   one or two tokens keep 2 accumulator chains per half each.
// rsmm_i8_16x4__avxvnni: the int8 kernel on CPUs with AVX-VNNI but no AVX-512 (Intel
//   Alder Lake and later client cores): one VEX vpdpbusd per quad, token and half
//   into int32 (no int16 stage); k = 3, 4 as two parts of at most 4 bits each
//   (Q(k) = 4^(k-2) Q(2) + Q(k-2), one shift per group). 7-15 % faster than the
//   AVX2 kernel per tile at M = 1 (both measured on one Zen 5 core).
// The code is rsmm_ymm.inc, compiled below once per instruction set (AVX2; AVX2 + AVX-VNNI).
// Per group g and token: y += s1 * (s_k/s1 * (dot * dot_scale + xsum/2)) - (s1 z1)
// * xsum, with s1 and s1 z1 from the tile parameters (int8 mode: half precision in units of
// the row's scale, which the store multiplies in; F16C converts them). Bias loads and y stores are
// masked (vmaskmovps): rows past N are never read or written.
// All: group_size % 16 == 0, k <= 4, any N, unaligned pointers; bytes of slices
// k+1..S never read.
#include <immintrin.h>

#include <cstring>

#include "../tiles.h"
#include "mobiq/format.h"
#include "mobiq/kernels.h"

namespace mobiq {
namespace {

namespace avx2 {
#define MOBIQ_YMM __attribute__((target("avx2,fma,f16c")))
constexpr bool kVnni = false;
#include "rsmm_ymm.inc"
#undef MOBIQ_YMM
}  // namespace avx2

namespace avxvnni {
#define MOBIQ_YMM __attribute__((target("avx2,fma,f16c,avxvnni")))
constexpr bool kVnni = true;
#include "rsmm_ymm.inc"
#undef MOBIQ_YMM
}  // namespace avxvnni

}  // namespace

void rsmm_i8_16x4__avx2(const RsmmArgs& a, const int32_t* tokens, int64_t num_tokens, int k, int64_t n0, int64_t n1) {
  avx2::run<true>(a, tokens, num_tokens, k, n0, n1);
}

void rsmm_f32_16x4__avx2(const RsmmArgs& a, const int32_t* tokens, int64_t num_tokens, int k, int64_t n0,
                         int64_t n1) {
  avx2::run<false>(a, tokens, num_tokens, k, n0, n1);
}

void rsmm_i8_16x4__avxvnni(const RsmmArgs& a, const int32_t* tokens, int64_t num_tokens, int k, int64_t n0,
                           int64_t n1) {
  avxvnni::run<true>(a, tokens, num_tokens, k, n0, n1);
}

}  // namespace mobiq
