// ONNX Runtime glue for SliceRouter (domain ai.mobiquant, version 1): the token router of one
// routed linear input in one node (it replaced a 9-node subgraph per router).
//   inputs  X float [..., K], W1 int8 [K, H], W1_scale float [H], B1 float [H], W2 float [H],
//           B2 float [] or [1], thresholds float [G, S-1] (a row per budget grid point),
//           row int64 [] (the budget's row)
//   output  counts int32 [...]: 1 + #(relu(X (W1 * W1_scale) + B1) . W2 + B2 > thresholds[row, j])
#pragma once

#include <cstdint>

#include "op_common.h"

namespace mobiq {

inline constexpr const char* kRouterOpName = "SliceRouter";

struct RouterWeights {
  Input w1, w1_scale, b1, w2, b2, table;
  int64_t K = 0, H = 0;
};

struct RouterKernel {
  RouterWeights weights;        // checked once when all six are constant initializers
  bool constant = false;
  OrtStatusPtr ComputeV2(OrtKernelContext* context);
};

struct RouterOp : Ort::CustomOpBase<RouterOp, RouterKernel, /*WithStatus=*/true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const;
  const char* GetName() const { return kRouterOpName; }
  size_t GetInputTypeCount() const { return 8; }
  ONNXTensorElementDataType GetInputType(size_t index) const;
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32; }
};

}  // namespace mobiq
