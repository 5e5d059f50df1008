// route_tokens — the token router of one routed linear input (SPEC §1), fused:
//   score_t  = relu(s1 * (x_t W1) + b1) . w2 + b2    (W1 [K, H] int8, s1 per hidden unit; float32 sums)
//   count_t  = 1 + #{ j : score_t > tau_j }          (slice 1 always; tau = one threshold-table row)
// The hidden layer is the cost: K x H weights read per token — int8, as they would otherwise be a
// fifth of a 4-bit model's bytes per token. Portable path: plain loops over blocks of up to 4
// tokens sharing each row of W1. AVX-512 path (H % 16 == 0, H <= 128, chosen at run time): the
// hidden vector of one token in up to 8 registers, x_t[k] broadcast.
#include <cstddef>
#include <vector>

#include "mobiq/router.h"

#if defined(__x86_64__)
#include <immintrin.h>
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

using RouteFn = void (*)(const RouterArgs&, int64_t, int64_t);

// Chosen per call (H is the router's), the CPU check once per process.
RouteFn avx512_variant(int64_t H) {
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  if (!avx512 || H % 16 != 0) return nullptr;
  switch (H / 16) {
    case 1: return route_avx512<1>;
    case 2: return route_avx512<2>;
    case 4: return route_avx512<4>;
    case 8: return route_avx512<8>;
    default: return nullptr;
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

void route_tokens(const RouterArgs& a, int64_t t0, int64_t t1) {
#if defined(__x86_64__)
  if (const RouteFn fn = avx512_variant(a.H)) return fn(a, t0, t1);
#endif
  route_tokens_portable(a, t0, t1);
}

}  // namespace mobiq
