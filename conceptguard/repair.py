"""Head-only repair: retrain the last layer on frozen reference features.

As in last-layer retraining (Kirichenko et al., ICLR 2023): the encoder is kept, a new linear
head over all classes is fitted on features of held-out inputs with class-balanced weights
(multinomial logistic regression on standardised features, the standardisation folded back
into the weights). A pair whose errors come from the head is fixed by it; a pair the encoder
does not separate is not, which makes the repair the measured test of a ``limit`` verdict.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Small fits run on one torch thread: on busy cores, several spin-wait against each
    other (a 900 x 6 fit took 27 s on two threads, 0.3 s on one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit_multinomial(x: np.ndarray, labels: np.ndarray, num_classes: int, l2: float = 1e-3,
                 max_iter: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """A class-balanced multinomial logistic model ``(W (C, d), b (C,))`` on rows ``x``:
    mean cross-entropy with each class weighted by ``n / (C n_c)`` plus ``l2 |W|^2`` on
    standardised columns (the standardisation folded back into ``W`` and ``b``), minimised
    by full-batch L-BFGS in float64 (deterministic). Every class must have a row."""
    x = np.asarray(x, np.float64)
    labels = np.asarray(labels).astype(np.int64)
    counts = np.bincount(labels, minlength=num_classes)
    missing = np.flatnonzero(counts == 0).tolist()
    if missing:
        raise ValueError(f"a logistic fit needs inputs of every class; none of class(es) "
                         f"{missing}")
    mean = x.mean(0)
    scale = x.std(0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    with _torch_threads(1):
        xs = torch.as_tensor((x - mean) / scale)
        y = torch.as_tensor(labels)
        weight = torch.as_tensor(len(labels) / (num_classes * counts), dtype=torch.float64)
        W = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                                tolerance_change=1e-12, history_size=20,
                                line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(xs @ W.T + b, y, weight=weight) \
                + l2 * (W ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
    Wn = W.detach().numpy() / scale[None, :]
    bn = b.detach().numpy() - Wn @ mean
    return Wn, bn


def fit_class_head(z: np.ndarray, labels: np.ndarray, num_classes: int, l2: float = 1e-3,
             max_iter: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """The repaired head: :func:`fit_multinomial` on features ``z`` over all classes, as
    float32 ``(W (C, d), b (C,))``. Every class must have at least one row."""
    if len(np.unique(labels)) < num_classes:
        missing = sorted(set(range(num_classes)) - set(np.unique(labels).tolist()))
        raise ValueError(f"head repair needs reference inputs of every class; none of "
                         f"class(es) {missing}")
    W, b = fit_multinomial(z, labels, num_classes, l2, max_iter)
    return W.astype(np.float32), b.astype(np.float32)


def with_head(model: nn.Module, W: np.ndarray, b: np.ndarray) -> nn.Module:
    """A copy of a split classifier whose ``nn.Linear`` head holds ``(W, b)``."""
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear) or head.bias is None:
        raise ValueError("head repair needs a classifier whose head is an nn.Linear with bias")
    if tuple(head.weight.shape) != tuple(W.shape):
        raise ValueError(f"repaired head has shape {tuple(W.shape)}, the classifier's "
                         f"{tuple(head.weight.shape)}")
    out = copy.deepcopy(model)
    with torch.no_grad():
        out.head.weight.copy_(torch.as_tensor(W, dtype=out.head.weight.dtype))
        out.head.bias.copy_(torch.as_tensor(b, dtype=out.head.bias.dtype))
    return out


def head_weights(model: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """``(W, b)`` of a split classifier's ``nn.Linear`` head as float32 arrays."""
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"diagnosis needs an nn.Linear head, got {type(head).__name__}")
    W = head.weight.detach().cpu().numpy().astype(np.float32)
    b = (head.bias.detach().cpu().numpy().astype(np.float32) if head.bias is not None
         else np.zeros(W.shape[0], np.float32))
    return W, b
