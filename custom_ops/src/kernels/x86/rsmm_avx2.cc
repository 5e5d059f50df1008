// AVX2 kernels (no AVX-512), up to 4 tokens x 1 row, 64 columns per step.
//
// Per 64-column block the 16 packed bytes of a slice are broadcast to both
// 128-bit lanes; lane pair A takes bit pairs 0 and 1 (variable dword shifts 0
// and 2), pair B bit pairs 2 and 3, masked to 2-bit codes: the block-permuted
// order. Q(k) = (Q << 2) | q per slice (16-bit shifts are safe: Q < 64 before
// the last shift since k <= 4).
// rsmm_i8_4x64__avx2: int8 mode; vpmaddubsw needs Q * |xq| pairs below 2^15,
//   so Q is built from at most 3 slices and a 4th slice is a second product
//   weighted by 4 — exact.
// rsmm_f32_4x64__avx2: exact float mode; Q bytes widened to float, FMA.
// Both: group_size % 64 == 0, k <= 4, bytes of slices k+1..S never read.
#include <immintrin.h>

#include "mobiq/format.h"
#include "mobiq/kernels.h"
#include "../tiles.h"

#define MOBIQ_AVX2 __attribute__((target("avx2,fma")))

namespace mobiq {
namespace {

struct Codes {
  __m256i a, b;  // block positions 0..31 and 32..63
};

// Q over slices [first, last) of the block whose slice-1 bytes start at p.
MOBIQ_AVX2 inline Codes q_block(const uint8_t* p, size_t plane, int first, int last) {
  const __m256i shift_a = _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2);
  const __m256i shift_b = _mm256_setr_epi32(4, 4, 4, 4, 6, 6, 6, 6);
  const __m256i three = _mm256_set1_epi8(3);
  Codes q{_mm256_setzero_si256(), _mm256_setzero_si256()};
  for (int e = first; e < last; ++e) {
    const __m256i packed =
        _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + e * plane)));
    const __m256i ca = _mm256_and_si256(_mm256_srlv_epi32(packed, shift_a), three);
    const __m256i cb = _mm256_and_si256(_mm256_srlv_epi32(packed, shift_b), three);
    q.a = _mm256_or_si256(_mm256_slli_epi16(q.a, 2), ca);
    q.b = _mm256_or_si256(_mm256_slli_epi16(q.b, 2), cb);
  }
  return q;
}

MOBIQ_AVX2 inline __m256i dot_u8s8(__m256i q, __m256i x) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), _mm256_set1_epi16(1));
}

MOBIQ_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int NT>
MOBIQ_AVX2 void i8_tile(const RsmmArgs& a, const int32_t* tok, int k, int64_t n0, int64_t n1) {
  const int64_t groups = a.K / a.group_size, row_bytes = a.K / 4;
  const size_t plane = slice_bytes(a.N, a.K);
  const float ratio = step_ratio(k);
  const int head = k < 3 ? k : 3;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = a.slices + n * row_bytes;
    __m256 facc[NT];
    double off[NT];
    for (int j = 0; j < NT; ++j) facc[j] = _mm256_setzero_ps(), off[j] = a.bias ? a.bias[n] : 0.0;
    for (int64_t g = 0; g < groups; ++g) {
      __m256i acc[NT];
      for (int j = 0; j < NT; ++j) acc[j] = _mm256_setzero_si256();
      for (int64_t c = g * a.group_size; c < (g + 1) * a.group_size; c += 64) {
        const Codes q = q_block(row + c / 4, plane, 0, head);
        const bool tail = k > head;
        const Codes q4 = tail ? q_block(row + c / 4, plane, head, k) : q;
        for (int j = 0; j < NT; ++j) {
          const int8_t* x = a.xq + tok[j] * a.K + c;
          const __m256i xa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
          const __m256i xb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32));
          __m256i d = _mm256_add_epi32(dot_u8s8(q.a, xa), dot_u8s8(q.b, xb));
          if (tail) d = _mm256_add_epi32(_mm256_slli_epi32(d, 2), _mm256_add_epi32(dot_u8s8(q4.a, xa), dot_u8s8(q4.b, xb)));
          acc[j] = _mm256_add_epi32(acc[j], d);
        }
      }
      const float s1 = a.scales[n * groups + g], z1 = a.zero_points[n * groups + g];
      const float sk = s1 * ratio, offset = s1 * (0.5f * ratio - z1);
      for (int j = 0; j < NT; ++j) {
        const int64_t tg = tok[j] * groups + g;
        facc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[j]), _mm256_set1_ps(sk * a.xq_scale[tg]), facc[j]);
        off[j] += static_cast<double>(offset) * a.x_group_sums[tg];
      }
    }
    for (int j = 0; j < NT; ++j) a.y[tok[j] * a.N + n] = static_cast<float>(off[j] + hsum(facc[j]));
  }
}

