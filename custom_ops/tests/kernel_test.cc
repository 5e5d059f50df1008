// mobiq_kernel_test: every kernel of all_kernels() that this CPU runs, held to
// rsmm_f32_reference (float64 dequantize, then multiply) on a fixed edge-case
// grid, and the MOBIQ_KERNEL override of select_kernel. No ONNX Runtime.
//
// Grid: g in {16, 32, 64, 128}, K = g and 3g; N in {1, 3, 16, 17, 64}; M in {1, 2, 5, 7}; per-token slice counts mixed,
// all 1, all S (S = 4); bias on/off and unaligned operands (x, slices, scales,
// zero points, bias and y one element / byte past an aligned allocation) take
// turns. Random data from fixed seeds. The slices buffer ends after the largest
// slice count in use, so a read of a later slice is out of bounds (ASan build).
// Each kernel runs as the ORT glue runs it (rsmm_op.cc): prepare_activations,
// tokens grouped by slice count, rows in blocks of 32.
// Tolerances: kF32 max |y - ref| <= 1e-5 max |ref| + 1e-6. kInt8: the kF32
// bound against the portable int8 kernel (same quantized activations, exact
// integer dots), and relative Frobenius <= 2e-2 against the reference when the
// output has at least 16 values (over fewer, that norm measures luck: one y
// near 0 by cancellation makes the int8 rounding error look large).
// Extremes: all codes 3 (or 2) with activations at +-max, where integer partial
// sums peak; the same over one group of kMaxGroupSize columns, where the int32 sums come
// within 0.4 % of overflowing.
// Non-finite activations: a NaN, +Inf or -Inf in one token makes that token's row all NaN in
// every kernel, the other rows bitwise what they are with the token finite; tiny activations
// (1e-40) stay finite. Prints one line per failure, one per kernel, the automatic choices, and last
// "N passed, M failed"; exits 1 on any failure.
// KV cache: kv_store/kv_load within half a quantization step (fp16: 2^-10 relative) for every
// format; every attention variant within 1e-5 of attention_reference on caches of every format (the
// integer-dot variant: on its int8-coded queries, plus the bound of its int16-coded value weights), with
// NaN stored at the positions no row sees (they must never be read into a sum).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "mobiq/attention.h"
#include "mobiq/format.h"
#include "mobiq/kernels.h"
#include "mobiq/router.h"

namespace {

using mobiq::KernelInfo;
using mobiq::Mode;

constexpr int kS = 4;
constexpr int64_t kRowsPerBlock = 32;  // as the ORT glue for N < 2048: row tiles in pairs, tails
int passed = 0, failed = 0;

void check(bool ok, const std::string& what) {
  if (ok) {
    ++passed;
  } else {
    ++failed;
    std::printf("FAIL %s\n", what.c_str());
  }
}

// ---- problems ---------------------------------------------------------------

struct Problem {
  int64_t M, K, N, g;
  std::string counts;  // mixed, all-1, all-4
  bool bias, unaligned;
  std::vector<int32_t> slice_count;          // per token
  std::vector<float> x, scales, zps, bias_v;  // each starts `off` elements into its buffer
  std::vector<uint8_t> slices;                // the first max-count slices (format.h), `off` bytes in
  size_t off;

