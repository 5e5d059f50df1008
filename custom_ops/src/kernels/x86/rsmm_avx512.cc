// AVX-512 kernels, up to 4 tokens x 1 row, 64 columns per step.
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

#include "mobiq/format.h"
#include "mobiq/kernels.h"
#include "../tiles.h"

#define MOBIQ_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))
#define MOBIQ_AVX512VNNI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")))

namespace mobiq {
namespace {

constexpr int kSimdMaxSlices = 4;

struct Unpack {
  __m512i rot[kSimdMaxSlices];
  __m512i mask[kSimdMaxSlices];
};

MOBIQ_AVX512 Unpack make_unpack(int k) {
  Unpack u;
  for (int e = 0; e < k; ++e) {
    const int target = 2 * (k - 1 - e);
    alignas(64) int32_t r[16];
    for (int d = 0; d < 16; ++d) r[d] = (target - 2 * (d / 4)) & 31;
    u.rot[e] = _mm512_load_si512(r);
    u.mask[e] = _mm512_set1_epi8(static_cast<char>(3 << target));
  }
  return u;
}

// Q(k) of the 64-column block whose slice-1 bytes start at p: 64 bytes, block-permuted.
MOBIQ_AVX512 inline __m512i q_block(const uint8_t* p, size_t plane, int k, const Unpack& u) {
  __m512i q = _mm512_and_si512(
      _mm512_rolv_epi32(_mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), u.rot[0]),
      u.mask[0]);
  for (int e = 1; e < k; ++e) {
    const __m512i r = _mm512_rolv_epi32(
        _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + e * plane))), u.rot[e]);
    q = _mm512_ternarylogic_epi32(q, r, u.mask[e], 0xF8);  // q | (r & mask)
  }
  return q;
}

template <int NT>
MOBIQ_AVX512VNNI void i8_tile(const RsmmArgs& a, const int32_t* tok, int k, int64_t n0, int64_t n1) {
  const Unpack u = make_unpack(k);
  const int64_t groups = a.K / a.group_size, row_bytes = a.K / 4;
  const size_t plane = slice_bytes(a.N, a.K);
  const float ratio = step_ratio(k);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = a.slices + n * row_bytes;
    __m512 facc[NT];
    double off[NT];
    for (int j = 0; j < NT; ++j) facc[j] = _mm512_setzero_ps(), off[j] = a.bias ? a.bias[n] : 0.0;
    for (int64_t g = 0; g < groups; ++g) {
      __m512i acc[NT];
      for (int j = 0; j < NT; ++j) acc[j] = _mm512_setzero_si512();
      for (int64_t c = g * a.group_size; c < (g + 1) * a.group_size; c += 64) {
        const __m512i q = q_block(row + c / 4, plane, k, u);
        for (int j = 0; j < NT; ++j)
          acc[j] = _mm512_dpbusd_epi32(acc[j], q, _mm512_loadu_si512(a.xq + tok[j] * a.K + c));
      }
      const float s1 = a.scales[n * groups + g], z1 = a.zero_points[n * groups + g];
      const float sk = s1 * ratio, offset = s1 * (0.5f * ratio - z1);
      for (int j = 0; j < NT; ++j) {
        const int64_t tg = tok[j] * groups + g;
        facc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[j]), _mm512_set1_ps(sk * a.xq_scale[tg]), facc[j]);
        off[j] += static_cast<double>(offset) * a.x_group_sums[tg];
      }
    }
    for (int j = 0; j < NT; ++j)
      a.y[tok[j] * a.N + n] = static_cast<float>(off[j] + static_cast<double>(_mm512_reduce_add_ps(facc[j])));
  }
}

template <int NT>
MOBIQ_AVX512 void f32_tile(const RsmmArgs& a, const int32_t* tok, int k, int64_t n0, int64_t n1) {
  const Unpack u = make_unpack(k);
  const int64_t groups = a.K / a.group_size, row_bytes = a.K / 4;
  const size_t plane = slice_bytes(a.N, a.K);
  const float ratio = step_ratio(k);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = a.slices + n * row_bytes;
    __m512 facc[NT];
    double off[NT];
    for (int j = 0; j < NT; ++j) facc[j] = _mm512_setzero_ps(), off[j] = a.bias ? a.bias[n] : 0.0;
    for (int64_t g = 0; g < groups; ++g) {
      __m512 gacc[NT];
      for (int j = 0; j < NT; ++j) gacc[j] = _mm512_setzero_ps();
      for (int64_t c = g * a.group_size; c < (g + 1) * a.group_size; c += 64) {
        const __m512i q = q_block(row + c / 4, plane, k, u);
        const __m512 q0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(q, 0)));
        const __m512 q1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(q, 1)));
        const __m512 q2 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(q, 2)));
        const __m512 q3 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(q, 3)));
        for (int j = 0; j < NT; ++j) {
          const float* x = a.x + tok[j] * a.K + c;
          gacc[j] = _mm512_fmadd_ps(q0, _mm512_loadu_ps(x), gacc[j]);
          gacc[j] = _mm512_fmadd_ps(q1, _mm512_loadu_ps(x + 16), gacc[j]);
          gacc[j] = _mm512_fmadd_ps(q2, _mm512_loadu_ps(x + 32), gacc[j]);
          gacc[j] = _mm512_fmadd_ps(q3, _mm512_loadu_ps(x + 48), gacc[j]);
        }
      }
      const float s1 = a.scales[n * groups + g], z1 = a.zero_points[n * groups + g];
      const __m512 sk = _mm512_set1_ps(s1 * ratio);
      const float offset = s1 * (0.5f * ratio - z1);
      for (int j = 0; j < NT; ++j) {
        facc[j] = _mm512_fmadd_ps(gacc[j], sk, facc[j]);
        off[j] += static_cast<double>(offset) * a.x_group_sums[tok[j] * groups + g];
      }
    }
    for (int j = 0; j < NT; ++j)
      a.y[tok[j] * a.N + n] = static_cast<float>(off[j] + static_cast<double>(_mm512_reduce_add_ps(facc[j])));
  }
}

}  // namespace

void rsmm_i8_4x64__avx512vnni(const RsmmArgs& a, const int32_t* tokens, int64_t num_tokens, int k, int64_t n0,
                              int64_t n1) {
  run_tiles<i8_tile<1>, i8_tile<2>, i8_tile<3>, i8_tile<4>>(a, tokens, num_tokens, k, n0, n1);
}

void rsmm_f32_4x64__avx512(const RsmmArgs& a, const int32_t* tokens, int64_t num_tokens, int k, int64_t n0,
                           int64_t n1) {
  run_tiles<f32_tile<1>, f32_tile<2>, f32_tile<3>, f32_tile<4>>(a, tokens, num_tokens, k, n0, n1);
}

}  // namespace mobiq
