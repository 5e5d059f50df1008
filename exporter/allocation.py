"""Where the slices go: a per-router bit allocation from measured per-token sensitivity.

Below 4 bits some weights must be read with slice 1 alone (2 bits), and on a small
model a 2-bit read costs very different amounts in different places (SmolLM2: the
last block's MLP or a middle block's attention input ~10-50x a middle block's
attention output projection) and for different tokens (the top 10 % of tokens carry
~30-60 % of a router's KL). :func:`token_sensitivity` measures, on calibration text,
the KL divergence of the next-token distribution at every token when one router alone
reads one slice while all others read the base (4 bits). Each router's
:class:`CostCurve` says what sending a fraction of its tokens down costs when its
tokens are taken in its routing order (a straight line for a router without per-token
information). :func:`allocate` meets a budget b below the base by taking curve pieces
cheapest KL per weight-bit first; above the base, slices are added where they gain
most, assuming each slice cuts a router's error ~16x (SmolLM2 validation PPL at 6 bits:
34.19 against 34.41 for every router at 6). Straight lines give the per-router
allocation (one fractional router per budget); bent curves split the tokens of many
routers. A fractional router keeps its top-scoring tokens at the higher width
(water-filling over its own scores, :mod:`.thresholds`), so the average bits barely
depend on the text. Lowering b only ever removes slices.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mobiquant.runtime import format as F

from .blockwise import capture_block_inputs, run_block
from .qmodel import QuantizedModel, decoder_layers, grid_index, reads_kept
from .thresholds import NEVER, threshold_rows

BASE_BITS = 4.0


def router_sizes(qmodel: QuantizedModel) -> dict[str, int]:
    """Weights each router's counts apply to (the weight of its reads in the average bits)."""
    return {name: sum(qmodel.linears[lin].sliced.out_features * qmodel.linears[lin].sliced.in_features
                      for lin in qmodel.routed_linears(name)) for name in qmodel.routers}


