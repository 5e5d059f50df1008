// attention.inc compiled for AVX2 + FMA + F16C (16 lanes = two ymm) and AVX-512 (one zmm).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "../attention_variants.h"

namespace mobiq {
namespace avx2 {
#define MOBIQ_ATTN __attribute__((target("avx2,fma,f16c")))
#include "../attention.inc"
#undef MOBIQ_ATTN
}  // namespace avx2

namespace avx512 {
#define MOBIQ_ATTN __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma,f16c")))
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
