"""Where the slices go: a per-router bit allocation from measured sensitivity.

Below 4 bits some weights must be read with slice 1 alone (2 bits), and on a small
model a 2-bit read costs very different amounts in different places (SmolLM2: the
last block's MLP or a middle block's attention input ~10-50x a middle block's
attention output projection). One quantile per router (every router at b bits)
spends the 2-bit reads evenly; here each router's **sensitivity** is measured once
on calibration text — the KL divergence of the next-token distribution when that
router alone reads one slice while all others read the base (4 bits) — and a budget
b below the base is met by taking routers in order of sensitivity per weight, least
first, down to one slice until the saved bits cover ``base - b``. Above the base,
slices are added where they gain most, assuming each slice cuts a router's error
~16x (SmolLM2 validation PPL at 6 bits: 34.19 against 34.41 for every router at 6;
the same model below the base lost: 104.9 against 95.8 at 3 bits). Only the router
at the boundary is fractional: it keeps its top-scoring tokens at the higher width (water-filling over
its own scores), so the average bits barely depend on the text. The order is fixed,
so lowering b only ever removes slices.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

from mobiquant.runtime import format as F

from .blockwise import capture_block_inputs, run_block
from .qmodel import QuantizedModel, decoder_layers, grid_index
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


@torch.no_grad()
def router_sensitivity(qmodel: QuantizedModel, tokens: torch.Tensor, base: float = BASE_BITS,
                       progress: bool = True) -> dict[str, float]:
    """KL(base read || base read with router r at one slice) per router, mean over ``tokens`` [n, T].

    Every router's table row for ``base`` is set to the uniform read for the measurement and
    restored after. Block inputs of the base read are cached, so probing a router in block i
    runs blocks i.. only."""
    model, row = qmodel.model, grid_index(base)
    layers = decoder_layers(model)
    names = {i: [n for n in qmodel.routers if n.startswith(f"layers.{i}.")] for i in range(len(layers))}
    saved = {name: r.thresholds[row].clone() for name, r in qmodel.routers.items()}
    uniform = {name: torch.from_numpy(threshold_rows(np.zeros(1), r.num_slices, np.array([base]))[0]).float()
               for name, r in qmodel.routers.items()}  # every token reads base bits (even widths need no scores)
    qmodel.set_target_bits(base)
    sensitivity: dict[str, float] = {}
    t0 = time.time()
    try:
        for name, r in qmodel.routers.items():
            r.thresholds[row] = uniform[name]
        x, kwargs = capture_block_inputs(model, tokens)
        inputs = []
        for layer, kw in zip(layers, kwargs):
            inputs.append(x)
            x = run_block(layer, x, kw)
        reference = torch.log_softmax(_logits(model, x), -1)
        p = reference.exp()
        for i in range(len(layers)):
            for name in names[i]:
                router = qmodel.routers[name]
                router.thresholds[row] = NEVER  # no token passes: slice 1 only
                x = inputs[i]
                for layer, kw in zip(layers[i:], kwargs[i:]):
                    x = run_block(layer, x, kw)
                router.thresholds[row] = uniform[name]
                kl = (p * (reference - torch.log_softmax(_logits(model, x), -1))).sum(-1).mean()
                sensitivity[name] = float(kl)
                if progress:
                    print(f"\r[allocation] sensitivity {len(sensitivity)}/{len(qmodel.routers)} {name}: KL "
                          f"{sensitivity[name]:.4f} ({time.time() - t0:.0f}s)", end="", file=sys.stderr, flush=True)
    finally:
        for name, r in qmodel.routers.items():
            r.thresholds[row] = saved[name]
        if progress:
            print(file=sys.stderr)
    return sensitivity


def allocation_order(sensitivity: dict[str, float], sizes: dict[str, int]) -> list[str]:
    """Routers in the order they give up slices below the base: least KL per weight first."""
    return sorted(sensitivity, key=lambda name: (sensitivity[name] / sizes[name], name))


def allocate(sensitivity: dict[str, float], sizes: dict[str, int], bits: float, base: float = BASE_BITS,
             max_bits: float = 2.0 * F.DEFAULT_NUM_SLICES) -> dict[str, float]:
    """Average bits per router so that the weight-weighted average is ``bits``.

    Below ``base``, routers give up their second slice in :func:`allocation_order`. Above it,
    each further slice of router r gains ~ sensitivity[r] / 16^(slices beyond the base) (a slice
    quarters the step, so the error variance falls ~16x): those gains per weight, largest first,
    order the steps. Only the router of the last step taken is fractional."""
    bits = float(np.clip(bits, F.SLICE_BITS, max_bits))
    out = {name: base for name in sensitivity}
    if bits < base:
        steps = [(name, base, base - F.SLICE_BITS) for name in allocation_order(sensitivity, sizes)]
    else:
        widths = np.arange(base, max_bits, F.SLICE_BITS)
        steps = sorted(((name, w, w + F.SLICE_BITS) for name in sensitivity for w in widths),
                       key=lambda s: (-sensitivity[s[0]] / sizes[s[0]] * 16.0 ** (-(s[1] - base) / F.SLICE_BITS),
                                      s[1], s[0]))
    total = sum(sizes.values())
    to_move = total * abs(bits - base)  # bit-weights to take away or add
    for name, start, end in steps:
        if to_move <= 1e-9 * total:
            break
        move = min(to_move, sizes[name] * abs(end - start))
        out[name] = start + np.sign(end - start) * move / sizes[name]
        to_move -= move
    return out