  std::string describe() const {
    return "M=" + std::to_string(M) + " K=" + std::to_string(K) + " N=" + std::to_string(N) +
           " g=" + std::to_string(g) + " counts=" + counts + " bias=" + std::to_string(bias) +
           " unaligned=" + std::to_string(unaligned);
  }
};

Problem make_problem(int64_t M, int64_t K, int64_t N, int64_t g, const std::string& counts, bool bias,
                     bool unaligned, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> scale(0.02f, 0.1f), zero(0.0f, 3.5f);
  std::uniform_int_distribution<int> count(1, kS), byte(0, 255);
  Problem p{M, K, N, g, counts, bias, unaligned, {}, {}, {}, {}, {}, {}, unaligned ? 1u : 0u};
  int max_count = 1;
  for (int64_t t = 0; t < M; ++t) {
    p.slice_count.push_back(counts == "mixed" ? count(rng) : counts == "all-1" ? 1 : kS);
    max_count = std::max(max_count, p.slice_count.back());
  }
  const auto fill = [&](std::vector<float>& v, size_t n, auto&& draw) {
    v.assign(p.off + n, NAN);
    for (size_t i = 0; i < n; ++i) v[p.off + i] = draw(rng);
  };
  const size_t groups = static_cast<size_t>(N * (K / g));
  fill(p.x, static_cast<size_t>(M * K), normal);
  fill(p.scales, groups, scale);
  fill(p.zps, groups, zero);
  if (bias) fill(p.bias_v, static_cast<size_t>(N), normal);
  p.slices.resize(p.off + static_cast<size_t>(max_count) * mobiq::slice_bytes(N, K));
  for (size_t i = p.off; i < p.slices.size(); ++i) p.slices[i] = static_cast<uint8_t>(byte(rng));
  return p;
}

// y of `kernel` on `p`, run as rsmm_op.cc runs it (y starts as `fill`: an output never written shows).
std::vector<float> run(const KernelInfo& kernel, const Problem& p, float fill = NAN) {
  std::vector<float> y(p.off + static_cast<size_t>(p.M * p.N), fill);
  mobiq::RsmmArgs args{};
  args.slices = p.slices.data() + p.off;
  args.scales = p.scales.data() + p.off;
  args.zero_points = p.zps.data() + p.off;
  args.bias = p.bias ? p.bias_v.data() + p.off : nullptr;
  args.y = y.data() + p.off;
  args.M = p.M, args.K = p.K, args.N = p.N, args.group_size = p.g, args.num_slices = kS;
  mobiq::TileParams params;
  mobiq::build_tile_params(kernel.mode, args.scales, args.zero_points, p.N, p.K / p.g, params);
  mobiq::use_tile_params(params, args);
  mobiq::ActivationBuffers buffers;
  mobiq::prepare_activations(kernel.operand, p.x.data() + p.off, p.M, p.K, p.g, buffers, args);
  for (int64_t n0 = 0; n0 < p.N; n0 += kRowsPerBlock)
    for (int k = 1; k <= kS; ++k) {
      std::vector<int32_t> tokens;
      for (int64_t t = 0; t < p.M; ++t)
        if (p.slice_count[static_cast<size_t>(t)] == k) tokens.push_back(static_cast<int32_t>(t));
      if (!tokens.empty())
        kernel.fn(args, tokens.data(), static_cast<int64_t>(tokens.size()), k, n0, std::min(p.N, n0 + kRowsPerBlock));
    }
  return std::vector<float>(y.begin() + static_cast<std::ptrdiff_t>(p.off), y.end());
}

// ---- comparison ---------------------------------------------------------------

// Empty if y is within tolerance of ref, else what went wrong and where.
std::string compare(const std::vector<float>& y, const std::vector<float>& ref, int64_t N, bool frobenius) {
  double max_ref = 0.0, max_err = 0.0, sq_err = 0.0, sq_ref = 0.0;
  size_t worst = 0;
  for (size_t i = 0; i < y.size(); ++i) {
    const double err = std::fabs(static_cast<double>(y[i]) - ref[i]);
    if (!(err <= max_err)) max_err = std::isnan(err) ? INFINITY : err, worst = i;  // NaN counts as worst
    max_ref = std::fmax(max_ref, std::fabs(ref[i]));
    sq_err += err * err, sq_ref += static_cast<double>(ref[i]) * ref[i];
  }
  const double value = frobenius ? std::sqrt(sq_err / std::fmax(sq_ref, 1e-300)) : max_err;
  const double bound = frobenius ? 2e-2 : 1e-5 * max_ref + 1e-6;
  if (value <= bound) return "";
  char msg[256];
  std::snprintf(msg, sizeof msg, "%s %.3g > %.3g, worst at [t=%lld, n=%lld]: got %.7g, want %.7g",
                frobenius ? "relative Frobenius error" : "max |y - ref|", value, bound,
                static_cast<long long>(worst / static_cast<size_t>(N)), static_cast<long long>(worst % static_cast<size_t>(N)),
                static_cast<double>(y[worst]), static_cast<double>(ref[worst]));
  return msg;
}

const KernelInfo& kernel_named(const std::string& name) {
  for (const auto& k : mobiq::all_kernels())
    if (name == k.name) return k;
  throw std::logic_error("no kernel " + name);
}

// The int8 mode's tile parameters: binary16 bit patterns of IEEE 754 (normal, largest, subnormal,
// round to nearest even), and every s1, s1 z1 within half a binary16 step of the row's largest.
void test_tile_params() {
  struct Known {
    float value;
    uint16_t bits;
    bool exact;  // value is a binary16 number (else a tie that rounds to the even neighbour)
  };
  const Known known[] = {{1.0f, 0x3C00, true},         {-2.0f, 0xC000, true},          {65504.0f, 0x7BFF, true},
                         {0x1p-24f, 0x0001, true},      {0.1f, 0x2E66, false},          {1.0f + 0x1p-11f, 0x3C00, false},
                         {1.0f + 0x3p-11f, 0x3C02, false}};
  for (const Known& k : known) {
    check(mobiq::to_half(k.value) == k.bits, "to_half(" + std::to_string(k.value) + ") expected " +
                                                  std::to_string(k.bits) + "; got " + std::to_string(mobiq::to_half(k.value)));
    check(!k.exact || mobiq::from_half(k.bits) == k.value, "from_half(" + std::to_string(k.bits) + ") expected " +
                                                               std::to_string(k.value));
  }
  const int64_t N = 17, G = 3;  // row 16 alone in its tile; row 3 all zero (scales 0 are graph-input values)
  std::vector<float> s(N * G), z(N * G);
  for (int64_t i = 0; i < N * G; ++i) s[i] = std::ldexp(1.0f + 0.37f * (i % 5), -static_cast<int>(i % 13)), z[i] = 1.5f - (i % 7);
  for (int64_t g = 0; g < G; ++g) s[3 * G + g] = 0.0f;
  mobiq::TileParams params;
  mobiq::build_tile_params(Mode::kInt8, s.data(), z.data(), N, G, params);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < G; ++g) {
      const size_t at = static_cast<size_t>(2 * ((n / 16) * G + g) * 16 + n % 16);
      const double r = params.row_scales[static_cast<size_t>(n)];
      const double got_s = r * mobiq::from_half(params.halves[at]), got_o = r * mobiq::from_half(params.halves[at + 16]);
      const double want_s = s[n * G + g], want_o = static_cast<double>(s[n * G + g]) * z[n * G + g];
      check(std::fabs(got_s - want_s) <= 0x1p-12 * r && std::fabs(got_o - want_o) <= 0x1p-12 * r,
            "tile params row " + std::to_string(n) + " group " + std::to_string(g));
    }
}

