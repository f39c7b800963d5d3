"""The monitor as a graph: :func:`conceptguard.scoring.score` as a torch module, exported to
ONNX alone (the sidecar path: logits, features, concepts in) or fused behind the serving
graph (:class:`conceptguard.export.MonitoredClassifier`: images in), so that one runtime
call per batch returns the classifier's outputs, every detector's risk, the four heads,
trust, reject, the reason code and the concept contributions, on CPU or CUDA.

numpy :func:`~conceptguard.scoring.score` stays the reference (float64); this graph computes
in float32 and is tested against it on the demo bank (``tests/test_monitor_graph.py``).
Functions of the core that use only Python operators are reused as they are
(:func:`conceptguard.projection.unit_rows`); the rest is the same formula once more in
torch ops, rearranged only where float32 would lose what float64 keeps:

- the confidence features of confident inputs: with ``r = sum_{c != argmax} exp(l_c - l_max)``
  (the softmax's mass off the top class, relative to it), ``log((1 - p_max) / p_max) =
  log r``, ``logsumexp l = l_max + log1p(r)``, entropy ``= log1p(r) - sum_c p_c (l_c - l_max)``
  and DOCTOR ``(1 - g) / g = (2 r + r^2 - q) / (1 + q)`` with ``q = sum_{c != argmax}
  exp(2 (l_c - l_max))``. These are identities; they avoid ``1 - p`` for ``p`` near 1,
  which float32 rounds to 0 where float64 still resolves it.
- ``log1p`` as ``x log(u) / (u - 1)``, ``u = 1 + x`` (ONNX has no Log1p).

Outputs (:data:`MONITOR_OUTPUTS`): ``risks`` is ``(N, len(DETECTORS))`` in registry order
(:data:`RISK_NAMES`); ``reason`` indexes :data:`conceptguard.trust.REASON_KINDS`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from conceptguard.detectors import (
    DETECTORS,
    KNN,
    ConceptMahalanobis,
    Mahalanobis,
    PaperRule,
    ReActEnergy,
    ViM,
)
from conceptguard.export import MonitoredClassifier, onnx_export
from conceptguard.graph import FUSED_OUTPUTS, INPUT_NAME, MONITOR_OUTPUTS, OUTPUT_NAMES
from conceptguard.projection import unit_rows
from conceptguard.scoring import Monitor
from conceptguard.trust import CONFIDENCE, HEADS, HINGED, REASON_KINDS

RISK_NAMES: tuple[str, ...] = tuple(DETECTORS)
MONITOR_INPUTS: tuple[str, ...] = OUTPUT_NAMES  # logits, features, concepts

# MaxSoftmax.feature clips p to 1 - 1e-12: log((1 - p) / p) >= this.
_MSP_FLOOR = math.log(1e-12 / (1.0 - 1e-12))
_GRAPH_DETECTORS = ("msp", "max_logit", "energy", "entropy", "doctor", "mahalanobis", "knn",
                    "vim", "react_energy", "concept_mahalanobis", "heatmap_cosine",
                    "paper_rule")


def _f32(a: np.ndarray | float) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, np.float32))


def log1p(x: torch.Tensor) -> torch.Tensor:
    """``log(1 + x)`` accurate for small ``x`` in float32 (Goldberg's trick)."""
    u = 1.0 + x
    d = u - 1.0
    return torch.where(d == 0, x, x * torch.log(u) / torch.where(d == 0, 1.0, d))


class MonitorGraph(nn.Module):
    """``(logits, features, concepts) -> MONITOR_OUTPUTS``, built from a loaded monitor.

    ``knn_subsample``: keep every ``n``-th reference feature of the KNN detector (a cost
    knob for benchmarks; it changes the KNN risk, so the bank's calibration no longer holds
    exactly). None: all of them, as the numpy path."""

    def __init__(self, monitor: Monitor, knn_subsample: int | None = None):
        super().__init__()
        unknown = [n for n in DETECTORS if n not in _GRAPH_DETECTORS]
        if unknown:
            raise NotImplementedError(f"no graph for detectors {unknown}: use numpy score()")
        det = monitor.detectors
        maha, cmaha = det["mahalanobis"], det["concept_mahalanobis"]
        knn, vim, react, rule = det["knn"], det["vim"], det["react_energy"], det["paper_rule"]
        assert isinstance(maha, Mahalanobis) and isinstance(cmaha, ConceptMahalanobis)
        assert isinstance(knn, KNN) and isinstance(vim, ViM)
        assert isinstance(react, ReActEnergy) and isinstance(rule, PaperRule)
        hc = det["heatmap_cosine"]
        if not all(np.array_equal(getattr(hc, a), getattr(rule, a))
                   for a in ("h_ok", "h_bad", "h_adv")):
            raise NotImplementedError("heatmap_cosine and paper_rule use different heatmaps")
        buf = self.register_buffer
        buf("maha_whiten", _f32(maha.gaussians.whiten))
        buf("maha_means", _f32(maha.gaussians.whitened_means))
        buf("cmaha_whiten", _f32(cmaha.gaussians.whiten))
        buf("cmaha_means", _f32(cmaha.gaussians.whitened_means))
        bank = knn.bank if knn_subsample is None else knn.bank[::knn_subsample]
        self.knn_k = int(min(knn.k, len(bank)))
        buf("knn_bank_t", _f32(np.ascontiguousarray(bank.T)))
        buf("vim_origin", _f32(vim.origin))
        buf("vim_basis", _f32(vim.residual_basis))
        self.vim_alpha = float(vim.alpha)
        buf("react_weight_t", _f32(np.ascontiguousarray(react.weight.T)))
        buf("react_bias", _f32(react.bias))
        self.react_clip = float(react.clip)
        buf("heatmap_units", _f32(np.stack(rule.units)))  # (3, C, K): ok, bad, adv
        buf("class_index", torch.arange(monitor.num_classes)[None, :])
        # Detector.feature of every column at once: log(max(x, lo) + eps) or x itself
        # (the msp column holds r, see forward; log r >= _MSP_FLOOR is MaxSoftmax's clip)
        log_cols = {"msp": (math.exp(_MSP_FLOOR), 0.0), "entropy": (0.0, 1e-9),
                    "doctor": (0.0, 1e-9), "mahalanobis": (0.0, 1.0), "knn": (0.0, 1e-6),
                    "concept_mahalanobis": (0.0, 1.0)}
        buf("feature_is_log", torch.tensor([[n in log_cols for n in RISK_NAMES]]))
        buf("feature_lo", _f32([[log_cols.get(n, (1.0, 0.0))[0] for n in RISK_NAMES]]))
        buf("feature_eps", _f32([[log_cols.get(n, (1.0, 0.0))[1] for n in RISK_NAMES]]))
        design_order = list(CONFIDENCE) + [n for n in DETECTORS if n not in CONFIDENCE]
        self.design_order = None if design_order == list(RISK_NAMES) else \
            [RISK_NAMES.index(n) for n in design_order]
        buf("hinged_index", torch.tensor([design_order.index(n) for n in HINGED]))
        tm = monitor.trust_model
        buf("knots", _f32(tm.knots[None]))  # (1, len(HINGED), len(HINGE_QUANTILES))
        n_cols = len(tm.mis_columns)
        mean, w = np.zeros((len(HEADS), n_cols)), np.zeros((len(HEADS), n_cols))
        for i, h in enumerate(HEADS):
            cols = tm.mis_columns if h == "misclassification" else slice(None)
            head = tm.heads[h]
            mean[i, cols], w[i, cols] = head.mean, head.w / head.scale
        buf("head_mean", _f32(mean))
        buf("head_w", _f32(w))  # w / scale: ((x - mean) / scale) w = (x - mean) (w / scale)
        buf("head_b", _f32([tm.heads[h].b for h in HEADS]))
        self.threshold = float(monitor.threshold)

    def forward(self, logits: torch.Tensor, features: torch.Tensor, concepts: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        z, s = features, concepts
        # Columns are kept (N, 1) (keepdim) and joined once: fewer graph nodes, which is
        # most of the cost at batch 1.
        # --- confidence detectors (stable forms, see the module docstring)
        pred = logits.argmax(1, keepdim=True)
        l_max = logits.max(1, keepdim=True).values
        d = logits - l_max
        e = torch.exp(d)
        e_off = torch.where(self.class_index == pred, 0.0, e)
        r = e_off.sum(1, keepdim=True)
        q = (e_off * e_off).sum(1, keepdim=True)
        total = 1.0 + r
        p = e / total
        log_total = log1p(r)
        logsumexp = l_max + log_total
        entropy = log_total - (p * d).sum(1, keepdim=True)
        doctor = (2.0 * r + r * r - q) / (1.0 + q)
        # --- density detectors
        maha = self._sq_mahalanobis(z, self.maha_whiten, self.maha_means)
        sim = unit_rows(z) @ self.knn_bank_t
        kth = torch.topk(sim, self.knn_k, dim=1).values[:, self.knn_k - 1:]
        knn = torch.sqrt(torch.clamp(2.0 - 2.0 * kth, min=0.0))
        residual = (((z - self.vim_origin) @ self.vim_basis) ** 2).sum(1, keepdim=True) ** 0.5
        vim = self.vim_alpha * residual - logsumexp
        rl = torch.clamp(z, max=self.react_clip) @ self.react_weight_t + self.react_bias
        rl_max = rl.max(1, keepdim=True).values
        react = -(rl_max + torch.log(torch.exp(rl - rl_max).sum(1, keepdim=True)))
        # --- concept detectors
        cmaha = self._sq_mahalanobis(s, self.cmaha_whiten, self.cmaha_means)
        su = unit_rows(s)
        rows = self.heatmap_units[:, pred[:, 0]]  # (3, N, K)
        sims = (su * rows).sum(-1, keepdim=True)  # (3, N, 1)
        ok, bad, adv = sims[0], sims[1], sims[2]
        cols = {
            "max_logit": -l_max, "energy": -logsumexp, "entropy": entropy,
            "doctor": doctor, "mahalanobis": maha, "knn": knn, "vim": vim,
            "react_energy": react, "concept_mahalanobis": cmaha,
            "heatmap_cosine": bad - ok, "paper_rule": torch.maximum(bad, adv) - ok,
        }
        risks = torch.cat([-1.0 / total if n == "msp" else cols[n] for n in RISK_NAMES], 1)
        # --- trust model: Detector.feature of each risk, hinges, four logistic heads
        x = torch.cat([r if n == "msp" else cols[n] for n in RISK_NAMES], 1)
        x = torch.where(self.feature_is_log,
                        torch.log(torch.maximum(x, self.feature_lo) + self.feature_eps), x)
        if self.design_order is not None:
            x = x[:, self.design_order]
        hinges = torch.relu(x[:, self.hinged_index, None] - self.knots).flatten(1)
        x = torch.cat([x, hinges], 1)
        head_logits = ((x[:, None, :] - self.head_mean) * self.head_w).sum(-1) + self.head_b
        ph = torch.sigmoid(head_logits)  # (N, len(HEADS))
        p_mis, p_anom, p_adv, p_unf = (ph[:, HEADS.index(h)] for h in HEADS)
        trust = (1.0 - p_mis) * (1.0 - p_anom)
        reject = trust < self.threshold
        reason = torch.where(
            ~reject, REASON_KINDS.index("accepted"),
            torch.where(torch.maximum(p_adv, p_unf) <= 0.5,
                        REASON_KINDS.index("misclassification-like"),
                        torch.where(p_adv >= p_unf, REASON_KINDS.index("adversarial-like"),
                                    REASON_KINDS.index("unfamiliar"))))
        # --- concept contributions (conceptguard.scoring.concept_contributions)
        contributions = su * (rows[0] - torch.where(adv > bad, rows[2], rows[1]))
        return (p, pred[:, 0], risks, p_mis, p_anom, p_adv, p_unf, trust, reject, reason,
                risks[:, RISK_NAMES.index("paper_rule")] > 0, contributions)

    @staticmethod
    def _sq_mahalanobis(x: torch.Tensor, whiten: torch.Tensor, whitened_means: torch.Tensor
                        ) -> torch.Tensor:
        """``min_c |x L - mu_c L|^2`` from explicit differences, as ``ClassGaussians``."""
        diff = (x @ whiten)[:, None, :] - whitened_means[None]
        return (diff * diff).sum(-1).min(1, keepdim=True).values


class FusedMonitoredClassifier(nn.Module):
    """``images -> (logits, features, concepts, *MONITOR_OUTPUTS)``: the serving graph and
    the monitor in one module."""

    def __init__(self, classifier: MonitoredClassifier, monitor: MonitorGraph):
        super().__init__()
        self.classifier = classifier
        self.monitor = monitor

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, z, s = self.classifier(images)
        return (logits, z, s, *self.monitor(logits, z, s))


def export_monitor_onnx(monitor: Monitor, dims: tuple[int, int, int], path: Path,
                        opset: int = 17, knn_subsample: int | None = None) -> None:
    """The monitor alone: ``(logits, features, concepts) -> MONITOR_OUTPUTS`` (the sidecar
    path). ``dims``: ``(classes, features, concepts)``."""
    c, f, k = dims
    dummies = tuple(torch.randn(2, n) for n in (c, f, k))
    onnx_export(MonitorGraph(monitor, knn_subsample).eval(), dummies, MONITOR_INPUTS,
                MONITOR_OUTPUTS, path, opset)


def export_fused_onnx(classifier: MonitoredClassifier, monitor: Monitor,
                      input_shape: tuple[int, int, int], path: Path, opset: int = 17,
                      knn_subsample: int | None = None) -> None:
    """One graph: ``images -> (logits, features, concepts, *MONITOR_OUTPUTS)``."""
    module = FusedMonitoredClassifier(classifier, MonitorGraph(monitor, knn_subsample)).eval()
    dummy = torch.rand((2, *input_shape), dtype=torch.float32)
    onnx_export(module, (dummy,), (INPUT_NAME,), FUSED_OUTPUTS, path, opset)


def export_bank_fused_onnx(bank, path: Path, opset: int = 17,  # bank: conceptguard.bank.Bank
                           knn_subsample: int | None = None) -> None:
    """:func:`export_fused_onnx` for a loaded bank (its classifier weights and projection)."""
    from conceptguard.classifier.io import load_classifier

    model, spec, _ = load_classifier(bank.classifier_path)
    export_fused_onnx(MonitoredClassifier(model, bank.projection()), bank.monitor,
                      spec.input_shape, path, opset, knn_subsample)


def add_fused_graph(path: Path | str, opset: int = 17) -> Path:
    """Export the fused graph of the bank at ``path`` into it as ``monitor.onnx`` and list
    its sha256 in the manifest (``conceptguard export-graph``), for banks built before
    build-bank wrote it. The bank is copied beside itself, the graph is exported there and
    checked against numpy :func:`~conceptguard.scoring.score` on the test-free probe batch,
    the manifest is rewritten, and the copy is swapped in with renames: readers see the old
    bank or the new one, never a manifest whose checksums do not match."""
    import shutil

    from conceptguard import bank as bankio

    path = Path(path)
    bank = bankio.load_bank(path)
    staging = bankio.staging_dir(path)
    try:
        shutil.copytree(path, staging, dirs_exist_ok=True)
        export_bank_fused_onnx(bank, staging / bankio.FUSED_ONNX, opset)
        check_fused_graph(bank.monitor, staging / bankio.FUSED_ONNX,
                          bankio.probe_images(bank))
        bankio.write_manifest(staging, bank.manifest.model_copy(deep=True))
        bankio.load_bank(staging)  # every checksum, before the swap
        bankio.publish(staging, path)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return path / bankio.FUSED_ONNX


def check_fused_graph(monitor: Monitor, onnx_path: Path, images: np.ndarray) -> None:
    """Raise ``ValueError`` when the fused graph at ``onnx_path`` disagrees with numpy
    :func:`~conceptguard.scoring.score` of ``monitor`` on float32 ``images``."""
    from conceptguard.runtime import OnnxRuntime
    from conceptguard.scoring import graph_disagreement, score, scores_from_graph

    o = OnnxRuntime(onnx_path, device="cpu", threads=1).run(images)
    if o.monitor is None:
        raise ValueError(f"{onnx_path} is not a fused graph (no monitor outputs)")
    with np.errstate(all="ignore"):
        ref = score(monitor, o.logits, o.features, o.concepts)
    problem = graph_disagreement(ref, scores_from_graph(o.monitor, monitor.threshold))
    if problem:
        raise ValueError(f"{onnx_path} disagrees with score() on the bank's tensors: {problem}")

