// attention.inc compiled for AVX2 + FMA + F16C (16 lanes = two ymm), AVX-512 (one zmm), and AVX-512 with
// VNNI and VBMI (integer dot products for 8- and 4-bit keys).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
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

// attend_rows' inner loops, exp16 and max_nan in ymm registers (attention.inc states their contracts).
#define MOBIQ_ATTN_NATIVE

MOBIQ_ATTN inline __m256 lo8(vf16 v) { __m256 x; std::memcpy(&x, &v, 32); return x; }
MOBIQ_ATTN inline __m256 hi8(vf16 v) { __m256 x; std::memcpy(&x, reinterpret_cast<const char*>(&v) + 32, 32); return x; }

// attention.inc's exp16 polynomial, eight lanes.
MOBIQ_ATTN inline __m256 exp8(__m256 x) {
  const __m256 keep = _mm256_cmp_ps(x, x, _CMP_ORD_Q);
  const __m256 c = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));  // NaN -> -87 (max_ps returns its second operand)
  __m256 n = _mm256_fmadd_ps(c, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(12582912.0f));
  n = _mm256_sub_ps(n, _mm256_set1_ps(12582912.0f));
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), c);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_blendv_ps(x, _mm256_mul_ps(p, _mm256_castsi256_ps(e)), keep);
}

MOBIQ_ATTN inline vf16 exp16(vf16 x) { return join(exp8(lo8(x)), exp8(hi8(x))); }

// The larger of a and b, or the NaN of either.
MOBIQ_ATTN inline __m256 max_nan8(__m256 a, __m256 b) {
  return _mm256_blendv_ps(_mm256_max_ps(a, b), a, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
}

MOBIQ_ATTN inline vf16 max_nan(vf16 a, vf16 b) { return join(max_nan8(lo8(a), lo8(b)), max_nan8(hi8(a), hi8(b))); }

template <int64_t kR>
MOBIQ_ATTN inline void score_rows(const float* q, int64_t D, int64_t n, const float* kf, int64_t dims, float* c) {
  static_assert(kR == 4, "four rows: 8 accumulators + 2 key halves + a broadcast fit 16 ymm");
  const float *q0 = q, *q1 = q + std::min<int64_t>(1, n - 1) * D, *q2 = q + std::min<int64_t>(2, n - 1) * D,
              *q3 = q + std::min<int64_t>(3, n - 1) * D;
  __m256 a0 = _mm256_setzero_ps(), b0 = a0, a1 = a0, b1 = a0, a2 = a0, b2 = a0, a3 = a0, b3 = a0;
  for (int64_t d = 0; d < dims; ++d) {
    const __m256 lo = _mm256_load_ps(kf + 16 * d), hi = _mm256_load_ps(kf + 16 * d + 8);
    __m256 x = _mm256_broadcast_ss(q0 + d);
    a0 = _mm256_fmadd_ps(x, lo, a0), b0 = _mm256_fmadd_ps(x, hi, b0);
    x = _mm256_broadcast_ss(q1 + d);
    a1 = _mm256_fmadd_ps(x, lo, a1), b1 = _mm256_fmadd_ps(x, hi, b1);
    x = _mm256_broadcast_ss(q2 + d);
    a2 = _mm256_fmadd_ps(x, lo, a2), b2 = _mm256_fmadd_ps(x, hi, b2);
    x = _mm256_broadcast_ss(q3 + d);
    a3 = _mm256_fmadd_ps(x, lo, a3), b3 = _mm256_fmadd_ps(x, hi, b3);
  }
  const __m256 out[8] = {a0, b0, a1, b1, a2, b2, a3, b3};
  std::memcpy(c, out, static_cast<size_t>(n) * 16 * sizeof(float));
}

template <int64_t kN>
MOBIQ_ATTN inline void weighted_rows(const float* v, int64_t J, const float* w, int64_t f, int64_t e, float* out) {
  for (int64_t j = 0; j < kN; j += 2) {  // two 16-lane vectors: four ymm accumulators
    const bool two = j + 1 < kN;
    __m256 a0 = _mm256_loadu_ps(out + 16 * j), a1 = _mm256_loadu_ps(out + 16 * j + 8);
    __m256 a2 = two ? _mm256_loadu_ps(out + 16 * j + 16) : _mm256_setzero_ps();
    __m256 a3 = two ? _mm256_loadu_ps(out + 16 * j + 24) : _mm256_setzero_ps();
    for (int64_t p = f; p < e; ++p) {
      const __m256 x = _mm256_broadcast_ss(w + p);
      const float* row = v + (p * J + j) * 16;
      a0 = _mm256_fmadd_ps(x, _mm256_load_ps(row), a0), a1 = _mm256_fmadd_ps(x, _mm256_load_ps(row + 8), a1);
      if (two) a2 = _mm256_fmadd_ps(x, _mm256_load_ps(row + 16), a2), a3 = _mm256_fmadd_ps(x, _mm256_load_ps(row + 24), a3);
    }
    _mm256_storeu_ps(out + 16 * j, a0), _mm256_storeu_ps(out + 16 * j + 8, a1);
    if (two) _mm256_storeu_ps(out + 16 * j + 16, a2), _mm256_storeu_ps(out + 16 * j + 24, a3);
  }
}

MOBIQ_ATTN inline vf16 splat16(float x) { return join(_mm256_set1_ps(x), _mm256_set1_ps(x)); }

// 16 signed bytes, or 16 halves, as two times 8 floats.
MOBIQ_ATTN inline void widen_codes(__m128i c, __m256* lo, __m256* hi) {
  *lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c));
  *hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(c, 8)));
}

