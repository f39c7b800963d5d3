"""The admin token check of the admin routes (bank reload, operating point)."""

from __future__ import annotations

import secrets

from fastapi import Request

from service.errors import ServiceError
from service.settings import Settings


def authorize(request: Request, settings: Settings) -> None:
    """``Authorization: Bearer <CONCEPTGUARD_ADMIN_TOKEN>``: 403 when no token is set (admin
    calls disabled), 401 without a Bearer token, 403 with a wrong one."""
    if not settings.reload_enabled():
        raise ServiceError("bank reload is disabled: set CONCEPTGUARD_ADMIN_TOKEN to enable it",
                           403, "reload_disabled")
    assert settings.admin_token is not None
    header = request.headers.get("authorization", "")
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise ServiceError("missing 'Authorization: Bearer <admin token>'", 401,
                           "unauthorized", headers={"WWW-Authenticate": "Bearer"})
    expected = settings.admin_token.get_secret_value().encode()
    if not secrets.compare_digest(token.encode("utf-8", "replace"), expected):
        raise ServiceError("the admin token is wrong", 403, "forbidden")
