// The one dispatch point: the list of compiled kernels and the choice for an op
// instance, from compile-time architecture, run-time CPU features, the numeric
// mode and the shape constraints. MOBIQ_KERNEL forces a variant (debugging,
// tests, benchmarks): a kernel name, "reference", or "portable" (the scalar
// kernel of the op's mode).
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "mobiq/format.h"
#include "mobiq/kernels.h"

#if defined(__aarch64__) && defined(__linux__)
#include <asm/hwcap.h>
#include <sys/auxv.h>
#endif

namespace mobiq {
namespace {

bool always() { return true; }
#if defined(__x86_64__)
bool has_avx2() {  // the 256-bit kernels convert half-precision parameters with F16C
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
bool has_avxvnni() { return has_avx2() && __builtin_cpu_supports("avxvnni"); }
bool has_avx512vnni() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512vnni");
}
#endif
#if defined(__aarch64__)
bool has_dotprod() {
#if defined(__linux__) && defined(HWCAP_ASIMDDP)
  return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#else
  return false;
#endif
}
#endif

constexpr int kAny = static_cast<int>(kMaxSlices);

}  // namespace

const std::vector<KernelInfo>& all_kernels() {
  // Slowest first within a mode: select_kernel takes the last usable one.
  static const std::vector<KernelInfo> kernels = {
      {rsmm_f32_reference, "rsmm_f32_reference", Mode::kF32, Operand::kFloat, kAny, always},
      {rsmm_f32_1x1__scalar, "rsmm_f32_1x1__scalar", Mode::kF32, Operand::kFloat, kAny, always},
      {rsmm_i8_1x1__scalar, "rsmm_i8_1x1__scalar", Mode::kInt8, Operand::kInt8, kAny, always},
#if defined(__x86_64__)
      {rsmm_f32_16x4__avx2, "rsmm_f32_16x4__avx2", Mode::kF32, Operand::kFloat, 4, has_avx2},
      {rsmm_i8_16x4__avx2, "rsmm_i8_16x4__avx2", Mode::kInt8, Operand::kInt8, 4, has_avx2},
      {rsmm_i8_16x4__avxvnni, "rsmm_i8_16x4__avxvnni", Mode::kInt8, Operand::kInt8, 4, has_avxvnni},
      {rsmm_f32_16x4__avx512vnni, "rsmm_f32_16x4__avx512vnni", Mode::kF32, Operand::kDigits, 4, has_avx512vnni},
      {rsmm_i8_16x4__avx512vnni, "rsmm_i8_16x4__avx512vnni", Mode::kInt8, Operand::kInt8, 4, has_avx512vnni},
#endif
#if defined(__aarch64__)
      {rsmm_f32_16x4__neon, "rsmm_f32_16x4__neon", Mode::kF32, Operand::kFloat, 4, always},
      {rsmm_i8_16x4__neon, "rsmm_i8_16x4__neon", Mode::kInt8, Operand::kInt8, 4, always},
      {rsmm_i8_16x4__neondot, "rsmm_i8_16x4__neondot", Mode::kInt8, Operand::kInt8, 4, has_dotprod},
#endif
  };
  return kernels;
}

const KernelInfo& select_kernel(Mode mode, int64_t num_slices) {
  const auto fits = [&](const KernelInfo& k) {
    return k.supported() && num_slices <= k.max_slices;
  };
  const char* forced = std::getenv("MOBIQ_KERNEL");
  const std::string want = forced ? forced : "";
  if (!want.empty()) {
    std::string names;
    for (const auto& k : all_kernels()) {
      const bool reference = k.fn == rsmm_f32_reference;
      const bool match = (k.name == want && (k.mode == mode || reference)) || (want == "reference" && reference) ||
                         (want == "portable" && k.max_slices == kAny && k.mode == mode && !reference);
      if (match) {
        if (!fits(k))
          throw std::invalid_argument("[ResidualSliceMatMul] MOBIQ_KERNEL=" + want + " cannot run here (CPU support, k <= " +
                                      std::to_string(k.max_slices) + "); got num_slices=" + std::to_string(num_slices));
        return k;
      }
      names += std::string(names.empty() ? "" : ", ") + k.name;
    }
    throw std::invalid_argument("[ResidualSliceMatMul] MOBIQ_KERNEL expected one of reference, portable, " + names +
                                "; got '" + want + "'");
  }
  const KernelInfo* best = nullptr;
  for (const auto& k : all_kernels())
    if (k.mode == mode && k.fn != rsmm_f32_reference && fits(k)) best = &k;
  return *best;  // the scalar kernel of each mode always fits
}

}  // namespace mobiq
