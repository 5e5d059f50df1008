"""A direct ONNX graph builder for decoder-only LMs with a KV cache (Llama and Gemma 3).

One graph, batch-1 friendly::

    inputs : input_ids int64 [B, S], attention_mask int64 [B, T] (T = past + S),
             past_key_values.{i}.key|value   uint8 [B, kv_heads, blocks, block_bytes]  (attention "kv")
                                             float32 [B, kv_heads, P, head_dim]         (attention "gqa")
             target_bits float32 []                       (MoBiQuant graphs only)
    outputs: logits float32 [B, S, vocab], present.{i}.key|value (the past's type; "kv": the same shape,
             bound to the same buffers), avg_bits float32 []  (MoBiQuant graphs only)

Attention is ai.mobiquant.KVAttention (the MoBiQuant file: a cache of any precision, chosen by the
session through the block size, runtime/kvcache.py) or ONNX Runtime's com.microsoft.GroupQueryAttention
(the baselines, float32 cache); both with rotary inside (one cos/sin table per rope base;
sliding-window layers through local_window_size; the cache always holds every position; q|k|v packed
in one input; Gemma 3's and Qwen3's q/k norms are KVAttention's own inputs, or nodes before
GroupQueryAttention). A residual add and the RMSNorm after it are one
com.microsoft.SkipSimplifiedLayerNormalization; other RMSNorms are ONNX RMSNormalization (opset 23).
Fewer nodes: ~5 % faster decode on SmolLM2.
The block structure is the architecture's (:data:`FAMILIES`). How a linear layer is
computed is the caller's choice (:class:`LinearKind`): that is what differs
between the MoBiQuant file and the fp32 / MatMulNBits baselines built here too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mobiquant.tools.models import ModelError

OPSET = 23
MS_DOMAIN = "com.microsoft"
MOBIQ_DOMAIN = "ai.mobiquant"
ATTENTION_OPS = ("kv", "gqa")
# HF model_type -> block structure built here. Phi-3 arrives as Mistral (exporter/architectures.py splits its fused
# linears); Qwen2's q/k/v biases and any other linear's bias are inputs of the linear; Qwen3 norms q and k per head.
FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gemma3_text": "gemma3"}
QK_NORM = ("gemma3_text", "qwen3")  # model types with per-head RMSNorm on q and k before rotary
ACTIVATIONS = {"llama": "silu", "gemma3": "gelu_pytorch_tanh"}  # the MLP activation each family is built with


class GraphSpecError(ModelError):
    """A model configuration this builder does not reproduce (named, never silently approximated)."""


@dataclass(frozen=True)
class DecoderSpec:
    """Shapes and constants of a decoder (read from a HF config).

    ``family`` "llama": pre-norm blocks, SiLU MLP. ``family`` "gemma3": embeddings scaled by
    sqrt(hidden), RMSNorm weights used as (1 + w), norms before and after attention and MLP,
    GELU-tanh MLP. ``qk_norm``: per-head q/k RMSNorm before rotary (Gemma 3, Qwen3). Per layer:
    the rope base and the sliding window (keys a query sees, its own included; 0 = all).
    """

    family: str
    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    rms_eps: float
    max_positions: int
    rope_thetas: tuple[float, ...]
    windows: tuple[int, ...]
    attn_scale: float  # on q.k before softmax (HF's Gemma 3 ignores attn_logit_softcapping: so do we)
    intermediate: int
    qk_norm: bool = False
    final_softcap: float = 0.0  # logits -> c * tanh(logits / c) when > 0

    @classmethod
    def from_hf_config(cls, config, max_positions: int | None = None) -> "DecoderSpec":
        family = FAMILIES.get(config.model_type)
        if family is None:
            raise GraphSpecError(f"[graph] model_type expected one of {', '.join(FAMILIES)}; got {config.model_type}")
        if getattr(config, "use_bidirectional_attention", False):
            raise GraphSpecError("[graph] causal attention expected; got use_bidirectional_attention=True")
        act = getattr(config, "hidden_activation", None) or config.hidden_act
        if act != ACTIVATIONS[family]:
            raise GraphSpecError(f"[graph] {config.model_type} activation expected {ACTIVATIONS[family]}; got {act}")
        n = config.num_hidden_layers
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        window = getattr(config, "sliding_window", None)  # Mistral, Phi-3: every layer when set, no layer_types
        layer_types = getattr(config, "layer_types", None) or ["sliding_attention" if window else "full_attention"] * n
        windows = tuple(int(window) if t == "sliding_attention" else 0 for t in layer_types)
        gemma = family == "gemma3"
        return cls(family, n, config.hidden_size, config.num_attention_heads, config.num_key_value_heads, head_dim,
                   config.vocab_size, float(config.rms_norm_eps), int(max_positions or config.max_position_embeddings),
                   tuple(_rope_theta(config, t) for t in layer_types), windows,
                   float(config.query_pre_attn_scalar if gemma else head_dim) ** -0.5, int(config.intermediate_size),
                   config.model_type in QK_NORM, float(getattr(config, "final_logit_softcapping", None) or 0.0))


def _rope_theta(config, layer_type: str) -> float:
    """The rope base of a layer type: ``rope_parameters`` is one dict (Llama) or one per layer type (Gemma 3)."""
    rope = getattr(config, "rope_parameters", None) or {}
    rope = rope.get(layer_type, rope)
    if rope.get("rope_type", "default") != "default":
        raise GraphSpecError(f"[graph] rope_type expected 'default'; got {rope['rope_type']!r} ({layer_type})")
    partial = float(rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None)) or 1.0)
    if partial != 1.0:
        raise GraphSpecError(f"[graph] rotary over the whole head expected; got partial_rotary_factor {partial:g}")
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


ALIGNMENT = 4096  # external tensors start at page offsets: ONNX Runtime can map them, untouched slices stay on disk
EXTERNAL_MIN_BYTES = 1024


class TensorSink:
    """Writes every initializer of at least EXTERNAL_MIN_BYTES to one data file as it is made (page-aligned) and
    returns a tensor that points there: a graph is never held in memory with its weights. ``location`` is the
    file's name as the graph records it (relative to the graph file)."""

    def __init__(self, path: Path, location: str):
        self.file = open(path, "wb")
        self.location = location
        self.offset = 0

    def __enter__(self) -> "TensorSink":
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def tensor(self, array: np.ndarray, name: str) -> onnx.TensorProto:
        array = np.ascontiguousarray(array)
        if array.nbytes < EXTERNAL_MIN_BYTES or array.dtype.byteorder == ">":
            return numpy_helper.from_array(array, name)
        pad = (-self.offset) % ALIGNMENT
        self.file.write(b"\0" * pad)
        self.offset += pad
        self.file.write(array.data)
        tensor = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                                  dims=array.shape, data_location=onnx.TensorProto.EXTERNAL)
        for key, value in (("location", self.location), ("offset", str(self.offset)), ("length", str(array.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.offset += array.nbytes
        return tensor


@dataclass
class GraphBuilder:
    """Accumulates nodes and initializers (large ones go straight to ``sink`` when given); names values uniquely."""

    sink: TensorSink | None = None
    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)
    _count: int = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, array: np.ndarray, hint: str) -> str:
        n = self.name(hint)
        self.initializers.append(self.sink.tensor(array, n) if self.sink else
                                 numpy_helper.from_array(np.ascontiguousarray(array), n))
        return n

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, outputs: int | list[str] = 1,
           domain: str = "", **attrs) -> str | list[str]:
        names = outputs if isinstance(outputs, list) else [self.name(hint or op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, domain=domain or None, name=self.name(op_type),
                                           **attrs))
        return names[0] if len(names) == 1 else names


