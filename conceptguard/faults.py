"""Faults of known location, and the rule that localises a misclassification's fault.

**Localisation** (docs/method.md, section 5.5: the paper's per-input rule). The VLM oracle
names what the image shows (:func:`zero_shot_labels` of its image embedding); the aligned
features name what the encoder kept (:func:`encoder_view_labels`). Oracle != label:
ambiguous. Encoder view == label: the head erred. Otherwise: the encoder
(:func:`localise`); :func:`fault_report` counts the verdicts per class pair.

**Injection.** Variants of a ``SplitClassifier`` with a fault of known location. Head faults
change only ``head`` (an ``nn.Linear``): class rows swapped or blended, one class bias
shifted, one class row scaled. Encoder faults change only ``encoder``: a share of a block's
output channels ablated (zeroed), the encoder fine-tuned with the head frozen so that one
class's features move onto another class's mean, a pair's separation erased (its
discriminant directions projected out of the features, so that no head can win it back),
BatchNorm running statistics drifted, or Gaussian noise added to the weights. Every injector
returns a new model (the input is not modified) and a :class:`Fault` saying which component
was changed and which errors the fault is expected to cause; :func:`localisation_accuracy`
scores the rule's verdicts on them.

The offline ``inject-faults`` command (``offline/inject_faults.py``) runs the grid of
variants; ``build-bank`` and ``diagnose`` use the localisation.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from conceptguard.classifier.split import SplitClassifier
from conceptguard.heatmaps import top_concepts
from conceptguard.projection import aligned_embedding

HEAD, ENCODER, AMBIGUOUS = "head", "encoder", "ambiguous"
VERDICTS = (HEAD, ENCODER, AMBIGUOUS)


# ------------------------------------------------------------------ localisation


def zero_shot_labels(embeddings: np.ndarray, class_T: np.ndarray) -> np.ndarray:
    """The class whose prompt embedding (a row of ``class_T``) is closest to each row of
    ``embeddings`` (the VLM's image embeddings: the oracle)."""
    return (embeddings @ class_T.T).argmax(1)


def encoder_view_labels(features: np.ndarray, W: np.ndarray, b: np.ndarray,
                        class_T: np.ndarray) -> np.ndarray:
    """The zero-shot labels of the classifier's features read through the aligner
    ``(W, b)``: the class the encoder kept (the encoder view)."""
    return zero_shot_labels(aligned_embedding(features, W, b), class_T)


def localise(labels: np.ndarray, predictions: np.ndarray, oracle_zero_shot: np.ndarray,
             encoder_zero_shot: np.ndarray) -> np.ndarray:
    """Verdict per input (only meaningful where ``predictions != labels``)."""
    verdict = np.where(encoder_zero_shot == labels, HEAD, ENCODER).astype(object)
    verdict[oracle_zero_shot != labels] = AMBIGUOUS
    return verdict


def verdict_counts(verdicts: np.ndarray) -> dict[str, int]:
    """How many of ``verdicts`` are head, encoder and ambiguous (all three keys)."""
    verdicts = np.asarray(verdicts, dtype=object)
    return {k: int((verdicts == k).sum()) for k in VERDICTS}


@dataclass(frozen=True)
class FaultReport:
    verdicts: np.ndarray  # per misclassified input: "head" | "encoder" | "ambiguous"
    counts: dict[str, int]
    pairs: list[dict]  # per (true, predicted) pair: counts and responsible concepts


def fault_report(labels: np.ndarray, predictions: np.ndarray, oracle_zero_shot: np.ndarray,
                 encoder_zero_shot: np.ndarray, concepts: np.ndarray, h_ok: np.ndarray,
                 class_names: list[str], concept_names: list[str], top_k: int = 3
                 ) -> FaultReport:
    """Verdicts for the misclassified inputs, counted overall and per class pair; the
    responsible concepts of a pair are the largest gaps between the inputs' mean concept
    profile and the correct heatmap of their true class."""
    wrong = predictions != labels
    verdicts = localise(labels[wrong], predictions[wrong], oracle_zero_shot[wrong],
                        encoder_zero_shot[wrong])
    counts = verdict_counts(verdicts)
    pairs = []
    y, p, s = labels[wrong], predictions[wrong], concepts[wrong]
    for (t, q), n in Counter(zip(y.tolist(), p.tolist(), strict=True)).most_common():
        rows = (y == t) & (p == q)
        gap = s[rows].mean(0) - h_ok[t]
        pairs.append({
            "true": class_names[t], "predicted": class_names[q], "count": int(n),
            **verdict_counts(verdicts[rows]),
            "responsible_concepts": [{"concept": c, "gap": round(v, 4)}
                                     for c, v in top_concepts(gap, concept_names, top_k)],
        })
    return FaultReport(verdicts=verdicts, counts=counts, pairs=pairs)


# ------------------------------------------------------------------ faults of known location


@dataclass(frozen=True)
class Fault:
    """``component``: "head" | "encoder"; ``pair``: the (true, predicted) classes whose
    confusions the fault injects, ``None`` for a fault with no single pair (ablation);
    ``target``: for a bias shift, the class predictions move to."""

    kind: str
    component: str
    params: dict = field(default_factory=dict)
    pair: tuple[int, int] | None = None
    target: int | None = None

    def injected(self, labels: np.ndarray, predictions: np.ndarray) -> np.ndarray:
        """Mask of the errors this fault is meant to cause (among ``predictions != labels``)."""
        wrong = predictions != labels
        if self.target is not None:
            return wrong & (predictions == self.target)
        if self.pair is not None:
            a, b = self.pair
            if self.kind == "encoder_merge":  # one direction: a's features moved onto b
                return wrong & (labels == a) & (predictions == b)
            return wrong & np.isin(labels, self.pair) & np.isin(predictions, self.pair)
        return wrong


def simulated_oracle(labels: np.ndarray, num_classes: int, p: float, seed: int = 0
                     ) -> np.ndarray:
    """An oracle of known accuracy: the true label with probability ``p``, otherwise a
    uniformly drawn wrong label."""
    rng = np.random.default_rng(seed)
    wrong = (labels + rng.integers(1, num_classes, len(labels))) % num_classes
    return np.where(rng.random(len(labels)) < p, labels, wrong)


def localisation_accuracy(verdicts: np.ndarray, component: str) -> dict:
    """Counts of the verdicts on a fault's injected errors; ``accuracy``: the share
    attributed to the injected component (ambiguous counts as not attributed);
    ``decided_accuracy``: the same among the non-ambiguous verdicts (None if none)."""
    counts = verdict_counts(verdicts)
    n = len(verdicts)
    decided = counts[HEAD] + counts[ENCODER]
    return {**counts, "n": n,
            "accuracy": round(counts[component] / n, 5) if n else None,
            "decided_accuracy": round(counts[component] / decided, 5) if decided else None}


def score_localisation(labels: np.ndarray, predictions: np.ndarray, oracle: np.ndarray,
                       encoder_view: np.ndarray, component: str) -> dict:
    """:func:`localisation_accuracy` of the verdicts :func:`localise` gives these inputs
    (a fault's injected errors) against the injected ``component``."""
    return localisation_accuracy(localise(labels, predictions, oracle, encoder_view),
                                 component)


# ------------------------------------------------------------------ injection


def _linear_head(model: SplitClassifier) -> nn.Linear:
    if not isinstance(model.head, nn.Linear):
        raise ValueError(f"head faults need an nn.Linear head, got {type(model.head).__name__}")
    return model.head


def head_swap(model: SplitClassifier, a: int, b: int,
              more: tuple[tuple[int, int], ...] = ()) -> tuple[SplitClassifier, Fault]:
    """Swap the head's rows (weights and bias) of classes ``a`` and ``b`` (and of each
    further pair in ``more``: a more severe fault; ``pair`` names the first)."""
    out = copy.deepcopy(model)
    head = _linear_head(out)
    with torch.no_grad():
        for x, y in ((a, b), *more):
            for p in (head.weight, head.bias):
                if p is not None:
                    p[[x, y]] = p[[y, x]].clone()
    params = {"a": a, "b": b, **({"more": [list(m) for m in more]} if more else {})}
    return out, Fault("head_swap", HEAD, params, pair=(a, b))


def head_scale(model: SplitClassifier, c: int, factor: float) -> tuple[SplitClassifier, Fault]:
    """Multiply class ``c``'s head row (weights and bias) by ``factor``: above 1, inputs
    with a positive ``c`` logit move to ``c``."""
    out = copy.deepcopy(model)
    head = _linear_head(out)
    with torch.no_grad():
        head.weight[c] *= factor
        if head.bias is not None:
            head.bias[c] *= factor
    return out, Fault("head_scale", HEAD, {"c": c, "factor": factor}, target=c)


def _batchnorms(module: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


def encoder_bn_drift(model: SplitClassifier, severity: float, seed: int = 0
                     ) -> tuple[SplitClassifier, Fault]:
    """Drift every encoder BatchNorm's running statistics, as a stale or mismatched
    normalisation would: ``mean += severity * N(0, 1) * sqrt(var)`` and
    ``var *= exp(severity * N(0, 1))`` per channel (seeded)."""
    out = copy.deepcopy(model)
    bns = _batchnorms(out.encoder)
    if not bns:
        raise ValueError("encoder_bn_drift needs an encoder with BatchNorm2d layers")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in bns:
            n = bn.num_features
            std = bn.running_var.clamp_min(0).sqrt()
            bn.running_mean += severity * torch.randn(n, generator=gen) * std
            bn.running_var *= torch.exp(severity * torch.randn(n, generator=gen))
    return out, Fault("encoder_bn_drift", ENCODER, {"severity": severity, "seed": seed,
                                                    "layers": len(bns)})


def encoder_noise(model: SplitClassifier, sigma: float, seed: int = 0
                  ) -> tuple[SplitClassifier, Fault]:
    """Add Gaussian noise to every encoder convolution's weights, ``sigma`` times each
    tensor's own standard deviation (seeded)."""
    out = copy.deepcopy(model)
    convs = [m for m in out.encoder.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("encoder_noise needs an encoder with Conv2d layers")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in convs:
            w = conv.weight
            w += sigma * float(w.std()) * torch.randn(w.shape, generator=gen)
    return out, Fault("encoder_noise", ENCODER, {"sigma": sigma, "seed": seed,
                                                 "layers": len(convs)})


def head_blend(model: SplitClassifier, a: int, b: int, alpha: float = 0.6
               ) -> tuple[SplitClassifier, Fault]:
    """Replace rows ``a`` and ``b`` by ``(1 - alpha) * own + alpha * other`` (alpha 0.5 makes
    the two classes indistinguishable, above 0.5 they are mostly swapped)."""
    out = copy.deepcopy(model)
    head = _linear_head(out)
    with torch.no_grad():
        for p in (head.weight, head.bias):
            if p is not None:
                ra, rb = p[a].clone(), p[b].clone()
                p[a] = (1 - alpha) * ra + alpha * rb
                p[b] = (1 - alpha) * rb + alpha * ra
    return out, Fault("head_blend", HEAD, {"a": a, "b": b, "alpha": alpha}, pair=(a, b))


def bias_shift(model: SplitClassifier, c: int, delta: float) -> tuple[SplitClassifier, Fault]:
    """Add ``delta`` to class ``c``'s bias: inputs near ``c`` are now predicted ``c``."""
    out = copy.deepcopy(model)
    head = _linear_head(out)
    if head.bias is None:
        raise ValueError("bias_shift needs a head with a bias")
    with torch.no_grad():
        head.bias[c] += delta
    return out, Fault("bias_shift", HEAD, {"c": c, "delta": delta}, target=c)


def encoder_ablate(model: SplitClassifier, block: str, fraction: float, seed: int = 0
                   ) -> tuple[SplitClassifier, Fault]:
    """Zero a random ``fraction`` of the output channels of residual stage ``block`` (a
    module of the encoder made of torchvision ``BasicBlock``/``Bottleneck`` blocks): in its
    last block, the final BatchNorm's scale and shift and the shortcut BatchNorm's are set to
    zero for those channels, so they leave the block as zeros. Stored in the weights."""
    out = copy.deepcopy(model)
    stage = out.encoder.get_submodule(block)
    last = list(stage.children())[-1] if isinstance(stage, nn.Sequential) else stage
    bns = [m for name, m in last.named_children() if name.startswith("bn")]
    downsample = getattr(last, "downsample", None)
    if not bns or downsample is None:
        raise ValueError(f"encoder_ablate needs a residual block with a projection shortcut "
                         f"(downsample); {block!r} has none")
    final_bn = bns[-1]
    short_bn = [m for m in downsample.modules() if isinstance(m, nn.BatchNorm2d)][-1]
    channels = final_bn.num_features
    rng = np.random.default_rng(seed)
    idx = torch.as_tensor(np.sort(rng.choice(channels, max(1, round(fraction * channels)),
                                             replace=False)))
    with torch.no_grad():
        for bn in (final_bn, short_bn):
            bn.weight[idx] = 0.0
            bn.bias[idx] = 0.0
    return out, Fault("encoder_ablate", ENCODER,
                      {"block": block, "fraction": fraction, "seed": seed,
                       "channels": int(len(idx))})


def encoder_merge(model: SplitClassifier, a: int, b: int, images: torch.Tensor,
                  labels: torch.Tensor, steps: int = 200, lr: float = 1e-3,
                  batch_size: int = 64, seed: int = 0) -> tuple[SplitClassifier, Fault]:
    """Fine-tune the encoder with the head frozen so that class ``a``'s features merge into
    class ``b``'s: class-``a`` inputs are pulled to ``b``'s mean feature (from the original
    encoder), the other inputs held at their original features. ``images``: float
    ``(N, C, H, W)`` in ``[0, 1]`` (a small training subset); BatchNorm statistics frozen."""
    torch.manual_seed(seed)
    out = copy.deepcopy(model).eval()
    with torch.no_grad():
        z0 = torch.cat([out.features(images[i:i + 256]) for i in range(0, len(images), 256)])
    if not bool((labels == a).any()) or not bool((labels == b).any()):
        raise ValueError(f"encoder_merge needs images of classes {a} and {b}")
    target = z0.clone()
    target[labels == a] = z0[labels == b].mean(0)
    for p in out.head.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(out.encoder.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    is_a = (labels == a).nonzero().flatten()
    others = (labels != a).nonzero().flatten()
    half = batch_size // 2
    for _ in range(steps):  # half of each batch from class a, half from the others
        idx = torch.cat([is_a[torch.randint(len(is_a), (half,), generator=gen)],
                         others[torch.randint(len(others), (batch_size - half,),
                                              generator=gen)]])
        z = out.features(images[idx])
        loss = ((z - target[idx]) ** 2).sum(1).mean() / z0.pow(2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in out.parameters():
        p.requires_grad_(True)
    return out.eval(), Fault("encoder_merge", ENCODER, {"a": a, "b": b, "steps": steps,
                                                         "lr": lr, "train_n": len(images)},
                             pair=(a, b))


class FeatureProjection(nn.Module):
    """An encoder followed by a fixed linear map of its (flattened) features."""

    def __init__(self, encoder: nn.Module, projection: np.ndarray):
        super().__init__()
        self.inner = encoder
        self.register_buffer("projection", torch.as_tensor(projection, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).flatten(1) @ self.projection


def erasing_projection(z: np.ndarray, is_a: np.ndarray, dims: int, ridge: float = 1e-3
                       ) -> np.ndarray:
    """A ``(D, D)`` orthogonal projection that removes ``dims`` discriminant directions of two
    classes from features ``z`` (rows; ``is_a`` marks one class): the Fisher direction of
    the projected features, found and projected out one at a time, so that each next one is
    what still separates the classes once the previous ones are gone."""
    z = np.asarray(z, np.float64)
    if is_a.sum() < 2 or (~is_a).sum() < 2:
        raise ValueError("erasing a pair needs at least 2 inputs of each class")
    d = z.shape[1]
    if not 0 < dims < d:
        raise ValueError(f"dims must be between 1 and {d - 1}, got {dims}")
    projection = np.eye(d)
    for _ in range(dims):
        zp = z @ projection
        w = np.linalg.solve(np.cov(zp.T) + ridge * np.eye(d),
                            zp[is_a].mean(0) - zp[~is_a].mean(0))
        w = projection @ w
        w /= np.linalg.norm(w)
        projection = projection @ (np.eye(d) - np.outer(w, w))
    return projection


def encoder_erase(model: SplitClassifier, a: int, b: int, images: torch.Tensor,
                  labels: torch.Tensor, dims: int) -> tuple[SplitClassifier, Fault]:
    """An encoder that lost what separates classes ``a`` and ``b``: :func:`erasing_projection`
    of ``dims`` directions, fitted on the features of ``images`` (float ``(N, C, H, W)`` in
    ``[0, 1]``, a training subset) of the two classes, applied to every output of the
    encoder. The head is unchanged. The variant's encoder is a :class:`FeatureProjection`,
    not the architecture its file format describes, so it is not saved."""
    out = copy.deepcopy(model).eval()
    y = np.asarray(labels)
    rows = (y == a) | (y == b)
    idx = torch.as_tensor(np.flatnonzero(rows))
    with torch.no_grad():
        z = torch.cat([out.features(images[idx[i:i + 256]])
                       for i in range(0, len(idx), 256)]).numpy() if len(idx) else \
            np.zeros((0, 1))
    projection = erasing_projection(z, y[rows] == a, dims)
    out.encoder = FeatureProjection(out.encoder, projection)
    return out, Fault("encoder_erase", ENCODER, {"a": a, "b": b, "dims": dims,
                                                  "train_n": int(rows.sum())}, pair=(a, b))
