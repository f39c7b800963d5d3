"""Vision-language backends behind one interface, chosen by name."""

from conceptguard.vlm.base import VLMBackend, VLMSpec
from conceptguard.vlm.registry import create_vlm

__all__ = ["VLMBackend", "VLMSpec", "create_vlm"]
