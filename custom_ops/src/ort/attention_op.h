// ONNX Runtime glue for KVAttention (domain ai.mobiquant, version 1): causal multi-head attention with
// grouped key/value heads and rotary embeddings over a KV cache held at 32, 16, 8 or 4 bits
// (mobiq/attention.h; docs/design.md, "The KV cache"). Prefill and decode are one path: the new
// tokens' keys and values are rotated, stored into the cache at positions [past, past + S), then
// every query reads the cache as stored, so a token's output is the same whether it came in a
// prompt or one at a time.
//
//   inputs   0 query float [B, S, H*D], or q|k|v packed [B, S, (H + 2 Hkv) D] when 1 and 2 are absent
//            1 key float [B, S, Hkv*D]     (optional)      2 value float [B, S, Hkv*D] (optional)
//            3 key_cache uint8 [B, Hkv, blocks, block_bytes]  4 value_cache (the same shape)
//            5 seqlens_k int32 [B]: tokens so far - 1 (GroupQueryAttention's convention), so
//              past = seqlens_k + 1 - S
//            6 cos_cache, 7 sin_cache float [positions, D/2] (non-interleaved rotary on all of D)
//            8 q_norm, 9 k_norm float [D] (optional, both or neither): each head of the queries and new keys
//              is RMS-normed first, x / sqrt(mean(x^2) + qk_norm_epsilon) * w (Gemma 3's and Qwen3's q/k norms)
//   outputs  0 output float [B, S, H*D]
//            1 present_key, 2 present_value: the caches with the new positions stored. Bound to the
//              same buffers as inputs 3 and 4 they are written in place (only the new positions);
//              otherwise the input is copied first.
// At 8 and 4 bits each group of kv_group dims of the keys and values is stored as H x (H the orthonormal
// Walsh-Hadamard matrix of the group size, its own inverse), the queries are read as H q and the
// outputs taken back through H: attention is unchanged, but an outlier channel of the keys is spread
// over its group instead of setting a scale that rounds the group's other values to zero.
//   attributes num_heads, kv_num_heads, scale (default 1/sqrt(D)), local_window_size (keys a query
//              sees, its own included; -1 = all), qk_norm_epsilon (default 1e-6; with inputs 8 and 9).
// The cache format is read from block_bytes (kv_format_of): a session picks the precision by the
// buffers it binds. Capacity = blocks * 16 positions.
#pragma once

#include "op_common.h"

#include "mobiq/attention.h"

namespace mobiq {

inline constexpr const char* kAttentionOpName = "KVAttention";

struct AttentionKernelState {
  int64_t heads = 0, kv_heads = 0, window = -1;
  float scale = 0.0f;  // 0: 1/sqrt(D)
  float norm_eps = 1e-6f;
  const AttentionKernel* kernel = nullptr;
  OrtStatusPtr ComputeV2(OrtKernelContext* context);
};

struct AttentionOp : Ort::CustomOpBase<AttentionOp, AttentionKernelState, /*WithStatus=*/true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const;
  const char* GetName() const { return kAttentionOpName; }
  size_t GetInputTypeCount() const { return 10; }
  ONNXTensorElementDataType GetInputType(size_t index) const;
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index == 1 || index == 2 || index >= 8 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetOutputType(size_t index) const {
    return index == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
  }
};

}  // namespace mobiq
