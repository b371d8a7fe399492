"""Authentication of the gateway: a tenant API key on every route but health, metrics and the
API document. The key is read from ``Authorization: Bearer <key>`` (or ``X-Api-Key``); the
tenant comes from the key, never from the request body. While the control registry cannot
confirm it is current (:meth:`~shared.control.ControlRegistry.problem`) every key is refused with
``503`` and ``Retry-After``: the gateway fails closed rather than honour a key that may have been
revoked meanwhile."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from schemas.control import Tenant
from shared.codec import json_response
from shared.control import ControlRegistry
from shared.observability import PUBLIC_PATHS

REGISTRY_KEY = web.AppKey("registry", ControlRegistry)
TENANT_KEY = web.RequestKey("xietong.tenant", Tenant)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def api_key_of(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.headers.get("X-Api-Key")


@web.middleware
async def require_api_key(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in PUBLIC_PATHS:
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
        # Fail closed: a registry that cannot prove it is current may be missing a revocation.
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


def authenticated_tenant(request: web.Request) -> Tenant:
    """The tenant the request's key belongs to (set by :func:`require_api_key`)."""
    tenant: Tenant = request[TENANT_KEY]
    return tenant
