"""VLM backends with real models: ConSE (bundled weights) and a tiny random open_clip ViT."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from conceptguard.vlm import VLMBackend, VLMSpec, create_vlm
from conceptguard.vlm.preprocess import preprocess_images
from conceptguard.vlm.registry import available_vlms, register_vlm
from tests.tolerance import assert_f32_close

TINY_CLIP = "cg-test-tiny-vit"
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8,
                   "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2,
                 "layers": 2},
}


def unit_rows(x: np.ndarray) -> bool:
    return bool(np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5))


def random_images(n: int, size: int, channels: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)


# --- preprocessing ---------------------------------------------------------------------------

def test_preprocess_gray_to_rgb_resize_and_normalise() -> None:
    gray = np.full((2, 28, 28, 1), 255, dtype=np.uint8)
    x = preprocess_images(gray, 40, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert x.shape == (2, 3, 40, 40) and x.dtype == torch.float32
    assert torch.allclose(x, torch.ones_like(x))
    inv = preprocess_images(gray, 40, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), invert=True)
    assert torch.allclose(inv, -torch.ones_like(inv))
    rgb = preprocess_images(random_images(1, 16, 3), 16, mean=(0, 0, 0), std=(1, 1, 1))
    assert float(rgb.min()) >= 0.0 and float(rgb.max()) <= 1.0


def test_preprocess_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        preprocess_images(np.zeros((1, 8, 8, 3), dtype=np.float32), 8, (0, 0, 0), (1, 1, 1))
    with pytest.raises(ValueError):
        preprocess_images(np.zeros((1, 8, 8, 2), dtype=np.uint8), 8, (0, 0, 0), (1, 1, 1))


# --- registry --------------------------------------------------------------------------------

def test_registry_unknown_backend_and_duplicates() -> None:
    from pydantic import ValidationError

    assert {"conse", "open_clip"} <= set(available_vlms())
    with pytest.raises(ValidationError, match="unknown VLM backend 'nope'"):
        VLMSpec(backend="nope")
    with pytest.raises(ValueError, match="already registered"):
        register_vlm("conse", lambda spec: None)  # type: ignore[arg-type,return-value]


def test_a_registered_backend_is_valid_and_built() -> None:
    """A new backend needs only ``register_vlm``: the spec validates against the registry."""
    from conceptguard.vlm import registry

    built = object()
    register_vlm("test_dummy", lambda spec: built)  # type: ignore[arg-type,return-value]
    try:
        spec = VLMSpec(backend="test_dummy")
        assert create_vlm(spec) is built
    finally:
        registry._REGISTRY.pop("test_dummy", None)
    with pytest.raises(ValueError, match="unknown VLM backend 'test_dummy'"):
        create_vlm(spec)  # validated while registered, built after removal


# --- ConSE -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def conse() -> VLMBackend:
    return create_vlm(VLMSpec(backend="conse"))


def test_conse_identity(conse: VLMBackend) -> None:
    assert isinstance(conse, VLMBackend)
    assert conse.dim == 384
    assert conse.id == "conse:efficientnet-lite0+all-MiniLM-L6-v2@112px,top10"
    assert "clip" not in conse.id.lower()


def test_conse_encodes_images(conse: VLMBackend) -> None:
    gray = random_images(4, 28, 1)
    emb = conse.encode_images(gray)
    assert emb.shape == (4, 384) and emb.dtype == np.float32
    assert unit_rows(emb)
    np.testing.assert_array_equal(emb, conse.encode_images(gray))
    rgb = conse.encode_images(random_images(3, 50, 3, seed=1), progress=True)
    assert rgb.shape == (3, 384) and unit_rows(rgb)
    assert conse.encode_images(np.zeros((0, 28, 28, 1), dtype=np.uint8)).shape == (0, 384)


def test_conse_batching_does_not_change_embeddings(conse: VLMBackend) -> None:
    images = random_images(5, 28, 1, seed=2)
    whole = conse.encode_images(images)
    singles = np.concatenate([conse.encode_images(images[i:i + 1]) for i in range(5)])
    np.testing.assert_allclose(whole, singles, atol=1e-5)


def test_conse_classifier_sees_a_photo(conse: VLMBackend) -> None:
    """Guards the input scaling ([-1, 1]) and ReLU6 activations of EfficientNet-Lite0."""
    from matplotlib import cbook
    from PIL import Image

    from conceptguard.vlm.conse import ConSEBackend

    assert isinstance(conse, ConSEBackend)
    assert not any("swish" in type(m).__name__.lower() for m in conse.classifier.modules())
    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as im:
        photo = np.asarray(im.convert("RGB"))[None]
    top5 = conse.class_probabilities(photo)[0].topk(5).indices.tolist()
    names = {conse.class_names[i] for i in top5}
    assert names & {"military uniform", "suit", "bow tie", "Windsor tie"}


def test_conse_encodes_texts(conse: VLMBackend) -> None:
    texts = ["a photo of a dog", "a photo of a puppy", "a photo of a truck"]
    emb = conse.encode_texts(texts)
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    assert unit_rows(emb)
    np.testing.assert_array_equal(emb, conse.encode_texts(texts))
    dog, puppy, truck = emb
    assert dog @ puppy > dog @ truck


def test_conse_image_lies_in_its_top_classes_span(conse: VLMBackend) -> None:
    """A ConSE image embedding is close to the text embedding of its top ImageNet class."""
    images = random_images(2, 64, 3, seed=3)
    emb = conse.encode_images(images)
    probs = conse.class_probabilities(images)  # type: ignore[attr-defined]
    top = probs.argmax(-1).numpy()
    class_emb = conse.class_embeddings.numpy()  # type: ignore[attr-defined]
    sims = emb @ class_emb.T
    for row, cls in zip(sims, top, strict=True):
        assert row[cls] > np.median(row)


# --- open_clip -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A randomly initialised tiny open_clip ViT saved as .safetensors and .pt."""
    import open_clip
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("tiny_clip")
    (root / f"{TINY_CLIP}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(root / f"{TINY_CLIP}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP, pretrained=None).eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(root / "tiny.safetensors"))
    torch.save(state, root / "tiny.pt")
    return {"model": model, "root": root}


