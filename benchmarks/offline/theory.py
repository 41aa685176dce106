"""Two-layer theory check (Lee et al., 2023, section 3.2), run empirically.

Source model = teacher: a two-layer ReLU network ``f(x) = v^T relu(W x)`` (d inputs, k hidden units) that
fits the source exactly. Two target perturbations:

* input: ``x_t = A x_s`` with ``A = I + 0.5 G / sqrt(d)`` (G Gaussian; invertible almost surely), target
  label ``y = f(x_s) = f(A^{-1} x_t)``; tuning the first layer alone can represent it exactly (``W A^{-1}``),
  the last layer alone cannot in general;
* output: ``y_t = t * y_s`` with ``t = -1``; the last layer alone represents it exactly (``t v``).

With ``n`` target points (fewer than d, 2d and 8d) each of first-layer-only,
last-layer-only and full fine-tuning is trained from the source weights with full-batch Adam to
(near) zero training loss, and its *population* target loss is measured on fresh points, relative to
the loss of the unadapted source model. Mean and standard error over seeds.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = ["TwoLayerConfig", "run_two_layer"]


@dataclass(frozen=True)
class TwoLayerConfig:
    d: int = 12
    k: int = 24
    ns: tuple[int, ...] = (6, 24, 96)
    label_scale: float = -1.0
    steps: int = 800
    lr: float = 1e-2
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    n_eval: int = 4000

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fit(W0, v0, x, y, which, steps, lr):
    """Full-batch Adam from (W0, v0); every tensor has a leading seed axis (S, ...)."""
    W = W0.clone().requires_grad_(which in ("first", "all"))
    v = v0.clone().requires_grad_(which in ("last", "all"))
    params = [p for p in (W, v) if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        # sum over seeds of each seed's mean loss: the seeds do not interact (Adam is per element)
        loss = _losses(W, v, x, y).sum()
        loss.backward()
        opt.step()
    return W.detach(), v.detach()


def _losses(W, v, x, y) -> torch.Tensor:
    """Per-seed mean squared error; W (S, k, d), v (S, k), x (S, n, d), y (S, n)."""
    pred = torch.einsum("snk,sk->sn", torch.relu(torch.einsum("snd,skd->snk", x, W)), v)
    return ((pred - y) ** 2).mean(1)


def _relative(method: str, W0: torch.Tensor, v0: torch.Tensor, train: tuple[torch.Tensor, torch.Tensor],
              evaluation: tuple[torch.Tensor, torch.Tensor], base: torch.Tensor, cfg: TwoLayerConfig) -> dict[str, Any]:
    """One method's population target loss relative to the unadapted model's, per seed, with mean ± s.e."""
    S = len(cfg.seeds)
    if method == "none":
        rel = torch.ones(S)
    else:
        W, v = _fit(W0, v0, *train, method, cfg.steps, cfg.lr)
        rel = _losses(W, v, *evaluation) / base
    rel = rel.double()
    se = float(rel.std(unbiased=True) / math.sqrt(S)) if S > 1 else 0.0
    return {"values": rel.tolist(), "mean": float(rel.mean()), "stderr": se}


def run_two_layer(cfg: TwoLayerConfig = TwoLayerConfig()) -> dict[str, Any]:
    """Returns ``{"config", "results": {perturbation: {n: {method: {"values", "mean", "stderr"}}}}}``;
    values are population target losses divided by the unadapted model's target loss."""
    gens = [torch.Generator().manual_seed(31_337 + s) for s in cfg.seeds]
    W0 = torch.stack([torch.randn(cfg.k, cfg.d, generator=g) / math.sqrt(cfg.d) for g in gens])
    v0 = torch.stack([torch.randn(cfg.k, generator=g) / math.sqrt(cfg.k) for g in gens])
    A = torch.stack([torch.eye(cfg.d) + 0.5 * torch.randn(cfg.d, cfg.d, generator=g) / math.sqrt(cfg.d) for g in gens])

    def teacher(xs):
        return torch.einsum("snk,sk->sn", torch.relu(torch.einsum("snd,skd->snk", xs, W0)), v0)

    methods = ("none", "first", "last", "all")
    results: dict[str, Any] = {}
    for pert in ("input", "output"):
        def draw(n, pert=pert):
            xs = torch.stack([torch.randn(n, cfg.d, generator=g) for g in gens])
            if pert == "input":
                return torch.einsum("snd,sed->sne", xs, A), teacher(xs)
            return xs, cfg.label_scale * teacher(xs)

        x_eval, y_eval = draw(cfg.n_eval)
        base = _losses(W0, v0, x_eval, y_eval)
        results[pert] = {}
        for n in cfg.ns:
            x, y = draw(n)
            results[pert][str(n)] = {m: _relative(m, W0, v0, (x, y), (x_eval, y_eval), base, cfg) for m in methods}
    return {"config": cfg.to_dict(), "results": results}