MOBIQ_AVX2 inline __m256 widen(__m128i bytes8) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes8)); }

template <int NT>
MOBIQ_AVX2 void f32_tile(const RsmmArgs& a, const int32_t* tok, int k, int64_t n0, int64_t n1) {
  const int64_t groups = a.K / a.group_size, row_bytes = a.K / 4;
  const size_t plane = slice_bytes(a.N, a.K);
  const float ratio = step_ratio(k);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = a.slices + n * row_bytes;
    __m256 facc[NT];
    double off[NT];
    for (int j = 0; j < NT; ++j) facc[j] = _mm256_setzero_ps(), off[j] = a.bias ? a.bias[n] : 0.0;
    for (int64_t g = 0; g < groups; ++g) {
      __m256 gacc[NT];
      for (int j = 0; j < NT; ++j) gacc[j] = _mm256_setzero_ps();
      for (int64_t c = g * a.group_size; c < (g + 1) * a.group_size; c += 64) {
        const Codes q = q_block(row + c / 4, plane, 0, k);
        __m256 w[8];
        const __m128i parts[4] = {_mm256_castsi256_si128(q.a), _mm256_extracti128_si256(q.a, 1),
                                  _mm256_castsi256_si128(q.b), _mm256_extracti128_si256(q.b, 1)};
        for (int h = 0; h < 4; ++h) w[2 * h] = widen(parts[h]), w[2 * h + 1] = widen(_mm_srli_si128(parts[h], 8));
        for (int j = 0; j < NT; ++j) {
          const float* x = a.x + tok[j] * a.K + c;
          for (int h = 0; h < 8; ++h) gacc[j] = _mm256_fmadd_ps(w[h], _mm256_loadu_ps(x + 8 * h), gacc[j]);
        }
      }
      const float s1 = a.scales[n * groups + g], z1 = a.zero_points[n * groups + g];
      const __m256 sk = _mm256_set1_ps(s1 * ratio);
      const float offset = s1 * (0.5f * ratio - z1);
      for (int j = 0; j < NT; ++j) {
        facc[j] = _mm256_fmadd_ps(gacc[j], sk, facc[j]);
        off[j] += static_cast<double>(offset) * a.x_group_sums[tok[j] * groups + g];
      }
    }
    for (int j = 0; j < NT; ++j) a.y[tok[j] * a.N + n] = static_cast<float>(off[j] + hsum(facc[j]));
  }
}

}  // namespace

void rsmm_i8_4x64__avx2(const RsmmArgs& a, const int32_t* tokens, int64_t num_tokens, int k, int64_t n0, int64_t n1) {
  run_tiles<i8_tile<1>, i8_tile<2>, i8_tile<3>, i8_tile<4>>(a, tokens, num_tokens, k, n0, n1);
}

void rsmm_f32_4x64__avx2(const RsmmArgs& a, const int32_t* tokens, int64_t num_tokens, int k, int64_t n0,
                         int64_t n1) {
  run_tiles<f32_tile<1>, f32_tile<2>, f32_tile<3>, f32_tile<4>>(a, tokens, num_tokens, k, n0, n1);
}

}  // namespace mobiq
