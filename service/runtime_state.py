"""The bank being served, swapped atomically on reload.

:class:`RuntimeState` holds the current :class:`~service.loaded.Loaded`; a reload loads the
new bank beside it (:func:`service.bank_loader.load`) and replaces the reference in one
assignment, so a request holds either the old or the new bundle for its whole life.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import anyio.to_thread

from conceptguard.bank import BankError
from service.bank_loader import load
from service.bank_paths import BankPathError, confine, relative_message
from service.errors import NotReady
from service.loaded import Loaded
from service.settings import Settings

__all__ = ["Loaded", "RuntimeState", "load"]


class RuntimeState:
    """Holds the current :class:`Loaded`; reloads build beside it and swap atomically."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.root: Path = settings.root
        self.path: Path = Path(os.path.realpath(settings.bank))
        self.bank_ref: str = (self.path.relative_to(self.root).as_posix()
                              if self.path.is_relative_to(self.root) else self.path.name)
        self._current: Loaded | None = None
        self._reload_lock = asyncio.Lock()
        self.warmed = False

    @property
    def ready(self) -> bool:
        return self._current is not None and self.warmed

    @property
    def current(self) -> Loaded | None:
        return self._current

    def require(self) -> Loaded:
        loaded = self._current
        if loaded is None or not self.warmed:
            raise NotReady("the bank is still loading; retry shortly")
        return loaded

    async def start(self) -> Loaded:
        loaded = await anyio.to_thread.run_sync(load, self.path, self.settings)
        self._swap(loaded)
        return loaded

    async def reload(self, path: str | None = None) -> tuple[Loaded, Loaded | None]:
        """Load ``path`` (relative to the banks root; default: the current bank) and swap
        it in; returns (new, old). On any error the current bank stays and
        :class:`BankError` is raised, its message relative to the banks root."""
        async with self._reload_lock:
            if path is None:
                target, ref = self.path, self.bank_ref
            else:
                target, ref = confine(self.root, path)
            try:
                new = await anyio.to_thread.run_sync(load, target, self.settings)
            except BankPathError:
                raise
            except BankError as exc:
                raise BankError(relative_message(str(exc), self.root)) from exc
            old = self._current
            self._swap(new)
            self.path, self.bank_ref = target, ref
            return new, old

    def _swap(self, new: Loaded) -> None:
        old = self._current
        self._current = new  # the atomic step
        if old is not None and (old.metrics.model, old.metrics.info) != (new.metrics.model,
                                                                         new.metrics.info):
            old.metrics.deactivate()
        new.metrics.activate()

    def stop(self) -> None:
        loaded, self._current = self._current, None
        if loaded is not None:
            loaded.metrics.deactivate()
