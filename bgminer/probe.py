"""A logistic-regression probe on fixed features: the strong few-shot baseline of the quality
benchmark, and the cold-start ranker of the default review strategy (:mod:`bgminer.explore`).

The objective is scikit-learn's L2-regularised logistic regression (``C``) on standardised
features, solved by L-BFGS (float64 by default; the review strategies fit in float32, which halves a
query's fitting time and leaves the top of the ranking as it was); the returned
:class:`LinearProbe` scores raw features.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LinearProbe:
    """A linear scorer ``x @ w + b`` on raw features (a logit: higher means more likely positive)."""

    w: np.ndarray
    b: float

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float32) @ self.w + self.b


def fit_logistic(
    x: np.ndarray, y: np.ndarray, c: float = 1.0, weight: np.ndarray | None = None, max_iter: int = 300,
    dtype=np.float64,
) -> LinearProbe:
    """Fit ``P(y=1 | x)``; ``weight`` multiplies each row's loss (e.g. to stand a sample of the
    background in for all of it). Needs both classes in ``y``."""
    x = np.asarray(x, dtype=dtype)
    y = np.asarray(y, dtype=bool)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"features {x.shape} and labels {y.shape} do not match")
    if y.all() or not y.any():
        raise ValueError("a logistic probe needs positive and negative examples")
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    xt = torch.from_numpy((x - mean) / std)
    yt = torch.from_numpy(y.astype(dtype))
    wt = torch.ones(len(y), dtype=xt.dtype) if weight is None else torch.from_numpy(np.asarray(weight, dtype))
    w = torch.zeros(x.shape[1] + 1, dtype=xt.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=max_iter, tolerance_grad=1e-6, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = xt @ w[:-1] + w[-1]
        loss = (F.binary_cross_entropy_with_logits(logits, yt, reduction="none") * wt).sum() + 0.5 / c * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    weights = w.detach().numpy().astype(np.float64)
    scaled = weights[:-1] / std
    return LinearProbe(w=scaled.astype(np.float32), b=float(weights[-1] - mean @ scaled))
