// The per-instruction-set builds of attention.inc (internal to the kernels library).
#pragma once

#include "mobiq/attention.h"

namespace mobiq {

// 16-lane vectors of the attention kernel (attention.inc).
typedef float vf16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));
typedef int8_t vb16 __attribute__((vector_size(16)));

#if defined(__x86_64__)
void attention__avx2(const AttentionArgs& a);
void attention__avx512(const AttentionArgs& a);
void attention__avx512vnni(const AttentionArgs& a);
bool has_attention_avx2();
bool has_attention_avx512();
bool has_attention_avx512vnni();
#endif
#if defined(__aarch64__)
void attention__neon(const AttentionArgs& a);
#endif
}  // namespace mobiq
