"""The monitor as a graph: :func:`conceptguard.scoring.score` as a torch module, exported to
ONNX alone (the sidecar path: logits, features, concepts in) or fused behind the serving
graph (:class:`conceptguard.export.MonitoredClassifier`: images in), so that one runtime
call per batch returns the classifier's outputs, every detector's risk, the four heads,
trust, reject, the reason code and the concept contributions, on CPU or CUDA.

numpy :func:`~conceptguard.scoring.score` stays the reference (float64); this graph computes
in float32 and is tested against it on the demo bank (``tests/test_monitor_graph.py``). It is
the same formulas in torch ops, arranged for few graph nodes (:class:`MonitorGraph`) and
rearranged where float32 would lose what float64 keeps:

- the confidence features of confident inputs: with ``r = sum_{c != argmax} exp(l_c - l_max)``
  (the softmax's mass off the top class, relative to it), ``log((1 - p_max) / p_max) =
  log r``, ``logsumexp l = l_max + log1p(r)``, entropy ``= log1p(r) - sum_c p_c (l_c - l_max)``
  and DOCTOR ``(1 - g) / g = (2 r + r^2 - q) / (1 + q)`` with ``q = sum_{c != argmax}
  exp(2 (l_c - l_max))``. These are identities; they avoid ``1 - p`` for ``p`` near 1,
  which float32 rounds to 0 where float64 still resolves it.
- ``log1p(r)`` as ``softplus(log r)`` (ONNX has no Log1p; ONNX Runtime's Softplus is
  accurate for very negative inputs).

Outputs (:data:`MONITOR_OUTPUTS`): ``risks`` is ``(N, len(DETECTORS))`` in registry order
(:data:`RISK_NAMES`); ``reason`` indexes :data:`conceptguard.scoring.REASON_KINDS`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from conceptguard.detectors import (
    DETECTORS,
    SHARED_QUANTITIES,
    ClippedEnergyBlock,
    Fused,
    GaussianBlock,
    HeatmapBlock,
    NearestBlock,
    PaperRule,
    ResidualBlock,
)
from conceptguard.export import MonitoredClassifier, onnx_export
from conceptguard.graph import FUSED_OUTPUTS, INPUT_NAME, MONITOR_OUTPUTS, OUTPUT_NAMES
from conceptguard.scoring import REASON_KINDS, Monitor
from conceptguard.trust import CONFIDENCE, HEADS, HINGED

RISK_NAMES: tuple[str, ...] = tuple(DETECTORS)  # at import; a graph reads the registry
# when it is built (MonitorGraph.risk_names), so a detector registered later is covered
MONITOR_INPUTS: tuple[str, ...] = OUTPUT_NAMES  # logits, features, concepts
STATE_KEY = "monitor_graph"  # the safetensors metadata key of MonitorGraph.state()


class GraphDisagrees(ValueError):
    """A written fused graph's scores differ from numpy :func:`~conceptguard.scoring.score`
    beyond float32's tolerance (:func:`check_fused_graph`); ``problem`` says which score and
    by how much. build-bank then keeps the classifier graph and numpy scoring."""

    def __init__(self, onnx_path: Path, problem: str):
        super().__init__(f"{onnx_path} disagrees with score() on the bank's tensors: {problem}")
        self.problem = problem


class NotFusable(ValueError):
    """The monitor holds a detector the fused graph cannot express (no :meth:`~conceptguard.
    detectors.Detector.fused` form, or a form the builder cannot widen): build-bank then
    keeps the classifier graph and numpy :func:`~conceptguard.scoring.score`
    (``fused_graph_stage`` in :mod:`offline.pipeline`); ``export-graph`` refuses."""


def fused_forms(monitor: Monitor) -> dict[str, Fused]:
    """Every registered detector's :class:`~conceptguard.detectors.Fused` form, in registry
    order; raises :class:`NotFusable` naming the first detector without one, or a set of
    forms the graph cannot hold (two nearest-neighbour or two clipped-energy blocks, heatmap
    blocks other than the monitor's heatmaps, a trust design order not the registry's)."""
    forms: dict[str, Fused] = {}
    for name in DETECTORS:
        det = monitor.detectors.get(name)
        if det is None:
            raise NotFusable(f"the monitor has no fitted detector {name!r}")
        form = det.fused()
        if form is None:
            raise NotFusable(f"detector {name!r} ({type(det).__name__}) has no fused form")
        unknown = set(form.terms) - {*SHARED_QUANTITIES, "own"}
        if unknown or ("own" in form.terms) != (form.block is not None):
            raise NotFusable(f"detector {name!r}: fused terms {sorted(form.terms)} do not "
                             f"match its block")
        forms[name] = form
    for kind in (NearestBlock, ClippedEnergyBlock):
        names = [n for n, f in forms.items() if isinstance(f.block, kind)]
        if len(names) > 1:
            raise NotFusable(f"the graph holds one {kind.__name__}, not {names}")
    rule = monitor.heatmaps
    for n, f in forms.items():
        b = f.block
        if isinstance(b, HeatmapBlock) and not all(
                np.array_equal(getattr(b, a), getattr(rule, a))
                for a in ("h_ok", "h_bad", "h_adv")):
            raise NotFusable(f"detector {n!r} uses heatmaps other than the paper rule's")
    design_order = list(CONFIDENCE) + [n for n in DETECTORS if n not in CONFIDENCE]
    if design_order != list(DETECTORS):
        raise NotFusable("the trust model's design order is not the registry's")
    return forms


def fusable(monitor: Monitor) -> str | None:
    """None when :class:`MonitorGraph` can express ``monitor``, else why not (one line)."""
    try:
        fused_forms(monitor)
    except NotFusable as exc:
        return str(exc)
    return None


def _feature_size(forms: dict[str, Fused]) -> int:
    """The feature size ``d``, read from the first block that has it."""
    for f in forms.values():
        b = f.block
        if isinstance(b, GaussianBlock) and b.space == "features":
            return int(b.gaussians.whiten.shape[0])
        if isinstance(b, ResidualBlock):
            return int(b.basis.shape[0])
        if isinstance(b, NearestBlock | ClippedEnergyBlock):
            return int((b.bank if isinstance(b, NearestBlock) else b.weight).shape[1])
    raise NotFusable("no fused block tells the feature size")


def _f32(a: np.ndarray | float) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, np.float32))


class MonitorGraph(nn.Module):
    """``(logits, features, concepts) -> MONITOR_OUTPUTS``, built from a loaded monitor: the
    registry says which detectors it covers (each detector's :class:`~conceptguard.
    detectors.Fused` form), the builder widens their blocks into shared operations.

    At batch 1 the graph's cost is mostly its node count (ONNX Runtime dispatches each node
    in microseconds, whatever its size), so the formulas are arranged into few, wide
    operations: one ``Gemm`` for the linear maps of ``[features, concepts]`` (every
    Gaussian block's whitening and its Mahalanobis cross terms, every residual block, the
    squared norms' inputs), one ``MatMul`` for the nearest-neighbour block's dot products
    (against the pre-normalised reference rows, a constant), one ``Gemm`` for every squared
    norm (on the squares), one for every risk (from the per-input quantities), one for the
    hinges and one for the heads. The Mahalanobis distances use ``|y|^2 - 2 y m_c + |m_c|^2``
    with ``y = x L - c`` and ``m_c = mu_c L - c``, centred on the mean ``c`` of the whitened
    class means; in float32 this loses ~1e-6 of the distances (relative), within the test
    tolerance (``tests/test_monitor_graph.py``)."""

    def __init__(self, monitor: Monitor):
        super().__init__()
        forms = fused_forms(monitor)
        self.risk_names = tuple(forms)  # the registry's order: the columns of ``risks``
        self.paper_rule_column = self.risk_names.index(PaperRule.name)  # its own output
        buf = self.register_buffer
        c = monitor.num_classes
        self.num_classes, self.num_concepts = c, monitor.num_concepts
        self._build_linear(forms, c, monitor.num_concepts)
        nearest = [f.block for f in forms.values() if isinstance(f.block, NearestBlock)]
        self.knn_k = 0
        if nearest:
            knn = nearest[0]
            self.knn_k = int(min(knn.k, len(knn.bank)))
            buf("knn_bank_t", _f32(np.ascontiguousarray(knn.bank.T)))
        energy = [f.block for f in forms.values() if isinstance(f.block, ClippedEnergyBlock)]
        self.has_energy = bool(energy)
        if energy:
            buf("react_weight_t", _f32(np.ascontiguousarray(energy[0].weight.T)))
            buf("react_bias", _f32(energy[0].bias))
            self.react_clip = float(energy[0].clip)
        # (C, 2K): per class, the unit rows H_ok - H_bad and H_adv - H_bad
        ok, bad, adv = monitor.heatmaps.units
        buf("heatmap_diffs", _f32(np.hstack([ok - bad, adv - bad])))
        buf("is_class", torch.eye(c, dtype=torch.bool))  # one-hot rows of the prediction
        # [e_off, e_off^2, e_off * d] (N, 3C) -> [r, q, t]
        buf("conf_sums", _f32(np.kron(np.eye(3), np.ones((c, 1)))))
        # [r, q, t, r^2, q^2, t^2] -> numerators, denominators of msp, t / (1 + r), DOCTOR; r
        num_den = np.zeros((6, 7))  # msp's numerator -1 is all bias
        num_den[2, 1] = 1.0  # t / (1 + r)
        num_den[[0, 3, 1], 2] = (2.0, 1.0, -1.0)  # DOCTOR: (2 r + r^2 - q) / (1 + q)
        num_den[0, 3] = num_den[0, 4] = num_den[1, 5] = 1.0
        num_den[0, 6] = 1.0
        buf("num_den_w", _f32(num_den))
        buf("num_den_b", _f32([-1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]))
        self._build_risks(forms, monitor.num_concepts)
        self._build_trust(monitor)
        self.threshold = float(monitor.threshold)

    def _build_linear(self, forms: dict[str, Fused], c: int, k: int) -> None:
        """One ``Gemm`` on ``u = [z, s]``: ``Y = [x_g L_g - c_g (each Gaussian block g),
        z, s, (z - o_j) R_j (each residual block j)]`` (whose squares, summed by blocks,
        give ``|x_g L_g|^2``, ``|z|^2``, ``|s|^2``, the residuals``^2``), the cross terms
        ``-2 x L (mu L)^T + |mu L|^2`` of every Gaussian block, and ``[s, s]`` (the factor of
        the heatmap terms)."""
        gauss = [f.block for f in forms.values() if isinstance(f.block, GaussianBlock)]
        resid = [f.block for f in forms.values() if isinstance(f.block, ResidualBlock)]
        d = _feature_size(forms)
        side = {"features": slice(0, d), "concepts": slice(d, d + k)}
        # (matrix, input rows, square-sum column): Gaussian blocks first (C columns each)
        blocks: list[tuple[np.ndarray, slice, slice | int]] = []
        for g, b in enumerate(gauss):
            blocks.append((b.gaussians.whiten64, side[b.space], slice(g * c, (g + 1) * c)))
        n_g = len(gauss) * c
        blocks += [(np.eye(d), side["features"], n_g), (np.eye(k), side["concepts"], n_g + 1)]
        blocks += [(b.basis.astype(np.float64), side["features"], n_g + 2 + j)
                   for j, b in enumerate(resid)]
        y_cols = sum(m.shape[1] for m, _, _ in blocks)
        cross = n_g + 2 + len(resid)  # distances (C per block), |z|^2, |s|^2, residuals^2
        w = np.zeros((d + k, y_cols + cross + 2 * k))
        bias = np.zeros(y_cols + cross + 2 * k)
        w[d:, y_cols + cross:] = np.hstack([np.eye(k), np.eye(k)])  # s, s: heatmap factor
        sums = np.zeros((y_cols, cross))
        col = 0
        for m, rows, out in blocks:
            w[rows, col:col + m.shape[1]] = m
            sums[col:col + m.shape[1], out] = 1.0
            col += m.shape[1]
        col = y_cols - sum(b.basis.shape[1] for b in resid)
        for b in resid:
            basis = b.basis.astype(np.float64)
            bias[col:col + basis.shape[1]] = -b.origin.astype(np.float64) @ basis
            col += basis.shape[1]
        # unit_rows divides by |x| + 1e-12: here by sqrt(|x|^2 + 1e-24), the same in float32
        bias[y_cols + n_g:y_cols + n_g + 2] = 1e-24
        # whitened coordinates centred on the mean of the class means (smaller squares,
        # less cancellation): y = x L - m, distances |y|^2 - 2 y (mu_c L - m) + |mu_c L - m|^2
        first = 0
        for g, b in enumerate(gauss):
            whiten, means = b.gaussians.whiten64, b.gaussians.whitened_means
            centre = means.mean(0)
            rel = means - centre
            bias[first:first + whiten.shape[1]] = -centre
            first += whiten.shape[1]
            out = slice(y_cols + g * c, y_cols + (g + 1) * c)
            w[side[b.space], out] = -2.0 * whiten @ rel.T
            bias[out] = 2.0 * centre @ rel.T + (rel * rel).sum(1)
        self.register_buffer("lin_w", _f32(w))
        self.register_buffer("lin_b", _f32(bias))
        self.register_buffer("square_sums", _f32(sums))
        self.split_linear = [y_cols, cross, 2 * k]
        self.num_gaussians, self.num_residuals = len(gauss), len(resid)

    def _build_risks(self, forms: dict[str, Fused], k: int) -> None:
        """``risks`` from the per-input quantities (forward's ``quantities``) by one
        ``Gemm`` (each detector's ``Fused.terms`` and ``bias``), then ``max(., floor) **
        power``; and ``Detector.feature`` of every column as ``log(max(x, lo) + eps)`` or
        ``x`` (``Fused.feature``). The heatmap terms enter per concept: ``cos(s, H_ok) -
        cos(s, H_bad)`` is the sum of ``ok_bad``, the paper rule's ``cos(s, H_ok) - max(
        cos(s, H_bad), cos(s, H_adv))`` the sum of the contributions."""
        sizes = {"l_max": 1, "log1p_r": 1, "neg_p_max": 1, "entropy_t": 1, "doctor": 1,
                 "gaussians": self.num_gaussians, "residuals": self.num_residuals,
                 "z_norm": 1, "nearest": self.knn_k, "energy": int(self.has_energy),
                 "ok_bad": k, "contributions": k}
        starts = dict(zip(sizes, np.cumsum([0, *sizes.values()])[:-1].tolist(), strict=True))
        count = {"gaussians": 0, "residuals": 0}
        names = self.risk_names
        a = np.zeros((sum(sizes.values()), len(names)))
        a0 = np.zeros(len(names))
        lo = np.full((1, len(names)), np.finfo(np.float32).min, np.float64)
        power = np.ones((1, len(names)))
        for j, name in enumerate(names):
            form = forms[name]
            for t, v in form.terms.items():
                if t != "own":
                    a[starts[t], j] = v
                    continue
                b = form.block
                if isinstance(b, GaussianBlock | ResidualBlock):
                    kind = "gaussians" if isinstance(b, GaussianBlock) else "residuals"
                    a[starts[kind] + count[kind], j] = v
                    count[kind] += 1
                elif isinstance(b, NearestBlock):  # the k-th nearest only
                    a[starts["nearest"] + self.knn_k - 1, j] = v
                elif isinstance(b, ClippedEnergyBlock):
                    a[starts["energy"], j] = v
                elif isinstance(b, HeatmapBlock):
                    t = "ok_bad" if b.versus == "bad" else "contributions"
                    a[starts[t]:starts[t] + k, j] = v
            a0[j] = form.bias
            if form.floor is not None:
                lo[0, j] = form.floor
            power[0, j] = form.power
        self.quantity_sizes = sizes
        buf = self.register_buffer
        buf("risk_w", _f32(a))
        buf("risk_b", _f32(a0))
        buf("risk_lo", _f32(lo))
        buf("risk_power", _f32(power))
        self.has_power = bool((power != 1.0).any())
        # Detector.feature of every column at once: log(max(x, lo) + eps) or x itself
        # (a column whose feature reads r takes r, see forward)
        feats = [forms[n].feature for n in names]
        buf("feature_is_r", torch.tensor([[f is not None and f.of_r for f in feats]]))
        buf("feature_is_log", torch.tensor([[f is not None for f in feats]]))
        buf("feature_lo", _f32([[f.lo if f else 1.0 for f in feats]]))
        buf("feature_eps", _f32([[f.eps if f else 0.0 for f in feats]]))

    def _build_trust(self, monitor: Monitor) -> None:
        """The hinges as one ``Gemm`` (a 0/1 selection minus the knots) and a ``Relu``; the
        heads as one ``Gemm`` on the design row (each head's centring folded into its bias:
        float32 keeps trust within ~1e-6 of float64 on the demo bank). Its columns: the four heads'
        logits ``a``, then ``-a_mis``, ``-a_anom`` (their sigmoids are the factors of
        trust), ``a_anom - a_mis``, ``a_unf - a_adv`` and a constant 1: the signs of the
        last three, weighted 3, 1, 4, index the reason table (:func:`conceptguard.scoring.
        reasons`: the head carrying the evidence names the reason)."""
        design_order = list(self.risk_names)  # fused_forms checked: the trust model's
        tm = monitor.trust_model
        q = tm.knots.shape[1]
        sel = np.zeros((len(design_order), len(HINGED) * q))
        for i, name in enumerate(HINGED):
            sel[design_order.index(name), i * q:(i + 1) * q] = 1.0
        buf = self.register_buffer
        buf("hinge_select", _f32(sel))
        buf("hinge_knots", _f32(-tm.knots.reshape(-1)))
        n_cols = len(tm.mis_columns)
        w = np.zeros((n_cols, len(HEADS)))
        b = np.zeros(len(HEADS))
        for i, h in enumerate(HEADS):
            cols = tm.mis_columns if h == "misclassification" else slice(None)
            head = tm.heads[h]
            wi = np.asarray(head.w, np.float64) / np.asarray(head.scale, np.float64)
            w[cols, i] = wi
            b[i] = head.b - np.asarray(head.mean, np.float64) @ wi  # (x - mean) w = x w - mean w
        mis, anom = HEADS.index("misclassification"), HEADS.index("anomaly")
        adv, unf = HEADS.index("adversarial"), HEADS.index("unfamiliar")
        extra_w = np.stack([-w[:, mis], -w[:, anom], w[:, anom] - w[:, mis],
                            w[:, unf] - w[:, adv], np.zeros(n_cols)], 1)
        extra_b = np.array([-b[mis], -b[anom], b[anom] - b[mis], b[unf] - b[adv], 1.0])
        buf("head_w", _f32(np.hstack([w, extra_w])))
        buf("head_b", _f32(np.r_[b, extra_b]))
        n_out = len(HEADS) + 5
        code = np.zeros(n_out)
        code[[n_out - 3, n_out - 2, n_out - 1]] = (3.0, 1.0, 4.0)
        buf("reason_code", _f32(code))
        table = np.zeros(9, np.int64)
        for sm in (-1, 0, 1):  # sign(a_anom - a_mis)
            for sd in (-1, 0, 1):  # sign(a_unf - a_adv)
                if sm <= 0:  # p_anomaly <= p_misclassification
                    kind = "misclassification-like"
                else:  # adversarial when p_adv >= p_unf
                    kind = "adversarial-like" if sd <= 0 else "unfamiliar"
                table[3 * sm + sd + 4] = REASON_KINDS.index(kind)
        buf("reason_table", torch.as_tensor(table))
        self.trust_columns = (len(HEADS), len(HEADS) + 2)

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """The graph's constants (its buffers) and its shape attributes, as safetensors
        tensors and metadata: :meth:`from_state` rebuilds the module from them with torch
        and numpy alone, without the bank or its loader (``benchmarks/gpu.py`` on a GPU
        machine that has torch but not this package's other dependencies)."""
        tensors = {k: v.detach().cpu().numpy() for k, v in self.named_buffers()}
        attrs = {k: v for k, v in vars(self).items()
                 if not k.startswith("_") and k != "training"}
        return tensors, {STATE_KEY: json.dumps(attrs)}

    @classmethod
    def from_state(cls, tensors: dict[str, np.ndarray], metadata: dict[str, str]
                   ) -> MonitorGraph:
        """The module :meth:`state` describes (the same constants, the same forward)."""
        if STATE_KEY not in metadata:
            raise ValueError(f"not a monitor graph state: no {STATE_KEY!r} metadata")
        graph = cls.__new__(cls)
        nn.Module.__init__(graph)
        for k, v in json.loads(metadata[STATE_KEY]).items():
            setattr(graph, k, v)
        for k, v in tensors.items():
            graph.register_buffer(k, torch.from_numpy(np.array(v)))
        return graph.eval()

    def forward(self, logits: torch.Tensor, features: torch.Tensor, concepts: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        z, s = features, concepts
        c = self.num_classes
        # --- confidence detectors (stable forms, see the module docstring)
        pred = logits.argmax(1)
        l_max = logits.max(1, keepdim=True).values
        d = logits - l_max
        e_off = torch.where(self.is_class[pred], 0.0, torch.exp(d))
        rqt = torch.cat([e_off, e_off * e_off, e_off * d], 1) @ self.conf_sums  # r, q, t
        nd = torch.addmm(self.num_den_b, torch.cat([rqt, rqt * rqt], 1), self.num_den_w)
        num, den, r = nd.split([3, 3, 1], 1)
        ratios = num / den  # -1 / (1 + r), t / (1 + r), DOCTOR
        log1p_r = nn.functional.softplus(torch.log(r))  # log(1 + r), exact for small r
        # --- linear maps of [z, s], then sums of squares by block
        y, lin, s2 = torch.addmm(self.lin_b, torch.cat([z, s], 1), self.lin_w
                                   ).split(self.split_linear, 1)
        sq = torch.addmm(lin, y * y, self.square_sums)
        g = self.num_gaussians
        dist, norms2 = sq.split([g * c, 2 + self.num_residuals], 1)
        quantities = [l_max, log1p_r, ratios]
        if g:  # every Gaussian block's distance to the nearest class
            quantities.append(dist.reshape(-1, g, c).min(2).values)
        # |z|, |s| (+ 1e-24 inside), the residual norms
        z_norm, s_norm, residual = (norms2 ** 0.5).split([1, 1, self.num_residuals], 1)
        quantities += [residual, z_norm]
        if self.knn_k:  # every k nearest; the risk reads the k-th (the others: weight 0)
            quantities.append(torch.topk(z @ self.knn_bank_t, self.knn_k, dim=1).values
                              / z_norm)
        if self.has_energy:
            quantities.append(torch.logsumexp(
                torch.clamp(z, max=self.react_clip) @ self.react_weight_t + self.react_bias,
                1, keepdim=True))
        # --- concept terms: with u = s / |s| and the predicted class's unit heatmap rows,
        # ok_bad = u (H_ok - H_bad), adv_bad = u (H_adv - H_bad) per concept; the
        # contributions are ok_bad where cos(s, H_adv) <= cos(s, H_bad), else
        # ok_bad - adv_bad (= u (H_ok - H_adv))
        ok_bad, adv_bad = (self.heatmap_diffs[pred] * (s2 / s_norm)).split(self.num_concepts, 1)
        adv_wins = adv_bad.sum(1, keepdim=True) > 0
        contributions = ok_bad - torch.where(adv_wins, adv_bad, 0.0)
        # --- every risk from the per-input quantities (_build_risks)
        risks = torch.addmm(self.risk_b, torch.cat([*quantities, ok_bad, contributions], 1),
                            self.risk_w)
        risks = torch.maximum(risks, self.risk_lo)
        if self.has_power:
            risks = risks ** self.risk_power
        # --- trust model: Detector.feature of each risk, hinges, the heads
        x = torch.where(self.feature_is_r, r, risks)
        x = torch.where(self.feature_is_log,
                        torch.log(torch.maximum(x, self.feature_lo) + self.feature_eps), x)
        hinges = torch.relu(torch.addmm(self.hinge_knots, x, self.hinge_select))
        head_logits = torch.addmm(self.head_b, torch.cat([x, hinges], 1), self.head_w)
        ph = torch.sigmoid(head_logits)
        p_mis, p_anom, p_adv, p_unf = (ph[:, HEADS.index(h)] for h in HEADS)
        lo, hi = self.trust_columns
        trust = ph[:, lo:hi].prod(1)  # (1 - p_mis) (1 - p_anom)
        reject = trust < self.threshold
        code = (torch.sign(head_logits) @ self.reason_code).long()
        reason = torch.where(reject, self.reason_table[code], 0)
        return (torch.softmax(logits, 1), pred, risks, p_mis, p_anom, p_adv, p_unf, trust,
                reject, reason, risks[:, self.paper_rule_column] > 0, contributions)


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
                        opset: int = 17) -> None:
    """The monitor alone: ``(logits, features, concepts) -> MONITOR_OUTPUTS`` (the sidecar
    path). ``dims``: ``(classes, features, concepts)``."""
    c, f, k = dims
    dummies = tuple(torch.randn(2, n) for n in (c, f, k))
    onnx_export(MonitorGraph(monitor).eval(), dummies, MONITOR_INPUTS,
                MONITOR_OUTPUTS, path, opset)


def export_fused_onnx(classifier: MonitoredClassifier, monitor: Monitor,
                      input_shape: tuple[int, int, int], path: Path, opset: int = 17) -> None:
    """One graph: ``images -> (logits, features, concepts, *MONITOR_OUTPUTS)``."""
    module = FusedMonitoredClassifier(classifier, MonitorGraph(monitor)).eval()
    dummy = torch.rand((2, *input_shape), dtype=torch.float32)
    onnx_export(module, (dummy,), (INPUT_NAME,), FUSED_OUTPUTS, path, opset)


def export_bank_fused_onnx(bank, path: Path, opset: int = 17  # bank: conceptguard.bank.Bank
                           ) -> None:
    """:func:`export_fused_onnx` for a loaded bank (its classifier weights and projection)."""
    from conceptguard.classifier.io import load_classifier

    model, spec, _ = load_classifier(bank.classifier_path)
    export_fused_onnx(MonitoredClassifier(model, bank.projection()), bank.monitor,
                      spec.input_shape, path, opset)


def add_fused_graph(path: Path | str, opset: int = 17) -> Path:
    """Export the fused graph of the bank at ``path`` into it as ``monitor.onnx`` and list
    its sha256 in the manifest (``conceptguard export-graph``), for banks built before
    build-bank wrote it. The bank is copied beside itself, the graph is exported there and
    checked against numpy :func:`~conceptguard.scoring.score` on the test-free probe batch,
    the manifest is rewritten, and the copy is swapped in with renames: readers see the old
    bank or the new one, never a manifest whose checksums do not match."""
    import shutil

    from conceptguard import bank as bankio
    from conceptguard.atomic import staging_dir

    path = Path(path)
    bank = bankio.load_bank(path)
    reason = fusable(bank.monitor)
    if reason is not None:
        raise NotFusable(f"{path}: no fused graph for this bank: {reason}")
    staging = staging_dir(path)
    try:
        shutil.copytree(path, staging, dirs_exist_ok=True)
        export_bank_fused_onnx(bank, staging / bankio.FUSED_ONNX, opset)
        check_fused_graph(bank.monitor, staging / bankio.FUSED_ONNX,
                          bankio.probe_images(bank))
        manifest = bank.manifest.model_copy(deep=True)
        manifest.fused_graph = {"written": True}
        bankio.write_manifest(staging, manifest)
        bankio.load_bank(staging)  # every checksum, before the swap
        bankio.publish(staging, path)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return path / bankio.FUSED_ONNX


def check_fused_graph(monitor: Monitor, onnx_path: Path, images: np.ndarray) -> None:
    """Raise :class:`GraphDisagrees` when the fused graph at ``onnx_path`` disagrees with
    numpy :func:`~conceptguard.scoring.score` of ``monitor`` on float32 ``images``
    (``ValueError`` when it is not a fused graph at all)."""
    from conceptguard.runtime import OnnxRuntime
    from conceptguard.scoring import graph_disagreement, graph_tolerance, score, scores_from_graph

    o = OnnxRuntime(onnx_path, device="cpu", threads=1).run(images)
    if o.monitor is None:
        raise ValueError(f"{onnx_path} is not a fused graph (no monitor outputs)")
    with np.errstate(all="ignore"):
        ref = score(monitor, o.logits, o.features, o.concepts)
    atol = graph_tolerance(monitor, o.logits, o.features, o.concepts, ref)
    problem = graph_disagreement(ref, scores_from_graph(o.monitor, monitor.threshold), atol)
    if problem:
        raise GraphDisagrees(onnx_path, problem)

