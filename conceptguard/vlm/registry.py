"""Backend registry: ``VLMSpec.backend`` name -> factory building a :class:`VLMBackend`.

Built in: ``conse`` and ``open_clip``. Another package adds one with :func:`register_vlm`
or, without any code here, with an entry point in the ``conceptguard.vlm_backends`` group
(:mod:`conceptguard.plugins`), found the first time the backends are listed or built.
"""

from __future__ import annotations

from collections.abc import Callable

from conceptguard.plugins import VLM_BACKENDS, Discovery
from conceptguard.vlm.base import VLMBackend, VLMSpec

VLMFactory = Callable[[VLMSpec], VLMBackend]

_REGISTRY: dict[str, VLMFactory] = {}


def register_vlm(name: str, factory: VLMFactory, *, overwrite: bool = False) -> None:
    """Make ``create_vlm`` build ``factory(spec)`` for ``spec.backend == name``."""
    if not name:
        raise ValueError("backend name must be non-empty")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"VLM backend {name!r} is already registered")
    _REGISTRY[name] = factory


_DISCOVERY = Discovery(VLM_BACKENDS, _REGISTRY, register_vlm)


def load_entry_points(*, again: bool = False) -> list[str]:
    """Register the backends other packages declare (group ``conceptguard.vlm_backends``);
    done once, on first use, unless ``again``. The names added."""
    return _DISCOVERY.load(again=again)


def available_vlms() -> list[str]:
    """Names of the registered backends (entry points included)."""
    load_entry_points()
    return sorted(_REGISTRY)


def create_vlm(spec: VLMSpec) -> VLMBackend:
    """Build the backend ``spec`` names; ValueError for an unknown backend."""
    load_entry_points()
    factory = _REGISTRY.get(spec.backend)
    if factory is None:
        raise ValueError(f"unknown VLM backend {spec.backend!r}; "
                         f"available: {', '.join(available_vlms()) or 'none'}")
    return factory(spec)


def _conse(spec: VLMSpec) -> VLMBackend:
    from conceptguard.vlm.conse import ConSEBackend  # heavy imports stay lazy

    return ConSEBackend(spec)


def _open_clip(spec: VLMSpec) -> VLMBackend:
    from conceptguard.vlm.openclip_backend import OpenCLIPBackend

    return OpenCLIPBackend(spec)


register_vlm("conse", _conse)
register_vlm("open_clip", _open_clip)