MOBIQ_ATTN inline void widen_halves(const KvHalf* p, __m256* lo, __m256* hi) {
  *lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  *hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
}

MOBIQ_ATTN inline vf16 widen16(vb16 c) {
  __m256 lo, hi;
  widen_codes((__m128i)c, &lo, &hi);
  return join(lo, hi);
}

MOBIQ_ATTN inline vf16 halves16(const KvHalf* p) {
  __m256 lo, hi;
  widen_halves(p, &lo, &hi);
  return join(lo, hi);
}

#include "../attention.inc"

// Decode (attention.inc's attend_few: at most kFewRows rows, nothing dequantized into scratch) in ymm
// registers: per block, the rows' scores from the keys' codes times their group scales, then per 16 dims of
// the value rows, every row's accumulators at once (8 ymm) over the positions it sees.
// Dim d of the block's 16 keys (raw codes; fp16: the values).
template <KvFormat kF>
MOBIQ_ATTN inline void key_dim(const uint8_t* kb, int64_t d, __m256* lo, __m256* hi) {
  if constexpr (kF == KvFormat::kF16) {
    widen_halves(reinterpret_cast<const KvHalf*>(kb) + d * kKvBlock, lo, hi);
  } else if constexpr (kF == KvFormat::kInt8) {
    widen_codes(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kb + d * kKvBlock)), lo, hi);
  } else {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(kb + (d / 2) * kKvBlock));
    const __m128i n = _mm_and_si128(d % 2 ? _mm_srli_epi16(b, 4) : b, _mm_set1_epi8(0x0F));
    widen_codes(_mm_sub_epi8(n, _mm_set1_epi8(8)), lo, hi);
  }
}

// Dims 16 j .. 16 j + 16 of the value at position p (raw codes; fp16: the values).
template <KvFormat kF>
MOBIQ_ATTN inline void value_dims(const uint8_t* vb, int64_t D, int64_t p, int64_t j, __m256* lo, __m256* hi) {
  if constexpr (kF == KvFormat::kF16) {
    widen_halves(reinterpret_cast<const KvHalf*>(vb) + p * D + 16 * j, lo, hi);
  } else if constexpr (kF == KvFormat::kInt8) {
    widen_codes(_mm_loadu_si128(reinterpret_cast<const __m128i*>(vb + p * D + 16 * j)), lo, hi);
  } else {  // byte i of a row: dims 2i (low nibble) and 2i + 1 (high)
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(vb + p * (D / 2) + 8 * j));
    const __m128i m = _mm_set1_epi8(0x0F);
    const __m128i c = _mm_unpacklo_epi8(_mm_and_si128(b, m), _mm_and_si128(_mm_srli_epi16(b, 4), m));
    widen_codes(_mm_sub_epi8(c, _mm_set1_epi8(8)), lo, hi);
  }
}

