// The attention task's portable variant (the architecture's baseline vector unit), its float64 reference,
// and the choice among the compiled variants (x86/attention_x86.cc, arm/attention_neon.cc).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention_variants.h"

namespace mobiq {
namespace portable {
#define MOBIQ_ATTN

inline vf16 splat16(float x) { return vf16{} + x; }

inline vf16 widen16(vb16 c) {
  vf16 out;
  for (int i = 0; i < 16; ++i) out[i] = static_cast<float>(c[i]);
  return out;
}

inline vf16 halves16(const KvHalf* p) {
  vf16 out;
  for (int i = 0; i < 16; ++i) out[i] = static_cast<float>(p[i]);
  return out;
}

#include "attention.inc"
#undef MOBIQ_ATTN
}  // namespace portable

namespace {

bool always() { return true; }

void attention_portable(const AttentionArgs& a) { portable::attend(a); }

}  // namespace

int64_t kv_decode_chunk(int64_t positions, int64_t caches) {
  constexpr int64_t kLeast = 256, kTasks = 8;
  const int64_t share = positions * caches / kTasks;
  return std::max(kLeast, (share + kKvBlock - 1) / kKvBlock * kKvBlock);
}

void attention_reference(const AttentionArgs& a) {
  const int64_t D = a.layout.head_dim;
  std::vector<float> k(static_cast<size_t>(D)), v(static_cast<size_t>(D));
  for (int64_t r = 0; r < a.rows; ++r) {
    const int64_t f = std::max(a.first[r], a.key_begin), e = std::min(a.last[r] + 1, a.key_end);
    std::vector<double> s;
    double mx = -INFINITY;
    for (int64_t t = f; t < e; ++t) {
      kv_load(a.layout, true, a.keys + (t / kKvBlock) * a.layout.block_bytes, t % kKvBlock, k.data());
      double dot = 0.0;
      for (int64_t d = 0; d < D; ++d) dot += static_cast<double>(a.q[r * D + d]) * k[static_cast<size_t>(d)];
      s.push_back(dot);
      mx = std::max(mx, dot);
    }
    std::vector<double> acc(static_cast<size_t>(D), 0.0);
    double sum = 0.0;
    for (int64_t t = f; t < e; ++t) {
      const double w = std::exp(s[static_cast<size_t>(t - f)] - mx);
      sum += w;
      kv_load(a.layout, false, a.values + (t / kKvBlock) * a.layout.block_bytes, t % kKvBlock, v.data());
      for (int64_t d = 0; d < D; ++d) acc[static_cast<size_t>(d)] += w * v[static_cast<size_t>(d)];
    }
    a.m[r] = f < e ? static_cast<float>(mx) : -INFINITY;
    a.l[r] = static_cast<float>(sum);
    for (int64_t d = 0; d < D; ++d) a.acc[r * D + d] = static_cast<float>(acc[static_cast<size_t>(d)]);
  }
}

const AttentionKernel* attention_kernels(int64_t* count) {
  static const AttentionKernel kernels[] = {
      {attention_portable, "attention__portable", always, false},
#if defined(__x86_64__)
      {attention__avx2, "attention__avx2", has_attention_avx2, false},
      {attention__avx512, "attention__avx512", has_attention_avx512, false},
      {attention__avx512vnni, "attention__avx512vnni", has_attention_avx512vnni, true},
#endif
#if defined(__aarch64__)
      {attention__neon, "attention__neon", always, false},
#endif
  };
  *count = static_cast<int64_t>(sizeof kernels / sizeof kernels[0]);
  return kernels;
}

const AttentionKernel& select_attention_kernel() {
  int64_t n = 0;
  const AttentionKernel* kernels = attention_kernels(&n);
  const char* forced = std::getenv("MOBIQ_ATTENTION_KERNEL");
  if (forced && *forced) {
    std::string names;
    for (int64_t i = 0; i < n; ++i) {
      if (kernels[i].name == std::string(forced)) {
        if (!kernels[i].supported())
          throw std::invalid_argument(std::string("[KVAttention] MOBIQ_ATTENTION_KERNEL=") + forced +
                                      " cannot run on this CPU");
        return kernels[i];
      }
      names += std::string(names.empty() ? "" : ", ") + kernels[i].name;
    }
    throw std::invalid_argument("[KVAttention] MOBIQ_ATTENTION_KERNEL expected one of " + names + "; got '" +
                                forced + "'");
  }
  const AttentionKernel* best = &kernels[0];
  for (int64_t i = 1; i < n; ++i)
    if (kernels[i].supported()) best = &kernels[i];
  return *best;
}

}  // namespace mobiq
