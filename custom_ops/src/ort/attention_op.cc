#include "attention_op.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

namespace mobiq {
namespace {

[[noreturn]] void fail(const std::string& what) { fail_op(kAttentionOpName, what); }

constexpr const char* kNames[] = {"query", "key", "value", "key_cache", "value_cache", "seqlens_k", "cos_cache",
                                  "sin_cache", "q_norm", "k_norm"};
constexpr ONNXTensorElementDataType kF = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, kU8 = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
constexpr ONNXTensorElementDataType kTypes[] = {kF,  kF, kF, kU8, kU8, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32,
                                                kF, kF, kF, kF};

Input input(Ort::KernelContext& ctx, size_t i) {
  return get_typed_input(ctx, i, kAttentionOpName, kNames[i], kTypes[i]);
}

constexpr int64_t kTileRows = 32;      // query rows (tokens x heads of a group) per task otherwise
constexpr int64_t kInlineTokens = 16;  // new tokens stored on the calling thread
constexpr int64_t kInlineReads = 8192; // (row, position) pairs attended on the calling thread

// One (batch, kv head, token tile, key chunk) task; its rows' partial results live at `offset`.
struct Task {
  int64_t b, h, s0, s1, k0, k1, offset;
};

struct Call {
  KvLayout layout;
  int64_t B, S, H, Hkv, G, D, blocks, window;
  float scale;
  const float *q, *k, *v, *cos, *sin;
  const float *q_norm, *k_norm;  // per-head RMSNorm weights [D] before rotary, or null
  float norm_eps;
  int64_t q_stride, k_stride, q_off, k_off, v_off;  // floats per token row; offsets of q, k, v in it
  const int32_t* seqlens;
  uint8_t *key_cache, *value_cache;
  float* out;
  std::vector<float> qrot;  // [B, Hkv, S*G, D]: rotated queries, scale folded in
  std::vector<Task> tasks;
  std::vector<float> acc, m, l;
  std::vector<int64_t> first, last;  // per task row, at the task's offset
  AttentionFn fn;

  int64_t past(int64_t b) const { return seqlens[b] + 1 - S; }
  uint8_t* cache(uint8_t* base, int64_t b, int64_t h) const {
    return base + (b * Hkv + h) * blocks * layout.block_bytes;
  }
};

// out = rotate(x) * scale: x1 cos - x2 sin, x2 cos + x1 sin over the halves of D.
void rotate(const float* x, const float* cos, const float* sin, int64_t D, float scale, float* out) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = x[i], x2 = x[i + half];
    out[i] = (x1 * cos[i] - x2 * sin[i]) * scale;
    out[i + half] = (x2 * cos[i] + x1 * sin[i]) * scale;
  }
}

// out = x / sqrt(mean(x^2) + eps) * w over one head (HF's RMSNorm in float32; Gemma's 1 + w is the exporter's).
void rms_norm(const float* x, const float* w, int64_t D, float eps, float* out) {
  float squares = 0.0f;
  for (int64_t i = 0; i < D; ++i) squares += x[i] * x[i];
  const float inv = 1.0f / std::sqrt(squares / static_cast<float>(D) + eps);
  for (int64_t i = 0; i < D; ++i) out[i] = x[i] * inv * w[i];
}

// x[0 .. n) <- H_n x / sqrt(n) (Sylvester-ordered Walsh-Hadamard, orthonormal and its own inverse);
// n a power of two.
void hadamard(float* x, int64_t n) {
  for (int64_t len = 1; len < n; len *= 2)
    for (int64_t i = 0; i < n; i += 2 * len)
      for (int64_t j = i; j < i + len; ++j) {
        const float a = x[j], b = x[j + len];
        x[j] = a + b;
        x[j + len] = a - b;
      }
  const float norm = 1.0f / std::sqrt(static_cast<float>(n));
  for (int64_t i = 0; i < n; ++i) x[i] *= norm;
}

