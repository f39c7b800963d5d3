"""The MLServer peer of ``benchmarks/peers.py``: a small custom runtime that serves
``classifier.onnx`` on encoded PNG files sent as a v2 (Open Inference Protocol) BYTES input
(base64 strings in JSON, or raw bytes). Same preprocessing as ``fastapi_ort.py``: greyscale,
28x28 bilinear, [0, 1], ONNX Runtime at ``ORT_THREADS`` (default 1) intra-op threads,
softmax; outputs ``probabilities`` (FP32 [N, 10]) and ``class_index`` (INT64 [N]). No monitor.

Runs in its own virtual environment (``mlserver==1.7.1 onnxruntime pillow``):
``CLASSIFIER_ONNX=banks/demo/classifier.onnx mlserver start benchmarks/peers/mlserver_ort``.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from PIL import Image

SIZE = 28


def _png_bytes(elem: object) -> bytes:
    raw = elem.encode() if isinstance(elem, str) else bytes(elem)
    try:
        return base64.b64decode(raw, validate=True)
    except binascii.Error:  # already raw bytes (binary data extension)
        return raw


def _pixels(data: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(data)).convert("L")
    if img.size != (SIZE, SIZE):
        img = img.resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.float32) / 255.0


class OrtPngRuntime(MLModel):
    async def load(self) -> bool:
        default = Path(__file__).resolve().parents[3] / "banks/demo/classifier.onnx"
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(os.environ.get("ORT_THREADS", "1"))
        opts.inter_op_num_threads = 1
        self._session = ort.InferenceSession(os.environ.get("CLASSIFIER_ONNX", str(default)),
                                             opts, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        files = [_png_bytes(e) for e in payload.inputs[0].data]
        x = np.stack([_pixels(f) for f in files])[:, None]
        logits = self._session.run(["logits"], {self._input: x})[0]
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        return InferenceResponse(
            model_name=self.name, id=payload.id,
            outputs=[NumpyCodec.encode_output("probabilities", p.astype(np.float32)),
                     NumpyCodec.encode_output("class_index", p.argmax(axis=1).astype(np.int64))])
