// attention.inc compiled for AVX2 + FMA + F16C (16 lanes = two ymm) and AVX-512 (one zmm).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include <immintrin.h>

#include "../attention_variants.h"

namespace mobiq {
namespace avx2 {
#define MOBIQ_ATTN __attribute__((target("avx2,fma,f16c")))

MOBIQ_ATTN inline vf16 join(__m256 lo, __m256 hi) {
  vf16 out;
  std::memcpy(&out, &lo, 32);
  std::memcpy(reinterpret_cast<char*>(&out) + 32, &hi, 32);
  return out;
}

MOBIQ_ATTN inline vf16 widen16(vb16 c) {
  const __m128i v = (__m128i)c;
  return join(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8))));
}

MOBIQ_ATTN inline vf16 halves16(const KvHalf* p) {
  return join(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
              _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8))));
}

#include "../attention.inc"
#undef MOBIQ_ATTN
}  // namespace avx2

namespace avx512 {
#define MOBIQ_ATTN __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma,f16c")))

MOBIQ_ATTN inline vf16 widen16(vb16 c) { return (vf16)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32((__m128i)c)); }

MOBIQ_ATTN inline vf16 halves16(const KvHalf* p) {
  return (vf16)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

#include "../attention.inc"
#undef MOBIQ_ATTN
}  // namespace avx512

void attention__avx2(const AttentionArgs& a) { avx2::attend(a); }
void attention__avx512(const AttentionArgs& a) { avx512::attend(a); }

bool has_attention_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
bool has_attention_avx512() {
  return has_attention_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
}

}  // namespace mobiq
