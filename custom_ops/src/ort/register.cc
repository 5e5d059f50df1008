// The library's only exported symbol: RegisterCustomOps, called by ONNX Runtime
// from SessionOptions.register_custom_ops_library(path). Requests the ORT API
// version of the headers it was compiled against (the oldest it supports).
#include <mutex>
#include <string>

#include "attention_op.h"
#include "rsmm_op.h"

namespace {

OrtCustomOpDomain* shared_domain(const OrtApi& api, OrtStatus** status) {
  // One domain for the process, alive as long as any session may use it.
  static mobiq::RsmmOp rsmm;
  static mobiq::AttentionOp attention;
  static OrtCustomOpDomain* domain = nullptr;
  static OrtStatus* error = nullptr;
  static std::once_flag once;
  std::call_once(once, [&] {
    error = api.CreateCustomOpDomain(mobiq::kDomain, &domain);
    if (!error) error = api.CustomOpDomain_Add(domain, &rsmm);
    if (!error) error = api.CustomOpDomain_Add(domain, &attention);
  });
  *status = error ? api.CreateStatus(api.GetErrorCode(error), api.GetErrorMessage(error)) : nullptr;
  return domain;
}

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    const std::string msg = std::string("[mobiq_ops] built for ONNX Runtime API version ") +
                            std::to_string(ORT_API_VERSION) + " or newer; this ONNX Runtime is " +
                            api_base->GetVersionString();
    return api_base->GetApi(1)->CreateStatus(ORT_FAIL, msg.c_str());
  }
  Ort::InitApi(api);
  OrtStatus* status = nullptr;
  OrtCustomOpDomain* domain = shared_domain(*api, &status);
  if (status) return status;
  return api->AddCustomOpDomain(options, domain);
}
