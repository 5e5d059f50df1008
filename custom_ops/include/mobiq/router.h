// The fused token router (no ONNX Runtime in here): per token, the number of slices to read.
#pragma once

#include <cstdint>
#include <vector>

namespace mobiq {

struct RouterArgs {
  const float* x;         // [M, K] activations
  const int8_t* w1;       // [K, H] hidden weights, int8 per hidden unit: W1[k, j] = w1[k, j] * w1_scale[j]
  const float* w1_scale;  // [H]
  const float* b1;        // [H]
  const float* w2;        // [H]
  float b2;
  const float* tau;       // [num_tau] thresholds of the current budget, for slices 2 .. num_tau + 1
  int64_t num_tau, K, H;
  int32_t* counts;        // [M] out: 1 + #(score > tau_j)
};

using RouteFn = void (*)(const RouterArgs& a, int64_t t0, int64_t t1);

struct RouterVariant {
  const char* name;         // route_<compute>__<isa>
  RouteFn fn;
  bool (*fits)(int64_t H);  // this CPU runs it, for this hidden size
};

// The variants compiled in, portable first (tests and benchmarks run each).
const std::vector<RouterVariant>& router_variants();

// Tokens [t0, t1): the fastest variant that fits this CPU and H.
void route_tokens(const RouterArgs& a, int64_t t0, int64_t t1);
void route_tokens_portable(const RouterArgs& a, int64_t t0, int64_t t1);

}  // namespace mobiq
