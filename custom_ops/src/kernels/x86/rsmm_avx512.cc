// AVX-512 kernels: tiles of NR rows x NT tokens (NR*NT independent accumulator
// chains, so dot-product latency is hidden even for one token), 64 columns per step.
// More than 4 tokens (prefill): each row's Q(k) bytes are decoded once into scratch
// and every token tile reads them back.
//
// rsmm_i8_4x64__avx512vnni: int8 mode. Per 64-column block, the 16 packed bytes
//   of each slice are broadcast to the four 128-bit lanes; lane i rotates its
//   dwords so that bit pair i of every byte lands at bit pair (k - e) — rotation
//   keeps bytes in place modulo 32 bits — and a mask keeps it. OR-ing the k
//   slices (one vpternlogd each) gives Q(k) as 64 unsigned bytes (k <= 4), in
//   block-permuted order; one vpdpbusd against the permuted int8 activations
//   per token. Per group: float accumulate s_k * xq_scale * dot.
// rsmm_f32_4x64__avx512: exact float mode. Same Q(k) bytes, widened to float
//   16 at a time and multiplied with block-permuted float activations.
// Both: group_size % 64 == 0, k <= 4, bytes of slices k+1..S never read.
#include <immintrin.h>

#include <vector>

#include "../tiles.h"
#include "mobiq/format.h"
#include "mobiq/kernels.h"

#define MOBIQ_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))
#define MOBIQ_AVX512VNNI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")))

namespace mobiq {
namespace {

template <int KS>
struct Unpack {
  __m512i rot[KS];
  __m512i mask[KS];

  MOBIQ_AVX512 Unpack() {
    for (int e = 0; e < KS; ++e) {
      const int target = 2 * (KS - 1 - e);
      alignas(64) int32_t r[16];
      for (int d = 0; d < 16; ++d) r[d] = (target - 2 * (d / 4)) & 31;
      rot[e] = _mm512_load_si512(r);
      mask[e] = _mm512_set1_epi8(static_cast<char>(3 << target));
    }
  }

  // Q(KS) of the 64-column block whose slice-1 bytes start at p: 64 bytes, block-permuted.
  MOBIQ_AVX512 __m512i codes(const uint8_t* p, size_t plane) const {
    __m512i q = _mm512_and_si512(
        _mm512_rolv_epi32(_mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), rot[0]),
        mask[0]);
    for (int e = 1; e < KS; ++e) {
      const __m512i r = _mm512_rolv_epi32(
          _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + e * plane))), rot[e]);
      q = _mm512_ternarylogic_epi32(q, r, mask[e], 0xF8);  // q | (r & mask)
    }
    return q;
  }
};

// Lane-wise partial sums of the zero-point term sum_g s1_g (ratio/2 - z1_g) xsum_g of one row
// (masked loads: one step for up to 16 groups), to be reduced together with the dot products.
MOBIQ_AVX512 inline __m512 zero_point_lanes(const float* s1, const float* z1, const float* xsum, int64_t groups,
                                            float ratio) {
  const __m512 half = _mm512_set1_ps(0.5f * ratio);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; g += 16) {
    const int64_t left = groups - g;
    const __mmask16 m = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
    const __m512 c = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, s1 + g), _mm512_sub_ps(half, _mm512_maskz_loadu_ps(m, z1 + g)));
    acc = _mm512_fmadd_ps(c, _mm512_maskz_loadu_ps(m, xsum + g), acc);
  }
  return acc;
}

MOBIQ_AVX512 void store_rows(const RsmmArgs& a, const int32_t* tok, int nt, int64_t n, int nr, const __m512* facc,
                             float ratio) {
  const int64_t groups = a.K / a.group_size;
  for (int r = 0; r < nr; ++r)
    for (int j = 0; j < nt; ++j) {
      const int64_t row = n + r;
      const __m512 zp = zero_point_lanes(a.scales + row * groups, a.zero_points + row * groups,
                                         a.x_group_sums + tok[j] * groups, groups, ratio);
      a.y[tok[j] * a.N + row] = (a.bias ? a.bias[row] : 0.0f) + _mm512_reduce_add_ps(_mm512_add_ps(facc[r * nt + j], zp));
    }
}

