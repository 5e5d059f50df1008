// route_tokens — the token router of one routed linear input (docs/design.md, "The op"), fused:
//   score_t  = relu(s1 * (x_t W1) + b1) . w2 + b2    (W1 [K, H] int8, s1 per hidden unit; float32 sums)
//   count_t  = 1 + #{ j : score_t > tau_j }          (slice 1 always; tau = one threshold-table row)
// The hidden layer is the cost: K x H weights read per token — int8, as they would otherwise be a
// fifth of a 4-bit model's bytes per token. ResidualSliceMatMul runs it only for threshold rows that
// tokens decide (a constant row costs nothing). Variants, picked per call from H and once per
// process from the CPU; all sum in float32 (the order of the sums differs between variants: a score
// within float rounding of a threshold may land on either side):
//   portable  plain loops over blocks of up to 4 tokens sharing each row of W1 (any CPU);
//   avx512    H in {16, 32, 64, 128}: one token's hidden vector in up to 8 zmm, x_t[k] broadcast;
//   avx2      H in {8, 16, 32, 64}: the same in up to 8 ymm (AVX2 + FMA, e.g. AVX-VNNI client cores);
//   neon      H in {8, 16, 32, 64}: the same in up to 16 float32x4 (every aarch64 CPU).
#include <cstddef>
#include <cstdlib>
#include <string>
#include <vector>

#include "mobiq/router.h"

#if defined(__x86_64__)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif

namespace mobiq {
namespace {

inline int32_t count_above(const RouterArgs& a, float score) {
  int32_t count = 1;
  for (int64_t j = 0; j < a.num_tau; ++j) count += score > a.tau[j];
  return count;
}

template <int T>
void route_block(const RouterArgs& a, int64_t t0, float* h) {
  for (int i = 0; i < T * a.H; ++i) h[i] = 0.0f;
  for (int64_t k = 0; k < a.K; ++k) {
    const int8_t* w = a.w1 + k * a.H;
    for (int i = 0; i < T; ++i) {
      const float xk = a.x[(t0 + i) * a.K + k];
      float* hi = h + i * a.H;
      for (int64_t j = 0; j < a.H; ++j) hi[j] += xk * static_cast<float>(w[j]);
    }
  }
  for (int i = 0; i < T; ++i) {
    float score = a.b2;
    for (int64_t j = 0; j < a.H; ++j) {
      const float hj = h[i * a.H + j] * a.w1_scale[j] + a.b1[j];
      score += (hj > 0.0f ? hj : 0.0f) * a.w2[j];
    }
    a.counts[t0 + i] = count_above(a, score);
  }
}

#if defined(__x86_64__)
__attribute__((target("avx512f"))) inline __m512 int8_floats(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

template <int V>  // H = 16 V
__attribute__((target("avx512f"))) void route_avx512(const RouterArgs& a, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    __m512 h[V], h2[V];
    for (int v = 0; v < V; ++v) h[v] = h2[v] = _mm512_setzero_ps();
    const float* x = a.x + t * a.K;
    int64_t k = 0;
    for (; k + 2 <= a.K; k += 2) {  // two chains per register: FMA latency
      const __m512 x0 = _mm512_set1_ps(x[k]), x1 = _mm512_set1_ps(x[k + 1]);
      for (int v = 0; v < V; ++v) {
        h[v] = _mm512_fmadd_ps(x0, int8_floats(a.w1 + k * a.H + 16 * v), h[v]);
        h2[v] = _mm512_fmadd_ps(x1, int8_floats(a.w1 + (k + 1) * a.H + 16 * v), h2[v]);
      }
    }
    for (; k < a.K; ++k)
      for (int v = 0; v < V; ++v) h[v] = _mm512_fmadd_ps(_mm512_set1_ps(x[k]), int8_floats(a.w1 + k * a.H + 16 * v), h[v]);
    __m512 s = _mm512_setzero_ps();
    for (int v = 0; v < V; ++v) {
      const __m512 hv = _mm512_fmadd_ps(_mm512_add_ps(h[v], h2[v]), _mm512_loadu_ps(a.w1_scale + 16 * v),
                                        _mm512_loadu_ps(a.b1 + 16 * v));
      s = _mm512_fmadd_ps(_mm512_max_ps(hv, _mm512_setzero_ps()), _mm512_loadu_ps(a.w2 + 16 * v), s);
    }
    a.counts[t] = count_above(a, a.b2 + _mm512_reduce_add_ps(s));
  }
}

template <int V>  // H = 8 V
__attribute__((target("avx2,fma"))) void route_avx2(const RouterArgs& a, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    __m256 h[V];
    for (int v = 0; v < V; ++v) h[v] = _mm256_setzero_ps();
    const float* x = a.x + t * a.K;
    for (int64_t k = 0; k < a.K; ++k) {
      const __m256 xk = _mm256_set1_ps(x[k]);
      const int8_t* w = a.w1 + k * a.H;
      for (int v = 0; v < V; ++v) {
        const __m128i w8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + 8 * v));
        h[v] = _mm256_fmadd_ps(xk, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(w8)), h[v]);
      }
    }
    __m256 s = _mm256_setzero_ps();
    for (int v = 0; v < V; ++v) {
      const __m256 hv = _mm256_fmadd_ps(h[v], _mm256_loadu_ps(a.w1_scale + 8 * v), _mm256_loadu_ps(a.b1 + 8 * v));
      s = _mm256_fmadd_ps(_mm256_max_ps(hv, _mm256_setzero_ps()), _mm256_loadu_ps(a.w2 + 8 * v), s);
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, s);
    float total = 0.0f;
    for (float l : lanes) total += l;
    a.counts[t] = count_above(a, a.b2 + total);
  }
}

