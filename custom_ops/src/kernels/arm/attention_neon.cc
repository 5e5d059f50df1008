// attention.inc compiled for aarch64's baseline Advanced SIMD (NEON, 4 lanes; fp16 conversions native).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "../attention_variants.h"

namespace mobiq {
namespace neon {
#define MOBIQ_ATTN
#include "../attention.inc"
#undef MOBIQ_ATTN
}  // namespace neon

void attention__neon(const AttentionArgs& a) { neon::attend(a); }

}  // namespace mobiq
