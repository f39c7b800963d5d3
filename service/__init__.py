"""The service: transports (REST v1, REST v2, gRPC) over one data plane."""

from __future__ import annotations

import importlib.metadata


def _package_version() -> str:
    try:
        return importlib.metadata.version("conceptguard")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


__version__ = _package_version()
