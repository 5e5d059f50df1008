// The KV cache at 32, 16, 8 or 4 bits, and the attention that reads it (docs/design.md, "The KV cache").
// No ONNX Runtime in here.
//
// Cache buffer of one layer's keys (or values): uint8 [B, kv_heads, blocks, block_bytes]. A block
// holds kKvBlock = 16 consecutive positions of one head. Inside a block, with D = head_dim and
// g = kv_group(D) values per scale (64, 32 or 16: the largest that divides D):
//   keys     codes dim-major: element (position p, dim d) at [d][p]         (fp32, fp16, int8)
//                             int4: byte [d/2][p], dim d even low nibble, odd high nibble
//   values   codes position-major: [p][d]; int4: byte [p][d/2], the same nibbles
//   int8 / int4: then scales float32 [D/g][16] (group, position).
// Codes: fp32 / fp16 the value; int8 c = round(x / s) in [-127, 127], s = max|x over the group| / 127;
// int4 c in [-7, 7] stored as c + 8, s = max|x| / 7. A group with a NaN or an infinity stores scale
// NaN and codes 0 (its values read back NaN; nothing non-finite is ever cast to an integer).
// The format is a property of the buffer (kv_format_of: block_bytes differs per format), so a
// session chooses the cache precision by the buffers it allocates: nothing in the graph changes.
// Keys are dim-major so that one block's scores are D fused multiply-adds of 16 lanes (no
// horizontal sums); values position-major so that a weighted sum adds whole rows.
#pragma once

#include <cstdint>

namespace mobiq {

// IEEE half precision as the compiler spells it in C++ (GCC 12: _Float16 on x86, __fp16 on aarch64).
#if defined(__aarch64__)
using KvHalf = __fp16;
#else
using KvHalf = _Float16;
#endif

inline constexpr int64_t kKvBlock = 16;  // positions per cache block

enum class KvFormat { kF32, kF16, kInt8, kInt4 };

struct KvLayout {
  KvFormat format = KvFormat::kF32;
  int64_t head_dim = 0, group = 0, groups = 0;  // D, values per scale, D / group
  int group_shift = 0;                          // log2(group / 16): vector j of 16 dims is in group j >> it
  int64_t code_bytes = 0, block_bytes = 0;      // one block's codes; codes + scales
  int bits = 32;
};

// Values per scale: 64, 32 or 16, the largest that divides D. Requires D % 16 == 0 (checked by the caller).
int64_t kv_group(int64_t head_dim);
KvLayout kv_layout(KvFormat format, int64_t head_dim);
// The format whose block is `block_bytes` long for `head_dim`; false when none is.
bool kv_format_of(int64_t head_dim, int64_t block_bytes, KvLayout* out);

// Stores x[0 .. D) as position `lane` of `block` (keys or values layout).
void kv_store(const KvLayout& layout, bool keys, const float* x, uint8_t* block, int64_t lane);
// Reads position `lane` of `block` back into x[0 .. D) (tests, and the reference).
void kv_load(const KvLayout& layout, bool keys, const uint8_t* block, int64_t lane, float* x);

// A query row q[0 .. D) as the integer-dot variants score it against 8- and 4-bit keys: per group of the
// layout (layout.group dims, the keys' scale groups) codes c = round(q / s) in [-127, 127] with
// s = max|q over the group| / 127, the int8 rule of the cache (a group with a NaN or an infinity: s NaN,
// codes 0). scales[layout.groups].
void kv_quantize_query(const KvLayout& layout, const float* q, int8_t* codes, float* scales);

// One task of attention: `rows` query rows of one (batch, kv head) against the cached positions
// [key_begin, key_end). Row r sees positions [first[r], last[r]] (inclusive; causal and sliding
// window already applied by the caller) and is q[r * D ..] (rotated, attention scale folded in).
// The result is unnormalized, flash-attention style: acc[r] = sum_p exp(s_p - m[r]) v_p and
// l[r] = sum_p exp(s_p - m[r]) over the positions the row sees in the range (m[r] = -inf, l = 0,
// acc = 0 when it sees none); the caller merges key ranges and divides.
struct AttentionArgs {
  KvLayout layout;
  const uint8_t* keys;    // this head's first block
  const uint8_t* values;  // this head's first block
  const float* q;         // [rows, D]
  const int64_t* first;   // [rows]
  const int64_t* last;    // [rows]
  int64_t rows, key_begin, key_end;
  float* acc;             // [rows, D]
  float* m;               // [rows]
  float* l;               // [rows]
};

using AttentionFn = void (*)(const AttentionArgs& a);

// Key positions per decode task (split-K) when `positions` cached positions are read by `caches` (batch x kv
// heads) caches: about 8 tasks per call, at least 256 positions each, a whole number of blocks. Long reads
// per task (the cache streams from memory) while both cores stay busy.
int64_t kv_decode_chunk(int64_t positions, int64_t caches);

// The integer-dot variants' rounding of value weights: half an int16 step, 2^-16 of the block's largest.
inline constexpr double kValueWeightStep = 0.5 / 32767.0;

struct AttentionKernel {
  AttentionFn fn;
  const char* name;      // attention__<isa>
  bool (*supported)();
  // False: float arithmetic throughout. True (integer dot products): over 8- and 4-bit caches every row's
  // scores are the keys' codes times the query's kv_quantize_query codes (then times both scales), and over
  // 8-bit values with D a multiple of 64 the weighted sums take each weight (times its value scale) as an
  // int16 code per block of 16 positions, row and group: within kValueWeightStep of the block's largest such
  // weight per position.
  bool integer_dot;
};

// The compiled variants, slowest first (portable, then per instruction set: the same code compiled
// for AVX2 + F16C + FMA, AVX-512, NEON).
const AttentionKernel* attention_kernels(int64_t* count);
// The fastest supported variant, or MOBIQ_ATTENTION_KERNEL=<name> (invalid_argument if unknown or
// unusable here).
const AttentionKernel& select_attention_kernel();

// float64 reference of the same task (tests).
void attention_reference(const AttentionArgs& a);

}  // namespace mobiq