// Lanes [f, e) of 8 (from lane `base`) kept, the rest -inf.
MOBIQ_ATTN inline __m256 keep_lanes(__m256 s, int64_t base, int64_t f, int64_t e) {
  const __m256i lane = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(static_cast<int32_t>(base)));
  const __m256i in = _mm256_andnot_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(f)), lane),
                                         _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(e)), lane));
  return _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), s, _mm256_castsi256_ps(in));
}

// exp(s - m) where s > -inf, 0 where s = -inf (a position the row does not see).
MOBIQ_ATTN inline __m256 weights8(__m256 s, __m256 m) {
  const __m256 unseen = _mm256_cmp_ps(s, _mm256_set1_ps(-INFINITY), _CMP_EQ_OQ);
  return _mm256_andnot_ps(unseen, exp8(_mm256_sub_ps(s, m)));
}

MOBIQ_ATTN inline float sum8(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}

template <KvFormat kF, int kJ, int kR>
MOBIQ_ATTN void attend_few_rows_native(const AttentionArgs& a) {
  constexpr int64_t B = kKvBlock, J = kJ, D = 16 * kJ;
  constexpr bool scaled = kF != KvFormat::kF16;
  const KvLayout& l = a.layout;
  const int64_t b0 = a.key_begin / B, b1 = (a.key_end + B - 1) / B, nb = b1 - b0, groups = scaled ? l.groups : 1;
  thread_local std::vector<float> scratch;
  scratch.resize(static_cast<size_t>(kR * nb * 16 + 16));
  float* scores = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(scratch.data()) + 63) & ~uintptr_t{63});
  int64_t first[kR], last[kR];
  for (int64_t r = 0; r < kR; ++r) first[r] = std::max(a.first[r], a.key_begin), last[r] = std::min(a.last[r] + 1, a.key_end);
  __m256 mx[kR];  // running max of each row's scores (NaN kept)
  for (int64_t r = 0; r < kR; ++r) mx[r] = _mm256_set1_ps(-INFINITY);
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t* kb = a.keys + b * l.block_bytes;
    const float* ks = reinterpret_cast<const float*>(kb + l.code_bytes);
    __m256 s[kR][2];
    for (int64_t r = 0; r < kR; ++r) s[r][0] = s[r][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      const __m256 sl = scaled ? _mm256_loadu_ps(ks + g * B) : _mm256_set1_ps(1.0f);
      const __m256 sh = scaled ? _mm256_loadu_ps(ks + g * B + 8) : _mm256_set1_ps(1.0f);
      const int64_t d0 = scaled ? g * l.group : 0, d1 = scaled ? d0 + l.group : D;
      for (int64_t d = d0; d < d1; ++d) {
        __m256 lo, hi;
        key_dim<kF>(kb, d, &lo, &hi);
        if constexpr (scaled) lo = _mm256_mul_ps(lo, sl), hi = _mm256_mul_ps(hi, sh);
        for (int64_t r = 0; r < kR; ++r) {
          const __m256 x = _mm256_broadcast_ss(a.q + r * D + d);
          s[r][0] = _mm256_fmadd_ps(x, lo, s[r][0]), s[r][1] = _mm256_fmadd_ps(x, hi, s[r][1]);
        }
      }
    }
    const int64_t p0 = b * B;
    for (int64_t r = 0; r < kR; ++r) {
      if (first[r] > p0 || last[r] < p0 + B)  // a block the row sees only part of
        s[r][0] = keep_lanes(s[r][0], 0, first[r] - p0, last[r] - p0), s[r][1] = keep_lanes(s[r][1], 8, first[r] - p0, last[r] - p0);
      float* out = scores + (r * nb + (b - b0)) * 16;
      _mm256_store_ps(out, s[r][0]), _mm256_store_ps(out + 8, s[r][1]);
      mx[r] = max_nan8(s[r][0], max_nan8(s[r][1], mx[r]));
    }
  }
  __m256 m[kR], sums[kR];
  for (int64_t r = 0; r < kR; ++r) {
    a.m[r] = reduce_max(join(mx[r], mx[r]));
    m[r] = _mm256_set1_ps(a.m[r]), sums[r] = _mm256_setzero_ps();
    std::fill(a.acc + r * D, a.acc + (r + 1) * D, 0.0f);
  }
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t* vb = a.values + b * l.block_bytes;
    const float* vs = reinterpret_cast<const float*>(vb + l.code_bytes);
    const int64_t p0 = b * B;
    alignas(64) float w[kR][kMaxVectorsPerRow][16];  // row r's weight of position p times its value scale of group g
    int64_t need0 = B, need1 = 0, f[kR], e[kR];
    bool same = true;  // every row sees the same lanes of this block (decode: always)
    for (int64_t r = 0; r < kR; ++r) {
      const float* sc = scores + (r * nb + (b - b0)) * 16;
      const __m256 wl = weights8(_mm256_load_ps(sc), m[r]), wh = weights8(_mm256_load_ps(sc + 8), m[r]);
      sums[r] = _mm256_add_ps(sums[r], _mm256_add_ps(wl, wh));
      for (int64_t g = 0; g < groups; ++g) {
        _mm256_store_ps(w[r][g], scaled ? _mm256_mul_ps(wl, _mm256_loadu_ps(vs + g * B)) : wl);
        _mm256_store_ps(w[r][g] + 8, scaled ? _mm256_mul_ps(wh, _mm256_loadu_ps(vs + g * B + 8)) : wh);
      }
      f[r] = std::max<int64_t>(first[r] - p0, 0), e[r] = std::min<int64_t>(last[r] - p0, B);
      need0 = std::min(need0, f[r]), need1 = std::max(need1, e[r]);
      same = same && f[r] == f[0] && e[r] == e[0];
    }
    for (int64_t j = 0; j < J; ++j) {
      const int64_t g = scaled ? j >> l.group_shift : 0;
      __m256 acc[kR][2];
      for (int64_t r = 0; r < kR; ++r)
        acc[r][0] = _mm256_loadu_ps(a.acc + r * D + 16 * j), acc[r][1] = _mm256_loadu_ps(a.acc + r * D + 16 * j + 8);
      for (int64_t p = need0; p < need1; ++p) {
        __m256 lo, hi;
        value_dims<kF>(vb, D, p, j, &lo, &hi);
        for (int64_t r = 0; r < kR; ++r) {
          if (!same && (p < f[r] || p >= e[r])) continue;  // a row reads only what it sees
          const __m256 x = _mm256_broadcast_ss(&w[r][g][p]);
          acc[r][0] = _mm256_fmadd_ps(x, lo, acc[r][0]), acc[r][1] = _mm256_fmadd_ps(x, hi, acc[r][1]);
        }
      }
      for (int64_t r = 0; r < kR; ++r)
        _mm256_storeu_ps(a.acc + r * D + 16 * j, acc[r][0]), _mm256_storeu_ps(a.acc + r * D + 16 * j + 8, acc[r][1]);
    }
  }
  for (int64_t r = 0; r < kR; ++r) a.l[r] = sum8(sums[r]);
}