def reference_embeddings(model: torch.nn.Module, images: np.ndarray,
                         texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    import open_clip

    x = preprocess_images(images, 32, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    tokens = open_clip.get_tokenizer(TINY_CLIP)(texts)
    with torch.no_grad():
        img = model.encode_image(x, normalize=True).numpy()
        txt = model.encode_text(tokens, normalize=True).numpy()
    return img, txt


@pytest.mark.parametrize("filename", ["tiny.safetensors", "tiny.pt"])
def test_open_clip_loads_local_checkpoint(tiny_clip: dict[str, object], filename: str) -> None:
    root = tiny_clip["root"]
    assert isinstance(root, Path)
    vlm = create_vlm(VLMSpec(backend="open_clip", model=TINY_CLIP,
                             pretrained=str(root / filename), batch_size=3))
    assert isinstance(vlm, VLMBackend)
    assert vlm.dim == 32
    assert vlm.id.startswith(f"open_clip:{TINY_CLIP}@{filename}#sha256:")
    images = random_images(5, 28, 1)
    texts = ["a photo of a dog", "a photo of a truck", "a sandal", "a bag"]
    img, txt = vlm.encode_images(images), vlm.encode_texts(texts)
    assert img.shape == (5, 32) and txt.shape == (4, 32)
    assert img.dtype == np.float32 and txt.dtype == np.float32
    assert unit_rows(img) and unit_rows(txt)
    ref_img, ref_txt = reference_embeddings(tiny_clip["model"], images, texts)  # type: ignore[arg-type]
    assert_f32_close(img, ref_img, terms=img.shape[1])
    assert_f32_close(txt, ref_txt, terms=txt.shape[1])


def test_open_clip_image_size_override(tiny_clip: dict[str, object]) -> None:
    root = tiny_clip["root"]
    assert isinstance(root, Path)
    vlm = create_vlm(VLMSpec(backend="open_clip", model=TINY_CLIP,
                             pretrained=str(root / "tiny.safetensors"), image_size=48))
    assert vlm.image_size == 48  # type: ignore[attr-defined]
    assert vlm.id.endswith(",48px")
    assert unit_rows(vlm.encode_images(random_images(2, 28, 3)))


class Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("unpickled arbitrary code",))


def test_open_clip_refuses_pickled_objects(tiny_clip: dict[str, object], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "evil.pt"
    with bad.open("wb") as f:
        pickle.dump({"visual.proj": Payload()}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError):
        create_vlm(VLMSpec(backend="open_clip", model=TINY_CLIP, pretrained=str(bad)))
    assert "unpickled arbitrary code" not in capsys.readouterr().out


def test_open_clip_needs_weights() -> None:
    with pytest.raises(ValueError, match="pretrained"):
        create_vlm(VLMSpec(backend="open_clip", model=TINY_CLIP))
    with pytest.raises(FileNotFoundError):
        create_vlm(VLMSpec(backend="open_clip", model=TINY_CLIP, pretrained="/no/such.safetensors"))
