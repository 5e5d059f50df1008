// Shared ONNX Runtime glue of the library's ops: user-facing errors (ORT_INVALID_ARGUMENT, text
// naming the op, what was expected and what came), type-checked inputs, shape checks.
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace mobiq {

// A user-facing error: becomes ORT_INVALID_ARGUMENT with the message as is.
struct OpError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

[[noreturn]] inline void fail_op(const char* op, const std::string& what) {
  throw OpError("[" + std::string(op) + "] " + what);
}

inline OrtStatusPtr to_status(const std::exception& e) {
  const bool user = dynamic_cast<const OpError*>(&e) || dynamic_cast<const std::invalid_argument*>(&e);
  return Ort::GetApi().CreateStatus(user ? ORT_INVALID_ARGUMENT : ORT_FAIL, e.what());
}

inline std::string shape_str(const std::vector<int64_t>& shape) {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << (shape.size() == 1 ? ",)" : ")");
  return s.str();
}

inline const char* type_name(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    default: return "another type";
  }
}

struct Input {
  Ort::ConstValue value{nullptr};
  std::vector<int64_t> shape;
  size_t count = 0;
};

// A present value (a run's input or a constant initializer) of input `name` of `op`, type-checked.
inline Input typed_value(Ort::ConstValue value, const char* op, const char* name, ONNXTensorElementDataType type) {
  Input in;
  in.value = value;
  auto info = in.value.GetTensorTypeAndShapeInfo();
  if (info.GetElementType() != type)
    fail_op(op, std::string("input ") + name + " expected " + type_name(type) + "; got " + type_name(info.GetElementType()));
  in.shape = info.GetShape();
  in.count = info.GetElementCount();
  return in;
}

// Input `index` of `op`, type-checked; value is null when an optional input is absent.
inline Input get_typed_input(Ort::KernelContext& ctx, size_t index, const char* op, const char* name,
                             ONNXTensorElementDataType type) {
  if (index >= ctx.GetInputCount()) return {};
  Ort::ConstValue value = ctx.GetInput(index);
  if (!value) return {};
  return typed_value(value, op, name, type);
}

// Input `index` of `op` when it is a constant initializer, type-checked; value null otherwise (a
// graph input, or absent).
inline Input constant_input(const OrtKernelInfo* info, size_t index, const char* op, const char* name,
                            ONNXTensorElementDataType type) {
  const OrtApi& api = Ort::GetApi();
  int is_constant = 0;
  const OrtValue* value = nullptr;
  OrtStatus* status = api.KernelInfoGetConstantInput_tensor(info, index, &is_constant, &value);
  if (status) api.ReleaseStatus(status);
  if (status || !is_constant || !value) return {};
  return typed_value(Ort::ConstValue(value), op, name, type);
}

// Int attribute `name` of `op`; `fallback` when the node has none (an error when fallback is null).
inline int64_t int_attribute(const OrtKernelInfo* info, const char* op, const char* name, const int64_t* fallback) {
  int64_t value = 0;
  OrtStatus* status = Ort::GetApi().KernelInfoGetAttribute_int64(info, name, &value);
  if (status == nullptr) return value;
  Ort::GetApi().ReleaseStatus(status);
  if (fallback) return *fallback;
  fail_op(op, std::string("attribute '") + name + "' expected an int; got none");
}

inline void expect_shape(const Input& in, const char* op, const char* name, const std::vector<int64_t>& want,
                         const std::string& why) {
  if (in.shape != want)
    fail_op(op, std::string(name) + " shape expected " + shape_str(want) + " (" + why + "); got " + shape_str(in.shape));
}

}  // namespace mobiq
