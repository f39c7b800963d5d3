"""Adversarial attacks in pixel space ([0, 1]) through a maintained library (torchattacks).

Every attack is untargeted against the true label. Families (``kind``):

| kind | threat model | library class | parameters used |
|---|---|---|---|
| fgsm | L-inf, one gradient step | FGSM | eps |
| pgd | L-inf, iterative, random start | PGD | eps, steps, step size 2.5 eps / steps |
| apgd | L-inf, step-size-free PGD (cross-entropy) | APGD | eps, steps |
| pgd_l2 | L2, iterative | PGDL2 | eps (L2 radius), steps |
| cw | L2, minimal perturbation | CW | c, steps, lr |
| deepfool | L2, minimal perturbation | DeepFool | steps, overshoot 0.02 |
| square | L-inf, score-based black box | Square | eps, steps = queries |
| pixle | L0, black box: moves pixel patches | Pixle | patch (side), steps = restarts |

Adversarial images are rounded to uint8 afterwards, as a client would send them.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm.auto import tqdm

PIXLE_ITERATIONS = 5  # pixle: patch moves tried per restart

AttackKind = Literal["fgsm", "pgd", "apgd", "pgd_l2", "cw", "deepfool", "square", "pixle"]


class AttackSpec(BaseModel):
    """One attack. ``name`` keys metrics.json (e.g. ``pgd_eps0.05``); ``family`` (the kind)
    is what leave-one-family-out evaluation holds out."""

    model_config = ConfigDict(extra="forbid")

    kind: AttackKind = "pgd"
    eps: float = Field(0.05, gt=0)
    steps: int = Field(10, ge=1)
    step_size: float | None = None  # pgd / pgd_l2: default 2.5 * eps / steps
    c: float = Field(1.0, gt=0)  # cw: weight of the classification loss
    lr: float = Field(0.05, gt=0)  # cw: Adam learning rate
    patch: int = Field(3, ge=1)  # pixle: the largest side of a moved patch, in pixels

    @property
    def family(self) -> str:
        return self.kind

    def cache_fields(self) -> dict:
        """The spec as the attack caches key it: ``patch`` only for ``pixle`` (it came
        later; the other kinds' entries keep their keys)."""
        fields = self.model_dump()
        if self.kind != "pixle":
            del fields["patch"]
        return fields

    @property
    def name(self) -> str:
        if self.kind == "cw":
            return f"cw_c{self.c:g}"
        if self.kind == "deepfool":
            return "deepfool"
        if self.kind == "pixle":
            return f"pixle_p{self.patch}"
        return f"{self.kind}_eps{self.eps:g}"


TORCHATTACKS_INSTALL = "pip install --no-deps torchattacks==3.5.1"
MISSING_TORCHATTACKS = (
    "the offline job's attacks need torchattacks, which is not installed: run "
    f"`{TORCHATTACKS_INSTALL}` (--no-deps: its metadata pins old requests/urllib3; the "
    "offline extra already brings what it really uses, torch and scipy)")


def require_torchattacks() -> None:
    """Fail at once, naming the install command, when torchattacks is missing (it cannot
    be in the ``offline`` extra: its pinned dependencies would downgrade requests)."""
    import importlib.util

    if importlib.util.find_spec("torchattacks") is None:
        raise ModuleNotFoundError(MISSING_TORCHATTACKS, name="torchattacks")


def build_attack(model: nn.Module, spec: AttackSpec):
    """The torchattacks object for ``spec`` (imported here: an offline-only dependency)."""
    require_torchattacks()
    import torchattacks

    step = spec.step_size or 2.5 * spec.eps / spec.steps
    match spec.kind:
        case "fgsm":
            return torchattacks.FGSM(model, eps=spec.eps)
        case "pgd":
            return torchattacks.PGD(model, eps=spec.eps, alpha=step, steps=spec.steps,
                                    random_start=True)
        case "apgd":
            return torchattacks.APGD(model, eps=spec.eps, steps=spec.steps, loss="ce")
        case "pgd_l2":
            return torchattacks.PGDL2(model, eps=spec.eps, alpha=step, steps=spec.steps)
        case "cw":
            return torchattacks.CW(model, c=spec.c, steps=spec.steps, lr=spec.lr)
        case "deepfool":
            return torchattacks.DeepFool(model, steps=spec.steps, overshoot=0.02)
        case "square":
            return torchattacks.Square(model, eps=spec.eps, n_queries=spec.steps)
        case "pixle":  # sparse: a few patches of the image copied elsewhere in it
            return torchattacks.Pixle(model, x_dimensions=(1, spec.patch),
                                      y_dimensions=(1, spec.patch), restarts=spec.steps,
                                      max_iterations=PIXLE_ITERATIONS)
    raise ValueError(f"unknown attack kind {spec.kind!r}")


def run_attack(model: nn.Module, images: torch.Tensor, labels: np.ndarray, spec: AttackSpec,
               *, seed: int = 0, batch_size: int = 256, progress: bool = True) -> torch.Tensor:
    """Adversarial versions of ``images`` (float NCHW in [0,1]) against ``labels``."""
    model.eval()
    attack = build_attack(model, spec)
    y_all = torch.as_tensor(labels, dtype=torch.long)
    out = []
    for i, start in enumerate(tqdm(range(0, len(images), batch_size),
                                   desc=f"attack {spec.name}", disable=not progress,
                                   leave=False)):
        out.append(attack_batch(attack, images[start:start + batch_size],
                                y_all[start:start + batch_size], batch_seed(seed, i)))
    return torch.cat(out) if out else images.clone()


def batch_seed(seed: int, i: int) -> int:
    """The torch seed of batch ``i`` of an attack run seeded ``seed`` (random starts)."""
    return seed * 100_003 + i


def attack_batch(attack, x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
    """One batch through a built attack (:func:`build_attack`), its random draws seeded:
    the result depends on the batch's rows and ``seed`` only, so any engine that gives the
    attack the same batches gets the same images."""
    torch.manual_seed(seed)
    saved = np.random.get_state()  # Pixle draws from numpy's global generator
    np.random.seed(seed % (1 << 32))
    try:
        # contiguous: an NHWC batch permuted to NCHW is a strided view, and torchattacks' L2
        # attacks ``view`` their random start (of the same strides) flat, which fails for RGB
        return attack(x.contiguous(), y).detach().clamp(0.0, 1.0)
    finally:
        np.random.set_state(saved)
