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

}  // namespace

ONNXTensorElementDataType RouterOp::GetInputType(size_t index) const { return input_type(index); }

OrtStatusPtr RouterOp::CreateKernelV2(const OrtApi&, const OrtKernelInfo*, void** kernel) const {
  *kernel = new RouterKernel();
  return nullptr;
}

OrtStatusPtr RouterKernel::ComputeV2(OrtKernelContext* context) {
  try {
    Ort::KernelContext ctx(context);
    Input in[kInputs];
    for (size_t i = 0; i < kInputs; ++i) {
      in[i] = get_typed_input(ctx, i, kRouterOpName, kInputNames[i], input_type(i));
      if (!in[i].value) fail(std::string("input ") + kInputNames[i] + " expected; got none");
    }
    const Input &x = in[0], &w1 = in[1], &w1_scale = in[2], &b1 = in[3], &w2 = in[4], &b2 = in[5], &table = in[6],
                &row = in[7];
    if (w1.shape.size() != 2) fail("W1 expected shape [K, H]; got " + shape_str(w1.shape));
    const int64_t K = w1.shape[0], H = w1.shape[1];
    const std::string kh = "K=" + std::to_string(K) + ", H=" + std::to_string(H) + " from W1";
    if (x.shape.empty() || x.shape.back() != K)
      fail("X expected shape [..., K=" + std::to_string(K) + "] (" + kh + "); got " + shape_str(x.shape));
    expect_shape(w1_scale, kRouterOpName, "W1_scale", {H}, kh);
    expect_shape(b1, kRouterOpName, "B1", {H}, kh);
    expect_shape(w2, kRouterOpName, "W2", {H}, kh);
    if (b2.count != 1) fail("B2 expected one value; got shape " + shape_str(b2.shape));
    if (table.shape.size() != 2 || table.shape[0] < 1)
      fail("thresholds expected shape [G >= 1, S-1]; got " + shape_str(table.shape));
    if (row.count != 1) fail("row expected one value; got shape " + shape_str(row.shape));
    const int64_t r = *row.value.GetTensorData<int64_t>();
    if (r < 0 || r >= table.shape[0])
      fail("row expected in [0, " + std::to_string(table.shape[0] - 1) + "]; got " + std::to_string(r));

    const std::vector<int64_t> out_shape(x.shape.begin(), x.shape.end() - 1);
    auto counts = ctx.GetOutput(0, out_shape);
    const int64_t M = K ? static_cast<int64_t>(x.count) / K : 0;
    if (M == 0) return nullptr;
    const int64_t num_tau = table.shape[1];
    RouterArgs args{x.value.GetTensorData<float>(), w1.value.GetTensorData<int8_t>(),
                    w1_scale.value.GetTensorData<float>(), b1.value.GetTensorData<float>(),
                    w2.value.GetTensorData<float>(), *b2.value.GetTensorData<float>(),
                    table.value.GetTensorData<float>() + r * num_tau, num_tau, K, H,
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
