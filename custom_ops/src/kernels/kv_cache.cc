// The KV cache block formats (mobiq/attention.h): layouts, and storing / loading one position.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "mobiq/attention.h"

namespace mobiq {
namespace {

// Symmetric codes of x[0 .. n) with `levels` = 127 (int8) or 7 (int4) steps each side; returns the scale.
// A group with a NaN or an infinity gets scale NaN and codes 0.
float quantize_group(const float* x, int64_t n, int levels, int32_t* codes) {
  float amax = 0.0f;
  bool finite = true;
  for (int64_t i = 0; i < n; ++i) {
    finite = finite && std::isfinite(x[i]);
    amax = std::max(amax, std::fabs(x[i]));
  }
  if (!finite) {
    std::fill(codes, codes + n, 0);
    return std::nanf("");
  }
  const float scale = amax / static_cast<float>(levels);
  const float inv = scale > 0.0f ? 1.0f / scale : 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float c = std::nearbyint(x[i] * inv);
    codes[i] = static_cast<int32_t>(std::clamp(c, -static_cast<float>(levels), static_cast<float>(levels)));
  }
  return scale;
}

}  // namespace

int64_t kv_group(int64_t head_dim) { return head_dim % 64 == 0 ? 64 : head_dim % 32 == 0 ? 32 : 16; }

KvLayout kv_layout(KvFormat format, int64_t head_dim) {
  KvLayout l;
  l.format = format;
  l.head_dim = head_dim;
  l.group = kv_group(head_dim);
  l.groups = head_dim / l.group;
  l.group_shift = l.group == 64 ? 2 : l.group == 32 ? 1 : 0;
  const int64_t values = kKvBlock * head_dim;
  switch (format) {
    case KvFormat::kF32: l.bits = 32, l.code_bytes = 4 * values; break;
    case KvFormat::kF16: l.bits = 16, l.code_bytes = 2 * values; break;
    case KvFormat::kInt8: l.bits = 8, l.code_bytes = values; break;
    case KvFormat::kInt4: l.bits = 4, l.code_bytes = values / 2; break;
  }
  const bool scaled = format == KvFormat::kInt8 || format == KvFormat::kInt4;
  l.block_bytes = l.code_bytes + (scaled ? 4 * l.groups * kKvBlock : 0);
  return l;
}

void kv_quantize_query(const KvLayout& l, const float* q, int8_t* codes, float* scales) {
  int32_t c[64];  // one group (at most 64 dims)
  for (int64_t g = 0; g < l.groups; ++g) {
    scales[g] = quantize_group(q + g * l.group, l.group, 127, c);
    for (int64_t i = 0; i < l.group; ++i) codes[g * l.group + i] = static_cast<int8_t>(c[i]);
  }
}

bool kv_format_of(int64_t head_dim, int64_t block_bytes, KvLayout* out) {
  for (KvFormat f : {KvFormat::kF32, KvFormat::kF16, KvFormat::kInt8, KvFormat::kInt4}) {
    const KvLayout l = kv_layout(f, head_dim);
    if (l.block_bytes == block_bytes) {
      *out = l;
      return true;
    }
  }
  return false;
}

void kv_store(const KvLayout& l, bool keys, const float* x, uint8_t* block, int64_t lane) {
  const int64_t D = l.head_dim;
  // Element index of (lane, dim d) in the block's codes: dim-major for keys, position-major for values.
  const auto at = [&](int64_t d) { return keys ? d * kKvBlock + lane : lane * D + d; };
  switch (l.format) {
    case KvFormat::kF32: {
      float* codes = reinterpret_cast<float*>(block);
      for (int64_t d = 0; d < D; ++d) codes[at(d)] = x[d];
      return;
    }
    case KvFormat::kF16: {
      KvHalf* codes = reinterpret_cast<KvHalf*>(block);
      for (int64_t d = 0; d < D; ++d) codes[at(d)] = static_cast<KvHalf>(x[d]);
      return;
    }
    case KvFormat::kInt8:
    case KvFormat::kInt4: {
      const bool int8 = l.format == KvFormat::kInt8;
      float* scales = reinterpret_cast<float*>(block + l.code_bytes);
      int32_t codes[64];
      for (int64_t g = 0; g < l.groups; ++g) {
        scales[g * kKvBlock + lane] = quantize_group(x + g * l.group, l.group, int8 ? 127 : 7, codes);
        for (int64_t i = 0; i < l.group; ++i) {
          const int64_t d = g * l.group + i;
          if (int8) {
            reinterpret_cast<int8_t*>(block)[at(d)] = static_cast<int8_t>(codes[i]);
          } else {  // dims 2j, 2j + 1 share a byte: (2j)/2 = j in the "dim" slot of the layout
            const int64_t byte = keys ? (d / 2) * kKvBlock + lane : lane * (D / 2) + d / 2;
            const uint8_t nibble = static_cast<uint8_t>(codes[i] + 8);
            block[byte] = d % 2 ? static_cast<uint8_t>((block[byte] & 0x0F) | (nibble << 4))
                                : static_cast<uint8_t>((block[byte] & 0xF0) | nibble);
          }
        }
      }
      return;
    }
  }
}

void kv_load(const KvLayout& l, bool keys, const uint8_t* block, int64_t lane, float* x) {
  const int64_t D = l.head_dim;
  const auto at = [&](int64_t d) { return keys ? d * kKvBlock + lane : lane * D + d; };
  const float* scales = reinterpret_cast<const float*>(block + l.code_bytes);
  for (int64_t d = 0; d < D; ++d) {
    switch (l.format) {
      case KvFormat::kF32: x[d] = reinterpret_cast<const float*>(block)[at(d)]; break;
      case KvFormat::kF16: x[d] = static_cast<float>(reinterpret_cast<const KvHalf*>(block)[at(d)]); break;
      case KvFormat::kInt8:
        x[d] = reinterpret_cast<const int8_t*>(block)[at(d)] * scales[(d / l.group) * kKvBlock + lane];
        break;
      case KvFormat::kInt4: {
        const int64_t byte = keys ? (d / 2) * kKvBlock + lane : lane * (D / 2) + d / 2;
        const int code = (d % 2 ? block[byte] >> 4 : block[byte] & 0x0F) - 8;
        x[d] = static_cast<float>(code) * scales[(d / l.group) * kKvBlock + lane];
        break;
      }
    }
  }
}

}  // namespace mobiq
