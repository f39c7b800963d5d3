"""Head-only repair: retrain the last layer on frozen reference features.

As in last-layer retraining (Kirichenko et al., ICLR 2023): the encoder is kept, a new linear
head over all classes is fitted on features of held-out inputs with class-balanced weights
(multinomial logistic regression on standardised features, the standardisation folded back
into the weights). A pair whose errors come from the head is fixed by it; a pair the encoder
does not separate is not, which makes the repair the measured test of a ``limit`` verdict.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn


def fit_head(z: np.ndarray, labels: np.ndarray, num_classes: int, l2: float = 1e-3,
             max_iter: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A class-balanced multinomial logistic head ``(W (C, d), b (C,))`` on features ``z``:
    cross-entropy with each class weighted by ``n / (C n_c)`` plus ``l2 |W|^2`` on
    standardised features, minimised by L-BFGS (deterministic: full batch, float64). Every
    class must have at least one row."""
    z = np.asarray(z, np.float64)
    labels = np.asarray(labels).astype(np.int64)
    counts = np.bincount(labels, minlength=num_classes)
    missing = np.flatnonzero(counts == 0).tolist()
    if missing:
        raise ValueError(f"head repair needs reference inputs of every class; none of "
                         f"class(es) {missing}")
    mean = z.mean(0)
    scale = z.std(0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    torch.manual_seed(seed)
    x = torch.as_tensor((z - mean) / scale)
    y = torch.as_tensor(labels)
    weight = torch.as_tensor(len(labels) / (num_classes * counts), dtype=torch.float64)
    W = torch.zeros(num_classes, z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                            tolerance_change=1e-12, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(x @ W.T + b, y, weight=weight) + l2 * (W ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    Wn = W.detach().numpy() / scale[None, :]
    bn = b.detach().numpy() - Wn @ mean
    return Wn.astype(np.float32), bn.astype(np.float32)


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


def linear_head(model: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """``(W, b)`` of a split classifier's ``nn.Linear`` head as float32 arrays."""
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"diagnosis needs an nn.Linear head, got {type(head).__name__}")
    W = head.weight.detach().cpu().numpy().astype(np.float32)
    b = (head.bias.detach().cpu().numpy().astype(np.float32) if head.bias is not None
         else np.zeros(W.shape[0], np.float32))
    return W, b
