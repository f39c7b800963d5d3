"""Extensions from other packages, through ``importlib.metadata`` entry points.

A package adds a VLM backend or a data source without editing this one: it declares an
entry point in its own metadata, e.g. in its ``pyproject.toml``::

    [project.entry-points."conceptguard.vlm_backends"]
    my_vlm = "my_package.vlm:build"        # build(spec: VLMSpec) -> VLMBackend

    [project.entry-points."conceptguard.data_sources"]
    my_data = "my_package.data:load"       # load(spec: DataSpec) -> (train, test)

The entry point's name is the name a config uses (``vlm.backend``, ``data.source``). It is
imported on first use only (a backend's heavy imports stay lazy); a name this package
already registers is kept, and the entry point skipped with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Container
from importlib.metadata import EntryPoint, entry_points
from typing import Any

log = logging.getLogger("conceptguard")

VLM_BACKENDS = "conceptguard.vlm_backends"
DATA_SOURCES = "conceptguard.data_sources"


class EntryPointFactory:
    """A callable that imports its entry point on first call, then calls what it names."""

    def __init__(self, entry: EntryPoint):
        self.entry = entry
        self._target: Callable[..., Any] | None = None

    @property
    def target(self) -> Callable[..., Any]:
        if self._target is None:
            target = self.entry.load()
            if not callable(target):
                raise TypeError(f"entry point {self.entry.name!r} = {self.entry.value!r} "
                                f"(group {self.entry.group}) is not callable")
            self._target = target
        return self._target

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.target(*args, **kwargs)

    def __repr__(self) -> str:
        return f"EntryPointFactory({self.entry.name!r} = {self.entry.value!r})"


def discover(group: str, known: Container[str],
             register: Callable[[str, EntryPointFactory], None]) -> list[str]:
    """Register every entry point of ``group`` whose name is not in ``known`` (one
    :class:`EntryPointFactory` each); the names registered, sorted."""
    added = []
    for entry in sorted(entry_points(group=group), key=lambda e: e.name):
        if entry.name in known:
            log.warning("entry point %r = %r (group %s, distribution %s) skipped: the name "
                        "is already registered", entry.name, entry.value, group,
                        getattr(entry.dist, "name", "?"))
            continue
        register(entry.name, EntryPointFactory(entry))
        added.append(entry.name)
    return added


class Discovery:
    """:func:`discover` for one registry, done once (on first use) unless asked again: each
    registry module keeps one of these instead of its own flag."""

    def __init__(self, group: str, known: Container[str],
                 register: Callable[[str, EntryPointFactory], None]):
        self.group, self.known, self.register = group, known, register
        self.done = False

    def load(self, *, again: bool = False) -> list[str]:
        """The names added (none when already done and not ``again``)."""
        if self.done and not again:
            return []
        self.done = True
        return discover(self.group, self.known, self.register)
