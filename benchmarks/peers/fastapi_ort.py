"""The hand-written peer of ``benchmarks/peers.py``: what one would write in an afternoon to
serve ``classifier.onnx`` without conceptguard (no monitor). Decode the PNG, greyscale,
resize to 28x28 (bilinear, as the bank's preprocessing), ONNX Runtime at
``ORT_THREADS`` (default 1) intra-op threads, softmax, JSON answer.

    POST /classify        raw image body (Content-Type: image/png)
    POST /classify/file   multipart/form-data, field ``file``
    GET  /health

Runs in its own virtual environment (``fastapi uvicorn[standard] onnxruntime pillow numpy
python-multipart``): ``CLASSIFIER_ONNX=banks/demo/classifier.onnx uvicorn fastapi_ort:app``.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, File, Request, UploadFile
from PIL import Image

MODEL = os.environ.get("CLASSIFIER_ONNX",
                       str(Path(__file__).resolve().parents[2] / "banks/demo/classifier.onnx"))
SIZE = 28

_opts = ort.SessionOptions()
_opts.intra_op_num_threads = int(os.environ.get("ORT_THREADS", "1"))
_opts.inter_op_num_threads = 1
session = ort.InferenceSession(MODEL, _opts, providers=["CPUExecutionProvider"])
INPUT = session.get_inputs()[0].name

app = FastAPI()


def predict(data: bytes) -> dict:
    img = Image.open(io.BytesIO(data)).convert("L")
    if img.size != (SIZE, SIZE):
        img = img.resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    x = np.asarray(img, dtype=np.float32)[None, None] / 255.0
    logits = session.run(["logits"], {INPUT: x})[0][0]
    p = np.exp(logits - logits.max())
    p /= p.sum()
    k = int(p.argmax())
    return {"class_index": k, "probability": float(p[k]), "probabilities": p.tolist()}


@app.post("/classify")
async def classify(request: Request) -> dict:
    return predict(await request.body())


@app.post("/classify/file")
async def classify_file(file: UploadFile = File(...)) -> dict:  # noqa: B008
    return predict(await file.read())


@app.get("/health")
async def health() -> dict:
    return {"status": "ok"}
