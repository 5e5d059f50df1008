"""How each kind of exported model computes its linear layers (see graph.LinearKind).

- :class:`MoBiQuantLinear`: ``ai.mobiquant::ResidualSliceMatMul`` with its router fused
  in (one node per routed linear: the router's int8 MLP, threshold table and the
  budget's row are inputs of the op). Linears sharing an input are packed into one
  op (q|k|v, gate|up), so each router runs once per input. The threshold row for
  the graph input ``target_bits`` is computed once for the graph; the average bits
  actually read is a graph output, from the counts each op reports.
- :class:`MatMulNBitsLinear`: ONNX Runtime's ``com.microsoft::MatMulNBits`` (the
  incumbent), asymmetric round-to-nearest per block — a speed baseline.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from mobiquant.runtime import format as F
from mobiquant.runtime import ops

from .graph import MS_DOMAIN, GraphBuilder, LinearKind
from .qmodel import BITS_MIN, BITS_STEP, ROUTED_GROUPS, THRESHOLD_GRID, QuantizedModel

TARGET_BITS, AVG_BITS = "target_bits", "avg_bits"


class MoBiQuantLinear(LinearKind):
    def __init__(self, qmodel: QuantizedModel, accuracy_level: int = ops.ACCURACY_INT8):
        self.q = qmodel
        self.accuracy_level = accuracy_level
        for router in qmodel.routers.values():
            router.int8()  # the weights the graph stores, rounded into the PyTorch routers (once)
        self._row: str | None = None  # threshold-row index for target_bits (built once)
        self._usage: list[tuple[str, int]] = []  # (slice counts [B, S], weights they apply to)

    def linear(self, g: GraphBuilder, x: str, name: str, weights: list, group: str,
               bias: np.ndarray | None = None) -> str:
        if group == "lm_head":  # its fixed depth, or the depth its constant router gives each budget
            head = self.q.linears["lm_head"]
            if head.router is None:
                return self._op(g, x, name, head.sliced.prefix(head.fixed_slices), bias)
            return self._op(g, x, name, head.sliced, bias, self._router_inputs(g, "lm_head", head.router))[0]
        layer, kind = group.rsplit(".", 1)
        sw = F.concat_rows([self.q.linears[f"{layer}.{lin}"].sliced for lin in ROUTED_GROUPS[kind]])
        y, counts = self._op(g, x, name, sw, bias, self._router_inputs(g, group))
        self._usage.append((counts, sw.out_features * sw.in_features))
        return y

    def _op(self, g: GraphBuilder, x: str, name: str, sw: F.SlicedWeight, bias: np.ndarray | None = None,
            router: list[str] | None = None):
        """Y (no router), or (Y, slice_counts) of one ResidualSliceMatMul node."""
        inputs = [x, g.const(sw.packed, f"{name}.slices"), g.const(sw.scales, f"{name}.scales"),
                  g.const(sw.zero_points, f"{name}.zero_points")]
        if bias is not None or router is not None:  # no slice_counts: the router (or the weight's depth) decides
            inputs += ["", "" if bias is None else g.const(bias.astype(np.float32), f"{name}.bias")]
        if router is not None:
            inputs += router
        return g.op(ops.OP_TYPE, inputs, name, outputs=2 if router is not None else 1, domain=ops.DOMAIN,
                    K=sw.in_features, N=sw.out_features, group_size=sw.group_size, num_slices=sw.num_slices,
                    slice_bits=F.SLICE_BITS, layout=F.LAYOUT_VERSION, accuracy_level=self.accuracy_level)

    def _router_inputs(self, g: GraphBuilder, group: str, router=None) -> list[str]:
        """The op's inputs router_w1 .. threshold_row for router ``group`` (or ``router``, named ``group``)."""
        r = router or self.q.routers[group]
        w1, w1_scale = r.int8()
        return [g.const(w1.T.copy(), f"{group}.router.w1"), g.const(w1_scale, f"{group}.router.w1_scale"),
                g.const(r.fc1.bias.detach().numpy(), f"{group}.router.b1"),
                g.const(r.fc2.weight.detach().numpy().reshape(-1).copy(), f"{group}.router.w2"),
                g.const(r.fc2.bias.detach().numpy().reshape(-1).copy(), f"{group}.router.b2"),
                g.const(r.thresholds.numpy().astype(np.float32), f"{group}.router.thresholds"),
                self._threshold_row(g)]

    def _threshold_row(self, g: GraphBuilder) -> str:
        """Row of the threshold tables for target_bits: nearest grid point, clipped (as qmodel.grid_index)."""
        if self._row is None:
            pos = g.op("Floor", [g.op("Add", [
                g.op("Div", [g.op("Sub", [TARGET_BITS, g.const(np.array(BITS_MIN, np.float32), "bits_min")]),
                             g.const(np.array(BITS_STEP, np.float32), "bits_step")]),
                g.const(np.array(0.5, np.float32), "half")])])
            clipped = g.op("Clip", [pos, g.const(np.array(0.0, np.float32), "zero"),
                                    g.const(np.array(len(THRESHOLD_GRID) - 1, np.float32), "last_row")])
            self._row = g.op("Cast", [clipped], "threshold_row", to=TensorProto.INT64)
        return self._row

    def finish(self, g: GraphBuilder):
        """target_bits input; avg_bits = 2 * sum_r weights_r * sum_t k_rt / (sum_r weights_r * tokens)."""
        sizes = np.array([n for _, n in self._usage], np.float32)
        # counts [B, S] of every router side by side: [B, R*S], router-major, viewed as [B, R, S]
        stacked = g.op("Reshape", [g.op("Concat", [c for c, _ in self._usage], axis=-1),
                                   g.const(np.array([0, len(sizes), -1], np.int64), "batch_routers_tokens")])
        per_router = g.op("ReduceSum", [g.op("Cast", [stacked], to=TensorProto.FLOAT),
                                        g.const(np.array([0, 2], np.int64), "axes_0_2")], keepdims=0)
        total = g.op("ReduceSum", [g.op("Mul", [per_router, g.const(sizes * F.SLICE_BITS, "router_weights")])],
                     keepdims=0)
        tokens = g.op("Cast", [g.op("Size", [self._usage[0][0]])], "tokens", to=TensorProto.FLOAT)
        avg = g.op("Div", [total, g.op("Mul", [tokens, g.const(np.array(sizes.sum(), np.float32), "all_weights")])])
        g.op("Reshape", [avg, g.const(np.zeros(0, np.int64), "scalar_shape")], outputs=[AVG_BITS])
        return ([helper.make_tensor_value_info(TARGET_BITS, TensorProto.FLOAT, [])],
                [helper.make_tensor_value_info(AVG_BITS, TensorProto.FLOAT, [])])


