"""The runtime reports the device and execution provider its session really uses, and
``device=cuda`` fails clearly when the session falls back to the CPU."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.conftest import metric_samples


def test_onnx_device_comes_from_the_session(demo_bank_dir: Path) -> None:
    from conceptguard.runtime import OnnxRuntime

    rt = OnnxRuntime(demo_bank_dir / "classifier.onnx", device="cpu")
    assert rt.session.get_providers()[0] == rt.provider == "CPUExecutionProvider"
    assert rt.device == "cpu"


def test_cuda_fallback_to_cpu_is_refused_or_reported(demo_bank_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """onnxruntime that lists CUDA but whose session cannot use it (here: a CPU build made
    to list it) falls back to the CPU with a warning only; the runtime sees the session."""
    import onnxruntime as ort

    from conceptguard.runtime import OnnxRuntime

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("a real CUDA provider is installed")
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(RuntimeError, match=r"device=cuda.*CPUExecutionProvider"):
        OnnxRuntime(demo_bank_dir / "classifier.onnx", device="cuda")
    rt = OnnxRuntime(demo_bank_dir / "classifier.onnx", device="auto")
    assert (rt.device, rt.provider) == ("cpu", "CPUExecutionProvider")
    assert "CUDA provider did not load" in caplog.text


def test_provider_in_bank_info_metric_and_bank_summary(client: httpx.Client) -> None:
    info = [lab for lab, v in metric_samples(client.get("/metrics").text,
                                             "conceptguard_bank_info") if v == 1]
    assert info and all(lab["provider"] == "CPUExecutionProvider" and lab["device"] == "cpu"
                        and lab["backend"] == "onnx" for lab in info), info
    runtime = client.get("/v1/bank").json()["runtime"]
    assert runtime == {"backend": "onnx", "device": "cpu", "provider": "CPUExecutionProvider",
                       "graph": "fused"}