// At 8 and 4 bits each group of kv_group dims of keys, values and queries is taken through H (and the
// outputs back): q.k and the weighted sums of values are unchanged, but an outlier channel is spread
// over its group instead of setting a scale that rounds the group's other values to zero.
void to_hadamard_groups(const Call& c, float* x) {
  if (c.layout.format != KvFormat::kInt8 && c.layout.format != KvFormat::kInt4) return;
  for (int64_t g = 0; g < c.layout.groups; ++g) hadamard(x + g * c.layout.group, c.layout.group);
}

// x itself, or x normed into `normed` when the op norms heads.
const float* head_normed(const float* x, const float* w, const Call& c, float* normed) {
  if (!w) return x;
  rms_norm(x, w, c.D, c.norm_eps, normed);
  return normed;
}

// Phase 1, one task per (batch, kv head): store the new keys and values, rotate the queries.
void store_task(void* data, size_t index) {
  Call& c = *static_cast<Call*>(data);
  const int64_t b = static_cast<int64_t>(index) / c.Hkv, h = static_cast<int64_t>(index) % c.Hkv, D = c.D;
  thread_local std::vector<float> row, vrow, normed;
  row.resize(static_cast<size_t>(D)), vrow.resize(static_cast<size_t>(D)), normed.resize(static_cast<size_t>(D));
  uint8_t* kc = c.cache(c.key_cache, b, h);
  uint8_t* vc = c.cache(c.value_cache, b, h);
  for (int64_t s = 0; s < c.S; ++s) {
    const int64_t pos = c.past(b) + s, token = b * c.S + s;
    const float* cos = c.cos + pos * (D / 2);
    const float* sin = c.sin + pos * (D / 2);
    const float* k = head_normed(c.k + token * c.k_stride + c.k_off + h * D, c.k_norm, c, normed.data());
    const float* v = c.v + token * c.k_stride + c.v_off + h * D;
    rotate(k, cos, sin, D, 1.0f, row.data());
    std::copy(v, v + D, vrow.data());
    to_hadamard_groups(c, row.data());
    to_hadamard_groups(c, vrow.data());
    const int64_t block = pos / kKvBlock, lane = pos % kKvBlock;
    kv_store(c.layout, true, row.data(), kc + block * c.layout.block_bytes, lane);
    kv_store(c.layout, false, vrow.data(), vc + block * c.layout.block_bytes, lane);
    for (int64_t j = 0; j < c.G; ++j) {
      const float* q = head_normed(c.q + token * c.q_stride + c.q_off + (h * c.G + j) * D, c.q_norm, c, normed.data());
      float* out = c.qrot.data() + ((b * c.Hkv + h) * c.S * c.G + s * c.G + j) * D;
      rotate(q, cos, sin, D, c.scale, out);
      to_hadamard_groups(c, out);
    }
  }
}

// Phase 2: one attention task.
void attend_task(void* data, size_t index) {
  Call& c = *static_cast<Call*>(data);
  const Task& t = c.tasks[index];
  const int64_t rows = (t.s1 - t.s0) * c.G;
  AttentionArgs a;
  a.layout = c.layout;
  a.keys = c.cache(c.key_cache, t.b, t.h);
  a.values = c.cache(c.value_cache, t.b, t.h);
  a.q = c.qrot.data() + ((t.b * c.Hkv + t.h) * c.S * c.G + t.s0 * c.G) * c.D;
  a.first = c.first.data() + t.offset;
  a.last = c.last.data() + t.offset;
  a.rows = rows;
  a.key_begin = t.k0;
  a.key_end = t.k1;
  a.acc = c.acc.data() + t.offset * c.D;
  a.m = c.m.data() + t.offset;
  a.l = c.l.data() + t.offset;
  c.fn(a);
}

}  // namespace

ONNXTensorElementDataType AttentionOp::GetInputType(size_t index) const { return kTypes[index]; }