void test_kernels_on_grid() {
  const KernelInfo& reference = kernel_named("rsmm_f32_reference");
  const KernelInfo& portable_i8 = kernel_named("rsmm_i8_1x1__scalar");
  std::vector<int> cases(mobiq::all_kernels().size(), 0);
  uint32_t index = 0;
  for (int64_t g : {16, 32, 64, 128})
    for (int64_t groups : {1, 3})
      for (int64_t N : {1, 3, 16, 17, 64})
        for (const char* counts : {"mixed", "all-1", "all-4"})
          for (int64_t M : {1, 2, 5, 7}) {
            ++index;
            const bool bias = index % 3 == 1, unaligned = index % 5 < 2;  // periods prime to M's: all pairs occur
            const Problem p = make_problem(M, g * groups, N, g, counts, bias, unaligned, index);
            const std::vector<float> ref = run(reference, p), ref_i8 = run(portable_i8, p);
            for (size_t i = 0; i < mobiq::all_kernels().size(); ++i) {
              const KernelInfo& k = mobiq::all_kernels()[i];
              if (&k == &reference || !k.supported() || kS > k.max_slices) continue;
              ++cases[i];
              const std::vector<float> y = run(k, p);
              const bool i8 = k.mode == Mode::kInt8;
              std::string why = i8 && M * N < 16 ? "" : compare(y, ref, N, i8);
              if (why.empty() && i8 && &k != &portable_i8) {
                why = compare(y, ref_i8, N, false);
                if (!why.empty()) why = "against rsmm_i8_1x1__scalar: " + why;
              }
              check(why.empty(), std::string(k.name) + " " + p.describe() + ": " + why);
            }
          }
  for (size_t i = 0; i < mobiq::all_kernels().size(); ++i) {
    const KernelInfo& k = mobiq::all_kernels()[i];
    if (&k == &reference) continue;
    if (k.supported())
      std::printf("kernel %s: %d grid cases\n", k.name, cases[i]);
    else
      std::printf("kernel %s: not supported on this CPU, skipped\n", k.name);
  }
}