class MatMulNBitsLinear(LinearKind):
    """Asymmetric round-to-nearest ``bits``-bit blocks of ``block_size``, int8 compute (accuracy_level 4)."""

    def __init__(self, bits: int = 4, block_size: int = 64):
        self.bits, self.block_size = bits, block_size

    def linear(self, g, x, name, weights, group, bias=None):
        w = np.concatenate(weights, axis=0).astype(np.float64)
        n, k = w.shape
        bs, levels = self.block_size, 2**self.bits - 1
        blocks = w.reshape(n, k // bs, bs)
        lo, hi = np.minimum(blocks.min(-1), 0), np.maximum(blocks.max(-1), 0)
        scale = np.where(hi > lo, (hi - lo) / levels, 1.0)
        zp = np.clip(np.round(-lo / scale), 0, levels).astype(np.uint8)
        q = np.clip(np.round(blocks / scale[..., None]) + zp[..., None], 0, levels).astype(np.uint8)
        per_byte = 8 // self.bits
        q = q.reshape(n, k // bs, bs // per_byte, per_byte)
        packed = sum(q[..., j] << (self.bits * j) for j in range(per_byte)).astype(np.uint8)
        zp_rows = zp if (k // bs) % per_byte == 0 else np.pad(zp, ((0, 0), (0, per_byte - (k // bs) % per_byte)))
        zp_packed = sum(zp_rows.reshape(n, -1, per_byte)[..., j] << (self.bits * j) for j in range(per_byte))
        inputs = [x, g.const(packed, f"{name}.B"), g.const(scale.astype(np.float32).reshape(-1), f"{name}.scales"),
                  g.const(zp_packed.astype(np.uint8).reshape(-1), f"{name}.zero_points")]
        if bias is not None:  # inputs 4, 5: no g_idx, bias
            inputs += ["", g.const(bias.astype(np.float32), f"{name}.bias")]
        return g.op("MatMulNBits", inputs,
                    name, domain=MS_DOMAIN, K=k, N=n, bits=self.bits, block_size=bs, accuracy_level=4)
