// mobiq_ort_host: runs one .onnx file through ONNX Runtime's C API with the op
// library registered — the smallest program that loads libmobiq_ops.so the way an
// application does, for targets without Python (aarch64 under qemu in the tests).
//
//   mobiq_ort_host MODEL.onnx OPS_LIBRARY OUT_DIR NAME=TYPE:DIMS:FILE ...
//
// Each input is raw little-endian data of TYPE f32, i32 or u8 and shape DIMS
// ("5x64"). Runs on one intra-op thread; writes every output (float32) to
// OUT_DIR/<name>.bin and prints "<name> <dims>". Exit 1 with the error text on failure.
#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct Input {
  std::string name;
  ONNXTensorElementDataType type;
  std::vector<int64_t> shape;
  std::vector<char> bytes;
};

std::vector<char> read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot read " + path);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

// NAME=TYPE:DIMS:FILE
Input parse_input(const std::string& spec) {
  const size_t eq = spec.find('='), c1 = spec.find(':', eq), c2 = spec.find(':', c1 + 1);
  if (eq == std::string::npos || c1 == std::string::npos || c2 == std::string::npos)
    throw std::runtime_error("input expected NAME=TYPE:DIMS:FILE; got '" + spec + "'");
  Input in;
  in.name = spec.substr(0, eq);
  const std::string type = spec.substr(eq + 1, c1 - eq - 1), dims = spec.substr(c1 + 1, c2 - c1 - 1);
  size_t elem = 0;
  if (type == "f32") in.type = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, elem = 4;
  else if (type == "i32") in.type = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, elem = 4;
  else if (type == "u8") in.type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, elem = 1;
  else throw std::runtime_error("input type expected f32, i32 or u8; got '" + type + "'");
  size_t count = 1;
  for (size_t pos = 0; pos <= dims.size();) {
    const size_t x = std::min(dims.find('x', pos), dims.size());
    in.shape.push_back(std::stoll(dims.substr(pos, x - pos)));
    count *= static_cast<size_t>(in.shape.back());
    pos = x + 1;
  }
  in.bytes = read_file(spec.substr(c2 + 1));
  if (in.bytes.size() != count * elem)
    throw std::runtime_error("input " + in.name + " expected " + std::to_string(count * elem) + " bytes for " + dims +
                             "; got " + std::to_string(in.bytes.size()));
  return in;
}

std::string dims_str(const std::vector<int64_t>& shape) {
  std::string s;
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? "x" : "") + std::to_string(shape[i]);
  return s;
}

int run(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s MODEL.onnx OPS_LIBRARY OUT_DIR NAME=TYPE:DIMS:FILE ...\n", argv[0]);
    return 2;
  }
  std::vector<Input> inputs;
  for (int i = 4; i < argc; ++i) inputs.push_back(parse_input(argv[i]));

  Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "mobiq_ort_host");
  Ort::SessionOptions options;
  options.SetIntraOpNumThreads(1);
  options.RegisterCustomOpsLibrary(argv[2]);
  Ort::Session session(env, argv[1], options);

  const Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  std::vector<Ort::Value> values;
  std::vector<const char*> names;
  for (auto& in : inputs) {
    values.push_back(Ort::Value::CreateTensor(cpu, in.bytes.data(), in.bytes.size(), in.shape.data(), in.shape.size(),
                                              in.type));
    names.push_back(in.name.c_str());
  }
  Ort::AllocatorWithDefaultOptions allocator;
  std::vector<Ort::AllocatedStringPtr> owned;
  std::vector<const char*> out_names;
  for (size_t i = 0; i < session.GetOutputCount(); ++i) {
    owned.push_back(session.GetOutputNameAllocated(i, allocator));
    out_names.push_back(owned.back().get());
  }
  auto outputs = session.Run(Ort::RunOptions{nullptr}, names.data(), values.data(), values.size(), out_names.data(),
                             out_names.size());
  for (size_t i = 0; i < outputs.size(); ++i) {
    const auto info = outputs[i].GetTensorTypeAndShapeInfo();
    if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
      throw std::runtime_error(std::string("output ") + out_names[i] + " expected float32");
    std::ofstream f(std::string(argv[3]) + "/" + out_names[i] + ".bin", std::ios::binary);
    f.write(reinterpret_cast<const char*>(outputs[i].GetTensorData<float>()),
            static_cast<std::streamsize>(info.GetElementCount() * sizeof(float)));
    if (!f) throw std::runtime_error(std::string("cannot write output ") + out_names[i]);
    std::printf("%s %s\n", out_names[i], dims_str(info.GetShape()).c_str());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "[mobiq_ort_host] %s\n", e.what());
    return 1;
  }
}
