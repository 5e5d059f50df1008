"""Token-aware routers: each router learns to rank its tokens by how much a lower read costs them.

Input: a :class:`~.allocation.Probe` — for every router, its input activations at the base read
and the per-token KL of the model's next-token distribution when that router alone reads one
slice. A router is fitted to predict log KL from its input (:data:`FITS`):

- ``ridge``: a linear score (ridge regression on standardized inputs, the penalty picked by
  held-out rank correlation), written in the router's MLP form: relu(a) - relu(-a) = a;
- ``mlp``: the router's 2-layer MLP (``hidden`` units) trained on the same target (MSE on
  standardized log KL, AdamW, started from the ridge solution's direction).

The BOS token (position 0) is an attention sink every later token reads: its own KL says little
about what its precision costs the rest, so its target is the router's highest.
Every fit is cross-fitted on two halves of the tokens: the scores each half gets from the model fitted
on the other half give the honest rank correlation and the router's cost curve
(:meth:`~.allocation.CostCurve.from_tokens`), which decides how many of its tokens the allocation
moves. The router that ships is then fitted on all tokens and its hidden weights rounded to int8
(what the op reads), so the thresholds are fitted on the scores the file computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .allocation import CostCurve, Probe
from .qmodel import Router

FITS = ("ridge", "mlp")
RIDGE_PENALTIES = (1.0, 10.0, 100.0, 1000.0, 10000.0)
LINEAR_HIDDEN = 8  # a linear score needs 2 units; 8 is the smallest size every SIMD router path takes
KL_FLOOR = 1e-7


@dataclass(frozen=True)
class RouterFit:
    state: dict[str, torch.Tensor]  # fc1.weight [H, K], fc1.bias [H], fc2.weight [1, H], fc2.bias [1]
    curve: CostCurve  # from held-out scores
    spearman: float  # held-out rank correlation of scores and per-token KL (BOS excluded)
    half_ratio: float  # held-out KL of the half it sends down / that of a fixed half


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def targets(kl: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """log KL per token, the BOS token at the router's maximum."""
    y = np.log(np.maximum(kl, KL_FLOOR))
    y[positions == 0] = y.max()
    return y


class _Standardize:
    def __init__(self, x: np.ndarray):
        self.mean = x.mean(0)
        sd = x.std(0)
        self.sd = np.maximum(sd, 1e-3 * max(float(np.median(sd)), 1e-12))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.sd


def _ridge_path(z: np.ndarray, y: np.ndarray, penalties) -> list[tuple[np.ndarray, float]]:
    """For each penalty: w, c minimizing |z w + c - y|^2 + penalty |w|^2, from one symmetric eigendecomposition
    of the smaller Gram matrix for all of them (fewer tokens than inputs: w = z^T (z z^T + penalty I)^-1 y;
    several times faster than an SVD of z)."""
    mean = z.mean(0)
    zc, yc = z - mean, y - y.mean()
    if zc.shape[0] <= zc.shape[1]:
        ev, u = np.linalg.eigh(zc @ zc.T)
        uy = u.T @ yc
        ws = [zc.T @ (u @ (uy / (np.maximum(ev, 0.0) + penalty))) for penalty in penalties]
    else:
        ev, v = np.linalg.eigh(zc.T @ zc)
        vy = v.T @ (zc.T @ yc)
        ws = [v @ (vy / (np.maximum(ev, 0.0) + penalty)) for penalty in penalties]
    return [(w, float(y.mean() - mean @ w)) for w in ws]


def _ridge(z: np.ndarray, y: np.ndarray, penalty: float) -> tuple[np.ndarray, float]:
    return _ridge_path(z, y, [penalty])[0]


def _linear_state(w: np.ndarray, c: float, norm: _Standardize, in_features: int) -> dict[str, torch.Tensor]:
    """score = w . (x - mean) / sd + c as the router MLP: units +a and -a, fc2 = [1, -1]."""
    a = w / norm.sd
    b = c - float(a @ norm.mean)
    fc1 = np.zeros((LINEAR_HIDDEN, in_features), np.float32)
    fc1[0], fc1[1] = a, -a
    b1 = np.zeros(LINEAR_HIDDEN, np.float32)
    b1[0], b1[1] = b, -b
    fc2 = np.zeros((1, LINEAR_HIDDEN), np.float32)
    fc2[0, 0], fc2[0, 1] = 1.0, -1.0
    return {"fc1.weight": torch.from_numpy(fc1), "fc1.bias": torch.from_numpy(b1), "fc2.weight": torch.from_numpy(fc2),
            "fc2.bias": torch.zeros(1)}


def _fit_ridge(x: np.ndarray, y: np.ndarray, penalty: float) -> dict[str, torch.Tensor]:
    norm = _Standardize(x)
    w, c = _ridge(norm(x), y, penalty)
    return _linear_state(w, c, norm, x.shape[1])