// Largest integer partial sums: every code 3 (Q(k) = 4^k - 1) or 2, activations at +-max (int8
// +-127), one sign or alternating — where a 16-bit intermediate sum would saturate.
void test_kernels_at_extremes() {
  const KernelInfo& reference = kernel_named("rsmm_f32_reference");
  const KernelInfo& portable_i8 = kernel_named("rsmm_i8_1x1__scalar");
  int cases = 0;
  uint32_t index = 1000;
  for (int64_t g : {16, 128})
    for (uint8_t code_byte : {uint8_t{0xFF}, uint8_t{0xAA}})
      for (int sign : {1, -1, 0})  // 0: alternating
        for (int k = 1; k <= kS; ++k) {
          Problem p = make_problem(3, 2 * g, 17, g, "all-4", false, false, ++index);
          std::fill(p.slices.begin(), p.slices.end(), code_byte);
          for (size_t c = 0; c < p.x.size(); ++c) p.x[c] = sign ? static_cast<float>(sign) : (c % 2 ? -1.0f : 1.0f);
          std::fill(p.slice_count.begin(), p.slice_count.end(), k);
          const std::vector<float> ref = run(reference, p), ref_i8 = run(portable_i8, p);
          for (const KernelInfo& kernel : mobiq::all_kernels()) {
            if (&kernel == &reference || !kernel.supported() || kS > kernel.max_slices) continue;
            ++cases;
            const bool i8 = kernel.mode == Mode::kInt8;
            const std::string why = compare(run(kernel, p), i8 ? ref_i8 : ref, p.N, false);
            check(why.empty(), std::string(kernel.name) + " extremes k=" + std::to_string(k) + " code byte " +
                                   std::to_string(code_byte) + " sign " + std::to_string(sign) + " " + p.describe() +
                                   ": " + why);
          }
        }
  std::printf("extremes: %d cases\n", cases);
}

// One group of kMaxGroupSize columns (the glue's limit), every code 3, activations where the
// integer kernels' int32 sums peak: int8 127 (x = +-1), or base-256 digits -128, -128 (exact mode:
// one column at 1, the others at -32896 / (2^22 - 1)). Float-operand kernels have no integer sums
// (and float32 sums over 2^16 columns exceed the grid's tolerance): not run here.
void test_kernels_at_max_group() {
  const KernelInfo& reference = kernel_named("rsmm_f32_reference");
  const KernelInfo& portable_i8 = kernel_named("rsmm_i8_1x1__scalar");
  const int64_t g = mobiq::kMaxGroupSize;
  int cases = 0;
  for (int pattern : {1, -1, 2})
    for (int k = 1; k <= kS; ++k) {
      Problem p = make_problem(3, g, 16, g, "all-4", false, false, 3000 + static_cast<uint32_t>(k));
      std::fill(p.slices.begin(), p.slices.end(), uint8_t{0xFF});
      for (size_t c = 0; c < p.x.size(); ++c)
        p.x[c] = pattern != 2 ? static_cast<float>(pattern) : c % g == 0 ? 1.0f : -32896.0f / 4194303.0f;
      std::fill(p.slice_count.begin(), p.slice_count.end(), k);
      const std::vector<float> ref = run(reference, p), ref_i8 = run(portable_i8, p);
      for (const KernelInfo& kernel : mobiq::all_kernels()) {
        if (kernel.operand == mobiq::Operand::kFloat || !kernel.supported() || kS > kernel.max_slices) continue;
        ++cases;
        const bool i8 = kernel.mode == Mode::kInt8;
        const std::string why = compare(run(kernel, p), i8 ? ref_i8 : ref, p.N, false);
        check(why.empty(), std::string(kernel.name) + " group_size " + std::to_string(g) + " k=" + std::to_string(k) +
                               " pattern " + std::to_string(pattern) + ": " + why);
      }
    }
  std::printf("max group: %d cases\n", cases);
}

// ---- non-finite activations -------------------------------------------------------

