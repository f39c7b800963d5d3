"""OpenCLIP backend: any open_clip architecture, from a hub tag or a local checkpoint file.

Local checkpoints are read without unpickling arbitrary objects: ``.safetensors`` through
safetensors, ``.pt``/``.pth``/``.bin``/``.ckpt`` through ``torch.load(weights_only=True)``;
the state dict is then adapted and loaded here rather than by open_clip's own loader.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from conceptguard.vlm.base import VLMSpec
from conceptguard.vlm.preprocess import (
    embed_in_batches,
    l2_normalise,
    preprocess_images,
)

log = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
CHECKPOINT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)


def looks_like_path(pretrained: str) -> bool:
    """True when ``pretrained`` names a file rather than an open_clip hub tag."""
    return Path(pretrained).suffix.lower() in CHECKPOINT_SUFFIXES or "/" in pretrained \
        or "\\" in pretrained


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, loaded on CPU without unpickling arbitrary objects."""
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path), device="cpu")
    elif suffix in TORCH_SUFFIXES:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"unsupported checkpoint type {path.name!r}; "
                         f"expected one of {', '.join(CHECKPOINT_SUFFIXES)}")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path}: no state dict found")
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: state dict holds non-tensor values")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Adapt a CLIP state dict to ``model`` (as ``open_clip.load_checkpoint`` does) and load it."""
    from open_clip.factory import (
        convert_state_dict,
        convert_to_custom_text_state_dict,
        resize_pos_embed,
        resize_text_pos_embed,
    )

    state = convert_state_dict(model, dict(state))
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    for key in ("logit_scale", "logit_bias"):
        param = getattr(model, key, None)
        if key in state and param is not None and param.ndim != state[key].ndim:
            state[key] = state[key].reshape(param.shape)
    if "logit_bias" not in state and getattr(model, "logit_bias", None) is not None:
        state["logit_bias"] = torch.zeros_like(state["logit_scale"])
    position_ids = "text.transformer.embeddings.position_ids"
    if position_ids in state and not hasattr(model, position_ids):
        del state[position_ids]
    resize_pos_embed(state, model)
    resize_text_pos_embed(state, model)
    model.load_state_dict(state, strict=True)


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """First 12 hex digits of the file's SHA-256 (identifies a local checkpoint)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:12]


def native_image_size(model: torch.nn.Module) -> int:
    size = getattr(model.visual, "image_size", 224)
    if isinstance(size, tuple | list):
        if size[0] != size[1]:
            raise ValueError(f"non-square model input {size} is not supported")
        size = size[0]
    return int(size)


def normalisation(model: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The model's own image mean/std (OpenAI CLIP's when the model does not say)."""
    from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    mean = cfg.get("mean") or getattr(model.visual, "image_mean", None) or OPENAI_DATASET_MEAN
    std = cfg.get("std") or getattr(model.visual, "image_std", None) or OPENAI_DATASET_STD
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


class OpenCLIPBackend:
    """VLMBackend over an open_clip model.

    ``spec.model`` is the architecture (``"ViT-B-32"``), ``spec.pretrained`` a hub tag
    (``"laion2b_s34b_b79k"``, downloaded by open_clip) or a local checkpoint path. Images
    are fed at the model's native resolution unless ``spec.image_size`` is set explicitly.
    """

    def __init__(self, spec: VLMSpec) -> None:
        import open_clip

        if not spec.pretrained:
            raise ValueError("open_clip backend needs `pretrained`: a hub tag or a checkpoint path")
        self.spec = spec
        self.device = torch.device(spec.device)
        self.batch_size = spec.batch_size
        force_size = spec.image_size if "image_size" in spec.model_fields_set else None
        self.model, source = self._build(open_clip, spec, force_size)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(spec.model)
        self.image_size = native_image_size(self.model)
        self.mean, self.std = normalisation(self.model)
        self.dim = 0
        self.dim = int(self.encode_texts(["a photo"]).shape[1])
        size_tag = f",{self.image_size}px" if force_size is not None else ""
        self.id = f"open_clip:{spec.model}@{source}{size_tag}"

    def _build(self, open_clip: Any, spec: VLMSpec,
               force_size: int | None) -> tuple[torch.nn.Module, str]:
        pretrained = str(spec.pretrained)
        if not looks_like_path(pretrained):
            model = open_clip.create_model(spec.model, pretrained=pretrained, device=self.device,
                                           force_image_size=force_size, weights_only=True,
                                           require_pretrained=True)
            return model, pretrained
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"open_clip checkpoint not found: {path}")
        model = open_clip.create_model(spec.model, pretrained=None, pretrained_image=False,
                                       pretrained_text=False, force_image_size=force_size)
        load_weights(model, read_state_dict(path))
        return model.to(self.device), f"{path.name}#sha256:{file_digest(path)}"

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("encode_texts takes a list of strings, not a string")
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[start:start + self.batch_size])).to(self.device)
            chunks.append(l2_normalise(self.model.encode_text(tokens).float()).cpu().numpy())
        if not chunks:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(chunks).astype(np.float32, copy=False)

    @torch.inference_mode()
    def _embed_batch(self, images: np.ndarray) -> torch.Tensor:
        x = preprocess_images(images, self.image_size, self.mean, self.std,
                              invert=self.spec.invert)
        return l2_normalise(self.model.encode_image(x.to(self.device)).float())

    def encode_images(self, images: np.ndarray, progress: bool = False) -> np.ndarray:
        return embed_in_batches(images, self._embed_batch, self.dim, self.batch_size,
                                "open_clip images", progress)
