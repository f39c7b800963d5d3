"""Process-level concerns of a worker: heap bounds, file limit, SIGTERM drain, and the bank
pointer that keeps several workers on one bank.

With several workers (``--workers N``) every worker is its own process with its own bank.
A reload validates the bank in the worker that received it, then writes the *bank pointer*
(``conceptguard-bank.json`` in the shared state folder: ``CONCEPTGUARD_STATE_DIR``, else
``PROMETHEUS_MULTIPROC_DIR``) with a new generation number; every worker polls the pointer,
loads the bank it names and acknowledges the generation in its own file. The reload answers
once every live worker serves the new bank (or after ``reload_wait_s`` with the count).
Workers started later (a restart after a crash) read the pointer first.

The folder may be shared by several hosts (Ray Serve replicas on several nodes, pods with one
ReadWriteMany volume): a worker is named by host *and* pid (pids of two pods may coincide),
a worker on this host is live while its pid is, and a worker on another host (whose pid means
nothing here) while it refreshes its file: every ``HEARTBEAT_S``, stale after ``STALE_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import json
import logging
import os
import signal
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conceptguard.atomic import atomic_write_text
from service.shared_state import process_alive, state_folder

if TYPE_CHECKING:
    from service.runtime_state import RuntimeState
    from service.settings import Settings

log = logging.getLogger("conceptguard.service")

POINTER = "conceptguard-bank.json"
KEEP = object()  # publish(): keep the pointer's operating point
ACK_PREFIX = "conceptguard-worker-"
POLL_S = 0.25
HEARTBEAT_S = 5.0  # a following worker rewrites its acknowledgement this often
STALE_S = 30.0  # an acknowledgement from another host older than this: a gone worker


def bound_heap() -> None:
    """Return large freed blocks (decoded images) to the OS at once: a fixed mmap threshold
    of 1 MiB (glibc would otherwise raise it to 32 MiB and keep freed images in the heap)
    and at most two malloc arenas. A no-op where glibc is absent."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_mmap_threshold, m_arena_max = -3, -8
    with contextlib.suppress(AttributeError):
        libc.mallopt(m_mmap_threshold, 1 << 20)
        libc.mallopt(m_arena_max, 2)


def raise_file_limit() -> None:
    """Raise the soft open-file limit to the hard one (connections are file descriptors)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = max(soft, 65536)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


def drain_on_sigterm(timeout_s: float) -> None:
    """Make SIGTERM a drain, never a force-quit: uvicorn treats a second SIGINT as "quit
    now"; a SIGTERM that arrives twice (the process group and the supervisor) must not be
    turned into one. Only the main thread may install handlers (a no-op elsewhere)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(previous):
        return
    seen = False

    def on_term(sig: int, frame: Any) -> None:
        nonlocal seen
        if seen:
            return  # already draining
        seen = True
        log.info("SIGTERM: draining in-flight requests (at most %.0f s)", timeout_s)
        previous(sig, frame)

    signal.signal(signal.SIGTERM, on_term)


def _adopt_operating_point(state: RuntimeState, pointer: dict[str, Any]) -> None:
    """The pointer's operating point (set by ``PUT /v1/admin/operating-point`` in another
    worker) becomes this worker's, applied by the reload that follows."""
    if "operating_point" not in pointer:
        return
    from conceptguard.operating_point import OperatingTarget

    text = pointer["operating_point"]
    state.operating_target = None if text is None else OperatingTarget.parse(str(text))


