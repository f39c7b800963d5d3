"""The bank pointer's worker acknowledgements in a folder shared by several hosts (Ray Serve
replicas on several nodes, pods on one ReadWriteMany volume): workers are told apart by host
and pid, a worker on another host is live while it refreshes its file, and a reload waits for
the workers of every host."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest

from service import lifecycle
from service.lifecycle import ACK_PREFIX, SharedBank
from service.settings import load_settings
from tests.conftest import DEMO_BANK


def _bank(folder: Path, host: str, pid: int | None = None) -> SharedBank:
    return SharedBank(folder, load_settings(bank=DEMO_BANK, grpc_port=0), host=host, pid=pid)


def _age(folder: Path, worker_id: str, seconds: float) -> None:
    f = folder / f"{ACK_PREFIX}{worker_id}.json"
    data = json.loads(f.read_text())
    data["time"] = time.time() - seconds
    f.write_text(json.dumps(data))


def test_same_pid_on_two_hosts_is_two_workers(tmp_path: Path) -> None:
    """Pods have their own pid namespaces: one pid on two hosts must not share one file."""
    here, there = _bank(tmp_path, "pod-a"), _bank(tmp_path, "pod-b", pid=os.getpid())
    here.register()
    there.register()
    assert sorted(here.workers()) == [f"pod-a-{os.getpid()}", f"pod-b-{os.getpid()}"]


def test_another_hosts_worker_is_live_while_its_file_is_fresh(tmp_path: Path) -> None:
    here = _bank(tmp_path, "pod-a")
    # a pid that does not exist on this host: only its heartbeat tells whether it is live
    there = _bank(tmp_path, "pod-b", pid=2**22 + 12345)
    here.register()
    there.register()
    assert there.worker_id in here.workers()
    _age(tmp_path, there.worker_id, lifecycle.STALE_S + 1)
    assert there.worker_id not in here.workers()
    assert not (tmp_path / f"{ACK_PREFIX}{there.worker_id}.json").exists()


def test_a_dead_pid_on_this_host_is_dropped(tmp_path: Path) -> None:
    here = _bank(tmp_path, "pod-a")
    gone = _bank(tmp_path, "pod-a", pid=2**22 + 12345)
    here.register()
    gone.register()
    assert list(here.workers()) == [here.worker_id]


def test_reload_waits_for_the_workers_of_every_host(tmp_path: Path) -> None:
    here, there = _bank(tmp_path, "pod-a"), _bank(tmp_path, "pod-b", pid=2**22 + 7)
    here.register()
    there.register()

    async def scenario() -> tuple[dict, dict]:
        generation = here.publish("second")
        waiting = await here.wait_all(generation, timeout_s=0.3)  # pod-b has not moved
        there.generation = generation
        there._ack()
        return waiting, await here.wait_all(generation, timeout_s=5)

    waiting, done = asyncio.run(scenario())
    assert waiting["workers"] == 2 and waiting["serving"] == 1 and not waiting["all_serving"]
    assert done["workers"] == 2 and done["serving"] == 2 and done["all_serving"]


def test_a_following_worker_refreshes_its_file(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The heartbeat: with nothing to follow, the file's time still moves on."""
    monkeypatch.setattr(lifecycle, "HEARTBEAT_S", 0.3)
    worker = _bank(tmp_path, "pod-b")
    f = tmp_path / f"{ACK_PREFIX}{worker.worker_id}.json"

    async def scenario() -> tuple[float, float]:
        worker.start_following(state=None)  # type: ignore[arg-type]  # never reloads here
        first = json.loads(f.read_text())["time"]
        await asyncio.sleep(1.0)
        second = json.loads(f.read_text())["time"]
        await worker.close()
        return first, second

    first, second = asyncio.run(scenario())
    assert second > first
    assert not f.exists()  # close removes it