def _logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The LM's output from the last block's hidden states (final norm, head, Gemma's soft cap if set)."""
    logits = model.lm_head(model.model.norm(hidden)).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


@dataclass
class Probe:
    """Per-token sensitivity of every router (see :func:`token_sensitivity`), tokens flattened window-major."""

    kl: dict[str, np.ndarray]  # router -> [tokens] KL(base || router alone at one slice) at each position
    inputs: dict[str, np.ndarray] | None  # router -> [tokens, K] float32 router input at the base read
    positions: np.ndarray  # [tokens] position in its window (0: the BOS token)


REFERENCE_CACHE_BYTES = 256 << 20  # reference log-probabilities kept across routers up to this size (Gemma-3-270M's
# 262k vocabulary over 2 x 512 probe positions is 1 GiB: recomputed per router instead, a head pass each)
LOGIT_CHUNK_BYTES = 64 << 20  # float32 logits computed at once: positions per chunk = this / (4 x vocab)


class _TokenKL:
    """KL(p_ref || p_probe) per token [n, T] from the last block's hidden states, a chunk of positions at a time
    (LOGIT_CHUNK_BYTES of logits: a 128k-262k vocabulary's logits for whole windows would be gigabytes); the
    reference's log-probabilities are computed once when they fit in REFERENCE_CACHE_BYTES."""

    def __init__(self, model: torch.nn.Module, reference: torch.Tensor):
        self.model, self.shape = model, reference.shape[:2]
        self.reference = reference.reshape(-1, reference.shape[-1])
        vocab = model.config.vocab_size
        self.rows = max(1, LOGIT_CHUNK_BYTES // (4 * vocab))
        fits = self.reference.shape[0] * vocab * 4 <= REFERENCE_CACHE_BYTES
        with reads_kept(model.lm_head):
            self.cached = [self._ref(i) for i in range(0, len(self.reference), self.rows)] if fits else None

    def _ref(self, i: int) -> torch.Tensor:
        return torch.log_softmax(_logits(self.model, self.reference[i: i + self.rows]), -1)

    def __call__(self, probed: torch.Tensor) -> torch.Tensor:
        flat, out = probed.reshape(-1, probed.shape[-1]), []
        with reads_kept(self.model.lm_head):  # the head decoded once per call, not per chunk
            for j, i in enumerate(range(0, len(flat), self.rows)):
                ref = self.cached[j] if self.cached is not None else self._ref(i)
                probe = torch.log_softmax(_logits(self.model, flat[i: i + self.rows]), -1)
                out.append((ref.exp() * (ref - probe)).sum(-1))
        return torch.cat(out).reshape(self.shape)


@torch.no_grad()
def token_sensitivity(qmodel: QuantizedModel, tokens: torch.Tensor, base: float = BASE_BITS, inputs: bool = True,
                      progress: bool = True) -> Probe:
    """Per router r and token t: KL(base read || base read with r alone at one slice) at t, over ``tokens``
    [n, T], and (``inputs``) r's input activations at the base read.

    Every router's table row for ``base`` is set to the uniform read for the measurement and
    restored after. Block inputs of the base read are cached, so probing a router in block i
    runs blocks i.. only."""
    model, row = qmodel.model, grid_index(base)
    layers = decoder_layers(model)
    names = {i: [n for n in qmodel.routers if n.startswith(f"layers.{i}.")] for i in range(len(layers))}
    saved = {name: r.thresholds[row].clone() for name, r in qmodel.routers.items()}
    uniform = {name: _uniform_row(r, base) for name, r in qmodel.routers.items()}
    qmodel.set_target_bits(base)
    kl: dict[str, np.ndarray] = {}
    captured, handles = {}, []
    t0 = time.time()
    try:
        for name, r in qmodel.routers.items():
            r.thresholds[row] = uniform[name]
        x, kwargs = capture_block_inputs(model, tokens)  # (runs a first batch of windows through the model)
        if inputs:
            captured, handles = _capture_inputs(qmodel)
        block_inputs = []
        for layer, kw in zip(layers, kwargs):
            block_inputs.append(x)
            x = run_block(layer, x, kw)
        for h in handles:
            h.remove()
        token_kl = _TokenKL(model, x)
        for i in range(len(layers)):
            for name in names[i]:
                router = qmodel.routers[name]
                router.thresholds[row] = NEVER  # no token passes: slice 1 only
                x = block_inputs[i]
                for layer, kw in zip(layers[i:], kwargs[i:]):
                    x = run_block(layer, x, kw)
                router.thresholds[row] = uniform[name]
                kl[name] = token_kl(x).reshape(-1).cpu().numpy()
                if progress:
                    print(f"\r[allocation] sensitivity {len(kl)}/{len(qmodel.routers)} {name}: KL "
                          f"{kl[name].mean():.4f} ({time.time() - t0:.0f}s)", end="", file=sys.stderr, flush=True)
    finally:
        for h in handles:
            h.remove()
        for name, r in qmodel.routers.items():
            r.thresholds[row] = saved[name]
        if progress:
            print(file=sys.stderr)
    positions = _positions(tokens)
    return Probe(kl, captured if inputs else None, positions)


def _positions(tokens: torch.Tensor) -> np.ndarray:
    """Each token's position in its window, flattened window-major as the probe's values."""
    return np.tile(np.arange(tokens.shape[1]), tokens.shape[0])


def _uniform_row(router, base: float) -> torch.Tensor:
    """The threshold row that gives every token ``base`` bits (an even width: no scores needed)."""
    return torch.from_numpy(threshold_rows(np.zeros(1), router.num_slices, np.array([base]))[0]).float()


def _capture_inputs(qmodel: QuantizedModel) -> tuple[dict[str, np.ndarray], list]:
    """Hooks that keep each router's first input of the next forward pass [tokens, K] (float32, CPU)."""
    captured: dict[str, np.ndarray] = {}
    handles = []
    for name, router in qmodel.routers.items():
        def grab(module, args, name=name):  # q/k/v call their shared router with the same input: keep the first
            captured.setdefault(name, args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu().numpy())
        handles.append(router.register_forward_pre_hook(grab))
    return captured, handles


PROBE_CACHE = "sensitivity-probe.npz"  # beside a checkpoint: the per-token KL of its last probe


def cached_token_sensitivity(qmodel: QuantizedModel, tokens: torch.Tensor, cache: Path | None, inputs: bool = True,
                             progress: bool = True) -> Probe:
    """:func:`token_sensitivity`, its KL kept in ``cache`` for the same slices and tokens (the router
    inputs, one forward pass, are recomputed)."""
    import hashlib

    digest = hashlib.sha256(tokens.cpu().numpy().tobytes())
    for lin in qmodel.linears.values():
        digest.update(lin.sliced.packed[:, :1].tobytes() + lin.sliced.scales.tobytes())
    key = digest.hexdigest()
    if cache is not None and cache.is_file():
        saved = np.load(cache, allow_pickle=False)
        if str(saved["key"]) == key:
            kl = {name: saved[f"kl/{name}"] for name in qmodel.routers}
            captured = router_inputs(qmodel, tokens) if inputs else None
            if progress:
                print(f"[allocation] per-token sensitivity from {cache}", file=sys.stderr)
            return Probe(kl, captured, _positions(tokens))
    probe = token_sensitivity(qmodel, tokens, inputs=inputs, progress=progress)
    if cache is not None:
        tmp = cache.with_suffix(".partial.npz")
        np.savez(tmp, key=np.array(key), **{f"kl/{name}": v for name, v in probe.kl.items()})
        tmp.replace(cache)
    return probe


@torch.no_grad()
def router_inputs(qmodel: QuantizedModel, tokens: torch.Tensor, base: float = BASE_BITS) -> dict[str, np.ndarray]:
    """Every router's input activations [tokens, K] with every router at ``base`` (uniform)."""
    row = grid_index(base)
    saved = {name: r.thresholds[row].clone() for name, r in qmodel.routers.items()}
    captured, handles = _capture_inputs(qmodel)
    for router in qmodel.routers.values():
        router.thresholds[row] = _uniform_row(router, base)
    qmodel.set_target_bits(base)
    try:
        qmodel.model.model(input_ids=tokens)
    finally:
        for h in handles:
            h.remove()
        for name, r in qmodel.routers.items():
            r.thresholds[row] = saved[name]
    return captured


def allocation_order(sensitivity: dict[str, float], sizes: dict[str, int]) -> list[str]:
    """Routers in the order they give up slices below the base: least KL per weight first."""
    return sorted(sensitivity, key=lambda name: (sensitivity[name] / sizes[name], name))


@dataclass(frozen=True)
class CostCurve:
    """KL of moving the fraction f of a router's tokens one width down, taking tokens in routing order
    (lowest score first): convex and piecewise linear through (fractions[i], costs[i]), from (0, 0) to
    (1, mean KL). A router without per-token information has the straight line (:meth:`static`); a
    router that ranks tokens well bends it down (its least sensitive tokens cost little)."""

    fractions: np.ndarray
    costs: np.ndarray

    @classmethod
    def static(cls, mean_kl: float) -> "CostCurve":
        return cls(np.array([0.0, 1.0]), np.array([0.0, float(mean_kl)]))

    @classmethod
    def from_tokens(cls, scores: np.ndarray, kl: np.ndarray) -> "CostCurve":
        """The curve of routing by ``scores`` (low first) measured with per-token ``kl``: the lower convex
        hull of the cumulative KL, so that taking its pieces cheapest first keeps the routing order."""
        order = np.argsort(scores, kind="stable")
        f = np.arange(len(kl) + 1) / len(kl)
        cum = np.concatenate([[0.0], np.cumsum(np.asarray(kl, np.float64)[order])]) / len(kl)
        hull: list[int] = []
        for i in range(len(f)):
            while len(hull) >= 2 and ((f[hull[-1]] - f[hull[-2]]) * (cum[i] - cum[hull[-2]])
                                      - (cum[hull[-1]] - cum[hull[-2]]) * (f[i] - f[hull[-2]])) <= 0:
                hull.pop()
            hull.append(i)
        return cls(f[hull], cum[hull])

    def pieces(self) -> list[tuple[float, float]]:
        """(token fraction, KL) of each linear piece, cheapest per token first."""
        return list(zip(np.diff(self.fractions).tolist(), np.diff(self.costs).tolist()))


def allocate(curves: dict[str, CostCurve], sizes: dict[str, int], bits: float, base: float = BASE_BITS,
             max_bits: float = 2.0 * F.DEFAULT_NUM_SLICES) -> dict[str, float]:
    """Average bits per router so that the weight-weighted average is ``bits``.

    Below ``base``, the pieces of every router's cost curve (a fraction of its tokens down to one
    slice) are taken cheapest KL per weight-bit first. Above it, each further slice of a router's
    most sensitive tokens gains ~ their KL / 16^(slices beyond the base) (a slice quarters the step,
    so the error variance falls ~16x): pieces largest gain per weight-bit first. With straight-line
    curves this is the per-router allocation (one fractional router); with bent ones a router splits
    its tokens wherever that is cheaper than moving a whole other router."""
    bits = float(np.clip(bits, F.SLICE_BITS, max_bits))
    out = {name: base for name in curves}
    if bits < base:
        steps = sorted(((cost / (sizes[name] * frac), name, i, frac, -1.0)
                        for name, curve in curves.items() for i, (frac, cost) in enumerate(curve.pieces())))
    else:
        steps = sorted((-(cost * 16.0 ** (-(w - base) / F.SLICE_BITS)) / (sizes[name] * frac), w, name, i, frac, 1.0)
                       for name, curve in curves.items() for w in np.arange(base, max_bits, F.SLICE_BITS)
                       for i, (frac, cost) in enumerate(reversed(curve.pieces())))
        steps = [(key, name, i, frac, sign) for key, _, name, i, frac, sign in steps]
    total = sum(sizes.values())
    to_move = total * abs(bits - base)  # bit-weights to take away or add
    for _, name, _, frac, sign in steps:
        if to_move <= 1e-9 * total:
            break
        move = min(to_move, sizes[name] * F.SLICE_BITS * frac)
        out[name] += sign * move / sizes[name]
        to_move -= move
    return {name: _snap_to_width(w) for name, w in out.items()}


def _snap_to_width(bits: float) -> float:
    """A router through all its pieces lands a few ulps off its even width: snap it, so its rows stay constant."""
    whole = round(bits / F.SLICE_BITS) * F.SLICE_BITS
    return float(whole) if abs(bits - whole) < 1e-9 else bits
