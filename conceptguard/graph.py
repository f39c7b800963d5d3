"""Input and output names of the serving graphs, torch-free: the exporters
(:mod:`conceptguard.export`, :mod:`conceptguard.monitor_graph`) write them, the runtimes
read them.

``classifier.onnx``: ``images -> OUTPUT_NAMES``. ``monitor.onnx`` (the fused graph, when the
bank has one): ``images -> FUSED_OUTPUTS``, the classifier's outputs followed by every
output of :func:`conceptguard.scoring.score` (``risks`` is ``(N, len(DETECTORS))`` in
registry order; ``reason`` indexes :data:`conceptguard.scoring.REASON_KINDS`).
"""

INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "features", "concepts")
MONITOR_OUTPUTS = (
    "probabilities", "predictions", "risks", "p_misclassification", "p_anomaly",
    "p_adversarial", "p_unfamiliar", "trust", "reject", "reason", "paper_rule_reject",
    "contributions",
)
FUSED_OUTPUTS = OUTPUT_NAMES + MONITOR_OUTPUTS