class LinearKind:
    """How y = x W^T (+ b) is computed; ``group`` names the linears sharing input x, ``weights`` are their float
    weights in output order (None where the kind does not need them) and ``bias`` their joined bias or None."""

    def linear(self, g: GraphBuilder, x: str, name: str, weights: list[np.ndarray | None], group: str,
               bias: np.ndarray | None = None) -> str:
        raise NotImplementedError

    def finish(self, g: GraphBuilder) -> list:
        """Extra graph inputs/outputs this kind adds: (inputs, outputs) value infos."""
        return [], []


class Fp32Linear(LinearKind):
    def linear(self, g, x, name, weights, group, bias=None):
        w = np.concatenate(weights, axis=0).astype(np.float32)
        y = g.op("MatMul", [x, g.const(w.T.copy(), f"{name}.weight_t")], name)
        return y if bias is None else g.op("Add", [y, g.const(bias.astype(np.float32), f"{name}.bias")], name)


def rotary_cache(spec: DecoderSpec, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_positions, head_dim/2] of rope base ``theta``, non-interleaved (rotate-half) rotary."""
    inv = 1.0 / theta ** (np.arange(0, spec.head_dim, 2, dtype=np.float64) / spec.head_dim)
    angles = np.outer(np.arange(spec.max_positions, dtype=np.float64), inv)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


@dataclass
class _Decoder:
    """What every block of one graph shares: builder, spec, weights, linears, attention inputs, graph I/O."""

    g: GraphBuilder
    spec: DecoderSpec
    weights: dict[str, np.ndarray]
    kind: LinearKind
    seqlens_k: str
    total_len: str
    rotary: dict[float, tuple[str, str]]  # rope base -> (cos, sin) initializers
    inputs: list
    outputs: list
    attention_op: str  # "kv": ai.mobiquant KVAttention; "gqa": com.microsoft GroupQueryAttention

    def linear(self, x: str, name: str, group: str, modules: list[str]) -> str:
        """The linears ``modules`` (HF names, in output order) on input x as one linear of ``self.kind``."""
        biases = [self.weights.get(f"{m}.bias") for m in modules]
        if any(b is not None for b in biases) and any(b is None for b in biases):
            raise GraphSpecError(f"[graph] linears sharing an input expected all or none with a bias; got "
                                 f"{', '.join(m for m, b in zip(modules, biases) if b is not None)} only")
        bias = None if biases[0] is None else np.concatenate([b.astype(np.float32) for b in biases])
        return self.kind.linear(self.g, x, name, [self.weights.get(f"{m}.weight") for m in modules], group, bias)

    def _norm_weight(self, name: str) -> str:
        """HF RMSNorm weight ``name``; Gemma 3 scales by (1 + w), computed in float32 as HF does."""
        w = self.weights[name].astype(np.float32)
        if self.spec.family == "gemma3":
            w = np.float32(1.0) + w
        return self.g.const(w, "rms_weight")

    def norm(self, x: str, name: str) -> str:
        return self.g.op("RMSNormalization", [x, self._norm_weight(name)], "rms", axis=-1, epsilon=self.spec.rms_eps)

    def add_norm(self, x: str, delta: str | None, name: str) -> tuple[str, str]:
        """(x + delta, RMSNorm(x + delta)) in one node; (x, RMSNorm(x)) when there is nothing to add."""
        if delta is None:
            return x, self.norm(x, name)
        total = self.g.name("residual")
        normed = self.g.op("SkipSimplifiedLayerNormalization", [x, delta, self._norm_weight(name)],
                           outputs=[self.g.name("rms"), "", "", total], domain=MS_DOMAIN, epsilon=self.spec.rms_eps)[0]
        return total, normed

    def head_norm(self, x: str, name: str, heads: int) -> str:
        """RMSNorm over head_dim of x [B, S, heads*head_dim], each head on its own (Gemma 3 and Qwen3 q/k norms
        before GroupQueryAttention)."""
        g = self.g
        split = g.op("Reshape", [x, g.const(np.array([0, 0, heads, self.spec.head_dim], np.int64), "heads_shape")])
        return g.op("Reshape", [self.norm(split, name), g.const(np.array([0, 0, heads * self.spec.head_dim],
                                                                         np.int64), "merged_shape")])

    def attention(self, i: int, h: str) -> str:
        """o_proj(attention(h)) of layer ``i``, appending its past/present cache to the graph I/O."""
        g, spec, pre = self.g, self.spec, f"model.layers.{i}.self_attn"
        qkv = self.linear(h, f"layers.{i}.qkv", f"layers.{i}.attn_in", [f"{pre}.{p}_proj" for p in "qkv"])
        past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        present_k, present_v = f"present.{i}.key", f"present.{i}.value"
        cos, sin = self.rotary[spec.rope_thetas[i]]
        # local_window_size = keys a query sees, its own included: HF's sliding_window as is (checked
        # numerically against HF on prompts and decode steps past the window); "all" (0) is -1 (unused).
        window = spec.windows[i] or -1
        if self.attention_op == "kv":
            # uint8 blocks whose size sets the cache precision (runtime/kvcache.py); capacity = blocks * 16
            dims = ["batch", spec.kv_heads, "kv_blocks", "kv_block_bytes"]
            self.inputs += [helper.make_tensor_value_info(n, TensorProto.UINT8, dims) for n in (past_k, past_v)]
            self.outputs += [helper.make_tensor_value_info(n, TensorProto.UINT8, dims) for n in (present_k, present_v)]
            # q|k|v stay packed; q/k norms are the op's own inputs (no split, reshapes or norm nodes)
            norms = [self._norm_weight(f"{pre}.{p}_norm.weight") for p in "qk"] if spec.qk_norm else []
            attn = g.op("KVAttention", [qkv, "", "", past_k, past_v, self.seqlens_k, cos, sin] + norms,
                        outputs=[g.name(f"attn{i}"), present_k, present_v], domain=MOBIQ_DOMAIN,
                        num_heads=spec.heads, kv_num_heads=spec.kv_heads, scale=spec.attn_scale,
                        local_window_size=window, **({"qk_norm_epsilon": spec.rms_eps} if norms else {}))[0]
        else:
            q, k, v = qkv, "", ""  # packed
            if spec.qk_norm:
                split = g.const(np.array([spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim,
                                          spec.kv_heads * spec.head_dim], np.int64), "qkv_split")
                q, k, v = g.op("Split", [qkv, split], outputs=3, axis=-1)
                q, k = (self.head_norm(q, f"{pre}.q_norm.weight", spec.heads),
                        self.head_norm(k, f"{pre}.k_norm.weight", spec.kv_heads))
            B, T, P = "batch", "total_sequence", "past_sequence"
            self.inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [B, spec.kv_heads, P, spec.head_dim])
                            for n in (past_k, past_v)]
            self.outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [B, spec.kv_heads, T, spec.head_dim])
                             for n in (present_k, present_v)]
            attn = g.op("GroupQueryAttention", [q, k, v, past_k, past_v, self.seqlens_k, self.total_len, cos, sin],
                        outputs=[g.name(f"attn{i}"), present_k, present_v], domain=MS_DOMAIN,
                        num_heads=spec.heads, kv_num_heads=spec.kv_heads, do_rotary=1, rotary_interleaved=0,
                        scale=spec.attn_scale, local_window_size=window)[0]
        return self.linear(attn, f"layers.{i}.o_proj", f"layers.{i}.attn_out", [f"{pre}.o_proj"])

    def mlp(self, i: int, h: str, activation) -> str:
        """down(act(gate(h)) * up(h)) of layer ``i``; ``activation(g, gate)`` is the architecture's."""
        g, pre = self.g, f"model.layers.{i}.mlp"
        inter = self.spec.intermediate
        gate_up = self.linear(h, f"layers.{i}.gate_up", f"layers.{i}.mlp_in", [f"{pre}.gate_proj", f"{pre}.up_proj"])
        gate, up = g.op("Split", [gate_up, g.const(np.array([inter, inter], np.int64), "gu_split")], outputs=2, axis=-1)
        act = g.op("Mul", [activation(g, gate), up], f"act{i}")
        return self.linear(act, f"layers.{i}.down_proj", f"layers.{i}.mlp_out", [f"{pre}.down_proj"])