def _fit_mlp(x: np.ndarray, y: np.ndarray, hidden: int, penalty: float, steps: int = 300,
             seed: int = 0, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    norm = _Standardize(x)
    z = torch.from_numpy(norm(x).astype(np.float32)).to(device)
    mu, sd = float(y.mean()), float(y.std() + 1e-6)
    t = torch.from_numpy(((y - mu) / sd).astype(np.float32)).to(device)
    gen = torch.Generator().manual_seed(seed)
    fc1 = torch.nn.Linear(x.shape[1], hidden)
    fc2 = torch.nn.Linear(hidden, 1)
    with torch.no_grad():  # start near the ridge direction: half the units +w, half -w, plus small noise
        w, _ = _ridge(norm(x), (y - mu) / sd, penalty)
        base = torch.from_numpy(w.astype(np.float32))
        noise = torch.randn(hidden, x.shape[1], generator=gen) / np.sqrt(x.shape[1])
        sign = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(hidden)])
        fc1.weight.copy_(sign[:, None] * base[None] + 0.1 * noise * base.abs().mean())
        fc1.bias.zero_()
        fc2.weight.copy_(sign[None] / hidden * 2)
        fc2.bias.zero_()
    fc1.to(device)
    fc2.to(device)
    params = [*fc1.parameters(), *fc2.parameters()]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.mean((fc2(torch.relu(fc1(z))).squeeze(-1) - t) ** 2)
        loss.backward()
        opt.step()
    with torch.no_grad():  # fold the standardization into fc1 and the target's scale into fc2
        fc1.cpu()
        fc2.cpu()
        mean, inv = torch.from_numpy(norm.mean.astype(np.float32)), torch.from_numpy((1 / norm.sd).astype(np.float32))
        w1 = fc1.weight * inv[None]
        return {"fc1.weight": w1.clone(), "fc1.bias": (fc1.bias - w1 @ mean).clone(),
                "fc2.weight": (fc2.weight * sd).clone(), "fc2.bias": (fc2.bias * sd + mu).clone()}


def _scores(state: dict[str, torch.Tensor], x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        h = torch.relu(torch.from_numpy(x) @ state["fc1.weight"].T + state["fc1.bias"])
        return (h @ state["fc2.weight"].T + state["fc2.bias"]).squeeze(-1).numpy()


def fit_router(x: np.ndarray, kl: np.ndarray, positions: np.ndarray, fit: str = "mlp", hidden: int = 16,
               device: torch.device | None = None) -> RouterFit:
    """A router for inputs ``x`` [n, K] with per-token ``kl`` [n] (see the module docstring)."""
    if fit not in FITS:
        raise ValueError(f"[routing] router fit expected one of {', '.join(FITS)}; got {fit!r}")
    x = np.asarray(x, np.float32)
    y = targets(kl, positions)
    halves = [np.arange(len(y)) < len(y) // 2]
    halves.append(~halves[0])
    text = positions != 0

    def held_out(train) -> np.ndarray:
        scores = np.empty(len(y))
        for h in range(2):
            state = train(x[halves[h]], y[halves[h]])
            scores[halves[1 - h]] = _scores(state, x[halves[1 - h]])
        return scores

    # the penalty: best held-out rank correlation of the linear score (one SVD per half for all penalties)
    paths = []
    for h in range(2):
        norm = _Standardize(x[halves[h]])
        paths.append((norm, _ridge_path(norm(x[halves[h]]), y[halves[h]], RIDGE_PENALTIES)))
    quality, ridge_scores = [], []
    for i in range(len(RIDGE_PENALTIES)):
        scores = np.empty(len(y))
        for h, (norm, path) in enumerate(paths):
            w, c = path[i]
            scores[halves[1 - h]] = norm(x[halves[1 - h]]) @ w + c
        quality.append(spearman(scores[text], y[text]))
        ridge_scores.append(scores)
    best = int(np.argmax(quality))
    penalty = RIDGE_PENALTIES[best]
    if fit == "ridge":  # its held-out scores are the sweep's at the chosen penalty
        train = (lambda a, b: _fit_ridge(a, b, penalty))
        scores = ridge_scores[best]
    else:
        train = (lambda a, b: _fit_mlp(a, b, hidden, penalty, device=device))
        scores = held_out(train)
    low_half = np.argsort(scores[text], kind="stable")[: text.sum() // 2]
    half_ratio = float(kl[text][low_half].sum() / (0.5 * kl[text].sum()))
    return RouterFit(train(x, y), CostCurve.from_tokens(scores, kl), spearman(scores[text], y[text]), half_ratio)


def install(router: Router, fit: RouterFit) -> None:
    """Load ``fit`` into ``router`` (resized to its hidden units) and round its hidden weights to int8."""
    hidden = fit.state["fc1.weight"].shape[0]
    if hidden != router.hidden:
        router.resize(hidden)
    router.int8_weights = None
    state = router.state_dict()
    router.load_state_dict({**state, **{k: v.to(state[k].device, state[k].dtype) for k, v in fit.state.items()}})
    router.int8()


def fit_routers(routers: dict[str, Router], probe: Probe, fit: str = "mlp", hidden: int = 16,
                progress=None, device: torch.device | None = None) -> dict[str, RouterFit]:
    """Fit and install every router from ``probe`` (MLPs trained on ``device``); returns the fits."""
    fits = {}
    for name, router in routers.items():
        fits[name] = fit_router(probe.inputs[name], probe.kl[name], probe.positions, fit, hidden, device)
        install(router, fits[name])
        if progress:
            progress(name, fits[name])
    return fits