// Token `bad` of a problem gets `value` at column `col` (and, for `both`, -value at the last
// column): every kernel (the reference too) gives that row all NaN and the other rows bitwise what
// it gives on the clean problem; prepare_activations lists that token and no other, for every
// operand type.
void test_nonfinite_tokens() {
  int cases = 0;
  uint32_t index = 2000;
  for (float value : {NAN, INFINITY, -INFINITY})
    for (bool both : {false, true})
      for (int64_t M : {1, 5, 7})
        for (int64_t g : {16, 64}) {
          ++index;
          if (both && std::isnan(value)) continue;
          const Problem clean = make_problem(M, 3 * g, 17, g, "mixed", index % 2 == 0, index % 3 == 0, index);
          Problem p = clean;
          const int64_t bad = M / 2, col = (index % 3) * (g + 5) % p.K;
          p.x[p.off + static_cast<size_t>(bad * p.K + col)] = value;
          if (both) p.x[p.off + static_cast<size_t>(bad * p.K + p.K - 1)] = -value;
          const std::string what = " value " + std::to_string(value) + (both ? " and its negative" : "") +
                                   " at token " + std::to_string(bad) + " column " + std::to_string(col) + " " +
                                   p.describe();
          for (mobiq::Operand operand : {mobiq::Operand::kFloat, mobiq::Operand::kInt8, mobiq::Operand::kDigits}) {
            mobiq::ActivationBuffers buffers;
            mobiq::RsmmArgs args{};
            mobiq::prepare_activations(operand, p.x.data() + p.off, p.M, p.K, p.g, buffers, args);
            check(buffers.nonfinite == std::vector<int32_t>{static_cast<int32_t>(bad)},
                  "prepare_activations operand " + std::to_string(static_cast<int>(operand)) + " lists " +
                      std::to_string(buffers.nonfinite.size()) + " non-finite tokens;" + what);
          }
          for (const KernelInfo& kernel : mobiq::all_kernels()) {
            if (!kernel.supported() || kS > kernel.max_slices) continue;
            ++cases;
            const std::vector<float> want = run(kernel, clean, 1e30f), y = run(kernel, p, 1e30f);
            std::string why;
            for (int64_t t = 0; t < M && why.empty(); ++t)
              for (int64_t n = 0; n < p.N && why.empty(); ++n) {
                const float got = y[static_cast<size_t>(t * p.N + n)], ok = want[static_cast<size_t>(t * p.N + n)];
                if (t == bad ? !std::isnan(got) : !(got == ok))
                  why = "[t=" + std::to_string(t) + ", n=" + std::to_string(n) + "] got " + std::to_string(got) +
                        "; want " + (t == bad ? std::string("NaN") : std::to_string(ok));
              }
            check(why.empty(), std::string(kernel.name) + what + ": " + why);
          }
        }
  // Tiny activations: max |x| of a group below levels / FLT_MAX (no float -> int overflow).
  const KernelInfo& reference = kernel_named("rsmm_f32_reference");
  const KernelInfo& portable_i8 = kernel_named("rsmm_i8_1x1__scalar");
  for (int64_t g : {16, 64}) {
    Problem p = make_problem(3, 2 * g, 17, g, "mixed", true, false, ++index);
    for (int64_t c = 0; c < p.K; ++c) p.x[p.off + static_cast<size_t>(p.K + c)] *= 1e-40f;  // token 1
    const std::vector<float> ref = run(reference, p), ref_i8 = run(portable_i8, p);
    for (const KernelInfo& kernel : mobiq::all_kernels()) {
      if (&kernel == &reference || !kernel.supported() || kS > kernel.max_slices) continue;
      ++cases;
      const std::vector<float> y = run(kernel, p);
      std::string why = compare(y, kernel.mode == Mode::kInt8 ? ref_i8 : ref, p.N, false);
      for (float v : y)
        if (!std::isfinite(v)) why = "non-finite output " + std::to_string(v);
      check(why.empty(), std::string(kernel.name) + " tiny activations " + p.describe() + ": " + why);
    }
  }
  std::printf("non-finite: %d cases\n", cases);
}

// ---- the router ------------------------------------------------------------------