template <KvFormat kF, int kJ>
MOBIQ_ATTN void attend_few(const AttentionArgs& a) {
  switch (a.rows) {
    case 1: return attend_few_rows_native<kF, kJ, 1>(a);
    case 2: return attend_few_rows_native<kF, kJ, 2>(a);
    case 3: return attend_few_rows_native<kF, kJ, 3>(a);
    default: return attend_few_rows_native<kF, kJ, 4>(a);
  }
}

#undef MOBIQ_ATTN
#undef MOBIQ_ATTN_NATIVE
}  // namespace avx2

namespace avx512 {
#define MOBIQ_ATTN __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma,f16c")))

MOBIQ_ATTN inline vf16 splat16(float x) { return (vf16)_mm512_set1_ps(x); }

MOBIQ_ATTN inline vf16 widen16(vb16 c) { return (vf16)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32((__m128i)c)); }

MOBIQ_ATTN inline vf16 halves16(const KvHalf* p) {
  return (vf16)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

#include "../attention.inc"
#undef MOBIQ_ATTN
}  // namespace avx512

namespace avx512vnni {
#define MOBIQ_ATTN __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx512vbmi,fma,f16c")))
#define MOBIQ_ATTN_INT_SCORER
#define MOBIQ_ATTN_INT_VALUES
using avx512::halves16;
using avx512::splat16;
using avx512::widen16;

#include "../attention.inc"

// Scores of 8- and 4-bit key blocks as integer dot products (attention.h, AttentionKernel::integer_dot):
// per group, acc[p] = sum_d u[d][p] * c[d] with u the keys' codes made unsigned (int8 + 128; int4 as stored,
// code + 8) and c the query's int8 codes, four dims per vpdpbusd (one zmm holds four dims of the block's 16
// positions, transposed by one vpermb so that each 32-bit lane holds one position's four dims); then
// score += (acc - bias * sum_d c[d]) * key scale[p] * query scale.
template <KvFormat kF, int kJ>
struct IntScorer {
  static_assert(kF == KvFormat::kInt8 || kF == KvFormat::kInt4);
  static constexpr int64_t D = 16 * kJ;
  static constexpr int kGroup = 16 << group_shift_of(kJ), kGroups = kJ >> group_shift_of(kJ);
  static constexpr int32_t kBias = kF == KvFormat::kInt8 ? 128 : 8;
  const AttentionArgs& a;
  alignas(64) int8_t codes[kFewRows][D];
  float scale[kFewRows][kGroups];
  int32_t bias[kFewRows][kGroups];  // kBias * the group's code sum

