"""Per-input evidence for the report: curves and example thumbnails.

``metrics.json`` holds summary numbers only. The curves (ROC, risk-coverage, reliability)
and the example thumbnails need per-input scores, which this module regenerates cheaply
from the bank itself: the bank's ONNX graph on the data source's official test split,
scored by :func:`conceptguard.scoring.score` exactly as the service scores a request, plus
a small seeded set of foreign images, corruptions and PGD attacks (seconds on a CPU).

The test split streams (:mod:`offline.streaming`): its images are decoded a batch at a time
from the data source, the served outputs go to a temporary file, and only per-image scalars
stay in memory; the few rows shown as examples are read back and rescored in full
(:meth:`Group.row_scores`). Memory does not grow with the size of the test split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from conceptguard.bank import Bank
from conceptguard.imaging import to_model_input
from conceptguard.scoring import Monitor, Scores, method_risks, score
from offline.streaming import StreamedOutputs, score_streamed, served_streamed

FOREIGN_PER_SET = 100
CORRUPTIONS_PER_KIND = 100
ATTACKED = 200
ATTACK = {"kind": "pgd", "eps": 0.05, "steps": 10}
SEED = 0


@dataclass
class Group:
    """One set of inputs: uint8 images ``(N,H,W,C)`` (an array, or a lazy one that decodes
    the rows asked for), labels (``-1`` for foreign inputs), the scores, and whether each
    input is a defect (wrong, attacked or foreign). ``outputs`` and ``monitor``: where the
    full scores of a row come from when ``scores`` holds per-image scalars only."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    scores: Scores
    defect: np.ndarray
    outputs: StreamedOutputs | None = None
    monitor: Monitor | None = None

    @property
    def risks(self) -> dict[str, np.ndarray]:
        return method_risks(self.scores)

    def row_scores(self, rows: np.ndarray) -> Scores:
        """Full scores (concept contributions, probabilities) of ``rows``."""
        rows = np.asarray(rows, np.int64)
        if self.outputs is None or self.monitor is None:
            return self.scores.rows(rows)
        b = self.outputs.take(rows)
        return score(self.monitor, b.logits, b.features, b.concepts)


@dataclass
class Evidence:
    clean: Group
    foreign: Group | None = None
    corrupted: Group | None = None
    adversarial: Group | None = None
    notes: list[str] = field(default_factory=list)


def _runtime(bank: Bank):
    from conceptguard.runtime import OnnxRuntime

    return OnnxRuntime(bank.onnx_path, device="cpu")


def _run(bank: Bank, images: np.ndarray, batch: int = 1000) -> Scores:
    rt = _runtime(bank)
    x = to_model_input(images)
    outs = [rt.run(x[i:i + batch]) for i in range(0, len(x), batch)]
    return score(bank.monitor, np.concatenate([o.logits for o in outs]),
                 np.concatenate([o.features for o in outs]),
                 np.concatenate([o.concepts for o in outs]))


def _attack(bank: Bank, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    import torch

    from conceptguard.attacks import AttackSpec, run_attack
    from conceptguard.classifier.io import load_classifier

    model, _, _ = load_classifier(bank.classifier_path)
    x = torch.as_tensor(to_model_input(images))
    adv = run_attack(model, x, labels, AttackSpec(**ATTACK), seed=SEED, progress=False)
    return np.clip(np.rint(adv.numpy().transpose(0, 2, 3, 1) * 255.0), 0, 255).astype(np.uint8)


def compute_evidence(bank: Bank, *, attacks: bool = True) -> Evidence:
    """Score the test split, foreign sets, corruptions and (optionally) PGD attacks."""
    import tempfile

    from conceptguard.data.base import DataSpec
    from conceptguard.data.registry import open_source
    from conceptguard.foreign import FOREIGN_SETS, foreign_images
    from conceptguard.shifts import CORRUPTIONS, corrupt

    _, test = open_source(DataSpec(**bank.manifest.data["spec"]))
    outputs = served_streamed(_runtime(bank), test, Path(tempfile.gettempdir()))
    s = score_streamed(bank.monitor, outputs)
    ev = Evidence(Group("clean test", test.images, test.labels, s, s.predictions != test.labels,
                        outputs, bank.monitor))
    ev.notes.append(f"clean: the whole official test split ({len(test)} inputs)")
    size, channels = test.images.shape[1], test.images.shape[3]
    rng = np.random.default_rng(SEED)

    fimg = np.concatenate([foreign_images(n, FOREIGN_PER_SET, size, channels, SEED + i)
                           for i, n in enumerate(sorted(FOREIGN_SETS))])
    fs = _run(bank, fimg)
    ev.foreign = Group("foreign", fimg, np.full(len(fimg), -1), fs, np.ones(len(fimg), bool))
    ev.notes.append(f"foreign: {FOREIGN_PER_SET} seeded images from each of "
                    f"{', '.join(sorted(FOREIGN_SETS))}")

    parts, plabels = [], []
    per_kind = min(CORRUPTIONS_PER_KIND, len(test))  # a small image folder has fewer
    for i, kind in enumerate(sorted(CORRUPTIONS)):
        idx = rng.choice(len(test), per_kind, replace=False)
        parts.append(corrupt(test.images[idx], kind, 3, SEED + i))
        plabels.append(test.labels[idx])
    cimg, clab = np.concatenate(parts), np.concatenate(plabels)
    cs = _run(bank, cimg)
    ev.corrupted = Group("corrupted", cimg, clab, cs, cs.predictions != clab)
    ev.notes.append(f"corrupted: {per_kind} test inputs per corruption at "
                    f"severity 3 ({len(CORRUPTIONS)} kinds)")

    if attacks:
        right = np.flatnonzero(~ev.clean.defect)
        idx = rng.choice(right, min(ATTACKED, len(right)), replace=False)
        aimg = _attack(bank, test.images[idx], test.labels[idx])
        a = _run(bank, aimg)
        ok = a.predictions != test.labels[idx]  # successful attacks only
        keep = np.flatnonzero(ok)
        ev.adversarial = Group("adversarial", aimg[keep], test.labels[idx][keep],
                               a.rows(keep), np.ones(len(keep), bool))
        ev.notes.append(f"adversarial: PGD (L-inf, eps {ATTACK['eps']}, {ATTACK['steps']} "
                        f"steps) on {len(idx)} correctly classified test inputs; "
                        f"{len(keep)} successful attacks kept")
    return ev
