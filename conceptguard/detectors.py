"""Detectors: one class each, one registry, one score convention.

A detector is fitted once on the reference split (:class:`FitData`) and then turns the
serving graph's outputs for a batch (:class:`Outputs`: logits, features, standardised concept
scores) into a **risk** per input: higher = more likely a defect (a wrong prediction, an
attack, an unfamiliar input). Its fitted state is a dict of arrays (stored in the bank as
``detector.<name>.<key>``). The trust model, the evaluation's method list, the report and
the metrics-key checks all iterate :data:`DETECTORS`; adding a detector is one class here.

Every formula is stated in its class's docstring. ``p`` is the softmax of the logits ``l``,
``z`` the penultimate features, ``s`` the standardised concept scores.

Besides its numpy risk, a detector declares its own settings (``own_settings``: name, type,
default; :data:`DetectorSettings` and the build config's ``calibration.detectors`` are built
from them), the shared settings it reads (``settings_used``), whether the trust model puts
hinges on it (``hinged``), and optionally its form in the fused ONNX graph
(:meth:`Detector.fused`: a :class:`Fused`, a weighted sum of per-input quantities that
:mod:`conceptguard.monitor_graph` computes in a few wide operations). A detector whose
``fused()`` is None makes build-bank fall back to the classifier graph plus numpy scoring,
and say why.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, create_model

from conceptguard.gaussian import ClassGaussians, fit_class_gaussians
from conceptguard.projection import unit_rows

Group = Literal["confidence", "density", "concept", "statistic"]


@dataclass(frozen=True)
class Outputs:
    """The serving graph's outputs for a batch, with derived quantities computed once."""

    logits: np.ndarray  # (N, C)
    features: np.ndarray  # (N, d)
    concepts: np.ndarray  # (N, K)

    @cached_property
    def probabilities(self) -> np.ndarray:
        return softmax(self.logits)

    @cached_property
    def predictions(self) -> np.ndarray:
        return self.logits.argmax(1)

    @cached_property
    def unit_concepts(self) -> np.ndarray:
        return unit_rows(self.concepts)

    @cached_property
    def unit_features(self) -> np.ndarray:
        return unit_rows(np.asarray(self.features, np.float64))


@dataclass(frozen=True)
class FitData:
    """What detectors are fitted on: the reference split's outputs and labels, its heatmaps
    (``h_ok``, ``h_bad``, ``h_adv``: ``(C, K)``) and the detector settings."""

    outputs: Outputs
    labels: np.ndarray
    num_classes: int
    h_ok: np.ndarray
    h_bad: np.ndarray
    h_adv: np.ndarray
    settings: DetectorSettings

    @cached_property
    def head(self) -> tuple[np.ndarray, np.ndarray]:
        """The classifier head ``logits = z W^T + b`` recovered from the reference outputs by
        least squares; refused when the head is not affine in the features."""
        z = np.asarray(self.outputs.features, np.float64)
        za = np.hstack([z, np.ones((len(z), 1))])
        theta, *_ = np.linalg.lstsq(za, np.asarray(self.outputs.logits, np.float64),
                                    rcond=None)
        fitted = za @ theta
        err = np.abs(fitted - self.outputs.logits).max()
        scale = max(float(np.abs(self.outputs.logits).max()), 1.0)
        if err > 1e-3 * scale:
            raise ValueError(f"the classifier head is not affine in the features (max |err| "
                             f"{err:.3g}); ViM and ReAct need a linear head")
        return theta[:-1].T.copy(), theta[-1].copy()  # W (C, d), b (C,)


SHARED_SETTINGS: dict[str, tuple[Any, Any]] = {
    "shrinkage": (float, Field(1e-3, description="covariance shrinkage of the "
                               "Gaussian detectors (the calibration spec's shrinkage)")),
}
"""Settings more than one detector reads, with their defaults; a detector's own settings
are declared on its class (:attr:`Detector.own_settings`)."""


# ------------------------------------------------------------ the fused graph's view