def _silu(g: GraphBuilder, x: str) -> str:
    return g.op("Mul", [x, g.op("Sigmoid", [x])])


def _gelu_tanh(g: GraphBuilder, x: str) -> str:
    return g.op("Gelu", [x], approximate="tanh")


# A block takes the residual stream x and the previous block's output delta (not yet added: the add
# is fused with the norm that reads the sum) and returns the same pair for the next one.
def _llama_block(d: _Decoder, i: int, x: str, delta: str | None) -> tuple[str, str]:
    pre = f"model.layers.{i}"
    x, h = d.add_norm(x, delta, f"{pre}.input_layernorm.weight")
    x, h = d.add_norm(x, d.attention(i, h), f"{pre}.post_attention_layernorm.weight")
    return x, d.mlp(i, h, _silu)


def _gemma3_block(d: _Decoder, i: int, x: str, delta: str | None) -> tuple[str, str]:
    pre = f"model.layers.{i}"
    x, h = d.add_norm(x, delta, f"{pre}.input_layernorm.weight")
    attn = d.norm(d.attention(i, h), f"{pre}.post_attention_layernorm.weight")
    x, h = d.add_norm(x, attn, f"{pre}.pre_feedforward_layernorm.weight")
    return x, d.norm(d.mlp(i, h, _gelu_tanh), f"{pre}.post_feedforward_layernorm.weight")