// Q(k) of row n + r, columns c..c+63: decoded from the slices, or (Scratch) read back from the
// rows decoded once for a whole prefill (scratch holds row r at r * K).
template <int KS, bool Scratch>
MOBIQ_AVX512 inline __m512i row_codes(const RsmmArgs& a, const Unpack<KS>& u, const uint8_t* scratch, int64_t n, int r,
                                      int64_t c) {
  if constexpr (Scratch) return _mm512_loadu_si512(scratch + r * a.K + c);
  return u.codes(a.slices + (n + r) * (a.K / 4) + c / 4, slice_bytes(a.N, a.K));
}

template <int KS, int NR, int NT, bool Scratch>
MOBIQ_AVX512VNNI void i8_rows(const RsmmArgs& a, const int32_t* tok, int64_t n, const Unpack<KS>& u,
                              const uint8_t* scratch) {
  const int64_t groups = a.K / a.group_size;
  const float ratio = step_ratio(KS);
  __m512 facc[NR * NT];
  for (auto& f : facc) f = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i acc[NR * NT];
    for (auto& v : acc) v = _mm512_setzero_si512();
    for (int64_t c = g * a.group_size; c < (g + 1) * a.group_size; c += 64) {
      for (int r = 0; r < NR; ++r) {
        const __m512i q = row_codes<KS, Scratch>(a, u, scratch, n, r, c);
        for (int j = 0; j < NT; ++j)
          acc[r * NT + j] = _mm512_dpbusd_epi32(acc[r * NT + j], q, _mm512_loadu_si512(a.xq + tok[j] * a.K + c));
      }
    }
    for (int r = 0; r < NR; ++r) {
      const float sk = a.scales[(n + r) * groups + g] * ratio;
      for (int j = 0; j < NT; ++j)
        facc[r * NT + j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r * NT + j]),
                                           _mm512_set1_ps(sk * a.xq_scale[tok[j] * groups + g]), facc[r * NT + j]);
    }
  }
  store_rows(a, tok, NT, n, NR, facc, ratio);
}

template <int KS, int NR, int NT, bool Scratch>
MOBIQ_AVX512 void f32_rows(const RsmmArgs& a, const int32_t* tok, int64_t n, const Unpack<KS>& u,
                           const uint8_t* scratch) {
  const int64_t groups = a.K / a.group_size;
  const float ratio = step_ratio(KS);
  __m512 facc[NR * NT];
  for (auto& f : facc) f = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 gacc[NR * NT];
    for (auto& v : gacc) v = _mm512_setzero_ps();
    for (int64_t c = g * a.group_size; c < (g + 1) * a.group_size; c += 64) {
      for (int r = 0; r < NR; ++r) {
        const __m512i q = row_codes<KS, Scratch>(a, u, scratch, n, r, c);
        const __m512 w[4] = {_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(q, 0))),
                             _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(q, 1))),
                             _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(q, 2))),
                             _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(q, 3)))};
        for (int j = 0; j < NT; ++j) {
          const float* x = a.x + tok[j] * a.K + c;
          __m512 s = _mm512_mul_ps(w[0], _mm512_loadu_ps(x));
          s = _mm512_fmadd_ps(w[1], _mm512_loadu_ps(x + 16), s);
          const __m512 t = _mm512_fmadd_ps(w[3], _mm512_loadu_ps(x + 48), _mm512_mul_ps(w[2], _mm512_loadu_ps(x + 32)));
          gacc[r * NT + j] = _mm512_add_ps(gacc[r * NT + j], _mm512_add_ps(s, t));
        }
      }
    }
    for (int r = 0; r < NR; ++r) {
      const __m512 sk = _mm512_set1_ps(a.scales[(n + r) * groups + g] * ratio);
      for (int j = 0; j < NT; ++j) facc[r * NT + j] = _mm512_fmadd_ps(gacc[r * NT + j], sk, facc[r * NT + j]);
    }
  }
  store_rows(a, tok, NT, n, NR, facc, ratio);
}

template <int KS, int NR, int NT, bool Int8, bool Scratch>
MOBIQ_AVX512 inline void rows_at(const RsmmArgs& a, const int32_t* tok, int64_t n, const Unpack<KS>& u,
                                 const uint8_t* scratch) {
  if constexpr (Int8)
    i8_rows<KS, NR, NT, Scratch>(a, tok, n, u, scratch);
  else
    f32_rows<KS, NR, NT, Scratch>(a, tok, n, u, scratch);
}

