"""MoBiQuant in PyTorch: sliced linears and token-aware routers (simulated quantization).

The reference for calibration, evaluation and ONNX verification. Every linear of
every decoder block becomes a :class:`SlicedLinear`; linears that share an input
(q/k/v, gate/up) share one :class:`Router`. A router scores each token with a
2-layer MLP; the scores against the threshold row of the current target bits give
each token k in 1..S active slices (a prefix: slice 1 always on)::

    k_t = 1 + #{j : score_t > tau_j(target_bits)}        tau_1 <= tau_2 <= ... <= tau_{S-1}

Thresholds live in a table over a grid of target bits (THRESHOLD_GRID), fitted so
that the average bits over calibration tokens hit each grid value.
"""

from __future__ import annotations

import contextlib
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mobiquant.runtime import format as F
from mobiquant.runtime import ops

BITS_MIN, BITS_MAX, BITS_STEP = 2.0, 8.0, 0.1
THRESHOLD_GRID = np.round(np.arange(BITS_MIN, BITS_MAX + BITS_STEP / 2, BITS_STEP), 6)
ROUTER_HIDDEN = 64

# Linears per decoder block, grouped by shared input: router name -> linear names (Llama/Gemma naming).
ROUTED_GROUPS = {
    "attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn_out": ("self_attn.o_proj",),
    "mlp_in": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp_out": ("mlp.down_proj",),
}


def grid_index(target_bits: float) -> int:
    """Row of THRESHOLD_GRID used for ``target_bits`` (nearest grid point); the graph computes the same."""
    return int(np.clip(np.floor((target_bits - BITS_MIN) / BITS_STEP + 0.5), 0, len(THRESHOLD_GRID) - 1))


