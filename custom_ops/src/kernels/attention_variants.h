// The per-instruction-set builds of attention.inc (internal to the kernels library).
#pragma once

#include "mobiq/attention.h"

namespace mobiq {
#if defined(__x86_64__)
void attention__avx2(const AttentionArgs& a);
void attention__avx512(const AttentionArgs& a);
bool has_attention_avx2();
bool has_attention_avx512();
#endif
#if defined(__aarch64__)
void attention__neon(const AttentionArgs& a);
#endif
}  // namespace mobiq