_BLOCKS = {"llama": _llama_block, "gemma3": _gemma3_block}


EMBEDDING_BLOCK = 32  # columns per scale of the 8-bit token embedding


def embedding_rows(weights: dict[str, np.ndarray], spec: DecoderSpec) -> np.ndarray:
    """The rows the graph looks up, float32 (Gemma 3 scales them by sqrt(hidden) as HF does, in float32)."""
    embed = weights["model.embed_tokens.weight"].astype(np.float32)
    return embed * np.float32(spec.hidden ** 0.5) if spec.family == "gemma3" else embed


def quantize_rows(rows: np.ndarray, block: int = EMBEDDING_BLOCK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """8-bit asymmetric blocks along each row: (codes uint8 [V, K], scales float32 [V, K/block], zero points
    uint8 [V, K/block]), as GatherBlockQuantized (com.microsoft, bits=8) dequantizes: (code - zero) * scale."""
    v, k = rows.shape
    if k % block:
        raise ValueError(f"[graph] embedding width expected a multiple of {block}; got {k}")
    g = rows.reshape(v, k // block, block).astype(np.float64)
    lo, hi = np.minimum(g.min(-1), 0.0), np.maximum(g.max(-1), 0.0)  # 0 stays exact
    scale = np.where(hi > lo, (hi - lo) / 255.0, 1.0).astype(np.float32)
    zero = np.clip(np.round(-lo / scale), 0, 255).astype(np.uint8)
    codes = np.clip(np.round(g / scale[..., None]) + zero[..., None], 0, 255).astype(np.uint8)
    return codes.reshape(v, k), scale, zero


def dequantize_rows(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    v, k = codes.shape
    g = codes.reshape(v, scale.shape[1], -1).astype(np.float32) - zero[..., None].astype(np.float32)
    return (g * scale[..., None]).reshape(v, k)


def head_rows(g: GraphBuilder, ids: str, slices: str, scales: str, zeros: str, num_slices: int, k: int,
              group_size: int, out: str) -> str:
    """The rows ``ids`` of a ResidualSliceMatMul weight at full depth, W^(S) (runtime/format.py ``dequantize``),
    decoded from its packed slices with standard ONNX ops: a tied model's token embedding read from its LM head,
    no bytes of its own. Per token it touches S x K/4 bytes of slices and one row of scales and zero points."""
    i64 = lambda a, hint: g.const(np.array(a, np.int64), hint)  # noqa: E731
    sixteen, first = i64(16, "sixteen"), i64([0], "axis0")
    tile = g.op("Div", [ids, sixteen], "head_tile")
    row = g.op("Mod", [ids, sixteen], "head_row_in_tile")
    tiles = g.op("Gather", [slices, tile], "head_tiles", axis=1)  # [S, B, T, K/16, 64]
    shape = g.op("Shape", [tiles], "head_tiles_shape")
    lead = g.op("Slice", [shape, first, i64([4], "four")], "head_lead")  # [S, B, T, K/16]
    by_row = g.op("Reshape", [tiles, g.op("Concat", [lead, i64([16, 4], "rows_bytes")], axis=0)], "head_by_row")
    want = g.op("Reshape", [row, g.op("Concat", [i64([1], "one"), g.op("Shape", [ids]), i64([1, 1, 1], "ones3")],
                                      axis=0)], "head_row_index")  # [1, B, T, 1, 1, 1]
    index = g.op("Expand", [want, g.op("Concat", [lead, i64([1, 4], "one_four")], axis=0)], "head_row_index_full")
    picked = g.op("GatherElements", [by_row, index], "head_row_bytes", axis=4)  # [S, B, T, K/16, 1, 4]
    shifts = g.const(np.array([0, 2, 4, 6], np.uint8).reshape(4, 1), "pair_shifts")  # bit pair i: columns 4i + b
    codes = g.op("BitwiseAnd", [g.op("BitShift", [picked, shifts], direction="RIGHT"),
                                g.const(np.array(3, np.uint8), "three")], "head_codes")  # [S, B, T, K/16, 4, 4]
    flat = g.op("Reshape", [g.op("Cast", [codes], to=TensorProto.FLOAT),
                            g.op("Concat", [g.op("Slice", [shape, first, i64([3], "three_i")]),
                                            i64([k // group_size, group_size], "groups")], axis=0)], "head_q")
    weights = np.array([4.0 ** -e for e in range(num_slices)], np.float32).reshape(num_slices, 1, 1, 1, 1)
    combo = g.op("ReduceSum", [g.op("Mul", [flat, g.const(weights, "slice_weights")]), first],
                 "head_combo", keepdims=0)  # sum_e q_e / 4^e, [B, T, K/g, g]
    offset = np.float32(0.5 - 1.5 * sum(4.0 ** -e for e in range(1, num_slices)))
    s1 = g.op("Unsqueeze", [g.op("Gather", [scales, ids], axis=0), i64([-1], "last")])  # [B, T, K/g, 1]
    z1 = g.op("Unsqueeze", [g.op("Gather", [zeros, ids], axis=0), i64([-1], "last")])
    level = g.op("Sub", [g.op("Add", [combo, g.const(np.array(offset), "head_offset")]), z1])
    rows = g.op("Mul", [level, s1], "head_rows_grouped")
    return g.op("Reshape", [rows, g.op("Concat", [g.op("Shape", [ids]), i64([k], "width")], axis=0)], outputs=[out])


def _embedding_from_head(g: GraphBuilder, spec: DecoderSpec, logits: str) -> None:
    """Prepend the nodes that make "embeddings" from the LM head node's slices (its inputs 1..3)."""
    head = next(n for n in g.nodes if logits in n.output)
    if head.op_type != "ResidualSliceMatMul":
        raise ValueError(f"[graph] an embedding read from the LM head needs a ResidualSliceMatMul head; got {head.op_type}")
    attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    start = len(g.nodes)
    rows = head_rows(g, "input_ids", head.input[1], head.input[2], head.input[3], attrs["num_slices"], spec.hidden,
                     attrs["group_size"], "embeddings" if spec.family != "gemma3" else "head_embedding_rows")
    if spec.family == "gemma3":  # HF multiplies the looked-up rows by sqrt(hidden) in float32
        g.op("Mul", [rows, g.const(np.array(spec.hidden ** 0.5, np.float32), "embed_scale")], outputs=["embeddings"])
    g.nodes[:] = g.nodes[start:] + g.nodes[:start]  # they depend only on input_ids and initializers


def build_decoder(spec: DecoderSpec, weights: dict[str, np.ndarray], kind: LinearKind,
                  lm_head: LinearKind | None = None, embedding_bits: int = 32, attention: str = "kv",
                  sink: TensorSink | None = None) -> onnx.ModelProto:
    """The decoder graph. ``weights`` holds HF-named float tensors (embeddings, norms, linears). The token
    embedding is float32 (``embedding_bits`` 32), or 8-bit blocks read by GatherBlockQuantized (8), or — 0, for
    a tied model whose LM head is a ResidualSliceMatMul — the head's own slices at full depth (:func:`head_rows`).
    ``attention`` "kv": KVAttention over uint8 cache blocks of any precision (the MoBiQuant file); "gqa": ONNX
    Runtime's GroupQueryAttention over a float32 cache (the baselines: what ONNX Runtime users run). ``sink``:
    where large initializers are written as they are made (else they stay inside the returned graph)."""
    if attention not in ATTENTION_OPS:
        raise ValueError(f"[graph] attention expected one of {', '.join(ATTENTION_OPS)}; got {attention}")
    g = GraphBuilder(sink)
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_sequence"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", spec.vocab])]

    # seqlens_k = tokens so far - 1 per row; total_sequence_length = T (GroupQueryAttention's contract).
    mask_sum = g.op("ReduceSum", [g.op("Cast", ["attention_mask"], to=TensorProto.INT32),
                                  g.const(np.array([1], np.int64), "axis1")], keepdims=0)
    seqlens_k = g.op("Sub", [mask_sum, g.const(np.array(1, np.int32), "one_i32")], "seqlens_k")
    total_len = "" if attention == "kv" else g.op(
        "Cast", [g.op("Gather", [g.op("Shape", ["attention_mask"]), g.const(np.array(1, np.int64), "idx1")])],
        "total_len", to=TensorProto.INT32)
    rotary = {theta: tuple(g.const(t, f"{n}_cache_{theta:g}") for t, n in zip(rotary_cache(spec, theta),
                                                                               ("cos", "sin")))
              for theta in dict.fromkeys(spec.rope_thetas)}  # one table per distinct rope base
    d = _Decoder(g, spec, weights, kind, seqlens_k, total_len, rotary, inputs, outputs, attention)

    embed = embedding_rows(weights, spec)
    if embedding_bits == 0:
        x = "embeddings"  # made from the LM head's slices once the head exists (below)
    elif embedding_bits == 8:
        codes, scale, zero = quantize_rows(embed)
        x = g.op("GatherBlockQuantized", [g.const(codes, "embed_tokens.codes"), "input_ids",
                                          g.const(scale, "embed_tokens.scales"), g.const(zero, "embed_tokens.zero")],
                 "embeddings", domain=MS_DOMAIN, gather_axis=0, quantize_axis=1, block_size=EMBEDDING_BLOCK, bits=8)
    elif embedding_bits == 32:
        x = g.op("Gather", [g.const(embed, "embed_tokens"), "input_ids"], "embeddings")
    else:
        raise ValueError(f"[graph] embedding_bits expected 0, 8 or 32; got {embedding_bits}")
    delta = None
    for i in range(spec.num_layers):
        x, delta = _BLOCKS[spec.family](d, i, x, delta)
    _, x = d.add_norm(x, delta, "model.norm.weight")
    head_weight = weights.get("lm_head.weight", weights.get("model.embed_tokens.weight"))
    logits = (lm_head or kind).linear(g, x, "lm_head", [head_weight], "lm_head", weights.get("lm_head.bias"))
    if embedding_bits == 0:
        _embedding_from_head(g, spec, logits)
    if spec.final_softcap:
        cap = g.const(np.array(spec.final_softcap, np.float32), "final_softcap")
        logits = g.op("Mul", [g.op("Tanh", [g.op("Div", [logits, cap])]), cap])
    g.op("Identity", [logits], outputs=["logits"])
    extra_in, extra_out = kind.finish(g)
    graph = helper.make_graph(g.nodes, "mobiquant_decoder", d.inputs + extra_in, d.outputs + extra_out,
                              initializer=g.initializers)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
    if any(n.domain == MOBIQ_DOMAIN for n in g.nodes):
        opsets.append(helper.make_opsetid(MOBIQ_DOMAIN, 1))
    return helper.make_model(graph, opset_imports=opsets, producer_name="mobiquant")
