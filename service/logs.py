"""The service's own log lines (the bank loaded with its backend, device and provider,
ready, drain, the gRPC address) reach stderr: uvicorn configures only its own loggers, so
without a handler Python would drop every INFO line of ``conceptguard.*``."""

from __future__ import annotations

import logging
import os
import sys

FORMAT = "%(levelname)s:     %(name)s: %(message)s"  # uvicorn's column layout
LEVEL_ENV = "CONCEPTGUARD_LOG_LEVEL"  # `conceptguard serve --log-level` sets it


def ensure_log_handler() -> None:
    """Give the ``conceptguard`` logger a stderr handler at ``CONCEPTGUARD_LOG_LEVEL``
    (default info), unless some handler already takes its records (its own, or an
    ancestor's, e.g. an application's ``logging.basicConfig``)."""
    logger = logging.getLogger("conceptguard")
    if logger.hasHandlers():
        return
    level = logging.getLevelName(os.environ.get(LEVEL_ENV, "info").strip().upper())
    logger.setLevel(level if isinstance(level, int) else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    logger.addHandler(handler)