  // kv_quantize_query's rule in zmm registers (the same float operations, so the same codes: kernel_test).
  MOBIQ_ATTN explicit IntScorer(const AttentionArgs& args) : a(args) {
    constexpr int kVectors = kGroup / 16;
    for (int64_t r = 0; r < a.rows; ++r)
      for (int g = 0; g < kGroups; ++g) {
        const float* x = a.q + r * D + g * kGroup;
        __m512 v[kVectors], amax = _mm512_setzero_ps();
        __mmask16 finite = 0xFFFF;
        for (int i = 0; i < kVectors; ++i) {
          v[i] = _mm512_loadu_ps(x + 16 * i);
          finite &= _mm512_cmp_ps_mask(_mm512_sub_ps(v[i], v[i]), _mm512_setzero_ps(), _CMP_EQ_OQ);
          amax = _mm512_max_ps(amax, _mm512_abs_ps(v[i]));
        }
        int8_t* c = codes[r] + g * kGroup;
        if (finite != 0xFFFF) {
          scale[r][g] = std::nanf(""), bias[r][g] = 0;
          std::memset(c, 0, kGroup);
          continue;
        }
        const float s = _mm512_reduce_max_ps(amax) / 127.0f, inv = s > 0.0f ? 1.0f / s : 0.0f;
        __m512i sum = _mm512_setzero_si512();
        for (int i = 0; i < kVectors; ++i) {
          __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v[i], _mm512_set1_ps(inv)));  // nearest, ties to even
          q = _mm512_min_epi32(_mm512_max_epi32(q, _mm512_set1_epi32(-127)), _mm512_set1_epi32(127));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(c + 16 * i), _mm512_cvtepi32_epi8(q));
          sum = _mm512_add_epi32(sum, q);
        }
        scale[r][g] = s, bias[r][g] = kBias * _mm512_reduce_add_epi32(sum);
      }
  }

  // Dims d .. d + 3 of the block's 16 positions as unsigned codes, position p in 32-bit lane p.
  MOBIQ_ATTN static __m512i four_dims(const uint8_t* kb, int64_t d) {
    if constexpr (kF == KvFormat::kInt8) {  // rows d .. d + 3 of 16 bytes, contiguous
      const __m512i by_position = _mm512_set_epi32(
          0x3F2F1F0F, 0x3E2E1E0E, 0x3D2D1D0D, 0x3C2C1C0C, 0x3B2B1B0B, 0x3A2A1A0A, 0x39291909, 0x38281808,
          0x37271707, 0x36261606, 0x35251505, 0x34241404, 0x33231303, 0x32221202, 0x31211101, 0x30201000);
      const __m512i rows = _mm512_loadu_si512(kb + d * kKvBlock);
      return _mm512_xor_si512(_mm512_permutexvar_epi8(by_position, rows), _mm512_set1_epi8(-128));
    } else {  // bytes [d / 2][p] (dim 2i low nibble, 2i + 1 high): rows d / 2, d / 2 + 1 hold dims d .. d + 3
      const __m512i by_position = _mm512_set_epi32(
          0x3F1F2F0F, 0x3E1E2E0E, 0x3D1D2D0D, 0x3C1C2C0C, 0x3B1B2B0B, 0x3A1A2A0A, 0x39192909, 0x38182808,
          0x37172707, 0x36162606, 0x35152505, 0x34142404, 0x33132303, 0x32122202, 0x31112101, 0x30102000);
      const __m256i rows = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kb + (d / 2) * kKvBlock));
      const __m256i m = _mm256_set1_epi8(0x0F);
      // [dim d | dim d + 2 | dim d + 1 | dim d + 3], 16 bytes each
      const __m512i dims = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(rows, m)),
                                              _mm256_and_si256(_mm256_srli_epi16(rows, 4), m), 1);
      return _mm512_permutexvar_epi8(by_position, dims);
    }
  }

  template <int kR>
  MOBIQ_ATTN void rows_block(const uint8_t* kb, vf16* s) const {
    const KvLayout& l = a.layout;
    const float* ks = reinterpret_cast<const float*>(kb + l.code_bytes);
    __m512 out[kR];
    for (int r = 0; r < kR; ++r) out[r] = _mm512_setzero_ps();
    for (int g = 0; g < kGroups; ++g) {
      __m512i acc[kR][2];  // two sums per row (the dot product's latency)
      for (int r = 0; r < kR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_si512();
      for (int64_t d = g * kGroup; d < (g + 1) * kGroup; d += 8) {
        const __m512i k0 = four_dims(kb, d), k1 = four_dims(kb, d + 4);
        for (int r = 0; r < kR; ++r) {
          int32_t c0, c1;
          std::memcpy(&c0, codes[r] + d, 4), std::memcpy(&c1, codes[r] + d + 4, 4);
          acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], k0, _mm512_set1_epi32(c0));
          acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], k1, _mm512_set1_epi32(c1));
        }
      }
      const __m512 kscale = _mm512_loadu_ps(ks + g * kKvBlock);
      for (int r = 0; r < kR; ++r) {
        const __m512i dot = _mm512_sub_epi32(_mm512_add_epi32(acc[r][0], acc[r][1]), _mm512_set1_epi32(bias[r][g]));
        out[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(kscale, _mm512_set1_ps(scale[r][g])), out[r]);
      }
    }
    for (int r = 0; r < kR; ++r) s[r] = (vf16)out[r];
  }
};