bool avx512_fits(int64_t H) {
  static const bool cpu = __builtin_cpu_supports("avx512f");
  return cpu && (H == 16 || H == 32 || H == 64 || H == 128);
}
void route_tokens_avx512(const RouterArgs& a, int64_t t0, int64_t t1) {
  switch (a.H) {
    case 16: return route_avx512<1>(a, t0, t1);
    case 32: return route_avx512<2>(a, t0, t1);
    case 64: return route_avx512<4>(a, t0, t1);
    default: return route_avx512<8>(a, t0, t1);
  }
}

bool avx2_fits(int64_t H) {
  static const bool cpu = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return cpu && (H == 8 || H == 16 || H == 32 || H == 64);
}
void route_tokens_avx2(const RouterArgs& a, int64_t t0, int64_t t1) {
  switch (a.H) {
    case 8: return route_avx2<1>(a, t0, t1);
    case 16: return route_avx2<2>(a, t0, t1);
    case 32: return route_avx2<4>(a, t0, t1);
    default: return route_avx2<8>(a, t0, t1);
  }
}
#endif

#if defined(__aarch64__)
template <int V>  // H = 4 V
void route_neon(const RouterArgs& a, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    float32x4_t h[V];
    for (int v = 0; v < V; ++v) h[v] = vdupq_n_f32(0.0f);
    const float* x = a.x + t * a.K;
    for (int64_t k = 0; k < a.K; ++k) {
      const float32x4_t xk = vdupq_n_f32(x[k]);
      const int8_t* w = a.w1 + k * a.H;
      for (int v = 0; v < V; v += 2) {  // 8 int8 weights -> two float32x4
        const int16x8_t w16 = vmovl_s8(vld1_s8(w + 4 * v));
        h[v] = vfmaq_f32(h[v], xk, vcvtq_f32_s32(vmovl_s16(vget_low_s16(w16))));
        h[v + 1] = vfmaq_f32(h[v + 1], xk, vcvtq_f32_s32(vmovl_s16(vget_high_s16(w16))));
      }
    }
    float32x4_t s = vdupq_n_f32(0.0f);
    for (int v = 0; v < V; ++v) {
      const float32x4_t hv = vfmaq_f32(vld1q_f32(a.b1 + 4 * v), h[v], vld1q_f32(a.w1_scale + 4 * v));
      s = vfmaq_f32(s, vmaxq_f32(hv, vdupq_n_f32(0.0f)), vld1q_f32(a.w2 + 4 * v));
    }
    a.counts[t] = count_above(a, a.b2 + vaddvq_f32(s));
  }
}

bool neon_fits(int64_t H) { return H == 8 || H == 16 || H == 32 || H == 64; }
void route_tokens_neon(const RouterArgs& a, int64_t t0, int64_t t1) {
  switch (a.H) {
    case 8: return route_neon<2>(a, t0, t1);
    case 16: return route_neon<4>(a, t0, t1);
    case 32: return route_neon<8>(a, t0, t1);
    default: return route_neon<16>(a, t0, t1);
  }
}
#endif

}  // namespace

void route_tokens_portable(const RouterArgs& a, int64_t t0, int64_t t1) {
  std::vector<float> h(static_cast<size_t>(4 * a.H));
  int64_t t = t0;
  for (; t + 4 <= t1; t += 4) route_block<4>(a, t, h.data());
  for (; t < t1; ++t) route_block<1>(a, t, h.data());
}

static bool any_h(int64_t) { return true; }

const std::vector<RouterVariant>& router_variants() {
  // Slowest first: route_tokens takes the last that fits.
  static const std::vector<RouterVariant> variants = {
      {"route_f32__scalar", route_tokens_portable, any_h},
#if defined(__x86_64__)
      {"route_f32__avx2", route_tokens_avx2, avx2_fits},
      {"route_f32__avx512", route_tokens_avx512, avx512_fits},
#elif defined(__aarch64__)
      {"route_f32__neon", route_tokens_neon, neon_fits},
#endif
  };
  return variants;
}

void route_tokens(const RouterArgs& a, int64_t t0, int64_t t1) {
  // MOBIQ_KERNEL=portable|reference (debugging) forces the portable router with the portable matmul.
  static const bool portable = [] {
    const char* forced = std::getenv("MOBIQ_KERNEL");
    const std::string want = forced ? forced : "";
    return want == "portable" || want == "reference";
  }();
  if (portable) return route_tokens_portable(a, t0, t1);
  const auto& variants = router_variants();
  for (auto v = variants.rbegin(); v != variants.rend(); ++v)
    if (v->fits(a.H)) return v->fn(a, t0, t1);
}

}  // namespace mobiq