// Every router variant this CPU runs, at every hidden size it takes (8 .. 128, and 24 for the
// portable fallback), against float64 on random problems, thresholds at score quantiles; ties within
// 1e-4 may round either way.
void test_router() {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  int cases = 0;
  for (int64_t H : {8, 16, 24, 32, 64, 128})
    for (int64_t K : {64, 576, 97})
      for (int64_t M : {1, 3, 9}) {
        std::vector<float> x(static_cast<size_t>(M * K)), w1_scale(H), b1(H), w2(H);
        std::vector<int8_t> w1(static_cast<size_t>(K * H));
        std::uniform_int_distribution<int> int8(-127, 127);
        for (auto& v : x) v = normal(rng);
        for (auto& v : w1) v = static_cast<int8_t>(int8(rng));
        for (auto& v : w1_scale) v = 0.001f + std::fabs(normal(rng)) / 500;
        for (auto& v : b1) v = normal(rng) / 4;
        for (auto& v : w2) v = normal(rng);
        std::vector<double> score(static_cast<size_t>(M));
        for (int64_t t = 0; t < M; ++t) {
          double s = 0.1;
          for (int64_t j = 0; j < H; ++j) {
            double h = 0.0;
            for (int64_t k = 0; k < K; ++k) h += static_cast<double>(x[t * K + k]) * w1[k * H + j];
            s += std::fmax(h * w1_scale[j] + b1[j], 0.0) * w2[j];
          }
          score[t] = s;
        }
        std::vector<double> sorted = score;
        std::sort(sorted.begin(), sorted.end());
        const std::vector<float> tau = {static_cast<float>(sorted[0] - 1), static_cast<float>(sorted[M / 2]) + 1e-3f,
                                        static_cast<float>(sorted[M - 1]) + 1.0f};
        std::vector<mobiq::RouterVariant> variants = mobiq::router_variants();
        variants.push_back({"route_tokens", mobiq::route_tokens, [](int64_t) { return true; }});
        for (const auto& variant : variants) {
          if (!variant.fits(H)) continue;
          const auto fn = variant.fn;
          std::vector<int32_t> counts(static_cast<size_t>(M), -1);
          const mobiq::RouterArgs args{x.data(), w1.data(), w1_scale.data(), b1.data(), w2.data(), 0.1f,
                                       tau.data(), 3, K, H, counts.data()};
          fn(args, 0, M);
          for (int64_t t = 0; t < M; ++t) {
            int32_t want = 1;
            bool tie = false;
            for (float v : tau) want += score[t] > v, tie |= std::fabs(score[t] - v) < 1e-4;
            ++cases;
            check(tie || counts[t] == want, std::string(variant.name) +
                                                " H=" + std::to_string(H) + " K=" + std::to_string(K) + " t=" +
                                                std::to_string(t) + ": expected " + std::to_string(want) + "; got " +
                                                std::to_string(counts[t]));
          }
        }
      }
  std::printf("router: %d cases (variants:", cases);
  for (const auto& v : mobiq::router_variants()) std::printf(" %s%s", v.name, v.fits(64) ? "" : " (not here)");
  std::printf(")\n");
}

// ---- select_kernel --------------------------------------------------------------

std::string select_name(Mode mode, int64_t num_slices = kS) {
  try {
    return mobiq::select_kernel(mode, num_slices).name;
  } catch (const std::invalid_argument& e) {
    return std::string("error: ") + e.what();
  }
}

void expect_selected(const char* forced, Mode mode, int64_t num_slices, const std::string& want) {
  if (forced) setenv("MOBIQ_KERNEL", forced, 1); else unsetenv("MOBIQ_KERNEL");
  const std::string got = select_name(mode, num_slices);
  const bool ok = want.rfind("error: ", 0) == 0 ? got.find(want.substr(7)) != std::string::npos : got == want;
  check(ok, std::string("select_kernel(") + (mode == Mode::kF32 ? "f32" : "int8") + ", num_slices=" +
                std::to_string(num_slices) + ") with MOBIQ_KERNEL=" + (forced ? forced : "(unset)") + ": expected " +
                want + "; got " + got);
}

void test_select_kernel() {
  for (Mode mode : {Mode::kF32, Mode::kInt8}) {
    const std::string scalar = mode == Mode::kF32 ? "rsmm_f32_1x1__scalar" : "rsmm_i8_1x1__scalar";
    expect_selected("portable", mode, kS, scalar);
    expect_selected("reference", mode, kS, "rsmm_f32_reference");
    expect_selected(nullptr, mode, 8, scalar);  // no SIMD kernel reads 8 slices
    expect_selected("no_such_kernel", mode, kS, "error: expected one of reference, portable, rsmm_f32_reference");
  }
  for (const auto& k : mobiq::all_kernels()) {
    expect_selected(k.name, k.mode, kS, k.supported() ? std::string(k.name) : "error: cannot run here");
    if (k.max_slices < 8) expect_selected(k.name, k.mode, 8, "error: cannot run here");
  }
  unsetenv("MOBIQ_KERNEL");
  std::printf("selected: f32 -> %s, int8 -> %s\n", select_name(Mode::kF32).c_str(), select_name(Mode::kInt8).c_str());
}

}  // namespace