// 8-bit value sums (attention.inc's FewValues contract) as integer dot products: per block, row and group of
// 64 dims, the weights w are coded as int16 c = round(w / t), t = max w / 32767 (lanes a row does not see:
// 0; a NaN weight makes t NaN, so the group's sums NaN), and two positions' codes are summed per vpdpwssd
// against their value codes widened to int16 pairs; the block's int32 sums then add t times themselves to
// float sums. Error per block: at most t / 2 per weight, i.e. 2^-16 of the block's largest weight (times its
// value scale) per position, far below the 8-bit codes' own. Inside each 64 dims the sums are kept in the
// order the byte interleave leaves them (below) and put back in store().
template <int kJ, int kR>
struct IntValues {
  static_assert(kJ % 4 == 0);
  static constexpr int kZ = kJ / 4;  // 64-dim groups (kv_group: 64) per value row
  static constexpr int64_t D = 16 * kJ;
  // acc[r][z][i]: row r, dims 64 z + {0-7, 16-23}, {32-39, 48-55}, {8-15, 24-31}, {40-47, 56-63} for i = 0..3
  __m512 acc[kR][kZ][4];

  MOBIQ_ATTN IntValues() {
    for (int r = 0; r < kR; ++r)
      for (int z = 0; z < kZ; ++z)
        for (int i = 0; i < 4; ++i) acc[r][z][i] = _mm512_setzero_ps();
  }