class Router(nn.Module):
    """Scores tokens; maps scores to per-token slice counts through the threshold table."""

    def __init__(self, in_features: int, num_slices: int, hidden: int = ROUTER_HIDDEN, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, 1)
        with torch.no_grad():
            for layer in (self.fc1, self.fc2):
                bound = 1.0 / np.sqrt(layer.in_features)
                layer.weight.uniform_(-bound, bound, generator=gen)
                layer.bias.zero_()
        self.num_slices = num_slices
        self.register_buffer("thresholds", torch.zeros(len(THRESHOLD_GRID), num_slices - 1))
        # the router's own average bits at each grid row (its allocation; the static control reads it)
        self.register_buffer("widths", torch.from_numpy(THRESHOLD_GRID.copy()).float())
        self.target_bits = BITS_MAX
        self.record: list[torch.Tensor] | None = None  # collects scores during threshold fitting
        self.int8_weights: tuple[np.ndarray, np.ndarray] | None = None  # cache of int8()

    @property
    def hidden(self) -> int:
        return self.fc1.out_features

    def resize(self, hidden: int) -> None:
        """New (zeroed) layers with ``hidden`` units, e.g. to load or fit a router of another size."""
        self.fc1 = nn.Linear(self.fc1.in_features, hidden).to(self.fc1.weight.device)
        self.fc2 = nn.Linear(hidden, 1).to(self.fc1.weight.device)
        self.int8_weights = None
        with torch.no_grad():
            for layer in (self.fc1, self.fc2):
                layer.weight.zero_()
                layer.bias.zero_()

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x))).squeeze(-1)

    def int8(self) -> tuple[np.ndarray, np.ndarray]:
        """The hidden weights as the op reads them, int8 [H, K] with one scale per hidden unit [H];
        written back rounded into fc1 (once), so this router computes what the graph computes."""
        if self.int8_weights is None:
            w = self.fc1.weight.detach().cpu().numpy().astype(np.float32)
            scale = (np.abs(w).max(axis=1) / 127).astype(np.float32)
            scale[scale == 0] = 1.0
            q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
            with torch.no_grad():
                self.fc1.weight.copy_(torch.from_numpy(q.astype(np.float32) * scale[:, None]))
            self.int8_weights = (q, scale)
        return self.int8_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Slice counts [...] (int64) for activations x [..., K]."""
        s = self.score(x)
        if self.record is not None:
            self.record.append(s.detach().reshape(-1))
        tau = self.thresholds[grid_index(self.target_bits)]
        return 1 + (s.unsqueeze(-1) > tau).sum(-1)


class SlicedLinear(nn.Module):
    """y_t = x_t W^(k_t)^T (+ bias), W^(k) the sum of the first k slice reconstructions.

    Holds each weight's full-depth code Q(S) (one byte per weight up to 4 slices), never a float copy: W^(k) is
    decoded when a forward needs it (:func:`decode_read`, ~0.5 ns per weight: 70 ms for SmolLM2, little beside a
    forward over a window) and dropped after, so the quantized model takes a quarter of its float32 size."""

    def __init__(self, sliced: F.SlicedWeight, bias: torch.Tensor | None, router: Router | None):
        super().__init__()
        self.sliced = sliced
        self.register_buffer("levels", torch.from_numpy(full_depth_levels(sliced)), persistent=False)
        self.register_buffer("scales", torch.from_numpy(sliced.scales), persistent=False)
        self.register_buffer("zero_points", torch.from_numpy(sliced.zero_points), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.router = router
        self.fixed_slices = sliced.num_slices  # used when there is no router
        self.bits_log: list[tuple[float, float]] | None = None  # (sum of k, tokens) per call, for avg bits
        self.int8_activations = False  # simulate the op's accuracy_level=4 (see quantize_activations)
        self._kept: tuple[int, torch.Tensor] | None = None  # the last read, inside reads_kept() only

    @property
    def num_slices(self) -> int:
        return self.sliced.num_slices

    def read(self, k: int) -> torch.Tensor:
        """W^(k), float32 [N, K], decoded on this module's device (once per depth inside ``reads_kept``)."""
        if self._kept is not None and self._kept[0] == k:
            return self._kept[1]
        w = decode_read(self.levels, self.scales, self.zero_points, self.num_slices, k)
        if self._kept is not None:
            self._kept = (k, w)
        return w

    @contextmanager
    def reads_kept(self):
        """Within: the last read decoded is kept, for a caller applying this linear to many chunks of positions
        (an LM head over a window, a few rows of logits at a time); one float32 copy at most."""
        self._kept = (0, None)
        try:
            yield self
        finally:
            self._kept = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8_activations:
            x_in, x = x, quantize_activations(x, self.sliced.group_size)
        else:
            x_in = x
        if self.router is None:
            y = x @ self.read(self.fixed_slices).T
            counts = None
        else:
            counts = self.router(x_in)
            flat_x, flat_k = x.reshape(-1, x.shape[-1]), counts.reshape(-1)
            present = flat_k.unique().tolist()
            if len(present) == 1:
                y = flat_x @ self.read(present[0]).T
            else:  # one matmul per slice count present: the same function as per-slice products under prefix masks
                y = x.new_empty(flat_x.shape[0], self.sliced.out_features)
                for k in present:
                    rows = (flat_k == k).nonzero().squeeze(-1)
                    y[rows] = flat_x[rows] @ self.read(k).T
            y = y.reshape(*x.shape[:-1], -1)
        if self.bits_log is not None:
            n = x.numel() // x.shape[-1]
            total = float(counts.sum()) if counts is not None else float(self.fixed_slices * n)
            self.bits_log.append((total, float(n)))
        return y if self.bias is None else y + self.bias


def full_depth_levels(sliced: F.SlicedWeight, tiles: int = 64) -> np.ndarray:
    """Q(S) = sum_e 4^(S-e) q_e per weight, [N, K] (uint8 up to 4 slices, else int32): Q(k) = Q(S) >> 2(S-k).
    Unpacked ``tiles`` tiles of 16 rows at a time (all codes of a 128k-vocabulary head at once would be 1 GB)."""
    n = sliced.out_features
    levels = np.zeros((n, sliced.in_features), np.uint8 if sliced.num_slices <= 4 else np.int32)
    for t in range(0, sliced.packed.shape[1], tiles):
        rows = slice(t * F.TILE_ROWS, min(n, (t + tiles) * F.TILE_ROWS))
        codes = F.unpack(sliced.packed[:, t: t + tiles], rows.stop - rows.start)
        for e in range(sliced.num_slices):
            levels[rows] = (levels[rows] << F.SLICE_BITS) | codes[e]
    return levels


