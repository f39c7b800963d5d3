"""Input and output names of the serving graph (``classifier.onnx``), torch-free: the
exporter (:mod:`conceptguard.export`) writes them, the runtimes read them."""

INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "features", "concepts")
