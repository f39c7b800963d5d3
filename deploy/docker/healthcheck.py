#!/usr/bin/env python3
"""Container health probe without curl: exit 0 iff GET /v2/health/<live|ready> answers 2xx.

Usage: conceptguard-healthcheck [live|ready]   (default: ready)
Port from CONCEPTGUARD_HTTP_PORT (default 8000); proxies from the environment are ignored.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main(argv: list[str]) -> int:
    kind = argv[1] if len(argv) > 1 else "ready"
    if kind not in ("live", "ready"):
        print(f"usage: {argv[0]} [live|ready]", file=sys.stderr)
        return 2
    port = os.environ.get("CONCEPTGUARD_HTTP_PORT", "8000")
    url = f"http://127.0.0.1:{port}/v2/health/{kind}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=float(os.environ.get("HEALTHCHECK_TIMEOUT", "4"))) as resp:
            ok = 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    if not ok:
        print(f"unhealthy: {url}: HTTP {resp.status}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
