"""Batched inference on uint8 images: logits and penultimate features as numpy arrays."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from conceptguard.classifier.split import SplitClassifier
from conceptguard.imaging import to_model_input


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W, C)`` -> float32 ``(N, C, H, W)`` in ``[0, 1]``."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 (N,H,W,C) images, got {images.dtype} {images.shape}")
    return torch.from_numpy(to_model_input(images))  # the one conversion (imaging)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU if it has none)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def predict(model: SplitClassifier, images: np.ndarray, batch_size: int = 256,
            progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Logits ``(N, num_classes)`` and features ``(N, d)``, both float32, in eval mode.

    The model's training flag is restored afterwards.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    to_tensor(images[:0])  # validates dtype and layout
    device = model_device(model)
    was_training = model.training
    model.eval()
    logits_out: list[np.ndarray] = []
    features_out: list[np.ndarray] = []
    try:
        starts = range(0, len(images), batch_size)
        for start in tqdm(starts, desc="predict", unit="batch", disable=not progress):
            batch = to_tensor(images[start:start + batch_size]).to(device)
            logits, z = model.forward_with_features(batch)
            logits_out.append(logits.float().cpu().numpy())
            features_out.append(z.float().cpu().numpy())
    finally:
        model.train(was_training)
    if not logits_out:
        return (np.zeros((0, model.num_classes), np.float32),
                np.zeros((0, model.feature_dim), np.float32))
    return np.concatenate(logits_out), np.concatenate(features_out)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``argmax(logits)`` against integer ``labels``."""
    if logits.ndim != 2 or labels.shape != (len(logits),):
        raise ValueError(f"logits (N,C) and labels (N,) expected, got {logits.shape} "
                         f"and {labels.shape}")
    if len(labels) == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return float(np.mean(logits.argmax(axis=1) == labels))
