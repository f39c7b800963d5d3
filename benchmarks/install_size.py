"""Disk size of what each install set brings, measured in the current environment: the
dependency closure of the serving set (pyproject's dependencies) and of each extra, from the
installed distributions' file lists. This is what the image's /opt/venv holds for a build
with those extras (same wheels), without a Docker engine.

    .venv/bin/python benchmarks/install_size.py [--top 12]
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]


def dist_size(dist: md.Distribution) -> int:
    total = 0
    for f in dist.files or ():
        p = Path(dist.locate_file(f))
        if p.is_file():
            total += p.stat().st_size
    return total


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(reqs: list[str], extras_of_self: dict[str, list[str]]) -> set[str]:
    seen: set[str] = set()
    todo = [Requirement(r) for r in reqs]
    while todo:
        req = todo.pop()
        name = canonical(req.name)
        if name == "conceptguard":  # a self-reference: conceptguard[torch]
            for extra in req.extras:
                todo += [Requirement(r) for r in extras_of_self[extra]]
            continue
        if name in seen:
            continue
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            continue
        seen.add(name)
        for r in dist.requires or ():
            sub = Requirement(r)
            env = {"extra": next(iter(req.extras), "")}
            if sub.marker is None or sub.marker.evaluate(env):
                todo.append(sub)
    return seen


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = project["dependencies"]
    extras = project["optional-dependencies"]
    sizes = {canonical(d.metadata["Name"]): dist_size(d) for d in md.distributions()}
    serving = closure(base, extras)
    rows = [("serving (base install)", serving)]
    for extra in ("torch", "offline"):
        rows.append((f"+ [{extra}]", closure(base + extras[extra], extras)))
    mib = 1024 * 1024
    print("| install | distributions | size on disk |")
    print("|---|---|---|")
    for label, names in rows:
        print(f"| {label} | {len(names)} | {sum(sizes.get(n, 0) for n in names) / mib:,.0f} MiB |")
    full = rows[-1][1]
    print(f"\nlargest in the offline set (top {args.top}), and whether serving carries them:\n")
    print("| distribution | size | in serving |")
    print("|---|---|---|")
    for n in sorted(full, key=lambda n: -sizes.get(n, 0))[:args.top]:
        print(f"| {n} | {sizes.get(n, 0) / mib:,.0f} MiB | {'yes' if n in serving else 'no'} |")


if __name__ == "__main__":
    main()
