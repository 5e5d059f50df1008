"""A direct ONNX graph builder for decoder-only LMs with a KV cache (Llama family).

One graph, batch-1 friendly, KV cache in BNSH layout::

    inputs : input_ids int64 [B, S], attention_mask int64 [B, T] (T = past + S),
             past_key_values.{i}.key|value float32 [B, kv_heads, P, head_dim],
             target_bits float32 []                       (MoBiQuant graphs only)
    outputs: logits float32 [B, S, vocab], present.{i}.key|value [B, kv_heads, T, head_dim],
             avg_bits float32 []                          (MoBiQuant graphs only)

Attention is ONNX Runtime's com.microsoft.GroupQueryAttention with rotary inside;
RMSNorm is ONNX RMSNormalization (opset 23). How a linear layer is
computed is the caller's choice (:class:`LinearKind`): that is what differs
between the MoBiQuant file and the fp32 / MatMulNBits baselines built here too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 23
MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class DecoderSpec:
    """Shapes and constants of a Llama-style decoder (read from a HF config)."""

    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    rms_eps: float
    rope_theta: float
    max_positions: int

    @classmethod
    def from_hf_config(cls, config, max_positions: int | None = None) -> "DecoderSpec":
        rope = getattr(config, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
                   config.num_key_value_heads, head_dim, config.vocab_size, float(config.rms_norm_eps), float(theta),
                   int(max_positions or config.max_position_embeddings))


@dataclass
class GraphBuilder:
    """Accumulates nodes and initializers; names values uniquely."""

    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)
    _count: int = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, array: np.ndarray, hint: str) -> str:
        n = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), n))
        return n

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, outputs: int | list[str] = 1,
           domain: str = "", **attrs) -> str | list[str]:
        names = outputs if isinstance(outputs, list) else [self.name(hint or op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, domain=domain or None, name=self.name(op_type),
                                           **attrs))
        return names[0] if len(names) == 1 else names


class LinearKind:
    """How y = x W^T (+ b) is computed; ``group`` names the linears sharing input x."""

    def linear(self, g: GraphBuilder, x: str, name: str, weights: list[np.ndarray], group: str) -> str:
        raise NotImplementedError

    def finish(self, g: GraphBuilder) -> list:
        """Extra graph inputs/outputs this kind adds: (inputs, outputs) value infos."""
        return [], []


class Fp32Linear(LinearKind):
    def linear(self, g, x, name, weights, group):
        w = np.concatenate(weights, axis=0).astype(np.float32)
        return g.op("MatMul", [x, g.const(w.T.copy(), f"{name}.weight_t")], name)


def rotary_cache(spec: DecoderSpec) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_positions, head_dim/2] for non-interleaved (rotate-half) rotary."""
    inv = 1.0 / spec.rope_theta ** (np.arange(0, spec.head_dim, 2, dtype=np.float64) / spec.head_dim)
    angles = np.outer(np.arange(spec.max_positions, dtype=np.float64), inv)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def build_decoder(spec: DecoderSpec, weights: dict[str, np.ndarray], kind: LinearKind,
                  lm_head: LinearKind | None = None) -> onnx.ModelProto:
    """The decoder graph. ``weights`` holds HF-named float tensors (embeddings, norms, linears)."""
    g = GraphBuilder()
    B, S, T, P = "batch", "sequence", "total_sequence", "past_sequence"
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [B, S]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [B, T])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [B, S, spec.vocab])]

    # seqlens_k = tokens so far - 1 per row; total_sequence_length = T (GroupQueryAttention's contract).
    mask_sum = g.op("ReduceSum", [g.op("Cast", ["attention_mask"], to=TensorProto.INT32),
                                  g.const(np.array([1], np.int64), "axis1")], keepdims=0)
    seqlens_k = g.op("Sub", [mask_sum, g.const(np.array(1, np.int32), "one_i32")], "seqlens_k")
    total_len = g.op("Cast", [g.op("Gather", [g.op("Shape", ["attention_mask"]), g.const(np.array(1, np.int64), "idx1")])],
                     "total_len", to=TensorProto.INT32)
    cos, sin = rotary_cache(spec)
    cos_name, sin_name = g.const(cos, "cos_cache"), g.const(sin, "sin_cache")

    x = g.op("Gather", [g.const(weights["model.embed_tokens.weight"].astype(np.float32), "embed_tokens"), "input_ids"],
             "embeddings")
    qkv_split = g.const(np.array([spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim,
                                  spec.kv_heads * spec.head_dim], np.int64), "qkv_split")
    for i in range(spec.num_layers):
        pre = f"model.layers.{i}"
        h = _rms_norm(g, x, weights[f"{pre}.input_layernorm.weight"], spec.rms_eps)
        qkv = kind.linear(g, h, f"layers.{i}.qkv", [weights[f"{pre}.self_attn.{p}_proj.weight"] for p in "qkv"],
                          f"layers.{i}.attn_in")
        q, k, v = g.op("Split", [qkv, qkv_split], outputs=3, axis=-1)
        past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        present_k, present_v = f"present.{i}.key", f"present.{i}.value"
        kv_shape = [B, spec.kv_heads, P, spec.head_dim]
        inputs += [helper.make_tensor_value_info(past_k, TensorProto.FLOAT, kv_shape),
                   helper.make_tensor_value_info(past_v, TensorProto.FLOAT, kv_shape)]
        out_shape = [B, spec.kv_heads, T, spec.head_dim]
        outputs += [helper.make_tensor_value_info(present_k, TensorProto.FLOAT, out_shape),
                    helper.make_tensor_value_info(present_v, TensorProto.FLOAT, out_shape)]
        attn = g.op("GroupQueryAttention", [q, k, v, past_k, past_v, seqlens_k, total_len, cos_name, sin_name],
                    outputs=[g.name(f"attn{i}"), present_k, present_v], domain=MS_DOMAIN,
                    num_heads=spec.heads, kv_num_heads=spec.kv_heads, do_rotary=1, rotary_interleaved=0)[0]
        o = kind.linear(g, attn, f"layers.{i}.o_proj", [weights[f"{pre}.self_attn.o_proj.weight"]],
                        f"layers.{i}.attn_out")
        x = g.op("Add", [x, o], f"residual{i}a")
        h = _rms_norm(g, x, weights[f"{pre}.post_attention_layernorm.weight"], spec.rms_eps)
        inter = weights[f"{pre}.mlp.gate_proj.weight"].shape[0]
        gate_up = kind.linear(g, h, f"layers.{i}.gate_up",
                              [weights[f"{pre}.mlp.gate_proj.weight"], weights[f"{pre}.mlp.up_proj.weight"]],
                              f"layers.{i}.mlp_in")
        gate, up = g.op("Split", [gate_up, g.const(np.array([inter, inter], np.int64), "gu_split")], outputs=2, axis=-1)
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up], f"act{i}")
        down = kind.linear(g, act, f"layers.{i}.down_proj", [weights[f"{pre}.mlp.down_proj.weight"]],
                           f"layers.{i}.mlp_out")
        x = g.op("Add", [x, down], f"residual{i}b")
    x = _rms_norm(g, x, weights["model.norm.weight"], spec.rms_eps)
    head_weight = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
    g.op("Identity", [(lm_head or kind).linear(g, x, "lm_head", [head_weight], "lm_head")], outputs=["logits"])
    extra_in, extra_out = kind.finish(g)
    graph = helper.make_graph(g.nodes, "mobiquant_decoder", inputs + extra_in, outputs + extra_out,
                              initializer=g.initializers)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
    if any(n.domain == "ai.mobiquant" for n in g.nodes):
        opsets.append(helper.make_opsetid("ai.mobiquant", 1))
    return helper.make_model(graph, opset_imports=opsets, producer_name="mobiquant")


def _rms_norm(g: GraphBuilder, x: str, weight: np.ndarray, eps: float) -> str:
    return g.op("RMSNormalization", [x, g.const(weight.astype(np.float32), "rms_weight")], "rms", axis=-1, epsilon=eps)