// ---- KV cache and attention ------------------------------------------------------
// Every attention variant this CPU runs against attention_reference (float64) on caches of every
// format (the integer-dot variants over 8- and 4-bit caches: on the queries as kv_quantize_query codes them,
// within the bound of their coded value weights): random keys/values stored with kv_store, rows with their
// own causal/window ranges, a key range that starts and ends inside blocks; positions outside every row's
// range hold NaN (stale bytes must never reach a sum). Plus kv_store/kv_load round trips against the
// documented codes.
void test_kv_store_load() {
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (mobiq::KvFormat f : {mobiq::KvFormat::kF32, mobiq::KvFormat::kF16, mobiq::KvFormat::kInt8, mobiq::KvFormat::kInt4})
    for (int64_t D : {16, 48, 64, 256}) {
      const mobiq::KvLayout l = mobiq::kv_layout(f, D);
      std::vector<uint8_t> block(static_cast<size_t>(l.block_bytes), 0);
      for (bool keys : {true, false}) {
        double worst = 0.0;
        for (int64_t lane = 0; lane < mobiq::kKvBlock; ++lane) {
          std::vector<float> x(static_cast<size_t>(D)), y(static_cast<size_t>(D));
          for (float& v : x) v = normal(rng);
          mobiq::kv_store(l, keys, x.data(), block.data(), lane);
          mobiq::kv_load(l, keys, block.data(), lane, y.data());
          for (int64_t g = 0; g < D / l.group; ++g) {
            float amax = 0.0f;
            for (int64_t i = 0; i < l.group; ++i) amax = std::max(amax, std::fabs(x[static_cast<size_t>(g * l.group + i)]));
            const double step = f == mobiq::KvFormat::kInt8 ? amax / 127.0 : f == mobiq::KvFormat::kInt4 ? amax / 7.0 : 0.0;
            for (int64_t i = 0; i < l.group; ++i) {
              const size_t d = static_cast<size_t>(g * l.group + i);
              const double err = std::fabs(static_cast<double>(y[d]) - x[d]);
              const double bound = step > 0 ? 0.5 * step * (1 + 1e-5) : f == mobiq::KvFormat::kF16 ? std::fabs(x[d]) / 1024.0 : 0.0;
              worst = std::max(worst, err - bound);
            }
          }
        }
        check(worst <= 0.0, "kv_store/kv_load " + std::to_string(l.bits) + " bits D=" + std::to_string(D) +
                                (keys ? " keys" : " values") + ": error beyond half a step by " + std::to_string(worst));
      }
    }
}

