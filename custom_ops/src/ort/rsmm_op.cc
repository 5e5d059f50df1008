#include "rsmm_op.h"

#include <algorithm>
#include <cfloat>
#include <charconv>
#include <cmath>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "mobiq/format.h"
#include "mobiq/router.h"

namespace mobiq {
namespace {

[[noreturn]] void fail(const std::string& what) { fail_op(kOpName, what); }

constexpr size_t kRouterFirst = 6, kRouterLast = 12;  // router_w1 .. threshold_row
constexpr const char* kInputNames[] = {"X", "slices", "scales", "zero_points", "slice_counts", "bias",
                                       "router_w1", "router_w1_scale", "router_b1", "router_w2", "router_b2",
                                       "router_thresholds", "threshold_row"};
constexpr ONNXTensorElementDataType kF = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
constexpr ONNXTensorElementDataType kInputTypes[] = {
    kF, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, kF, kF, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, kF,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, kF, kF, kF, kF, kF, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64};

Input get_input(Ort::KernelContext& ctx, size_t index) {
  return get_typed_input(ctx, index, kOpName, kInputNames[index], kInputTypes[index]);
}

void expect_shape(const Input& in, const char* name, const std::vector<int64_t>& want, const std::string& why) {
  mobiq::expect_shape(in, kOpName, name, want, why);
}

// Router weights (inputs 6 .. 11) against K and num_slices.
void check_router(const RsmmKernel& k, RouterWeights& r) {
  if (r.w1.shape.size() != 2 || r.w1.shape[0] != k.K || r.w1.shape[1] < 1)
    fail("router_w1 shape expected [K=" + std::to_string(k.K) + ", H >= 1]; got " + shape_str(r.w1.shape));
  r.H = r.w1.shape[1];
  const std::string h = "H=" + std::to_string(r.H) + " from router_w1";
  expect_shape(r.w1_scale, "router_w1_scale", {r.H}, h);
  expect_shape(r.b1, "router_b1", {r.H}, h);
  expect_shape(r.w2, "router_w2", {r.H}, h);
  if (r.b2.count != 1) fail("router_b2 expected one value; got shape " + shape_str(r.b2.shape));
  if (r.table.shape.size() != 2 || r.table.shape[0] < 1 || r.table.shape[1] != k.num_slices - 1)
    fail("router_thresholds shape expected [G >= 1, num_slices - 1 = " + std::to_string(k.num_slices - 1) + "]; got " +
         shape_str(r.table.shape));
}

// The count every token gets from threshold row `tau` [num_tau] when no score can change it, else 0.
int32_t constant_count(const float* tau, int64_t num_tau) {
  int32_t count = 1;
  for (int64_t j = 0; j < num_tau; ++j) {
    if (tau[j] <= -kThresholdNever) ++count;
    else if (!(tau[j] >= kThresholdNever)) return 0;  // a finite threshold (or NaN): tokens decide
  }
  return count;
}

std::vector<int32_t> constant_counts(const RouterWeights& r) {
  const int64_t rows = r.table.shape[0], num_tau = r.table.shape[1];
  const float* table = r.table.value.GetTensorData<float>();
  std::vector<int32_t> out(static_cast<size_t>(rows));
  for (int64_t i = 0; i < rows; ++i) out[static_cast<size_t>(i)] = constant_count(table + i * num_tau, num_tau);
  return out;
}

// The router inputs from `input(index)` (indices 6 .. 11); false as soon as one has no value.
template <class InputAt>
bool fill_router(RouterWeights& r, InputAt input) {
  Input* slots[] = {&r.w1, &r.w1_scale, &r.b1, &r.w2, &r.b2, &r.table};
  for (size_t i = 0; i < 6; ++i)
    if (!(*slots[i] = input(kRouterFirst + i)).value) return false;
  return true;
}

constexpr int64_t kRouterTokensPerTask = 16;

struct RouterTask {
  const RouterArgs* args;
  int64_t tokens;
};

void route_task(void* data, size_t index) {
  const auto& task = *static_cast<const RouterTask*>(data);
  const int64_t t0 = static_cast<int64_t>(index) * kRouterTokensPerTask;
  route_tokens(*task.args, t0, std::min(task.tokens, t0 + kRouterTokensPerTask));
}

// counts[0 .. M) from the router MLP (tokens in parallel tasks of 16 when there are more).
void run_router(Ort::KernelContext& ctx, const RouterWeights& r, const float* x, const float* tau, int64_t M,
                int64_t K, int32_t* counts) {
  const RouterArgs args{x, r.w1.value.GetTensorData<int8_t>(), r.w1_scale.value.GetTensorData<float>(),
                        r.b1.value.GetTensorData<float>(), r.w2.value.GetTensorData<float>(),
                        *r.b2.value.GetTensorData<float>(), tau, r.table.shape[1], K, r.H, counts};
  if (M <= kRouterTokensPerTask) return route_tokens(args, 0, M);
  RouterTask task{&args, M};
  ctx.ParallelFor(route_task, static_cast<size_t>((M + kRouterTokensPerTask - 1) / kRouterTokensPerTask), 0, &task);
}

struct ParallelTask {
  const RsmmArgs* args;
  RsmmKernelFn fn;
  const std::vector<int32_t>* order;      // token indices grouped by slice count
  const std::vector<int64_t>* starts;     // group k occupies order[starts[k-1] .. starts[k])
  int64_t rows_per_block;
  int64_t num_slices;
};

void run_block(void* data, size_t block) {
  const auto& task = *static_cast<const ParallelTask*>(data);
  const int64_t n0 = static_cast<int64_t>(block) * task.rows_per_block;
  const int64_t n1 = std::min(task.args->N, n0 + task.rows_per_block);
  for (int64_t k = 1; k <= task.num_slices; ++k) {
    const int64_t begin = (*task.starts)[k - 1], end = (*task.starts)[k];
    if (end > begin) task.fn(*task.args, task.order->data() + begin, end - begin, static_cast<int>(k), n0, n1);
  }
}

// The weights' shapes against the attributes (message built only on failure).
void check_weights(const RsmmKernel& k, const RsmmWeights& w) {
  const int64_t groups = k.K / k.group_size;
  auto sizes = [&] {
    return "N=" + std::to_string(k.N) + ", K=" + std::to_string(k.K) + ", group_size=" + std::to_string(k.group_size);
  };
  const std::vector<int64_t> tiles = {k.num_slices, row_tiles(k.N), k.K / kTileCols, kTileBytes}, params = {k.N, groups};
  if (w.slices.shape != tiles)
    expect_shape(w.slices, "slices", tiles,
                 "num_slices=" + std::to_string(k.num_slices) + ", " + sizes() + ", tiles of 16 x 16 codes in 64 bytes");
  if (w.scales.shape != params) expect_shape(w.scales, "scales", params, sizes());
  if (w.zero_points.shape != params) expect_shape(w.zero_points, "zero_points", params, sizes());
  if (w.bias.value && w.bias.shape != std::vector<int64_t>{k.N})
    expect_shape(w.bias, "bias", {k.N}, "N=" + std::to_string(k.N));
}

// Values of constant initializers, checked once at session creation (docs/design.md, "The op"):
// the first value of input `index` that `rule` refuses (kFinite: NaN or infinite; kPositive: also
// <= 0; kNotNaN: NaN) is an error naming the node, the input, its initializer and the value's index.
enum class Values { kFinite, kPositive, kNotNaN };

void check_values(const OrtKernelInfo* info, size_t index, const Input& in, Values rule) {
  const float* v = in.value.GetTensorData<float>();
  size_t i = 0;
  for (; i < in.count; ++i) {
    const float a = std::fabs(v[i]);
    if (!(rule == Values::kNotNaN ? a == a : a <= FLT_MAX && (rule != Values::kPositive || v[i] > 0.0f))) break;
  }
  if (i == in.count) return;
  Ort::ConstKernelInfo kinfo(info);
  const std::string node = kinfo.GetNodeName();
  char value[32];
  *std::to_chars(value, value + sizeof value - 1, v[i]).ptr = '\0';  // shortest text that reads back as v[i]
  std::ostringstream why;
  if (!node.empty()) why << "node '" << node << "': ";
  why << kInputNames[index] << " (input " << index << ", initializer '" << kinfo.GetInputName(index) << "') expected "
      << (rule == Values::kPositive ? "finite values > 0" : rule == Values::kFinite ? "finite values" : "no NaN")
      << "; got " << value << " at [";
  std::vector<int64_t> at(in.shape.size());
  for (size_t d = at.size(), rest = i; d-- > 0; rest /= static_cast<size_t>(in.shape[d]))
    at[d] = static_cast<int64_t>(rest % static_cast<size_t>(in.shape[d]));
  for (size_t d = 0; d < at.size(); ++d) why << (d ? ", " : "") << at[d];
  why << "]";
  fail(why.str());
}

// Inputs 1, 2, 3 and (when the node has it) 5 as constant initializers, type-checked; false when
// any of them is a graph input (then ComputeV2 reads and checks them on every call).
bool constant_weights(const OrtKernelInfo* info, RsmmWeights& w) {
  Ort::ConstKernelInfo kinfo(info);
  const bool has_bias = kinfo.GetInputCount() > 5 && !kinfo.GetInputName(5).empty();
  auto constant = [&](size_t i) { return constant_input(info, i, kOpName, kInputNames[i], kInputTypes[i]); };
  w = {constant(1), constant(2), constant(3), has_bias ? constant(5) : Input{}};
  return w.slices.value && w.scales.value && w.zero_points.value && (!has_bias || w.bias.value);
}

}  // namespace

ONNXTensorElementDataType RsmmOp::GetInputType(size_t index) const { return kInputTypes[index]; }

OrtCustomOpInputOutputCharacteristic RsmmOp::GetInputCharacteristic(size_t index) const {
  return index >= 4 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
}

OrtStatusPtr RsmmOp::CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
  try {
    const int64_t two = kSliceBits, one = kLayoutVersion, exact = 0;
    auto k = std::make_unique<RsmmKernel>();
    k->K = int_attribute(info, kOpName, "K", nullptr);
    k->N = int_attribute(info, kOpName, "N", nullptr);
    k->group_size = int_attribute(info, kOpName, "group_size", nullptr);
    k->num_slices = int_attribute(info, kOpName, "num_slices", nullptr);
    const int64_t slice_bits = int_attribute(info, kOpName, "slice_bits", &two);
    const int64_t layout = int_attribute(info, kOpName, "layout", &one);
    // As MatMulNBits: 0/1 exact float32 compute, 4 int8 activations.
    const int64_t accuracy = int_attribute(info, kOpName, "accuracy_level", &exact);
    std::ostringstream why;
    if (layout != kLayoutVersion)
      why << "layout expected format version " << kLayoutVersion << " (the one this library reads); got unknown version "
          << layout;
    else if (slice_bits != kSliceBits)
      why << "slice_bits expected " << kSliceBits << "; got " << slice_bits;
    else if (k->K <= 0 || k->N <= 0)
      why << "K and N expected > 0; got K=" << k->K << ", N=" << k->N;
    else if (k->group_size <= 0 || k->group_size % kTileCols != 0)
      why << "group_size expected a positive multiple of " << kTileCols << "; got " << k->group_size;
    else if (k->group_size > kMaxGroupSize)
      why << "group_size expected <= " << kMaxGroupSize << " (a group's integer dot products must fit int32); got "
          << k->group_size;
    else if (k->K % k->group_size != 0)
      why << "K % group_size expected 0; got K=" << k->K << ", group_size=" << k->group_size;
    else if (k->num_slices < 1 || k->num_slices > kMaxSlices)
      why << "num_slices expected 1.." << kMaxSlices << "; got " << k->num_slices;
    else if (accuracy != 0 && accuracy != 1 && accuracy != 4)
      why << "accuracy_level expected 0 or 1 (float32) or 4 (int8 activations); got " << accuracy;
    if (!why.str().empty()) fail(why.str());
    k->mode = accuracy == 4 ? Mode::kInt8 : Mode::kF32;
    k->kernel = &select_kernel(k->mode, k->num_slices);
    k->constant = constant_weights(info, k->weights);
    if (k->constant) check_weights(*k, k->weights);
    const RsmmWeights& w = k->weights;  // each constant one, also beside weights that are graph inputs
    if (w.scales.value) check_values(info, 2, w.scales, Values::kPositive);
    if (w.zero_points.value) check_values(info, 3, w.zero_points, Values::kFinite);
    if (w.bias.value) check_values(info, 5, w.bias, Values::kFinite);
    if (k->constant) {
      build_tile_params(k->kernel->mode, k->weights.scales.value.GetTensorData<float>(),
                        k->weights.zero_points.value.GetTensorData<float>(), k->N, k->K / k->group_size, k->tile_params);
    }
    Ort::ConstKernelInfo kinfo(info);
    const size_t given = kinfo.GetInputCount();
    size_t router_inputs = 0;
    for (size_t i = kRouterFirst; i <= kRouterLast && i < given; ++i) router_inputs += !kinfo.GetInputName(i).empty();
    if (router_inputs != 0 && router_inputs != kRouterLast - kRouterFirst + 1)
      fail("router inputs router_w1 .. threshold_row expected all 7 or none; got " + std::to_string(router_inputs));
    k->routed = router_inputs != 0;
    if (k->routed && given > 4 && !kinfo.GetInputName(4).empty())
      fail("slice_counts expected absent when the node has a router (the router computes them); got both");
    if (k->routed) {
      k->router_constant = fill_router(k->router, [&](size_t i) {
        return constant_input(info, i, kOpName, kInputNames[i], kInputTypes[i]);
      });
      if (k->router_constant) {
        check_router(*k, k->router);
        const RouterWeights& r = k->router;
        check_values(info, 7, r.w1_scale, Values::kPositive);
        check_values(info, 8, r.b1, Values::kFinite);
        check_values(info, 9, r.w2, Values::kFinite);
        check_values(info, 10, r.b2, Values::kFinite);
        check_values(info, 11, r.table, Values::kNotNaN);
        k->row_counts = constant_counts(k->router);
      }
    }
    *kernel = k.release();
    return nullptr;
  } catch (const std::exception& e) {
    return to_status(e);
  }
}

