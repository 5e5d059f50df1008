// The one dispatch point: which kernel variant this process runs.
// Today: the portable scalar kernel everywhere (SIMD variants join here, chosen
// from compile-time and run-time CPU checks). MOBIQ_KERNEL forces a variant.
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "mobiq/kernels.h"

namespace mobiq {

KernelChoice select_kernel() {
  const char* forced = std::getenv("MOBIQ_KERNEL");
  const std::string want = forced ? forced : "";
  if (want == "reference") return {rsmm_f32_reference, "rsmm_f32_reference"};
  if (want.empty() || want == "scalar" || want == "portable")
    return {rsmm_f32_1x1__scalar, "rsmm_f32_1x1__scalar"};
  throw std::invalid_argument("[ResidualSliceMatMul] MOBIQ_KERNEL expected one of reference, scalar; got '" +
                              want + "'");
}

}  // namespace mobiq