# MaxSoftmax.feature clips p to 1 - 1e-12: its feature log((1 - p) / p) >= log(MSP_FLOOR_R)
MSP_FLOOR_R = 1e-12 / (1.0 - 1e-12)

SHARED_QUANTITIES: tuple[str, ...] = ("l_max", "log1p_r", "neg_p_max", "entropy_t", "doctor",
                                      "z_norm")
"""Per-input quantities the fused graph computes whatever detectors it holds, with
``r = sum_{c != argmax} exp(l_c - l_max)``: ``l_max``; ``log1p_r`` (``log(1 + r)``);
``neg_p_max`` (``-1 / (1 + r)`` = ``-max_c p_c``); ``entropy_t`` (``sum_c p_c (l_c - l_max)``:
the entropy is ``log1p_r - entropy_t``); ``doctor`` (``(1 - g) / g``); ``z_norm`` (``|z|``).
The graph computes them in forms that keep float32 accurate for confident inputs
(:mod:`conceptguard.monitor_graph`)."""


@dataclass(frozen=True)
class GaussianBlock:
    """Own quantity: ``min_c |x L - mu_c L|^2`` of ``x`` = the features or the concepts.
    The graph widens every Gaussian block into one ``Gemm`` (and one for the squares)."""

    space: Literal["features", "concepts"]
    gaussians: ClassGaussians


@dataclass(frozen=True)
class ResidualBlock:
    """Own quantity: ``|(z - origin) basis|`` (widened into the same ``Gemm``)."""

    origin: np.ndarray  # (d,)
    basis: np.ndarray  # (d, r)


@dataclass(frozen=True)
class NearestBlock:
    """Own quantity: the cosine of ``z`` to its ``k``-th nearest row of ``bank`` (unit
    rows): one ``MatMul`` against the pre-normalised bank and one ``TopK``."""

    bank: np.ndarray  # (n, d) unit rows
    k: int


@dataclass(frozen=True)
class ClippedEnergyBlock:
    """Own quantity: ``log sum_c exp(min(z, clip) W^T + b)_c``."""

    weight: np.ndarray  # (C, d)
    bias: np.ndarray  # (C,)
    clip: float


@dataclass(frozen=True)
class HeatmapBlock:
    """Own quantity: ``cos(s, H_ok[y^]) - cos(s, H_x[y^])`` as the sum of its per-concept
    terms, with ``H_x = H_bad`` (``versus="bad"``) or the closer of ``H_bad`` and ``H_adv``
    (``versus="bad_or_adv"``: the concept contributions). The graph computes both from the
    monitor's heatmaps (the paper rule's), so the block's must be those."""

    h_ok: np.ndarray
    h_bad: np.ndarray
    h_adv: np.ndarray
    versus: Literal["bad", "bad_or_adv"]


FusedBlock = (GaussianBlock | ResidualBlock | NearestBlock | ClippedEnergyBlock
              | HeatmapBlock)


@dataclass(frozen=True)
class LogFeature:
    """:meth:`Detector.feature` as ``log(max(x, lo) + eps)``; ``x`` is the risk, or ``r``
    (``of_r``: the max-softmax feature, ``log((1 - p) / p) = log r``)."""

    lo: float = 0.0
    eps: float = 0.0
    of_r: bool = False


@dataclass(frozen=True)
class Fused:
    """A detector's risk in the fused graph: ``max(sum_q terms[q] * q + bias, floor) **
    power`` over per-input quantities ``q``: the shared ones (:data:`SHARED_QUANTITIES`)
    and ``"own"``, the quantity of ``block`` (for a :class:`NearestBlock`, its k-th
    cosine). ``feature``: :meth:`Detector.feature` in the graph (None: the risk itself)."""

    terms: dict[str, float]
    block: FusedBlock | None = None
    bias: float = 0.0
    floor: float | None = None
    power: float = 1.0
    feature: LogFeature | None = None


def softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def logsumexp(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    m = x.max(1)
    return m + np.log(np.exp(x - m[:, None]).sum(1))


class Detector(ABC):
    """Protocol: ``fit(data) -> detector``, ``risk(outputs) -> (N,)``, ``state()`` and
    ``from_state(state)`` for the bank, and ``feature(risk)``: a monotone transform of the
    risk that the trust model uses as an input (logs of distances, log-odds of confidences).
    """

    name: ClassVar[str]
    group: ClassVar[Group]
    summary: ClassVar[str]  # one line for docs and the report
    # the settings this detector adds, name -> (type, default or pydantic Field): fields of
    # DetectorSettings and of the build config's calibration.detectors section
    own_settings: ClassVar[dict[str, tuple[Any, Any]]] = {}
    # every DetectorSettings field fit() reads: its own settings and any SHARED_SETTINGS
    settings_used: ClassVar[tuple[str, ...]] = ()
    hinged: ClassVar[bool] = False  # the trust model adds hinges at its quantiles

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.settings_used = tuple(dict.fromkeys((*cls.settings_used, *cls.own_settings)))

    def fused(self) -> Fused | None:
        """This detector in the fused graph, or None: build-bank then falls back to the
        classifier graph and numpy scoring (and the manifest says why)."""
        return None

    @classmethod
    def fit(cls, data: FitData) -> Detector:
        return cls()

    @abstractmethod
    def risk(self, out: Outputs) -> np.ndarray: ...

    def state(self) -> dict[str, np.ndarray]:
        return {}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> Detector:
        return cls()

    @staticmethod
    def feature(risk: np.ndarray) -> np.ndarray:
        return np.asarray(risk, np.float64)


class MaxSoftmax(Detector):
    """``-max_c p_c`` (Hendrycks and Gimpel, 2017)."""

    name, group, summary = "msp", "confidence", "max softmax probability"

    def risk(self, out: Outputs) -> np.ndarray:
        return -out.probabilities.max(1)

    def fused(self) -> Fused:
        return Fused({"neg_p_max": 1.0}, feature=LogFeature(lo=MSP_FLOOR_R, of_r=True))

    @staticmethod
    def feature(risk: np.ndarray) -> np.ndarray:
        p = np.clip(-np.asarray(risk, np.float64), 1e-12, 1 - 1e-12)
        return np.log((1 - p) / p)


class MaxLogit(Detector):
    """``-max_c l_c`` (Hendrycks et al., 2022)."""

    name, group, summary = "max_logit", "confidence", "max logit"

    def risk(self, out: Outputs) -> np.ndarray:
        return -np.asarray(out.logits, np.float64).max(1)

    def fused(self) -> Fused:
        return Fused({"l_max": -1.0})


class Energy(Detector):
    """``-log sum_c exp(l_c)``, the free energy (Liu et al., 2020)."""

    name, group, summary = "energy", "confidence", "energy score"

    def risk(self, out: Outputs) -> np.ndarray:
        return -logsumexp(out.logits)

    def fused(self) -> Fused:  # logsumexp l = l_max + log(1 + r)
        return Fused({"l_max": -1.0, "log1p_r": -1.0})


class Entropy(Detector):
    """``-sum_c p_c log p_c``."""

    name, group, summary = "entropy", "confidence", "predictive entropy"

    def risk(self, out: Outputs) -> np.ndarray:
        p = out.probabilities
        return -(p * np.log(np.maximum(p, 1e-300))).sum(1)

    @staticmethod
    def feature(risk: np.ndarray) -> np.ndarray:
        return np.log(np.asarray(risk, np.float64) + 1e-9)

    def fused(self) -> Fused:
        return Fused({"log1p_r": 1.0, "entropy_t": -1.0}, feature=LogFeature(eps=1e-9))


class Doctor(Detector):
    """DOCTOR D_alpha: ``(1 - g) / g`` with ``g = sum_c p_c^2`` (Granese et al., 2021)."""

    name, group, summary = "doctor", "confidence", "DOCTOR (Gini)"

    def risk(self, out: Outputs) -> np.ndarray:
        g = (out.probabilities ** 2).sum(1)
        return (1.0 - g) / g

    @staticmethod
    def feature(risk: np.ndarray) -> np.ndarray:
        return np.log(np.asarray(risk, np.float64) + 1e-9)

    def fused(self) -> Fused:
        return Fused({"doctor": 1.0}, feature=LogFeature(eps=1e-9))


@dataclass(frozen=True)
class _GaussianDetector(Detector):
    """Shared code of the two Mahalanobis detectors."""

    gaussians: ClassGaussians
    space: ClassVar[Literal["features", "concepts"]]
    settings_used = ("shrinkage",)
    hinged = True

    def fused(self) -> Fused:
        return Fused({"own": 1.0}, GaussianBlock(self.space, self.gaussians),
                     feature=LogFeature(eps=1.0))  # log1p(max(d, 0))

    def state(self) -> dict[str, np.ndarray]:
        return {"means": self.gaussians.means, "whiten": self.gaussians.whiten}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> Detector:
        return cls(ClassGaussians(state["means"], state["whiten"]))

    @staticmethod
    def feature(risk: np.ndarray) -> np.ndarray:
        return np.log1p(np.maximum(np.asarray(risk, np.float64), 0.0))


@dataclass(frozen=True)
class Mahalanobis(_GaussianDetector):
    """``min_c (z - mu_c)^T Sigma^-1 (z - mu_c)``: class means and one shared covariance of
    the reference features (Lee et al., 2018, without input preprocessing)."""

    name, group, summary = "mahalanobis", "density", "feature Mahalanobis distance"
    space = "features"

    @classmethod
    def fit(cls, data: FitData) -> Detector:
        return cls(fit_class_gaussians(data.outputs.features, data.labels, data.num_classes,
                                       data.settings.shrinkage))

    def risk(self, out: Outputs) -> np.ndarray:
        return self.gaussians.sq_distances(out.features).min(1)


@dataclass(frozen=True)
class ConceptMahalanobis(_GaussianDetector):
    """The same as ``mahalanobis`` in the standardised concept space ``s``."""

    name, group, summary = ("concept_mahalanobis", "concept",
                            "concept-space Mahalanobis distance")
    space = "concepts"

    @classmethod
    def fit(cls, data: FitData) -> Detector:
        return cls(fit_class_gaussians(data.outputs.concepts, data.labels, data.num_classes,
                                       data.settings.shrinkage))

    def risk(self, out: Outputs) -> np.ndarray:
        return self.gaussians.sq_distances(out.concepts).min(1)


def stratified_subset(labels: np.ndarray, size: int | None, seed: int) -> np.ndarray:
    """Sorted row indices of a class-stratified random subset of ``size`` rows of
    ``labels`` (all rows when ``size`` is None or not smaller than ``len(labels)``).

    Each class keeps its share of ``size`` (largest remainders break ties, towards the
    larger class), drawn without replacement with ``numpy.random.default_rng(seed)``, so
    the same labels, size and seed give the same rows."""
    labels = np.asarray(labels)
    n = len(labels)
    if size is None or size >= n:
        return np.arange(n)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * size / n
    take = np.floor(quota).astype(int)
    order = np.lexsort((-counts, -(quota - take)))  # largest remainder, then larger class
    take[order[: size - int(take.sum())]] += 1
    rng = np.random.default_rng(seed)
    rows = [rng.choice(np.flatnonzero(labels == c), t, replace=False)
            for c, t in zip(classes, take, strict=True)]
    return np.sort(np.concatenate(rows))


def scaled_k(k: int, size: int, total: int) -> int:
    """KNN's ``k`` on a reference subset of ``size`` of ``total`` rows: ``k`` names the
    neighbour on the whole set, and a subset keeps it at (at least) the same share of the
    set, ``ceil(k * size / total)`` (at least 1, at most ``size``). The 10th nearest of 4,000
    sits at 0.25% of the set, the 3rd of 1,000 at 0.3%: nearly the same density read, where
    a fixed ``k`` on a smaller set reads a density four times coarser."""
    if size >= total:
        return max(1, min(k, size))
    return max(1, min(size, math.ceil(k * size / total)))


@dataclass(frozen=True)
class KNN(Detector):
    """Distance from ``z / |z|`` to its k-th nearest neighbour among the unit reference
    features (Sun et al., 2022), as the Euclidean distance of unit vectors
    ``sqrt(2 - 2 cos)``.

    The reference set is a seeded, class-stratified subset of ``knn_reference`` reference
    features (:func:`stratified_subset`; None: all of them), and ``knn_k`` shrinks with it
    (:func:`scaled_k`). Sun et al. find that KNN over a small random fraction of the
    training set keeps its AUROC; the cost per input (a cosine product and a top-k over the
    set) is linear in its size. Since it is the detector's own fit, the trust model and the
    threshold are fitted on the risks it gives."""

    name, group, summary = "knn", "density", "k-th nearest-neighbour distance (features)"
    bank: np.ndarray  # (n, d) unit reference features
    k: int
    own_settings: ClassVar[dict[str, tuple[Any, Any]]] = {
        "knn_k": (int, Field(10, ge=1, description="the neighbour on the whole split")),
        "knn_reference": (int | None, Field(None, ge=1, description="size of the reference "
                                            "subset (None: the whole split)")),
        "knn_seed": (int, Field(0, description="seed of the reference subset")),
    }
    hinged = True

    def fused(self) -> Fused:  # sqrt(max(2 - 2 cos_k, 0))
        return Fused({"own": -2.0}, NearestBlock(self.bank, min(self.k, len(self.bank))),
                     bias=2.0, floor=0.0, power=0.5, feature=LogFeature(eps=1e-6))

    @classmethod
    def fit(cls, data: FitData) -> Detector:
        rows = stratified_subset(data.labels, data.settings.knn_reference,
                                 data.settings.knn_seed)
        k = scaled_k(data.settings.knn_k, len(rows), len(data.labels))
        return cls(data.outputs.unit_features[rows].astype(np.float32), k)

    @cached_property
    def bank64_t(self) -> np.ndarray:
        """The unit reference rows, transposed, in float64: converted once, not per call."""
        return self.bank.T.astype(np.float64)

    def risk(self, out: Outputs) -> np.ndarray:
        sim = out.unit_features @ self.bank64_t  # (N, n) cosine
        at = sim.shape[1] - self.k  # the k-th largest is the (n - k)-th smallest
        kth = np.partition(sim, at, axis=1)[:, at]
        return np.sqrt(np.maximum(2.0 - 2.0 * kth, 0.0))

    def state(self) -> dict[str, np.ndarray]:
        return {"bank": self.bank, "k": np.array([self.k], np.float32)}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> Detector:
        return cls(state["bank"], int(state["k"][0]))

    @staticmethod
    def feature(risk: np.ndarray) -> np.ndarray:
        return np.log(np.asarray(risk, np.float64) + 1e-6)


@dataclass(frozen=True)
class ViM(Detector):
    """Virtual-logit matching (Wang et al., 2022): with the head ``l = W z + b``, origin
    ``u = -W^+ b`` and ``R`` the principal-complement basis of the reference features
    ``z - u`` (all but the ``D`` largest directions), ``alpha |(z - u) R| - log sum exp l``;
    ``alpha`` = mean max logit / mean residual norm on the reference split."""

    name, group, summary = "vim", "density", "ViM (virtual logit)"
    origin: np.ndarray  # (d,)
    residual_basis: np.ndarray  # (d, d - D)
    alpha: float
    own_settings: ClassVar[dict[str, tuple[Any, Any]]] = {
        "vim_dim": (int | None, Field(None, ge=1, description="principal subspace size "
                                      "(None: half the features)"))}
    hinged = True

    def fused(self) -> Fused:  # alpha |(z - u) R| - (l_max + log(1 + r))
        return Fused({"own": self.alpha, "l_max": -1.0, "log1p_r": -1.0},
                     ResidualBlock(self.origin, self.residual_basis))

    @classmethod
    def fit(cls, data: FitData) -> Detector:
        w, b = data.head
        z = np.asarray(data.outputs.features, np.float64)
        origin = -np.linalg.pinv(w) @ b
        x = z - origin
        dim = data.settings.vim_dim or z.shape[1] // 2
        _, evecs = np.linalg.eigh(x.T @ x / len(x))
        basis = evecs[:, : z.shape[1] - dim]  # eigh: ascending, so the smallest first
        residual = np.linalg.norm(x @ basis, axis=1)
        alpha = float(np.asarray(data.outputs.logits).max(1).mean() / residual.mean())
        return cls(origin.astype(np.float32), basis.astype(np.float32), alpha)

    @cached_property
    def basis64(self) -> np.ndarray:
        return self.residual_basis.astype(np.float64)

    def risk(self, out: Outputs) -> np.ndarray:
        x = np.asarray(out.features, np.float64) - self.origin
        residual = np.linalg.norm(x @ self.basis64, axis=1)
        return self.alpha * residual - logsumexp(out.logits)

    def state(self) -> dict[str, np.ndarray]:
        return {"origin": self.origin, "residual_basis": self.residual_basis,
                "alpha": np.array([self.alpha], np.float32)}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> Detector:
        return cls(state["origin"], state["residual_basis"], float(state["alpha"][0]))


@dataclass(frozen=True)
class ReActEnergy(Detector):
    """ReAct (Sun et al., 2021): clip the features at the reference split's 90th percentile
    activation ``c``, recompute the logits with the head and take the energy:
    ``-log sum exp(W min(z, c) + b)``."""

    name, group, summary = "react_energy", "density", "ReAct + energy"
    weight: np.ndarray  # (C, d)
    bias: np.ndarray  # (C,)
    clip: float
    own_settings: ClassVar[dict[str, tuple[Any, Any]]] = {
        "react_percentile": (float, Field(0.9, gt=0, lt=1, description="the activation "
                                          "clip's quantile"))}
    hinged = True

    def fused(self) -> Fused:
        return Fused({"own": -1.0}, ClippedEnergyBlock(self.weight, self.bias, self.clip))

    @classmethod
    def fit(cls, data: FitData) -> Detector:
        w, b = data.head
        clip = float(np.quantile(np.asarray(data.outputs.features, np.float64),
                                 data.settings.react_percentile))
        return cls(w.astype(np.float32), b.astype(np.float32), clip)

    @cached_property
    def weight64_t(self) -> np.ndarray:
        return self.weight.T.astype(np.float64)

    def risk(self, out: Outputs) -> np.ndarray:
        z = np.minimum(np.asarray(out.features, np.float64), self.clip)
        return -logsumexp(z @ self.weight64_t + self.bias)

    def state(self) -> dict[str, np.ndarray]:
        return {"weight": self.weight, "bias": self.bias,
                "clip": np.array([self.clip], np.float32)}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> Detector:
        return cls(state["weight"], state["bias"], float(state["clip"][0]))


@dataclass(frozen=True)
class _HeatmapDetector(Detector):
    """Shared code of the heatmap detectors: unit rows of ``H_ok``, ``H_bad``, ``H_adv``."""

    h_ok: np.ndarray
    h_bad: np.ndarray
    h_adv: np.ndarray

    @classmethod
    def fit(cls, data: FitData) -> Detector:
        return cls(np.asarray(data.h_ok, np.float32), np.asarray(data.h_bad, np.float32),
                   np.asarray(data.h_adv, np.float32))

    def state(self) -> dict[str, np.ndarray]:
        return {"h_ok": self.h_ok, "h_bad": self.h_bad, "h_adv": self.h_adv}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> Detector:
        return cls(state["h_ok"], state["h_bad"], state["h_adv"])

    @cached_property
    def units(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return unit_rows(self.h_ok), unit_rows(self.h_bad), unit_rows(self.h_adv)

    def sims(self, out: Outputs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``cos(s, H_ok[y^])``, ``cos(s, H_bad[y^])``, ``cos(s, H_adv[y^])``."""
        s, pred = out.unit_concepts, out.predictions
        return tuple((s * u[pred]).sum(1) for u in self.units)  # type: ignore[return-value]


class HeatmapCosine(_HeatmapDetector):
    """``cos(s, H_bad[y^]) - cos(s, H_ok[y^])``: closer to past mistakes than to past
    correct predictions of the predicted class."""

    name, group, summary = "heatmap_cosine", "concept", "heatmap cosine (bad - ok)"

    def risk(self, out: Outputs) -> np.ndarray:
        ok, bad, _ = self.sims(out)
        return bad - ok

    def fused(self) -> Fused:
        return Fused({"own": -1.0}, HeatmapBlock(self.h_ok, self.h_bad, self.h_adv, "bad"))


class PaperRule(_HeatmapDetector):
    """The source paper's rule as a score: ``max(cos(s, H_bad), cos(s, H_adv)) - cos(s,
    H_ok)``; it rejects where this is positive."""

    name, group, summary = "paper_rule", "concept", "paper rule (heatmap cosines)"

    def risk(self, out: Outputs) -> np.ndarray:
        ok, bad, adv = self.sims(out)
        return np.maximum(bad, adv) - ok

    def fused(self) -> Fused:
        return Fused({"own": -1.0},
                     HeatmapBlock(self.h_ok, self.h_bad, self.h_adv, "bad_or_adv"))


class FeatureNorm(Detector):
    """``-|z|``: the features' Euclidean norm, negated (small activations: a dim, washed-out
    or blurred input). Not a standard detector: a statistic the trust model's heads read."""

    name, group, summary = "feature_norm", "statistic", "feature norm (negated)"

    def risk(self, out: Outputs) -> np.ndarray:
        return -np.linalg.norm(np.asarray(out.features, np.float64), axis=1)

    def fused(self) -> Fused:
        return Fused({"z_norm": -1.0})


DETECTORS: dict[str, type[Detector]] = {
    cls.name: cls for cls in (MaxSoftmax, MaxLogit, Energy, Entropy, Doctor, Mahalanobis,
                              KNN, ViM, ReActEnergy, ConceptMahalanobis, HeatmapCosine,
                              PaperRule, FeatureNorm)
}
"""Every detector, in report order. The standard baselines are all but the concept ones and
the statistics."""

BASELINES: tuple[str, ...] = tuple(n for n, c in DETECTORS.items()
                                   if c.group not in ("concept", "statistic"))


def settings_fields() -> dict[str, tuple[Any, Any]]:
    """Every detector's own settings, from the registry (a name declared twice, or shadowing
    a shared setting, is refused)."""
    out: dict[str, tuple[Any, Any]] = {}
    for cls in DETECTORS.values():
        for name, spec in cls.own_settings.items():
            if name in out or name in SHARED_SETTINGS:
                raise TypeError(f"detector {cls.name}: setting {name!r} is declared twice")
            out[name] = spec
    return out


class _Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


DetectorSettings: type[Any] = create_model(
    "DetectorSettings", __base__=_Settings, __module__=__name__,
    __doc__="What the detectors' fits read: :data:`SHARED_SETTINGS` and every detector's "
            "own settings (built from :data:`DETECTORS`).",
    **SHARED_SETTINGS, **settings_fields())


def fit_detectors(data: FitData) -> dict[str, Detector]:
    return {name: cls.fit(data) for name, cls in DETECTORS.items()}


def detector_risks(detectors: dict[str, Detector], out: Outputs) -> dict[str, np.ndarray]:
    return {name: d.risk(out) for name, d in detectors.items()}


def detectors_state(detectors: dict[str, Detector]) -> dict[str, np.ndarray]:
    """Flat ``detector.<name>.<key>`` tensors for the bank."""
    return {f"detector.{name}.{k}": np.ascontiguousarray(v, np.float32)
            for name, d in detectors.items() for k, v in d.state().items()}


def detectors_from_state(tensors: dict[str, np.ndarray]) -> dict[str, Detector]:
    out: dict[str, Detector] = {}
    for name, cls in DETECTORS.items():
        prefix = f"detector.{name}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            out[name] = cls.from_state(state)
        except KeyError as exc:
            raise ValueError(f"detector {name!r}: tensor {prefix}{exc.args[0]} is missing"
                             ) from exc
    return out
