"""Repository-level pytest plugins: shared fixtures usable by every test module, and how
pytest-xdist shares the tests out (``scripts/test.sh`` runs ``-n 2 --dist loadgroup``)."""

from __future__ import annotations

import pytest

pytest_plugins = ["tests.fixtures_bank"]

# Modules that start a local Ray run one after another on one worker: two local Ray
# clusters at once would each claim the machine's CPUs. The users of the session's tiny bank
# run on one worker too: it builds the bank once while the other worker does other work.
SHARED_GROUPS: dict[str, str] = {
    "test_ray_data": "ray",
    "test_ray_serve": "ray",
    "test_build_engine": "ray",
    "test_offline_e2e": "tiny-bank",
    "test_fused_fallback": "tiny-bank",
    "test_calibration_build": "tiny-bank",
}

# The longest groups go out first, so that neither worker is left with one at the end: the
# scheduler hands the groups out in collection order once its own reordering (by the number
# of tests in a group, which put the four-test walkthrough last) is off (pytest_configure).
LONGEST_FIRST: tuple[str, ...] = (
    "test_your_model", "tiny-bank", "ray", "test_streaming_build", "test_diagnose_cli",
    "test_dashboard_truth",
)


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist's --no-loadscope-reorder
        config.option.loadscopereorder = False


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under ``--dist loadgroup`` every module is one group (its module-scoped servers and
    builds are made once, on one worker) unless a test names its own ``xdist_group``."""
    # the workers, which collect and whose order the scheduler uses, see --dist as "no" and
    # xdist's own flag ``loadgroup`` instead; the controller sees --dist itself
    if not (getattr(config.option, "loadgroup", False)
            or getattr(config.option, "dist", "no") == "loadgroup"):
        return
    groups: dict[str, str] = {}
    for item in items:
        mark = item.get_closest_marker("xdist_group")
        if mark is None:
            module = item.module.__name__.rsplit(".", 1)[-1] if item.module else item.nodeid
            group = SHARED_GROUPS.get(module, module)
            item.add_marker(pytest.mark.xdist_group(group))
        else:
            group = str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
        groups[item.nodeid] = group
    rank = {g: i for i, g in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda it: rank.get(groups[it.nodeid], len(rank)))  # stable: order kept within


def pytest_collection_finish(session: pytest.Session) -> None:
    """Under ``--dist loadgroup`` every collected id must carry its group (pytest-xdist adds
    ``@group``). pytest 9.2 keeps node ids where pytest-xdist 3.8 no longer writes them, and
    the groups were then silently ignored: modules were split across the workers, each
    building its module fixtures (servers, banks, Ray clusters) again. Stop instead."""
    if not getattr(session.config.option, "loadgroup", False) or not session.items:
        return
    lost = [item.nodeid for item in session.items if "@" not in item.nodeid]
    if lost:
        raise pytest.UsageError(
            f"pytest-xdist's --dist loadgroup lost the test groups ({len(lost)} ids without "
            f"@group, e.g. {lost[0]}): pytest {pytest.__version__} with this pytest-xdist "
            "splits modules across workers; install the versions of requirements/dev.lock")