def reads_kept(module: nn.Module):
    """``module.reads_kept()`` for a SlicedLinear (its read decoded once while inside), else a no-op context."""
    return module.reads_kept() if isinstance(module, SlicedLinear) else contextlib.nullcontext()


def decode_read(levels: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, num_slices: int,
                k: int) -> torch.Tensor:
    """W^(k) = s_k (Q(k) + 1/2) - s1 z1 with s_k = s1 / 4^(k-1), float32 [N, K] (runtime/format.py's read, in torch)."""
    n, width = levels.shape
    step = scales / 4.0 ** (k - 1)
    q = (levels >> (F.SLICE_BITS * (num_slices - k))).float().view(n, scales.shape[1], -1)
    return q.add_(0.5).mul_(step.unsqueeze(-1)).sub_((scales * zero_points).unsqueeze(-1)).view(n, width)


def constant_router(in_features: int, num_slices: int, per_row: np.ndarray) -> Router:
    """A router that gives every token ``per_row[g]`` slices at grid row g: zero weights (one hidden unit) and
    threshold rows of -/+ THRESHOLD_NEVER, which the op treats as constant (no MLP work)."""
    per_row = np.asarray(per_row)
    if per_row.shape != THRESHOLD_GRID.shape or per_row.min() < 1 or per_row.max() > num_slices:
        raise ValueError(f"[qmodel] slices per grid row expected {len(THRESHOLD_GRID)} values in 1..{num_slices}; "
                         f"got shape {per_row.shape}, range {per_row.min()}..{per_row.max()}")
    router = Router(in_features, num_slices)
    router.resize(1)
    j = np.arange(num_slices - 1)
    table = np.where(j[None, :] < per_row[:, None] - 1, -ops.THRESHOLD_NEVER, ops.THRESHOLD_NEVER)
    router.thresholds.copy_(torch.from_numpy(table.astype(np.float32)))
    return router