OrtStatusPtr RsmmKernel::ComputeV2(OrtKernelContext* context) {
  try {
    Ort::KernelContext ctx(context);
    const Input x = get_input(ctx, 0), given_counts = get_input(ctx, 4);
    RsmmWeights call_weights;
    if (!constant) call_weights = {get_input(ctx, 1), get_input(ctx, 2), get_input(ctx, 3), get_input(ctx, 5)};
    const RsmmWeights& w = constant ? weights : call_weights;
    if (!x.value || !w.slices.value || !w.scales.value || !w.zero_points.value)
      fail("inputs X, slices, scales, zero_points expected; got fewer");
    if (!constant) check_weights(*this, call_weights);
    if (x.shape.empty() || x.shape.back() != K)
      fail("X expected shape [..., K=" + std::to_string(K) + "]; got " + shape_str(x.shape));
    const int64_t M = K ? static_cast<int64_t>(x.count) / K : 0;
    const int64_t groups = K / group_size;
    const float* xf = x.value.GetTensorData<float>();

    // Activations first: their scan also finds the tokens with a NaN or an infinity.
    thread_local ActivationBuffers buffers;
    RsmmArgs args{};
    prepare_activations(kernel->operand, xf, M, K, group_size, buffers, args);

    // Per-token slice counts: given, from the router, or S. `uniform` > 0 when every token has that
    // count (then nothing needs grouping or storing). Per-call buffers are kept per thread (a
    // session may run on several threads at once).
    thread_local std::vector<int32_t> routed_counts;
    const int32_t* counts = nullptr;
    int32_t uniform = static_cast<int32_t>(num_slices);
    if (given_counts.value) {
      if (static_cast<int64_t>(given_counts.count) != M)
        fail("slice_counts expected one count per token (" + std::to_string(M) + " for X shape " +
             shape_str(x.shape) + "); got shape " + shape_str(given_counts.shape));
      counts = given_counts.value.GetTensorData<int32_t>();
      for (int64_t t = 0; t < M; ++t)
        if (counts[t] < 1 || counts[t] > num_slices)
          fail("slice_counts expected values in [1, " + std::to_string(num_slices) + "]; got " +
               std::to_string(counts[t]) + " at token " + std::to_string(t));
      uniform = 0;
    } else if (routed) {
      RouterWeights call_router;
      if (!router_constant) {
        if (!fill_router(call_router, [&](size_t i) { return get_input(ctx, i); }))
          fail("router inputs router_w1 .. router_thresholds expected; got fewer");
        check_router(*this, call_router);
      }
      const RouterWeights& r = router_constant ? router : call_router;
      const Input row = get_input(ctx, 12);
      if (!row.value || row.count != 1)
        fail("threshold_row expected one int64 value; got shape " + (row.value ? shape_str(row.shape) : "none"));
      const int64_t i = *row.value.GetTensorData<int64_t>(), rows = r.table.shape[0];
      if (i < 0 || i >= rows)
        fail("threshold_row expected in [0, " + std::to_string(rows - 1) + "]; got " + std::to_string(i));
      const float* tau = r.table.value.GetTensorData<float>() + i * r.table.shape[1];
      uniform = router_constant ? row_counts[static_cast<size_t>(i)] : constant_count(tau, r.table.shape[1]);
      if (uniform == 0 && M > 0) {
        routed_counts.resize(static_cast<size_t>(M));
        run_router(ctx, r, xf, tau, M, K, routed_counts.data());
        for (const int32_t t : buffers.nonfinite) routed_counts[static_cast<size_t>(t)] = 1;  // its Y is NaN
        counts = routed_counts.data();
      }
    }

    // Tokens grouped by slice count (stable): each group runs as one dense block.
    thread_local std::vector<int64_t> starts;
    thread_local std::vector<int32_t> order;
    starts.assign(static_cast<size_t>(num_slices) + 1, 0);
    order.resize(static_cast<size_t>(M));
    if (counts) {
      for (int64_t t = 0; t < M; ++t) ++starts[static_cast<size_t>(counts[t])];
      for (size_t k = 1; k < starts.size(); ++k) starts[k] += starts[k - 1];
      std::vector<int64_t> fill(starts.begin(), starts.end() - 1);
      for (int64_t t = 0; t < M; ++t) order[static_cast<size_t>(fill[static_cast<size_t>(counts[t] - 1)]++)] = static_cast<int32_t>(t);
    } else {
      for (int64_t t = 0; t < M; ++t) order[static_cast<size_t>(t)] = static_cast<int32_t>(t);
      for (size_t k = static_cast<size_t>(uniform); k < starts.size(); ++k) starts[k] = M;
    }
    if (ctx.GetOutputCount() > 1) {
      auto out_counts = ctx.GetOutput(1, std::vector<int64_t>(x.shape.begin(), x.shape.end() - 1));
      int32_t* c = out_counts.GetTensorMutableData<int32_t>();
      if (counts) std::copy(counts, counts + M, c);
      else std::fill(c, c + M, uniform);
    }

    std::vector<int64_t> out_shape(x.shape.begin(), x.shape.end() - 1);
    out_shape.push_back(N);
    auto y = ctx.GetOutput(0, out_shape);
    if (M == 0) return nullptr;

    args.slices = w.slices.value.GetTensorData<uint8_t>();
    args.scales = w.scales.value.GetTensorData<float>();
    args.zero_points = w.zero_points.value.GetTensorData<float>();
    args.bias = w.bias.value ? w.bias.value.GetTensorData<float>() : nullptr;
    args.y = y.GetTensorMutableData<float>();
    args.M = M, args.K = K, args.N = N, args.group_size = group_size, args.num_slices = num_slices;
    TileParams call_params;
    if (!constant) build_tile_params(kernel->mode, args.scales, args.zero_points, N, groups, call_params);
    use_tile_params(constant ? tile_params : call_params, args);
    // Whole row tiles per task: 4 for large N (fewer calls, pairs of tiles for the kernels), 2 for
    // small N (still >= 18 tasks at N = 576, enough to balance 2-4 threads).
    const int64_t rows_per_block = (N >= 2048 ? 4 : 2) * kTileRows;
    ParallelTask task{&args, kernel->fn, &order, &starts, rows_per_block, num_slices};
    const size_t blocks = static_cast<size_t>((N + rows_per_block - 1) / rows_per_block);
    ctx.ParallelFor(run_block, blocks, 0, &task);
    return nullptr;
  } catch (const std::exception& e) {
    return to_status(e);
  }
}

}  // namespace mobiq