def _safe_name(host: str) -> str:
    """A host name usable in a file name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in host)[:64] or "host"


class SharedBank:
    """The bank pointer in a folder shared by the workers of one server."""

    def __init__(self, folder: Path, settings: Settings, *, host: str | None = None,
                 pid: int | None = None):
        self.folder = folder
        self.settings = settings
        self.generation = 0
        self._task: asyncio.Task[None] | None = None
        self.pid = os.getpid() if pid is None else pid
        self.host = _safe_name(socket.gethostname() if host is None else host)
        self.worker_id = f"{self.host}-{self.pid}"
        self._ack_state: tuple[bool, str | None] = (True, None)

    @classmethod
    def from_env(cls, settings: Settings) -> SharedBank | None:
        folder = state_folder()
        return None if folder is None else cls(folder, settings)

    # ---------------------------------------------------------------- files

    def read_pointer(self) -> dict[str, Any] | None:
        try:
            data = json.loads((self.folder / POINTER).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or not isinstance(data.get("generation"), int):
            return None
        return data

    def _write_json(self, name: str, data: dict[str, Any]) -> None:
        atomic_write_text(self.folder / name, json.dumps(data))

    def _ack(self, ok: bool = True, error: str | None = None) -> None:
        self._ack_state = (ok, error)
        self._write_json(f"{ACK_PREFIX}{self.worker_id}.json",
                         {"pid": self.pid, "host": self.host, "generation": self.generation,
                          "ok": ok, "error": error, "time": time.time()})

    def register(self) -> None:
        """Announce this worker while it is still starting (generation -1: not serving
        yet), so that a reload meanwhile waits for it too."""
        self.generation = -1
        self._ack()
        self.generation = 0

    def publish(self, path: str, operating_point: str | object | None = KEEP) -> int:
        """Point every worker at ``path`` (relative to the banks root) and, when given, at
        ``operating_point`` (``"coverage:0.9"``; None: the bank's own threshold; by default
        the pointer's current one is kept); the new generation."""
        with open(self.folder / ".conceptguard-bank.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = self.read_pointer()
            generation = (current["generation"] if current else 0) + 1
            data: dict[str, Any] = {"generation": generation, "path": path,
                                    "time": time.time()}
            if operating_point is not KEEP:
                data["operating_point"] = operating_point
            elif current is not None and "operating_point" in current:
                data["operating_point"] = current["operating_point"]
            self._write_json(POINTER, data)
        self.generation = generation
        self._ack()
        return generation

    def _alive(self, data: dict[str, Any], pid: int) -> bool:
        if data.get("host", self.host) == self.host:
            return process_alive(pid)
        try:
            return time.time() - float(data["time"]) < STALE_S
        except (KeyError, TypeError, ValueError):
            return False

    def workers(self) -> dict[str, dict[str, Any]]:
        """Acknowledgements of the live workers, by ``host-pid`` (gone workers' files
        removed)."""
        out: dict[str, dict[str, Any]] = {}
        for f in self.folder.glob(f"{ACK_PREFIX}*.json"):
            try:
                data = json.loads(f.read_text())
                pid = int(data["pid"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if self._alive(data, pid):
                out[f.name[len(ACK_PREFIX):-len(".json")]] = data
            else:
                with contextlib.suppress(OSError):
                    f.unlink()
        return out

    async def wait_all(self, generation: int, timeout_s: float) -> dict[str, Any]:
        """Wait until every live worker acknowledges ``generation``; a summary."""
        deadline = time.monotonic() + timeout_s
        while True:
            acks = self.workers()
            serving = [p for p, a in acks.items() if a.get("generation", 0) >= generation
                       and a.get("ok")]
            failed = {p: a.get("error") for p, a in acks.items()
                      if a.get("generation", 0) >= generation and not a.get("ok")}
            done = len(serving) + len(failed) >= len(acks)
            if done or time.monotonic() >= deadline:
                return {"generation": generation, "workers": len(acks),
                        "serving": len(serving), "failed": len(failed),
                        "all_serving": len(serving) == len(acks)}
            await asyncio.sleep(POLL_S / 2)

    # ---------------------------------------------------------------- following

    async def adopt_startup(self, state: RuntimeState) -> None:
        """A worker (re)started after a reload serves the bank the pointer names."""
        from service.bank_paths import confine

        pointer = self.read_pointer()
        if pointer is None:
            return
        with contextlib.suppress(Exception):
            state.path, state.bank_ref = confine(state.root, str(pointer["path"]))
            self.generation = pointer["generation"]
        with contextlib.suppress(Exception):
            _adopt_operating_point(state, pointer)

    def start_following(self, state: RuntimeState) -> None:
        self._ack()
        self._task = asyncio.create_task(self._follow(state), name="conceptguard-bank-pointer")

    async def _follow(self, state: RuntimeState) -> None:
        from conceptguard.bank import BankError

        last_ack = time.monotonic()
        while True:
            await asyncio.sleep(POLL_S)
            pointer = self.read_pointer()
            if pointer is None or pointer["generation"] <= self.generation:
                if time.monotonic() - last_ack >= HEARTBEAT_S:  # still here (other hosts)
                    with contextlib.suppress(OSError):
                        self._ack(*self._ack_state)
                    last_ack = time.monotonic()
                continue
            last_ack = time.monotonic()
            generation = pointer["generation"]
            try:
                _adopt_operating_point(state, pointer)
                if state.bank_ref != pointer["path"] or generation > self.generation:
                    await state.reload(str(pointer["path"]))
                self.generation = generation
                self._ack()
                log.info("bank pointer generation %d: serving %s", generation, pointer["path"])
            except BankError as exc:
                self.generation = generation
                self._ack(False, str(exc))
                log.error("bank pointer generation %d: %s", generation, exc)
            except Exception as exc:  # keep following whatever happens
                self.generation = generation
                self._ack(False, f"{type(exc).__name__}: {exc}")
                log.exception("bank pointer generation %d failed", generation)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(OSError):
            (self.folder / f"{ACK_PREFIX}{self.worker_id}.json").unlink()