  MOBIQ_ATTN inline void block(const uint8_t* vb, const float* w, int64_t p0, int64_t p1, const int64_t* f,
                               const int64_t* e, bool same) {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int z = 0; z < kZ; ++z) {
      alignas(64) int32_t pairs[kR][8];  // codes of positions 2k, 2k + 1 as int16 halves of one int32
      float t[kR];
      for (int r = 0; r < kR; ++r) {
        const int64_t lo = same ? p0 : f[r], hi = same ? p1 : e[r];
        const __mmask16 seen = _mm512_cmp_epi32_mask(lane, _mm512_set1_epi32(static_cast<int32_t>(lo)), _MM_CMPINT_NLT) &
                               _mm512_cmp_epi32_mask(lane, _mm512_set1_epi32(static_cast<int32_t>(hi)), _MM_CMPINT_LT);
        const __m512 u = _mm512_maskz_mov_ps(seen, _mm512_loadu_ps(w + (r * kZ + z) * 16));
        const bool nan = _mm512_cmp_ps_mask(u, u, _CMP_UNORD_Q) != 0;
        const float top = _mm512_reduce_max_ps(u);
        t[r] = nan ? std::nanf("") : top / 32767.0f;
        const float inv = !nan && top > 0.0f ? 32767.0f / top : 0.0f;
        const __m512i c = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_mov_ps(nan ? 0 : seen, u), _mm512_set1_ps(inv)));
        _mm256_store_si256(reinterpret_cast<__m256i*>(pairs[r]), _mm512_cvtepi32_epi16(_mm512_min_epi32(c, _mm512_set1_epi32(32767))));
      }
      __m512i sum[kR][4];
      for (int r = 0; r < kR; ++r)
        for (int i = 0; i < 4; ++i) sum[r][i] = _mm512_setzero_si512();
      for (int64_t k = p0 / 2; k < (p1 + 1) / 2; ++k) {  // positions 2k, 2k + 1 (one may be unseen: code 0)
        const int8_t* row = reinterpret_cast<const int8_t*>(vb) + 2 * k * D + 64 * z;
        const __m512i a = _mm512_loadu_si512(row), b = _mm512_loadu_si512(row + D);
        const __m512i lo = _mm512_unpacklo_epi8(a, b), hi = _mm512_unpackhi_epi8(a, b);
        const __m512i x[4] = {_mm512_cvtepi8_epi16(_mm512_castsi512_si256(lo)), _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(lo, 1)),
                              _mm512_cvtepi8_epi16(_mm512_castsi512_si256(hi)), _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(hi, 1))};
        for (int r = 0; r < kR; ++r) {
          const __m512i c = _mm512_set1_epi32(pairs[r][k]);
          for (int i = 0; i < 4; ++i) sum[r][i] = _mm512_dpwssd_epi32(sum[r][i], x[i], c);
        }
      }
      for (int r = 0; r < kR; ++r)
        for (int i = 0; i < 4; ++i)
          acc[r][z][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[r][i]), _mm512_set1_ps(t[r]), acc[r][z][i]);
    }
  }

  MOBIQ_ATTN inline void store(int r, float* out) const {
    for (int z = 0; z < kZ; ++z) {
      const __m512 *x = acc[r][z];  // x[0]: dims 0-7, 16-23; x[2]: 8-15, 24-31; x[1], x[3]: the same + 32
      _mm512_storeu_ps(out + 64 * z, _mm512_shuffle_f32x4(x[0], x[2], 0x44));
      _mm512_storeu_ps(out + 64 * z + 16, _mm512_shuffle_f32x4(x[0], x[2], 0xEE));
      _mm512_storeu_ps(out + 64 * z + 32, _mm512_shuffle_f32x4(x[1], x[3], 0x44));
      _mm512_storeu_ps(out + 64 * z + 48, _mm512_shuffle_f32x4(x[1], x[3], 0xEE));
    }
  }
};

#undef MOBIQ_ATTN_INT_VALUES
#undef MOBIQ_ATTN_INT_SCORER
#undef MOBIQ_ATTN
}  // namespace avx512vnni

void attention__avx2(const AttentionArgs& a) { avx2::attend(a); }
void attention__avx512(const AttentionArgs& a) { avx512::attend(a); }
void attention__avx512vnni(const AttentionArgs& a) { avx512vnni::attend(a); }

bool has_attention_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
bool has_attention_avx512() {
  return has_attention_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
}
bool has_attention_avx512vnni() {
  return has_attention_avx512() && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi");
}

}  // namespace mobiq