// Decode: rows in tiles of NR (then single rows) for one token tile of NT, codes decoded in registers.
template <int KS, int NT, bool Int8>
MOBIQ_AVX512 void rows(const RsmmArgs& a, const int32_t* tok, int64_t n0, int64_t n1) {
  constexpr int NR = NT == 1 ? 4 : 2;
  const Unpack<KS> u;
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) rows_at<KS, NR, NT, Int8, false>(a, tok, n, u, nullptr);
  for (; n < n1; ++n) rows_at<KS, 1, NT, Int8, false>(a, tok, n, u, nullptr);
}

template <int NT, bool Int8>
void tile(const RsmmArgs& a, const int32_t* tok, int k, int64_t n0, int64_t n1) {
  switch (k) {
    case 1: rows<1, NT, Int8>(a, tok, n0, n1); break;
    case 2: rows<2, NT, Int8>(a, tok, n0, n1); break;
    case 3: rows<3, NT, Int8>(a, tok, n0, n1); break;
    default: rows<4, NT, Int8>(a, tok, n0, n1); break;
  }
}

// Prefill (more tokens than one tile): each pair of rows is decoded once into scratch, then every
// token tile reads the codes back instead of decoding them again.
template <int KS, int NR, bool Int8>
MOBIQ_AVX512 void prefill_rows(const RsmmArgs& a, const int32_t* tokens, int64_t num_tokens, int64_t n,
                               const Unpack<KS>& u, uint8_t* scratch) {
  for (int r = 0; r < NR; ++r)
    for (int64_t c = 0; c < a.K; c += 64)
      _mm512_storeu_si512(scratch + r * a.K + c, row_codes<KS, false>(a, u, nullptr, n, r, c));
  int64_t i = 0;
  for (; i + 4 <= num_tokens; i += 4) rows_at<KS, NR, 4, Int8, true>(a, tokens + i, n, u, scratch);
  switch (num_tokens - i) {
    case 3: rows_at<KS, NR, 3, Int8, true>(a, tokens + i, n, u, scratch); break;
    case 2: rows_at<KS, NR, 2, Int8, true>(a, tokens + i, n, u, scratch); break;
    case 1: rows_at<KS, NR, 1, Int8, true>(a, tokens + i, n, u, scratch); break;
    default: break;
  }
}

template <int KS, bool Int8>
MOBIQ_AVX512 void prefill(const RsmmArgs& a, const int32_t* tokens, int64_t num_tokens, int64_t n0, int64_t n1) {
  const Unpack<KS> u;
  std::vector<uint8_t> scratch(static_cast<size_t>(2 * a.K));
  int64_t n = n0;
  for (; n + 2 <= n1; n += 2) prefill_rows<KS, 2, Int8>(a, tokens, num_tokens, n, u, scratch.data());
  for (; n < n1; ++n) prefill_rows<KS, 1, Int8>(a, tokens, num_tokens, n, u, scratch.data());
}

template <bool Int8>
void run(const RsmmArgs& a, const int32_t* tokens, int64_t num_tokens, int k, int64_t n0, int64_t n1) {
  if (num_tokens <= 4) {
    run_tiles<tile<1, Int8>, tile<2, Int8>, tile<3, Int8>, tile<4, Int8>>(a, tokens, num_tokens, k, n0, n1);
    return;
  }
  switch (k) {
    case 1: prefill<1, Int8>(a, tokens, num_tokens, n0, n1); break;
    case 2: prefill<2, Int8>(a, tokens, num_tokens, n0, n1); break;
    case 3: prefill<3, Int8>(a, tokens, num_tokens, n0, n1); break;
    default: prefill<4, Int8>(a, tokens, num_tokens, n0, n1); break;
  }
}

}  // namespace

void rsmm_i8_4x64__avx512vnni(const RsmmArgs& a, const int32_t* tokens, int64_t num_tokens, int k, int64_t n0,
                              int64_t n1) {
  run<true>(a, tokens, num_tokens, k, n0, n1);
}

void rsmm_f32_4x64__avx512(const RsmmArgs& a, const int32_t* tokens, int64_t num_tokens, int k, int64_t n0,
                           int64_t n1) {
  run<false>(a, tokens, num_tokens, k, n0, n1);
}

}  // namespace mobiq
