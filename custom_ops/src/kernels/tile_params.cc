// build_tile_params — slice-1 parameters in the order of the SIMD accumulators:
// for row tile T and group g, 16 consecutive floats hold rows 16 T .. 16 T + 15
// (0 past row N): s1 in `scales`, s1 * z1 in `offsets`. Built once per weight when
// scales and zero points are constant initializers, else once per call.
#include "mobiq/format.h"
#include "mobiq/kernels.h"

namespace mobiq {

void build_tile_params(const float* scales, const float* zero_points, int64_t N, int64_t groups, TileParams& p) {
  const size_t size = static_cast<size_t>(row_tiles(N) * groups * kTileRows);
  p.scales.assign(size, 0.0f);
  p.offsets.assign(size, 0.0f);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < groups; ++g) {
      const size_t at = static_cast<size_t>(((n / kTileRows) * groups + g) * kTileRows + n % kTileRows);
      p.scales[at] = scales[n * groups + g];
      p.offsets[at] = scales[n * groups + g] * zero_points[n * groups + g];
    }
}

void use_tile_params(const TileParams& p, RsmmArgs& args) {
  args.tile_scales = p.scales.data();
  args.tile_offsets = p.offsets.data();
}

}  // namespace mobiq