OrtStatusPtr AttentionOp::CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
  try {
    const OrtApi& api = Ort::GetApi();
    auto k = std::make_unique<AttentionKernelState>();
    const int64_t all = -1;
    k->heads = int_attribute(info, kAttentionOpName, "num_heads", nullptr);
    k->kv_heads = int_attribute(info, kAttentionOpName, "kv_num_heads", nullptr);
    k->window = int_attribute(info, kAttentionOpName, "local_window_size", &all);
    float scale = 0.0f;
    if (OrtStatus* s = api.KernelInfoGetAttribute_float(info, "scale", &scale)) api.ReleaseStatus(s), scale = 0.0f;
    k->scale = scale;
    float eps = 1e-6f;
    if (OrtStatus* s = api.KernelInfoGetAttribute_float(info, "qk_norm_epsilon", &eps))
      api.ReleaseStatus(s), eps = 1e-6f;
    k->norm_eps = eps;
    if (k->heads <= 0 || k->kv_heads <= 0 || k->heads % k->kv_heads != 0)
      fail("num_heads and kv_num_heads expected > 0 with num_heads % kv_num_heads == 0; got " +
           std::to_string(k->heads) + " and " + std::to_string(k->kv_heads));
    if (k->window == 0 || k->window < -1)
      fail("local_window_size expected -1 (all) or > 0; got " + std::to_string(k->window));
    if (!std::isfinite(k->scale) || k->scale < 0.0f) fail("scale expected finite and > 0 (or absent)");
    if (!std::isfinite(k->norm_eps) || k->norm_eps <= 0.0f) fail("qk_norm_epsilon expected finite and > 0 (or absent)");
    k->kernel = &select_attention_kernel();
    *kernel = k.release();
    return nullptr;
  } catch (const std::exception& e) {
    return to_status(e);
  }
}