def quantize_activations(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """x through the op's int8 activation path: per (token, group) scale max|x|/127, round half to even."""
    shape = x.shape
    g = x.reshape(*shape[:-1], shape[-1] // group_size, group_size)
    amax = g.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / torch.where(amax > 0, amax, 1.0), 0.0)  # as the kernel: x * (127 / amax)
    return (torch.round(g * inv) * (amax / 127.0)).reshape(shape)


@dataclass
class QuantizedModel:
    """A Hugging Face causal LM whose block linears (and LM head) are SlicedLinears."""

    model: nn.Module
    routers: dict[str, Router]  # "layers.{i}.{group}" -> router
    linears: dict[str, SlicedLinear]  # "layers.{i}.{linear}" / "lm_head" -> sliced linear

    def routed_linears(self, router: str) -> list[str]:
        """Names of the linears whose slice counts ``router`` ("layers.{i}.{group}") decides."""
        layer, group = router.rsplit(".", 1)
        return [f"{layer}.{name}" for name in ROUTED_GROUPS[group]]

    def set_int8_activations(self, enabled: bool) -> None:
        for lin in self.linears.values():
            lin.int8_activations = enabled

    def set_target_bits(self, bits: float) -> None:
        for r in self.routers.values():
            r.target_bits = float(bits)
        head = self.linears["lm_head"].router
        if head is not None:
            head.target_bits = float(bits)

    def set_head_slices(self, per_row: np.ndarray | None) -> None:
        """The LM head reads ``per_row[g]`` slices at threshold-grid row g (None: its fixed depth at every budget),
        through a router whose every row is constant (no router work; the op reads what the graph reads)."""
        head = self.linears["lm_head"]
        head.router = None if per_row is None else constant_router(head.sliced.in_features, head.num_slices, per_row)

    def start_bits_log(self) -> None:
        for name, lin in self.linears.items():
            lin.bits_log = [] if name != "lm_head" else None

    def average_bits(self) -> float:
        """Weight-count-weighted average bits read by routed linears since start_bits_log."""
        num = den = 0.0
        for name, lin in self.linears.items():
            if lin.bits_log is None:
                continue
            size = lin.sliced.out_features * lin.sliced.in_features
            for total, tokens in lin.bits_log:
                num += size * total * F.SLICE_BITS
                den += size * tokens
        return num / den if den else float("nan")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    return list(model.model.layers)


def slice_model(model: nn.Module, group_size: int, num_slices: int = F.DEFAULT_NUM_SLICES,
                params: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> dict[str, F.SlicedWeight]:
    """Every block linear and the LM head of ``model`` as residual slices, by name.

    ``params`` maps a linear's name to calibrated slice-1 (scales, zero_points); without
    an entry the group min/max is used. Raises FormatError naming a layer that cannot
    be quantized (e.g. K not a multiple of the group size).
    """
    params = params or {}
    sliced = {}
    for i, layer in enumerate(decoder_layers(model)):
        for names in ROUTED_GROUPS.values():
            for name in names:
                full = f"layers.{i}.{name}"
                sliced[full] = _quantize_linear(full, _get(layer, name).weight, group_size, num_slices, params.get(full))
    sliced["lm_head"] = _quantize_linear("lm_head", model.lm_head.weight, group_size, num_slices, params.get("lm_head"))
    return sliced


def build_quantized(model: nn.Module, sliced: dict[str, F.SlicedWeight], lm_head_slices: int | None = None,
                    seed: int = 0) -> QuantizedModel:
    """Swap ``model``'s block linears and LM head for SlicedLinears (in place), adding one router per shared input."""
    routers: dict[str, Router] = {}
    linears: dict[str, SlicedLinear] = {}
    for i, layer in enumerate(decoder_layers(model)):
        for group, names in ROUTED_GROUPS.items():
            first = sliced[f"layers.{i}.{names[0]}"]
            router = Router(first.in_features, first.num_slices, seed=seed + len(routers))
            routers[f"layers.{i}.{group}"] = router
            layer.add_module(f"router_{group}", router)
            for name in names:
                full = f"layers.{i}.{name}"
                _check_shape(full, _get(layer, name), sliced[full])
                linear = SlicedLinear(sliced[full], _get(layer, name).bias, router)
                _set(layer, name, linear)
                linears[full] = linear
    _check_shape("lm_head", model.lm_head, sliced["lm_head"])
    head = SlicedLinear(sliced["lm_head"], model.lm_head.bias, None)
    head.fixed_slices = lm_head_slices or sliced["lm_head"].num_slices
    model.lm_head = head
    model.config.tie_word_embeddings = False  # the head is quantized now; the embedding stays float
    linears["lm_head"] = head
    _own_memory(model)
    return QuantizedModel(model, routers, linears)


@torch.no_grad()
def _own_memory(model: nn.Module) -> None:
    """Copy the float tensors still in use (embedding, norms) out of the source file's memory map: the mapping
    then closes, and the pages of the float linears, dead once sliced, leave the resident set (Gemma-3-270M:
    1.1 GB of a 1.1 GB file; a 1B model's: 4.7 GB)."""
    for module in model.modules():
        if not isinstance(module, (SlicedLinear, Router)):  # those are built in memory already
            for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                t.data = t.data.clone()


def _quantize_linear(name: str, weight: torch.Tensor, group_size: int, num_slices: int,
                     p: tuple[np.ndarray, np.ndarray] | None) -> F.SlicedWeight:
    w = weight.detach().float().numpy()
    try:
        if p is None:
            return F.quantize(w, group_size, num_slices)
        return F.quantize(w, group_size, num_slices, scales=p[0], zero_points=p[1])
    except F.FormatError as e:
        raise F.FormatError(f"[quantize] layer {name} (shape {tuple(w.shape)}): {e}") from e


def _check_shape(name: str, linear: nn.Module, sw: F.SlicedWeight) -> None:
    want = tuple(linear.weight.shape)
    if want != (sw.out_features, sw.in_features):
        raise F.FormatError(f"[quantize] {name} shape expected {want}; got {(sw.out_features, sw.in_features)}")


def _get(module: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def _set(module: nn.Module, dotted: str, value: nn.Module) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        module = getattr(module, part)
    setattr(module, last, value)
