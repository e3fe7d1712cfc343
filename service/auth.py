"""API keys: `Authorization: Bearer <key>` or `X-API-Key: <key>`, checked in constant time against every key.

`settings.api_key` (CONVLENS_API_KEY, comma-separated) lists the keys; none configured means no authentication.
`require_write_access` guards the routes that change state or spend compute on the queue; with
`settings.auth == "all"` the app also puts `require_read_access` on every route but the exempt ones (liveness and
the web page, which sends the key itself).
"""

from __future__ import annotations

import hmac
import logging
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.settings import Settings

log = logging.getLogger("convlens.auth")

# auto_error=False: a missing header is our 401 with our detail, not FastAPI's 403 "Not authenticated".
bearer_scheme = HTTPBearer(
    auto_error=False, scheme_name="bearer", description="`Authorization: Bearer <key>` (a CONVLENS_API_KEY key)"
)
api_key_scheme = APIKeyHeader(
    name="X-API-Key", auto_error=False, scheme_name="apiKey", description="`X-API-Key: <key>` (same keys)"
)

# Paths open even with CONVLENS_AUTH=all: liveness for probes, and the web page and its files.
# /ready stays open for load balancers and container health checks (it says only what is up, never data).
EXEMPT_PATHS = frozenset({"/health", "/ready", "/", "/index.html", "/favicon.ico", "/docs", "/docs/oauth2-redirect"})
EXEMPT_PREFIXES = ("/static/", "/docs-assets/")
MAX_KEY_CHARS = 4096  # longer headers are not keys; compare_digest would still be cheap, but say so clearly

AUTH_401 = {"description": "no API key, or not one of CONVLENS_API_KEY's (the detail says how to send one)"}
HOW = "send `Authorization: Bearer <key>` or `X-API-Key: <key>` with a key from CONVLENS_API_KEY"


def key_matches(given: str, keys: list[str]) -> bool:
    """Constant time per key, and every key is compared (no early exit that would tell which one matched)."""
    g = given.encode("utf-8", "surrogateescape")
    ok = False
    for k in keys:
        ok |= hmac.compare_digest(g, k.encode("utf-8", "surrogateescape"))
    return ok


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(401, detail=detail, headers={"WWW-Authenticate": "Bearer"})


def check_key(settings: Settings, bearer: HTTPAuthorizationCredentials | None, api_key: str | None) -> None:
    """Nothing when no key is configured or a given key matches; 401 otherwise."""
    keys = settings.api_key
    if not keys:
        return
    given = [g for g in ((bearer.credentials if bearer else None), api_key) if g]
    if not given:
        raise _unauthorized(f"authentication required: {HOW}")
    if any(len(g) <= MAX_KEY_CHARS and key_matches(g, keys) for g in given):
        return
    raise _unauthorized(f"invalid API key: {HOW}")


BearerCred = Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)]
ApiKeyCred = Annotated[str | None, Security(api_key_scheme)]


async def require_write_access(request: Request, bearer: BearerCred, api_key: ApiKeyCred) -> None:
    """Routes that change state or queue work: a key is needed whenever keys are configured."""
    check_key(request.app.state.settings, bearer, api_key)


async def require_read_access(request: Request, bearer: BearerCred, api_key: ApiKeyCred) -> None:
    """Every other route: a key is needed only with CONVLENS_AUTH=all, and never on the exempt paths."""
    settings: Settings = request.app.state.settings
    path = request.url.path
    if settings.auth != "all" or path in EXEMPT_PATHS or path.startswith(EXEMPT_PREFIXES):
        return
    check_key(settings, bearer, api_key)


WriteAccess = Depends(require_write_access)
ReadAccess = Depends(require_read_access)


def warn_if_open(settings: Settings) -> None:
    """Say loudly, at startup, that anyone who reaches the port can train, cancel and switch models."""
    if settings.api_key:
        log.info("API keys configured (%d); auth mode %r", len(settings.api_key), settings.auth)
        return
    exposed = settings.host not in ("127.0.0.1", "localhost", "::1")
    log.warning(
        "NO API KEY CONFIGURED: anyone who can reach %s:%d can queue training, cancel jobs and change the default "
        "model%s. Set CONVLENS_API_KEY (comma-separated keys) to require one.",
        settings.host,
        settings.port,
        " (and it listens beyond this machine)" if exposed else "",
    )


def openapi_security_only_with_keys(app: FastAPI, settings: Settings) -> None:
    """Without configured keys nothing asks for one, so the published schema declares no security schemes either
    (a client or fuzzer reading it would otherwise send keys a keyless server ignores); with keys, /docs shows
    Authorize and every guarded operation names both schemes."""
    if settings.api_key:
        return
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()
        for ops in schema.get("paths", {}).values():
            for op in ops.values():
                if isinstance(op, dict):
                    op.pop("security", None)
                    op.get("responses", {}).pop("401", None)
        schema.get("components", {}).pop("securitySchemes", None)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
