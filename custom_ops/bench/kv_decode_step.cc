// Where a long-context decode step's attention time goes (docs/design.md, "The KV cache"): SmolLM2-135M's
// shapes (30 layers x 3 kv heads x 3 query rows, head size 64) at P cached positions, each layer a
// separate cache so that the step streams from memory as in the model, split into tasks over 2 threads as
// the op does (about 8 per layer, at least 256 positions each). Rows, each the best of 20 steps after 3 warm-ups:
//   attention      the kernel over every layer's cache
//   stream         the same cache bytes read and nothing computed (the memory floor)
//   weights        a 2.7 MB-per-layer stream standing in for the layers' 81 MB of weights
//   weights+attn   both, per layer, as a step does them
// Prints one JSON object. Build and run: make bench-kv-attention (P=4096 FORMAT=8).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "mobiq/attention.h"

using namespace mobiq;

namespace {

constexpr int kLayers = 30, kHeads = 3, kRows = 3, kDim = 64;
constexpr size_t kWeightBytes = 2700000 / 64 * 64;

// Reads n bytes (a multiple of 64) and computes next to nothing: the compiler vectorizes the XOR.
uint64_t stream(const uint8_t* p, size_t n) {
  uint64_t acc[8] = {};
  for (size_t i = 0; i + 64 <= n; i += 64)
    for (int j = 0; j < 8; ++j) {
      uint64_t x;
      std::memcpy(&x, p + i + 8 * j, 8);
      acc[j] ^= x;
    }
  return acc[0] ^ acc[1] ^ acc[2] ^ acc[3] ^ acc[4] ^ acc[5] ^ acc[6] ^ acc[7];
}

double best_ms(const std::function<void()>& step) {
  for (int i = 0; i < 3; ++i) step();
  double best = 1e30;
  for (int i = 0; i < 20; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    step();
    best = std::min(best, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s POSITIONS BITS (16, 8 or 4)\n", argv[0]);
    return 2;
  }
  const int P = std::atoi(argv[1]);
  const std::string bits = argv[2];
  if (P <= 0 || (bits != "16" && bits != "8" && bits != "4")) {
    std::fprintf(stderr, "expected POSITIONS > 0 and BITS 16, 8 or 4; got %s %s\n", argv[1], argv[2]);
    return 2;
  }
  const KvLayout l = kv_layout(bits == "16" ? KvFormat::kF16 : bits == "8" ? KvFormat::kInt8 : KvFormat::kInt4, kDim);
  const size_t head_bytes = static_cast<size_t>((P + kKvBlock - 1) / kKvBlock * l.block_bytes + 63) / 64 * 64;
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  std::vector<float> x(kDim);
  std::vector<uint8_t*> keys(kLayers * kHeads), values(kLayers * kHeads), weights(kLayers);
  for (int i = 0; i < kLayers * kHeads; ++i) {
    keys[i] = static_cast<uint8_t*>(std::aligned_alloc(64, head_bytes));
    values[i] = static_cast<uint8_t*>(std::aligned_alloc(64, head_bytes));
    for (int p = 0; p < P; ++p) {
      for (float& v : x) v = normal(rng);
      kv_store(l, true, x.data(), keys[i] + (p / kKvBlock) * l.block_bytes, p % kKvBlock);
      kv_store(l, false, x.data(), values[i] + (p / kKvBlock) * l.block_bytes, p % kKvBlock);
    }
  }
  for (int i = 0; i < kLayers; ++i) {
    weights[i] = static_cast<uint8_t*>(std::aligned_alloc(64, kWeightBytes));
    std::memset(weights[i], i, kWeightBytes);
  }
  std::vector<float> q(kRows * kDim);
  for (float& v : q) v = normal(rng) * 0.125f;
  const AttentionKernel& kernel = select_attention_kernel();
  const int chunk = static_cast<int>(kv_decode_chunk(P, kHeads));  // the op's decode split
  const int chunks = (P + chunk - 1) / chunk, tasks = kHeads * chunks;
  std::vector<float> acc(static_cast<size_t>(tasks * kRows * kDim)), m(tasks * kRows), sums(tasks * kRows);
  const std::vector<int64_t> first(kRows, 0), last(kRows, P - 1);
  volatile uint64_t sink = 0;

  const auto weight_pass = [&](int layer) {
#pragma omp parallel for schedule(static) num_threads(2)
    for (int t = 0; t < 2; ++t) sink = sink + stream(weights[layer] + t * (kWeightBytes / 2), kWeightBytes / 2);
  };
  const auto attention_pass = [&](int layer) {
#pragma omp parallel for schedule(dynamic) num_threads(2)
    for (int t = 0; t < tasks; ++t) {
      const int h = t / chunks, c = t % chunks;
      AttentionArgs a;
      a.layout = l;
      a.keys = keys[layer * kHeads + h], a.values = values[layer * kHeads + h], a.q = q.data();
      a.first = first.data(), a.last = last.data(), a.rows = kRows;
      a.key_begin = c * chunk, a.key_end = std::min(P, (c + 1) * chunk);
      a.acc = acc.data() + t * kRows * kDim, a.m = m.data() + t * kRows, a.l = sums.data() + t * kRows;
      kernel.fn(a);
    }
  };
  const auto stream_pass = [&](int layer) {
#pragma omp parallel for schedule(dynamic) num_threads(2)
    for (int t = 0; t < 2 * kHeads; ++t)
      sink = sink + stream(t < kHeads ? keys[layer * kHeads + t] : values[layer * kHeads + t - kHeads], head_bytes);
  };
  const auto layers = [&](std::initializer_list<std::function<void(int)>> passes) {
    return [&, passes] {
      for (int layer = 0; layer < kLayers; ++layer)
        for (const auto& pass : passes) pass(layer);
    };
  };
  const double attention = best_ms(layers({attention_pass})), streamed = best_ms(layers({stream_pass}));
  const double weights_only = best_ms(layers({weight_pass})), both = best_ms(layers({weight_pass, attention_pass}));
  std::printf(
      "{\"kernel\": \"%s\", \"positions\": %d, \"kv_bits\": %s, \"kv_mb_per_step\": %.1f, \"attention_ms\": %.3f, "
      "\"stream_ms\": %.3f, \"attention_over_stream\": %.2f, \"weights_ms\": %.3f, \"weights_plus_attention_ms\": %.3f}\n",
      kernel.name, P, bits.c_str(), 2.0 * kLayers * kHeads * head_bytes / 1e6, attention, streamed, attention / streamed,
      weights_only, both);
  return 0;
}