OrtStatusPtr AttentionKernelState::ComputeV2(OrtKernelContext* context) {
  try {
    Ort::KernelContext ctx(context);
    const Input q = input(ctx, 0), k = input(ctx, 1), v = input(ctx, 2), kc = input(ctx, 3), vc = input(ctx, 4),
                seq = input(ctx, 5), cos = input(ctx, 6), sin = input(ctx, 7), qn = input(ctx, 8), kn = input(ctx, 9);
    if (!q.value || !kc.value || !vc.value || !seq.value || !cos.value || !sin.value)
      fail("inputs query, key_cache, value_cache, seqlens_k, cos_cache, sin_cache expected; got fewer");
    if (!k.value != !v.value) fail("key and value expected both or neither (packed query); got one");
    if (q.shape.size() != 3) fail("query expected shape [B, S, hidden]; got " + shape_str(q.shape));
    thread_local Call c;  // its buffers keep their capacity from call to call (a session may run on several threads)
    c.tasks.clear(), c.first.clear(), c.last.clear();
    c.B = q.shape[0], c.S = q.shape[1], c.H = heads, c.Hkv = kv_heads, c.G = heads / kv_heads;
    const bool packed = !k.value;
    const int64_t per_token = packed ? heads + 2 * kv_heads : heads;
    if (q.shape[2] % per_token != 0)
      fail("query width expected a multiple of " + std::to_string(per_token) + (packed ? " (H + 2 Hkv, packed)" : " (H)") +
           "; got " + std::to_string(q.shape[2]));
    c.D = q.shape[2] / per_token;
    if (c.D % 16 != 0 || c.D > 512) fail("head size expected a multiple of 16, at most 512; got " + std::to_string(c.D));
    c.q_stride = q.shape[2];
    if (packed) {
      c.k_stride = q.shape[2], c.q_off = 0, c.k_off = heads * c.D, c.v_off = (heads + kv_heads) * c.D;
      c.k = c.v = q.value.GetTensorData<float>();
    } else {
      const std::vector<int64_t> want{c.B, c.S, kv_heads * c.D};
      expect_shape(k, kAttentionOpName, "key", want, "[B, S, kv_num_heads * head size]");
      expect_shape(v, kAttentionOpName, "value", want, "[B, S, kv_num_heads * head size]");
      c.k_stride = kv_heads * c.D, c.q_off = 0, c.k_off = 0, c.v_off = 0;
      c.k = k.value.GetTensorData<float>();
      c.v = v.value.GetTensorData<float>();
    }
    c.q = q.value.GetTensorData<float>();
    if (!qn.value != !kn.value) fail("q_norm and k_norm expected both or neither; got one");
    c.q_norm = c.k_norm = nullptr;
    if (qn.value) {
      expect_shape(qn, kAttentionOpName, "q_norm", {c.D}, "[head size]");
      expect_shape(kn, kAttentionOpName, "k_norm", {c.D}, "[head size]");
      c.q_norm = qn.value.GetTensorData<float>();
      c.k_norm = kn.value.GetTensorData<float>();
    }
    c.norm_eps = norm_eps;
    if (kc.shape.size() != 4 || kc.shape[0] != c.B || kc.shape[1] != kv_heads)
      fail("key_cache expected shape [B=" + std::to_string(c.B) + ", kv_num_heads=" + std::to_string(kv_heads) +
           ", blocks, block_bytes]; got " + shape_str(kc.shape));
    expect_shape(vc, kAttentionOpName, "value_cache", kc.shape, "the key_cache's");
    if (!kv_format_of(c.D, kc.shape[3], &c.layout)) {
      std::string widths;
      for (KvFormat f : {KvFormat::kF32, KvFormat::kF16, KvFormat::kInt8, KvFormat::kInt4}) {
        const KvLayout l = kv_layout(f, c.D);
        widths += (widths.empty() ? "" : ", ") + std::to_string(l.block_bytes) + " (" + std::to_string(l.bits) + " bits)";
      }
      fail("key_cache block_bytes expected one of " + widths + " for head size " + std::to_string(c.D) + "; got " +
           std::to_string(kc.shape[3]));
    }
    c.blocks = kc.shape[2];
    if (static_cast<int64_t>(seq.count) != c.B) fail("seqlens_k expected shape [B=" + std::to_string(c.B) + "]; got " +
                                                     shape_str(seq.shape));
    expect_shape(sin, kAttentionOpName, "sin_cache", cos.shape, "the cos_cache's");
    if (cos.shape.size() != 2 || cos.shape[1] != c.D / 2)
      fail("cos_cache expected shape [positions, head size / 2 = " + std::to_string(c.D / 2) + "]; got " +
           shape_str(cos.shape));
    c.seqlens = seq.value.GetTensorData<int32_t>();
    for (int64_t b = 0; b < c.B; ++b) {
      const int64_t total = static_cast<int64_t>(c.seqlens[b]) + 1;
      if (total < c.S || total > c.blocks * kKvBlock || total > cos.shape[0])
        fail("seqlens_k[" + std::to_string(b) + "] + 1 = " + std::to_string(total) + " tokens expected in [S=" +
             std::to_string(c.S) + ", min(cache capacity " + std::to_string(c.blocks * kKvBlock) + ", rotary positions " +
             std::to_string(cos.shape[0]) + ")]");
    }
    c.cos = cos.value.GetTensorData<float>();
    c.sin = sin.value.GetTensorData<float>();
    c.window = window;
    c.scale = scale > 0.0f ? scale : 1.0f / std::sqrt(static_cast<float>(c.D));
    c.fn = kernel->fn;

    auto out = ctx.GetOutput(0, {c.B, c.S, heads * c.D});
    auto pk = ctx.GetOutput(1, kc.shape);
    auto pv = ctx.GetOutput(2, vc.shape);
    c.out = out.GetTensorMutableData<float>();
    c.key_cache = pk.GetTensorMutableData<uint8_t>();
    c.value_cache = pv.GetTensorMutableData<uint8_t>();
    const uint8_t* kin = kc.value.GetTensorData<uint8_t>();
    const uint8_t* vin = vc.value.GetTensorData<uint8_t>();
    if (c.key_cache != kin) std::memcpy(c.key_cache, kin, kc.count);  // not bound in place
    if (c.value_cache != vin) std::memcpy(c.value_cache, vin, vc.count);
    if (c.B * c.S == 0) return nullptr;

    c.qrot.resize(static_cast<size_t>(c.B * heads * c.S * c.D));
    // Small work runs on this thread: waking the pool costs more than a decode step's stores or a short
    // context's attention.
    if (c.B * c.S <= kInlineTokens) {
      for (size_t i = 0; i < static_cast<size_t>(c.B * kv_heads); ++i) store_task(&c, i);
    } else {
      ctx.ParallelFor(store_task, static_cast<size_t>(c.B * kv_heads), 0, &c);
    }

    // Tasks: token tiles of ~kTileRows rows; with few new tokens, key chunks instead (split-K).
    const int64_t tile = std::max<int64_t>(1, kTileRows / c.G);
    const bool split = c.S * c.G <= kTileRows;
    int64_t offset = 0, reads = 0;  // reads: (row, position) pairs of all tasks
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t h = 0; h < kv_heads; ++h)
        for (int64_t s0 = 0; s0 < c.S; s0 += tile) {
          const int64_t s1 = std::min(c.S, s0 + tile), rows = (s1 - s0) * c.G;
          const int64_t last = c.past(b) + s1 - 1;
          const int64_t first = window > 0 ? std::max<int64_t>(0, c.past(b) + s0 + 1 - window) : 0;
          const int64_t chunk = kv_decode_chunk(last + 1 - first, c.B * kv_heads);
          for (int64_t k0 = first; k0 <= last; k0 = split ? k0 + chunk : last + 1) {
            const int64_t k1 = split ? std::min(last + 1, k0 + chunk) : last + 1;
            c.tasks.push_back({b, h, s0, s1, k0, k1, offset});
            reads += (k1 - k0) * rows;
            for (int64_t s = s0; s < s1; ++s)
              for (int64_t j = 0; j < c.G; ++j) {
                const int64_t pos = c.past(b) + s;
                c.first.push_back(window > 0 ? std::max<int64_t>(0, pos + 1 - window) : 0);
                c.last.push_back(pos);
              }
            offset += rows;
          }
        }
    c.acc.resize(static_cast<size_t>(offset * c.D));
    c.m.resize(static_cast<size_t>(offset));
    c.l.resize(static_cast<size_t>(offset));
    if (reads <= kInlineReads) {
      for (size_t i = 0; i < c.tasks.size(); ++i) attend_task(&c, i);
    } else {
      ctx.ParallelFor(attend_task, c.tasks.size(), 0, &c);
    }

    // Merge each row's key chunks (they follow each other in `tasks`) and normalize.
    for (size_t i = 0; i < c.tasks.size();) {
      const Task& t = c.tasks[i];
      size_t n = 1;
      while (i + n < c.tasks.size() && c.tasks[i + n].b == t.b && c.tasks[i + n].h == t.h && c.tasks[i + n].s0 == t.s0)
        ++n;
      const int64_t rows = (t.s1 - t.s0) * c.G;
      for (int64_t r = 0; r < rows; ++r) {
        float mx = -INFINITY;
        for (size_t j = 0; j < n; ++j) {
          const float mj = c.m[static_cast<size_t>(c.tasks[i + j].offset + r)];
          mx = (mj > mx || mj != mj) ? mj : mx;
        }
        const int64_t s = t.s0 + r / c.G, head = t.h * c.G + r % c.G;
        float* o = c.out + ((t.b * c.S + s) * heads + head) * c.D;
        std::fill(o, o + c.D, 0.0f);
        double total = 0.0;
        for (size_t j = 0; j < n; ++j) {
          const int64_t at = c.tasks[i + j].offset + r;
          const float mj = c.m[static_cast<size_t>(at)];
          if (mj == -INFINITY) continue;  // the chunk held none of this row's positions
          const float w = std::exp(mj - mx);
          total += static_cast<double>(c.l[static_cast<size_t>(at)]) * w;
          const float* acc = c.acc.data() + at * c.D;
          for (int64_t d = 0; d < c.D; ++d) o[d] += w * acc[d];
        }
        const float inv = static_cast<float>(1.0 / total);
        for (int64_t d = 0; d < c.D; ++d) o[d] *= inv;
        to_hadamard_groups(c, o);
      }
      i += n;
    }
    return nullptr;
  } catch (const std::exception& e) {
    return to_status(e);
  }
}

}  // namespace mobiq
