// Token tiling shared by the SIMD kernels: tiles of 4 tokens, then the remainder.
#pragma once

#include <cstdint>

#include "mobiq/kernels.h"

namespace mobiq {

using TileFn = void (*)(const RsmmArgs&, const int32_t* tokens, int k, int64_t n0, int64_t n1);

template <TileFn T1, TileFn T2, TileFn T3, TileFn T4>
void run_tiles(const RsmmArgs& a, const int32_t* tokens, int64_t num_tokens, int k, int64_t n0, int64_t n1) {
  int64_t i = 0;
  for (; i + 4 <= num_tokens; i += 4) T4(a, tokens + i, k, n0, n1);
  switch (num_tokens - i) {
    case 3: T3(a, tokens + i, k, n0, n1); break;
    case 2: T2(a, tokens + i, k, n0, n1); break;
    case 1: T1(a, tokens + i, k, n0, n1); break;
    default: break;
  }
}

}  // namespace mobiq
