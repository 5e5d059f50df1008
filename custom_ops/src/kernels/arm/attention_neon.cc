// attention.inc compiled for aarch64's baseline Advanced SIMD (NEON, 4 lanes; fp16 conversions native).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include <arm_neon.h>

#include "../attention_variants.h"

namespace mobiq {
namespace neon {
#define MOBIQ_ATTN

inline vf16 splat16(float x) { return vf16{} + x; }

inline vf16 widen16(vb16 c) {
  const int8x16_t v = (int8x16_t)c;
  const int16x8_t lo = vmovl_s8(vget_low_s8(v)), hi = vmovl_s8(vget_high_s8(v));
  const float32x4_t parts[4] = {vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo))), vcvtq_f32_s32(vmovl_s16(vget_high_s16(lo))),
                                vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi))), vcvtq_f32_s32(vmovl_s16(vget_high_s16(hi)))};
  vf16 out;
  std::memcpy(&out, parts, sizeof out);
  return out;
}

inline vf16 halves16(const KvHalf* p) {
  const float16_t* h = reinterpret_cast<const float16_t*>(p);
  const float32x4_t parts[4] = {vcvt_f32_f16(vld1_f16(h)), vcvt_f32_f16(vld1_f16(h + 4)), vcvt_f32_f16(vld1_f16(h + 8)),
                                vcvt_f32_f16(vld1_f16(h + 12))};
  vf16 out;
  std::memcpy(&out, parts, sizeof out);
  return out;
}

#include "../attention.inc"
#undef MOBIQ_ATTN
}  // namespace neon

void attention__neon(const AttentionArgs& a) { neon::attend(a); }

}  // namespace mobiq
