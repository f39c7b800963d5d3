"""Untargeted L-infinity attacks in pixel space ([0, 1]): FGSM and PGD (random start)."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn
from tqdm.auto import tqdm


class AttackSpec(BaseModel):
    """One attack of the evaluation. ``name`` keys metrics.json (e.g. ``pgd_eps0.05``)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["fgsm", "pgd"] = "pgd"
    eps: float = 0.05
    steps: int = 10
    step_size: float | None = None  # PGD: default 2.5 * eps / steps

    @property
    def name(self) -> str:
        return f"{self.kind}_eps{self.eps:g}"


def _loss_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x), y)
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    return (x + eps * _loss_grad(model, x, y).sign()).clamp(0.0, 1.0).detach()


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int,
        step_size: float, generator: torch.Generator) -> torch.Tensor:
    noise = (torch.rand(x.shape, generator=generator) * 2 - 1) * eps
    adv = (x + noise.to(x.device)).clamp(0.0, 1.0)
    for _ in range(steps):
        adv = adv + step_size * _loss_grad(model, adv, y).sign()
        adv = torch.min(torch.max(adv, x - eps), x + eps).clamp(0.0, 1.0).detach()
    return adv


def run_attack(model: nn.Module, images: torch.Tensor, labels: np.ndarray, spec: AttackSpec,
               *, seed: int = 0, batch_size: int = 256, progress: bool = True) -> torch.Tensor:
    """Adversarial versions of ``images`` (float NCHW in [0,1]) against ``labels``."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    y_all = torch.as_tensor(labels, dtype=torch.long)
    step = spec.step_size or 2.5 * spec.eps / max(spec.steps, 1)
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc=f"attack {spec.name}",
                      disable=not progress, leave=False):
        x = images[start:start + batch_size]
        y = y_all[start:start + batch_size]
        if spec.kind == "fgsm":
            out.append(fgsm(model, x, y, spec.eps))
        else:
            out.append(pgd(model, x, y, spec.eps, spec.steps, step, gen))
    return torch.cat(out) if out else images.clone()
