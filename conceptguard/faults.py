"""Fault localisation for misclassified inputs (docs/method.md, section 5).

The VLM oracle names what the image shows; the aligned features name what the encoder
kept. Oracle != label: ambiguous. Encoder view == label: the head erred. Otherwise: encoder.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from conceptguard.heatmaps import top_concepts


@dataclass(frozen=True)
class FaultReport:
    verdicts: np.ndarray  # per misclassified input: "head" | "encoder" | "ambiguous"
    counts: dict[str, int]
    pairs: list[dict]  # per (true, predicted) pair: counts and responsible concepts


def localise(labels: np.ndarray, predictions: np.ndarray, oracle_zero_shot: np.ndarray,
             encoder_zero_shot: np.ndarray) -> np.ndarray:
    """Verdict per input (only meaningful where ``predictions != labels``)."""
    verdict = np.where(encoder_zero_shot == labels, "head", "encoder").astype(object)
    verdict[oracle_zero_shot != labels] = "ambiguous"
    return verdict


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
    counts = {k: int(v) for k, v in Counter(verdicts.tolist()).items()}
    for key in ("head", "encoder", "ambiguous"):
        counts.setdefault(key, 0)
    pairs = []
    y, p, s = labels[wrong], predictions[wrong], concepts[wrong]
    for (t, q), n in Counter(zip(y.tolist(), p.tolist(), strict=True)).most_common():
        rows = (y == t) & (p == q)
        gap = s[rows].mean(0) - h_ok[t]
        vc = Counter(verdicts[rows].tolist())
        pairs.append({
            "true": class_names[t], "predicted": class_names[q], "count": int(n),
            "head": int(vc.get("head", 0)), "encoder": int(vc.get("encoder", 0)),
            "ambiguous": int(vc.get("ambiguous", 0)),
            "responsible_concepts": [{"concept": c, "gap": round(v, 4)}
                                     for c, v in top_concepts(gap, concept_names, top_k)],
        })
    return FaultReport(verdicts=verdicts, counts=counts, pairs=pairs)
