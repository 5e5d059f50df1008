// build_tile_params — slice-1 parameters in the order of the SIMD accumulators:
// for row tile T and group g, 16 consecutive values hold rows 16 T .. 16 T + 15
// (0 past row N). kF32: s1 in `scales`, s1 * z1 in `offsets` (float32). kInt8: both
// divided by the row's largest |parameter| r_n and rounded to binary16, s1 / r_n then
// s1 z1 / r_n in one 64-byte line per (T, g) (`halves`), r_n in `row_scales`. Built once
// per weight when scales and zero points are constant initializers, else once per call.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "mobiq/format.h"
#include "mobiq/kernels.h"

namespace mobiq {

// Bit-level (GCC's _Float16 is x86-only in C++): round to nearest even, subnormals kept, overflow
// to infinity, NaN kept quiet.
uint16_t to_half(float v) {
  uint32_t x;
  std::memcpy(&x, &v, sizeof x);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7FFFFFFFu;
  if (x > 0x7F800000u) return sign | 0x7E00u;           // NaN
  if (x >= 0x477FF000u) return sign | 0x7C00u;          // rounds to 65520 or more: infinity
  if (x < 0x38800000u) {                                // below 2^-14: a multiple of 2^-24
    float magnitude;
    std::memcpy(&magnitude, &x, sizeof magnitude);
    return sign | static_cast<uint16_t>(std::nearbyint(magnitude * 0x1p24f));  // exact scaling, then RNE
  }
  uint32_t h = (x - 0x38000000u) >> 13;  // exponent rebiased 127 -> 15, 10 mantissa bits
  const uint32_t rest = x & 0x1FFFu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}

float from_half(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu;
  if (exponent == 0) {
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -magnitude : magnitude;
  }
  const uint32_t x = sign | (exponent == 31 ? 0x7F800000u : (exponent + 112) << 23) | (mantissa << 13);
  float f;
  std::memcpy(&f, &x, sizeof f);
  return f;
}

void build_tile_params(Mode mode, const float* scales, const float* zero_points, int64_t N, int64_t groups,
                       TileParams& p) {
  const size_t size = static_cast<size_t>(row_tiles(N) * groups * kTileRows);
  const auto line = [groups](int64_t n, int64_t g) {
    return static_cast<size_t>(((n / kTileRows) * groups + g) * kTileRows);
  };
  p = TileParams{};
  if (mode == Mode::kF32) {
    p.scales.assign(size, 0.0f);
    p.offsets.assign(size, 0.0f);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t g = 0; g < groups; ++g) {
        const size_t at = line(n, g) + static_cast<size_t>(n % kTileRows);
        p.scales[at] = scales[n * groups + g];
        p.offsets[at] = scales[n * groups + g] * zero_points[n * groups + g];
      }
    return;
  }
  p.halves.assign(2 * size, 0);
  p.row_scales.assign(static_cast<size_t>(row_tiles(N) * kTileRows), 1.0f);
  for (int64_t n = 0; n < N; ++n) {
    const float* s = scales + n * groups;
    const float* z = zero_points + n * groups;
    float r = 0.0f;
    for (int64_t g = 0; g < groups; ++g) r = std::max({r, std::fabs(s[g]), std::fabs(s[g] * z[g])});
    if (!(r > 0.0f)) r = 1.0f;  // an all-zero row (graph inputs are not value-checked)
    p.row_scales[static_cast<size_t>(n)] = r;
    for (int64_t g = 0; g < groups; ++g) {
      const size_t at = 2 * line(n, g) + static_cast<size_t>(n % kTileRows);
      p.halves[at] = to_half(s[g] / r);
      p.halves[at + kTileRows] = to_half(s[g] * z[g] / r);
    }
  }
}

void use_tile_params(const TileParams& p, RsmmArgs& args) {
  args.tile_scales = p.scales.data();
  args.tile_offsets = p.offsets.data();
  args.tile_halves = p.halves.data();
  args.row_scales = p.row_scales.data();
}

}  // namespace mobiq
