"""Supervised training of a :class:`SplitClassifier` on uint8 images.

Recipe: SGD (Nesterov momentum 0.9, weight decay 5e-4) with a one-cycle learning-rate schedule,
label smoothing 0.1, and light augmentation on tensors (random horizontal flip, random crop
with 2-pixel zero padding). Deterministic for a given seed on a given machine/thread count.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import nn
from tqdm.auto import tqdm

from conceptguard.classifier.inference import model_device, to_tensor
from conceptguard.classifier.split import SplitClassifier

DEFAULT_LR = 0.1
WEIGHT_DECAY = 5e-4
LABEL_SMOOTHING = 0.1
CROP_PADDING = 2


class TrainStats(BaseModel):
    """Summary of a run; loss and accuracy are running means over the last epoch (train mode)."""

    epochs: int
    seconds: float
    final_loss: float
    train_accuracy: float


def train_classifier(model: SplitClassifier, images: np.ndarray, labels: np.ndarray, *,
                     epochs: int, batch_size: int = 128, lr: float = DEFAULT_LR, seed: int = 0,
                     augment: bool = True, progress: bool = True) -> TrainStats:
    """Train ``model`` in place on uint8 ``(N, H, W, C)`` images; leaves it in eval mode."""
    x_all, y_all = _validate(model, images, labels, epochs, batch_size)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    steps = _steps_per_epoch(len(y_all), batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True,
                                weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, epochs=epochs,
                                                   steps_per_epoch=steps, pct_start=0.25)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=LABEL_SMOOTHING)
    device = model_device(model)
    # channels-last convolutions run ~3x faster than NCHW on CPU (oneDNN) for this network
    model.to(memory_format=torch.channels_last)
    start = time.perf_counter()
    model.train()
    loss, acc = 0.0, 0.0
    try:
        for epoch in range(epochs):
            order = torch.randperm(len(y_all), generator=generator)[:steps * batch_size]
            bar = tqdm(order.split(batch_size), desc=f"epoch {epoch + 1}/{epochs}",
                       unit="batch", disable=not progress)
            loss, acc = _run_epoch(model, bar, x_all, y_all, optimizer, schedule, loss_fn,
                                   generator if augment else None, device)
    finally:
        model.to(memory_format=torch.contiguous_format)
        model.eval()
    return TrainStats(epochs=epochs, seconds=time.perf_counter() - start, final_loss=loss,
                      train_accuracy=acc)


def _validate(model: SplitClassifier, images: np.ndarray, labels: np.ndarray, epochs: int,
              batch_size: int) -> tuple[np.ndarray, torch.Tensor]:
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 (N,H,W,C) images, got {images.dtype} {images.shape}")
    if images.shape[-1] != model.input_shape[0]:
        raise ValueError(f"images have {images.shape[-1]} channels, model expects "
                         f"{model.input_shape[0]}")
    if labels.shape != (len(images),):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    if epochs < 1 or batch_size < 2:
        raise ValueError(f"need epochs >= 1 and batch_size >= 2, got {epochs}, {batch_size}")
    if len(images) < 2:
        raise ValueError("need at least 2 training images")
    if labels.min() < 0 or labels.max() >= model.num_classes:
        raise ValueError(f"labels outside 0..{model.num_classes - 1}")
    return images, torch.from_numpy(labels.astype(np.int64))  # uint8 NHWC, as given


def _steps_per_epoch(n: int, batch_size: int) -> int:
    """Full batches plus the remainder, unless the remainder is a single image (BatchNorm)."""
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= 2 else 0)


def _run_epoch(model: SplitClassifier, batches: tqdm, x_all: np.ndarray, y_all: torch.Tensor,
               optimizer: torch.optim.Optimizer, schedule: torch.optim.lr_scheduler.LRScheduler,
               loss_fn: nn.Module, generator: torch.Generator | None,
               device: torch.device) -> tuple[float, float]:
    loss_sum, correct, seen = 0.0, 0, 0
    for idx in batches:
        x = to_tensor(x_all[idx.numpy()])  # the batch only: the set stays uint8
        if generator is not None:
            x = augment_batch(x, generator)
        x = x.to(device).contiguous(memory_format=torch.channels_last)
        y = y_all[idx].to(device)
        logits = model(x)
        loss = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        loss_sum += loss.item() * len(y)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
        batches.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}")
    return loss_sum / seen, correct / seen


def augment_batch(x: torch.Tensor, generator: torch.Generator,
                  padding: int = CROP_PADDING) -> torch.Tensor:
    """Random horizontal flip and random ``padding``-pixel shifted crop (zero fill), per image."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(h)).view(n, 1, h, 1)
    cols = (dx.view(n, 1) + torch.arange(w)).view(n, 1, 1, w)
    batch = torch.arange(n).view(n, 1, 1, 1)
    channels = torch.arange(x.shape[1]).view(1, -1, 1, 1)
    return padded[batch, channels, rows, cols]
