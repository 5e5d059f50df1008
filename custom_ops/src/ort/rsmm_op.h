// ONNX Runtime glue for ResidualSliceMatMul (domain ai.mobiquant, version 1):
// attributes, validation, output allocation, threading, OrtStatus. The maths
// lives in the raw-pointer kernels (mobiq/kernels.h). No exception leaves this
// layer: CreateKernelV2 and ComputeV2 convert them to OrtStatus.
#pragma once

#include "op_common.h"

#include "mobiq/kernels.h"

namespace mobiq {

inline constexpr const char* kDomain = "ai.mobiquant";
inline constexpr const char* kOpName = "ResidualSliceMatMul";

struct RsmmWeights {
  Input slices, scales, zero_points, bias;  // bias.value null when the node has none
};

struct RsmmKernel {
  int64_t K = 0, N = 0, group_size = 0, num_slices = 0;
  Mode mode = Mode::kF32;
  const KernelInfo* kernel = nullptr;
  RsmmWeights weights;    // checked once, and tile_params built once, when they are constant initializers
  TileParams tile_params;
  bool constant = false;
  OrtStatusPtr ComputeV2(OrtKernelContext* context);
};

struct RsmmOp : Ort::CustomOpBase<RsmmOp, RsmmKernel, /*WithStatus=*/true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const;
  const char* GetName() const { return kOpName; }
  size_t GetInputTypeCount() const { return 6; }
  ONNXTensorElementDataType GetInputType(size_t index) const;
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const;
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace mobiq