void test_attention() {
  std::mt19937 rng(12);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  int64_t count = 0;
  const mobiq::AttentionKernel* kernels = mobiq::attention_kernels(&count);
  for (mobiq::KvFormat f : {mobiq::KvFormat::kF32, mobiq::KvFormat::kF16, mobiq::KvFormat::kInt8, mobiq::KvFormat::kInt4})
    for (int64_t D : {16, 64, 96, 256})
    for (int64_t rows : {1, 2, 3, 4, 5, 9}) {  // <= 4: the decode path (few rows, nothing dequantized to scratch);
                                               // 5, 9: the general one (its rows in fours, and a tail)
      const mobiq::KvLayout l = mobiq::kv_layout(f, D);
      const int64_t positions = 70, blocks = (positions + 15) / 16;
      std::vector<uint8_t> keys(static_cast<size_t>(blocks * l.block_bytes)), values(keys.size());
      std::vector<float> x(static_cast<size_t>(D));
      const int64_t key_begin = 3, key_end = 61;
      const int64_t first[] = {3, 0, 20, 40, 5, 17, 3, 33, 9}, last[] = {3, 60, 47, 60, 33, 18, 60, 59, 9};
      for (int64_t t = 0; t < positions; ++t)
        for (int kv = 0; kv < 2; ++kv) {
          const bool seen = t >= 3 && t <= 60;  // some row sees it
          for (float& v : x) v = seen ? normal(rng) : std::nanf("");
          mobiq::kv_store(l, kv == 0, x.data(), (kv == 0 ? keys : values).data() + (t / 16) * l.block_bytes, t % 16);
        }
      const bool integer_keys = f == mobiq::KvFormat::kInt8 || f == mobiq::KvFormat::kInt4;
      double max_value_scale = 0.0;  // over the stored positions (the unseen ones hold NaN scales)
      for (int64_t b = 0; b < blocks; ++b)
        if (integer_keys)
          for (int64_t i = 0; i < l.groups * 16; ++i) {
            float sc;
            std::memcpy(&sc, values.data() + b * l.block_bytes + l.code_bytes + 4 * i, 4);
            if (std::isfinite(sc)) max_value_scale = std::max<double>(max_value_scale, sc);
          }
      std::vector<float> q(static_cast<size_t>(rows * D));
      for (float& v : q) v = 0.3f * normal(rng);
      const auto run = [&](mobiq::AttentionFn fn, std::vector<float>& acc, std::vector<float>& m, std::vector<float>& lsum) {
        acc.assign(static_cast<size_t>(rows * D), 7.0f);
        m.assign(rows, 7.0f);
        lsum.assign(rows, 7.0f);
        mobiq::AttentionArgs a{l, keys.data(), values.data(), q.data(), first, last, rows, key_begin, key_end,
                               acc.data(), m.data(), lsum.data()};
        fn(a);
      };
      std::vector<float> ra, rm, rl, qa, qm, ql;
      run(mobiq::attention_reference, ra, rm, rl);
      // The integer-dot variants' reference: the same task on the queries as kv_quantize_query codes them.
      if (integer_keys) {
        const std::vector<float> exact = q;
        std::vector<int8_t> codes(static_cast<size_t>(D));
        std::vector<float> scales(static_cast<size_t>(l.groups));
        for (int64_t r = 0; r < rows; ++r) {
          mobiq::kv_quantize_query(l, exact.data() + r * D, codes.data(), scales.data());
          for (int64_t d = 0; d < D; ++d) q[static_cast<size_t>(r * D + d)] = codes[static_cast<size_t>(d)] * scales[static_cast<size_t>(d / l.group)];
        }
        run(mobiq::attention_reference, qa, qm, ql);
        q = exact;
      }
      for (int64_t k = 0; k < count; ++k) {
        if (!kernels[k].supported()) continue;
        const bool quantized = integer_keys && kernels[k].integer_dot;
        const std::vector<float>& want_acc = quantized ? qa : ra;
        const std::vector<float>& want_l = quantized ? ql : rl;
        std::vector<float> ka, km, kl;
        run(kernels[k].fn, ka, km, kl);
        double worst = 0.0;
        bool finite = true;
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t d = 0; d < D; ++d) {
            // normalized outputs acc / l (the running max m cancels)
            const size_t i = static_cast<size_t>(r * D + d);
            const double got = static_cast<double>(ka[i]) / kl[static_cast<size_t>(r)];
            const double want = static_cast<double>(want_acc[i]) / want_l[static_cast<size_t>(r)];
            finite = finite && std::isfinite(got);
            worst = std::max(worst, std::fabs(got - want));
          }
        // Integer-dot 8-bit value sums (D a multiple of 64): each of a row's weights within kValueWeightStep of its
        // block's largest, so each output within that step times 16 positions x 127 (codes) x the largest value
        // scale, the blocks' largest weights summing to at most l.
        const bool coded_weights = kernels[k].integer_dot && f == mobiq::KvFormat::kInt8 && D % 64 == 0;
        const double tolerance = 1e-5 + (coded_weights ? mobiq::kValueWeightStep * 16 * 127 * max_value_scale : 0.0);
        check(finite && worst <= tolerance, std::string(kernels[k].name) + " " + std::to_string(l.bits) + " bits D=" +
                                           std::to_string(D) + " rows=" + std::to_string(rows) + ": max |out - float64| " + std::to_string(worst) +
                                           (finite ? "" : " (non-finite: a stale position was read)"));
      }
    }
  for (int64_t k = 0; k < count; ++k)
    std::printf("attention kernel %s: %s\n", kernels[k].name, kernels[k].supported() ? "tested" : "not supported here");
  std::printf("attention kernel chosen: %s\n", mobiq::select_attention_kernel().name);
}

int main() {
  test_tile_params();
  test_kernels_on_grid();
  test_kernels_at_extremes();
  test_kernels_at_max_group();
  test_nonfinite_tokens();
  test_router();
  test_select_kernel();
  test_kv_store_load();
  test_attention();
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
