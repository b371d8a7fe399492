"""Tenant API keys on aiohttp apps: one middleware for every partner-facing HTTP service.

The key is read from ``Authorization: Bearer <key>`` (or ``X-Api-Key``); the tenant comes from
the key, never from the request. Health, metrics and the API document need none
(:data:`shared.observability.PUBLIC_PATHS`), nor the paths an app names as public (a signed
download link carries its own proof). While the control registry cannot confirm it is current
(:meth:`~shared.control.ControlRegistry.problem`) every key is refused with ``503`` and
``Retry-After``: fail closed rather than honour a key that may have been revoked meanwhile.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web
from aiohttp.typedefs import Middleware

from schemas.control import Tenant
from shared.codec import json_response
from shared.control import ControlRegistry
from shared.observability import PUBLIC_PATHS

REGISTRY_KEY = web.AppKey("xietong.registry", ControlRegistry)
TENANT_KEY = web.RequestKey("xietong.tenant", Tenant)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def api_key_of(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.headers.get("X-Api-Key")


def require_api_key(public_prefixes: Iterable[str] = ()) -> Middleware:
    """The middleware: the app's registry (``app[REGISTRY_KEY]``) vouches for every key."""
    prefixes = tuple(public_prefixes)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in PUBLIC_PATHS or (prefixes and request.path.startswith(prefixes)):
            return await handler(request)
        api_key = api_key_of(request)
        if not api_key:
            return json_response(
                {"error": "missing API key (Authorization: Bearer <key>)"},
                status=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        registry = request.app[REGISTRY_KEY]
        problem = registry.problem()
        if problem is not None:
            return json_response(
                {"error": "cannot verify API keys right now; retry shortly", "reason": problem},
                status=503,
                headers={"Retry-After": "5"},
            )
        tenant = registry.authenticate(api_key)
        if tenant is None:
            return json_response(
                {"error": "unknown or revoked API key"},
                status=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        request[TENANT_KEY] = tenant
        return await handler(request)

    return middleware


def authenticated_tenant(request: web.Request) -> Tenant:
    """The tenant the request's key belongs to (set by :func:`require_api_key`)."""
    tenant: Tenant = request[TENANT_KEY]
    return tenant
