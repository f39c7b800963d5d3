"""Train a torchvision classifier on an image folder for a fixed time: the "model of your
own" of docs/your-model.md (any training code would do; this one is short on purpose).

Saves ``model.state_dict()`` with ``torch.save`` (what most training code writes) and, with
``--onnx``, the same model exported to ONNX (NCHW input, a dynamic batch axis). Inputs are
the folder's images resized to ``--size``, RGB, normalised with the ImageNet mean and std
(``--normalisation imagenet`` when importing).

    python scripts/train_example_model.py --data data/example-train --arch resnet18 \\
        --size 64 --seconds 60 --out models/example-resnet18.pt --onnx models/example.onnx
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalised(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW, ImageNet-normalised."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seconds: float,
          batch_size: int, seed: int) -> tuple[int, float]:
    """SGD with momentum until ``seconds`` have passed (at least one step); (steps, loss)."""
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    start, steps, loss = time.perf_counter(), 0, float("nan")
    while steps == 0 or time.perf_counter() - start < seconds:
        for idx in torch.randperm(len(y), generator=generator).split(batch_size):
            opt.zero_grad()
            out = loss_fn(model(x[idx]), y[idx])
            out.backward()
            opt.step()
            steps, loss = steps + 1, out.item()
            if time.perf_counter() - start >= seconds:
                break
    return steps, loss


def recalibrate_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int) -> None:
    """Running BatchNorm statistics as plain means over the training images: after a short
    run, torchvision's slow BN momentum (0.01 in MobileNetV3) leaves them far from the
    data, and the model in eval mode would guess."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for batch in x.split(batch_size):
            model(batch)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="an image folder: <class>/<files>")
    p.add_argument("--arch", default="resnet18", help="a torchvision classification model")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", type=Path, required=True, help="the state dict (torch.save)")
    p.add_argument("--onnx", type=Path, default=None, help="also export ONNX here")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from conceptguard.data.image_folder import load_image_folder

    torch.manual_seed(args.seed)
    try:
        train_set, test_set = load_image_folder(args.data, args.size, channels=3,
                                                test_fraction=0.1)
        model = torchvision.models.get_model(args.arch, weights=None,
                                             num_classes=len(train_set.classes))
    except (ValueError, FileNotFoundError) as exc:
        print(f"train_example_model: {exc}", file=sys.stderr)
        return 2
    x, y = normalised(train_set.images), torch.as_tensor(train_set.labels)
    steps, loss = train(model, x, y, args.seconds, args.batch_size, args.seed)
    recalibrate_batchnorm(model, x, args.batch_size)
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(b).argmax(1) for b in normalised(test_set.images).split(256)])
    acc = float((pred == torch.as_tensor(test_set.labels)).float().mean())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out)
    print(f"{args.arch}: {steps} steps in {args.seconds:.0f} s, loss {loss:.3f}, accuracy "
          f"{acc:.3f} on {len(pred)} held-out images; classes {train_set.classes}")
    print(f"{args.out} written")
    if args.onnx is not None:
        args.onnx.parent.mkdir(parents=True, exist_ok=True)
        torch.onnx.export(model, (torch.zeros(2, 3, args.size, args.size),), str(args.onnx),
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17, dynamo=False)
        print(f"{args.onnx} written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
