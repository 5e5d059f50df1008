#include "router_op.h"

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "mobiq/router.h"

namespace mobiq {
namespace {

[[noreturn]] void fail(const std::string& what) { fail_op(kRouterOpName, what); }

constexpr size_t kInputs = 8;
constexpr const char* kInputNames[kInputs] = {"X", "W1", "W1_scale", "B1", "W2", "B2", "thresholds", "row"};

ONNXTensorElementDataType input_type(size_t index) {
  return index == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8
         : index == 7 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64
                      : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}

constexpr int64_t kTokensPerTask = 16;

struct Task {
  const RouterArgs* args;
  int64_t tokens;
};

void run_task(void* data, size_t index) {
  const auto& task = *static_cast<const Task*>(data);
  const int64_t t0 = static_cast<int64_t>(index) * kTokensPerTask;
  route_tokens(*task.args, t0, std::min(task.tokens, t0 + kTokensPerTask));
}

// The router's weights (inputs W1 .. thresholds), validated: once at kernel creation when they
// are constant initializers (the exported models), else on every call.
void check_weights(RouterWeights& w) {
  if (w.w1.shape.size() != 2) fail("W1 expected shape [K, H]; got " + shape_str(w.w1.shape));
  w.K = w.w1.shape[0], w.H = w.w1.shape[1];
  const std::string kh = "K=" + std::to_string(w.K) + ", H=" + std::to_string(w.H) + " from W1";
  expect_shape(w.w1_scale, kRouterOpName, "W1_scale", {w.H}, kh);
  expect_shape(w.b1, kRouterOpName, "B1", {w.H}, kh);
  expect_shape(w.w2, kRouterOpName, "W2", {w.H}, kh);
  if (w.b2.count != 1) fail("B2 expected one value; got shape " + shape_str(w.b2.shape));
  if (w.table.shape.size() != 2 || w.table.shape[0] < 1)
    fail("thresholds expected shape [G >= 1, S-1]; got " + shape_str(w.table.shape));
}

// The six weights from `input(index)` (indices 1 .. 6); false as soon as one has no value.
template <class InputAt>
bool fill_weights(RouterWeights& w, InputAt input) {
  Input* slots[] = {&w.w1, &w.w1_scale, &w.b1, &w.w2, &w.b2, &w.table};
  for (size_t i = 1; i <= 6; ++i)
    if (!(*slots[i - 1] = input(i)).value) return false;
  return true;
}

Input required_input(Ort::KernelContext& ctx, size_t index) {
  Input in = get_typed_input(ctx, index, kRouterOpName, kInputNames[index], input_type(index));
  if (!in.value) fail(std::string("input ") + kInputNames[index] + " expected; got none");
  return in;
}

}  // namespace

ONNXTensorElementDataType RouterOp::GetInputType(size_t index) const { return input_type(index); }

OrtStatusPtr RouterOp::CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
  try {
    auto k = std::make_unique<RouterKernel>();
    const bool constant = fill_weights(k->weights, [&](size_t i) {
      return constant_input(info, i, kRouterOpName, kInputNames[i], input_type(i));
    });
    if (constant) check_weights(k->weights);
    k->constant = constant;
    *kernel = k.release();
    return nullptr;
  } catch (const std::exception& e) {
    return to_status(e);
  }
}

OrtStatusPtr RouterKernel::ComputeV2(OrtKernelContext* context) {
  try {
    Ort::KernelContext ctx(context);
    RouterWeights call_weights;
    if (!constant) {
      fill_weights(call_weights, [&](size_t i) { return required_input(ctx, i); });
      check_weights(call_weights);
    }
    const RouterWeights& w = constant ? weights : call_weights;
    const Input x = required_input(ctx, 0), row = required_input(ctx, 7);
    if (x.shape.empty() || x.shape.back() != w.K)
      fail("X expected shape [..., K=" + std::to_string(w.K) + "] (K=" + std::to_string(w.K) + ", H=" +
           std::to_string(w.H) + " from W1); got " + shape_str(x.shape));
    if (row.count != 1) fail("row expected one value; got shape " + shape_str(row.shape));
    const int64_t r = *row.value.GetTensorData<int64_t>();
    if (r < 0 || r >= w.table.shape[0])
      fail("row expected in [0, " + std::to_string(w.table.shape[0] - 1) + "]; got " + std::to_string(r));

    const std::vector<int64_t> out_shape(x.shape.begin(), x.shape.end() - 1);
    auto counts = ctx.GetOutput(0, out_shape);
    const int64_t M = w.K ? static_cast<int64_t>(x.count) / w.K : 0;
    if (M == 0) return nullptr;
    const int64_t num_tau = w.table.shape[1];
    RouterArgs args{x.value.GetTensorData<float>(), w.w1.value.GetTensorData<int8_t>(),
                    w.w1_scale.value.GetTensorData<float>(), w.b1.value.GetTensorData<float>(),
                    w.w2.value.GetTensorData<float>(), *w.b2.value.GetTensorData<float>(),
                    w.table.value.GetTensorData<float>() + r * num_tau, num_tau, w.K, w.H,
                    counts.GetTensorMutableData<int32_t>()};
    if (M <= kTokensPerTask) {
      route_tokens(args, 0, M);
    } else {
      Task task{&args, M};
      ctx.ParallelFor(run_task, static_cast<size_t>((M + kTokensPerTask - 1) / kTokensPerTask), 0, &task);
    }
    return nullptr;
  } catch (const std::exception& e) {
    return to_status(e);
  }
}

}  // namespace mobiq
