// ONNX Runtime glue for ResidualSliceMatMul (domain ai.mobiquant, version 1, model format 3):
// attributes, validation, output allocation, threading, OrtStatus. The maths lives in the
// raw-pointer kernels (mobiq/kernels.h, mobiq/router.h). No exception leaves this layer:
// CreateKernelV2 and ComputeV2 convert them to OrtStatus.
//
//   inputs   0 X float [..., K]            1 slices uint8 [S, ceil(N/16), K/16, 64]
//            2 scales float [N, K/g]       3 zero_points float [N, K/g]
//            4 slice_counts int32 [...]    (optional; never together with a router)
//            5 bias float [N]              (optional)
//            6 router_w1 int8 [K, H]  7 router_w1_scale float [H]  8 router_b1 float [H]
//            9 router_w2 float [H]   10 router_b2 float [1]
//           11 router_thresholds float [G, S-1]  12 threshold_row int64 []   (6..12: all or none)
//   outputs  0 Y float [..., N]
//            1 slice_counts int32 [...]    (optional: the counts used, for the average bits)
// With a router, each token's count is 1 + #(relu(x (W1 * w1_scale) + b1) . w2 + b2 > tau_j), tau =
// thresholds[row]. A threshold at or beyond +-1e29 ("never" / "always") is crossed by no / every
// finite score, so a row made only of those is a constant count: the op then runs no router work
// and reads none of the router's weights (docs/design.md, "The op").
// Refused at session creation: group_size > kMaxGroupSize; constant scales / router_w1_scale not
// finite and > 0, zero_points / bias / router_b1 / router_w2 / router_b2 not finite, NaN thresholds.
// A token with a NaN or an infinity in X: Y row NaN, and count 1 where the router decides.
#pragma once

#include <vector>

#include "op_common.h"

#include "mobiq/kernels.h"

namespace mobiq {

inline constexpr const char* kDomain = "ai.mobiquant";
inline constexpr const char* kOpName = "ResidualSliceMatMul";
inline constexpr float kThresholdNever = 1e29f;  // |tau| >= this: no finite score decides against it

struct RsmmWeights {
  Input slices, scales, zero_points, bias;  // bias.value null when the node has none
};

struct RouterWeights {
  Input w1, w1_scale, b1, w2, b2, table;
  int64_t H = 0;
};

struct RsmmKernel {
  int64_t K = 0, N = 0, group_size = 0, num_slices = 0;
  Mode mode = Mode::kF32;
  const KernelInfo* kernel = nullptr;
  RsmmWeights weights;    // checked once, and tile_params built once, when they are constant initializers
  TileParams tile_params;
  bool constant = false;
  bool routed = false;             // the node has router inputs (6..12)
  bool router_constant = false;    // ... all constant initializers: checked once, row_counts built once
  RouterWeights router;
  std::vector<int32_t> row_counts;  // per threshold row: its constant count, or 0 when tokens decide
  OrtStatusPtr ComputeV2(OrtKernelContext* context);
};

struct RsmmOp : Ort::CustomOpBase<RsmmOp, RsmmKernel, /*WithStatus=*/true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const;
  const char* GetName() const { return kOpName; }
  size_t GetInputTypeCount() const { return 13; }
  ONNXTensorElementDataType GetInputType(size_t index) const;
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const;
  size_t GetOutputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetOutputType(size_t index) const {
    return index == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
  }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t index) const {
    return index == 0 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
};

}  // namespace mobiq
