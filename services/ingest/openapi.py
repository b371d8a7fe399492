"""OpenAPI 3.1 of the gateway, built from the app's routes and the pydantic contracts.

The paths come from ``app.router`` (so the document cannot list a route the app does not serve,
nor miss one); the gateway's own operations are described in :data:`OPERATIONS` with request and
answer schemas generated from :mod:`schemas.events` and :mod:`services.ingest.handlers`. A route
added by another module (the insight and sharing routes) can describe itself with
:func:`describe`; until it does, it is listed with the first line of its handler's docstring.
"""

from __future__ import annotations

import inspect
from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from schemas.events import EVENT_MODELS, PAYLOADS
from services.ingest.console import PREFIX as CONSOLE_PREFIX
from services.ingest.handlers import ErrorAnswer, IngestAnswer
from services.ingest.operator import PREFIX as OPERATOR_PREFIX
from services.ingest.settings import IngestSettings

REF = "#/components/schemas/{model}"
Operation = dict[str, Any]

OPERATIONS: dict[tuple[str, str], Operation] = {}
"""(METHOD, path template) -> OpenAPI operation object."""


def describe(method: str, path: str, operation: Operation) -> None:
    """Document one route of the app (other modules call this for their routes)."""
    OPERATIONS[(method.upper(), path)] = operation


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": _ref(ErrorAnswer)}},
    }


AUTH_RESPONSES = {
    "401": _error("No API key, or an unknown or revoked one."),
    "503": _error("The gateway cannot vouch for keys right now (Retry-After): retry shortly."),
}


OPERATOR_RESPONSES = {
    "401": _error("No operator token, or a wrong one."),
    "404": _error("The operator view is not enabled (no XIETONG_OPERATOR_TOKEN)."),
}


def _public(operation: Operation) -> Operation:
    return {**operation, "security": []}


def _event_schema() -> dict[str, Any]:
    """A record of a JSON or NDJSON body: one of the events, or anything else, which is refused
    on its own under 202 (an unknown type, a line that is not JSON) - not a request error."""
    return {
        "anyOf": [
            {
                "oneOf": [_ref(model) for model in EVENT_MODELS.values()],
                "discriminator": {"propertyName": "type"},
            },
            {"description": "Anything else: refused on its own, listed in the 202's refusals."},
        ]
    }


def _gateway_operations() -> dict[tuple[str, str], Operation]:
    types = sorted({name for name, _ in PAYLOADS})
    versions = sorted({version for _, version in PAYLOADS})
    events = _event_schema()
    post_events: Operation = {
        "operationId": "publishEvents",
        "summary": "Publish events (JSON array, NDJSON or CSV); 202 once Kafka acknowledged them.",
        "description": (
            "Every record is validated against its contract. Accepted records go to "
            "events.raw.v1 (key: the tenant of the API key), refused ones to events.raw.v1.dlq "
            "with their original content; the answer lists each refusal by its 0-based index "
            "(array element, NDJSON line counting blank lines, CSV data row after the header "
            "not counting blank lines). For JSON and NDJSON a record of an unknown type or "
            "version, and an NDJSON line that is not JSON, is refused on its own under 202; for "
            "CSV the type comes from the query (none: 400, an unknown one: 422). Re-sending a "
            "batch is safe: event_id is the idempotency key (CSV rows without one get an id "
            "derived from the body), and the clean service drops repeated ids."
        ),
        "parameters": [
            {
                "name": "type",
                "in": "query",
                "required": False,
                "description": "CSV only: the event type of every row.",
                "schema": {"type": "string", "enum": types},
            },
            {
                "name": "version",
                "in": "query",
                "required": False,
                "description": "CSV only: the payload version (default: the latest of the type).",
                "schema": {"type": "integer", "enum": versions},
            },
        ],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"type": "array", "items": events}},
                "application/x-ndjson": {
                    "schema": events,
                    "description": "One event per line.",
                },
                "text/csv": {
                    "schema": {"type": "string", "minLength": 1},
                    "description": (
                        "Header of payload field names (payload.<field> and dotted nested names "
                        "accepted) and the envelope columns event_id, occurred_at, record_id, "
                        "operation, corrects; an empty cell is a missing value."
                    ),
                },
            },
        },
        "responses": {
            "202": {
                "description": "Every accepted record is acknowledged by Kafka.",
                "content": {"application/json": {"schema": _ref(IngestAnswer)}},
            },
            "400": _error(
                "Nothing published: an empty body; a JSON body that is not JSON or not an array; "
                "a CSV without ?type=, with a header that does not fit the type, or not "
                "parseable; a body that is not what its Content-Encoding says."
            ),
            "401": _error("No API key, or an unknown or revoked one."),
            "403": _error("A record names another tenant, or the tenant may not publish."),
            "413": _error("The body is larger than the limit (counted after decompression)."),
            "415": _error("Unsupported content type or charset (UTF-8 only)."),
            "422": _error("CSV: ?type= names no event type, or &version= no version of it."),
            "503": _error("Kafka did not acknowledge in time: retry (the same event ids)."),
        },
    }
    status = {"type": "object", "properties": {"status": {"type": "string"}}}
    json_status = {"application/json": {"schema": status}}
    return {
        ("POST", "/v1/events"): post_events,
        ("GET", "/healthz"): _public(
            {
                "operationId": "health",
                "summary": "The process is alive.",
                "responses": {"200": {"description": "Alive.", "content": json_status}},
            }
        ),
        ("GET", "/readyz"): _public(
            {
                "operationId": "ready",
                "summary": "The broker is reachable and the control registry loaded.",
                "responses": {
                    "200": {"description": "Ready.", "content": json_status},
                    "503": {"description": "Not ready, with the reason.", "content": json_status},
                },
            }
        ),
        ("GET", "/openapi.json"): _public(
            {
                "operationId": "openapi",
                "summary": "This document.",
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.1.",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        ),
    }


def app_routes(app: web.Application) -> set[tuple[str, str]]:
    """``(METHOD, path template)`` of every route the app serves (HEAD twins of GET left out)."""
    found: set[tuple[str, str]] = set()
    for route in app.router.routes():
        info = route.resource
        if info is None or route.method in ("HEAD", "*"):
            continue
        found.add((route.method, info.canonical))
    return found


def _fallback(app: web.Application, method: str, path: str) -> Operation:
    handler = next(
        route.handler
        for route in app.router.routes()
        if route.resource is not None
        and route.method == method
        and route.resource.canonical == path
    )
    summary = (inspect.getdoc(handler) or f"{method} {path}").splitlines()[0]
    return {"summary": summary, "responses": {"default": {"description": "See the summary."}}}


def _path_parameters(path: str) -> list[dict[str, Any]]:
    names = [part[1:-1].split(":")[0] for part in path.split("/") if part.startswith("{")]
    return [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in names
    ]


def build_openapi(app: web.Application, settings: IngestSettings | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``app``."""
    operations = {**_gateway_operations(), **OPERATIONS}
    paths: dict[str, dict[str, Any]] = {}
    for method, path in sorted(app_routes(app)):
        operation = dict(operations.get((method, path)) or _fallback(app, method, path))
        if path.startswith(CONSOLE_PREFIX):
            operation["security"] = []  # the console's page and files: no key (it asks for one)
        elif path.startswith(OPERATOR_PREFIX):
            # the operator token (services.ingest.operator), never a tenant key
            operation["security"] = [{"operatorToken": []}]
            operation["responses"] = {**OPERATOR_RESPONSES, **operation.get("responses", {})}
        elif operation.get("security") != []:
            # Every route behind a key answers these before its handler runs (shared.httpauth).
            operation["responses"] = {**AUTH_RESPONSES, **operation.get("responses", {})}
        parameters = _path_parameters(path)
        if parameters and "parameters" not in operation:
            operation["parameters"] = parameters
        paths.setdefault(path, {})[method.lower()] = operation
    models: list[type[BaseModel]] = [*EVENT_MODELS.values(), IngestAnswer, ErrorAnswer]
    _, definitions = models_json_schema(
        [(model, "validation") for model in models], ref_template=REF
    )
    schemas = definitions.get("$defs", {})
    for model in EVENT_MODELS.values():
        # The gateway fills in the key's tenant: a record need not name it (another is a 403).
        event = schemas[model.__name__]
        event["required"] = [name for name in event["required"] if name != "tenant"]
        tenant = {k: v for k, v in event["properties"]["tenant"].items() if k != "description"}
        event["properties"]["tenant"] = {
            "anyOf": [tenant, {"type": "null"}],
            "description": "The tenant of the API key; may be left out or null (another "
            "tenant's id is a 403).",
        }
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "Xietong ingest gateway",
            "version": "1",
            "description": (
                "Partner firms publish events and read the insights they may see. Every route "
                "but health, readiness and this document needs a tenant API key: "
                "`Authorization: Bearer xt_<key id>_<secret>` (or `X-Api-Key`). The gateway's "
                "Prometheus metrics are on the operator port, not here."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer", "description": "A tenant key."},
                "operatorToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The operator token (XIETONG_OPERATOR_TOKEN).",
                },
            },
        },
        "security": [{"apiKey": []}],
    }
    if settings is not None:
        document["servers"] = [{"url": f"http://{settings.http_host}:{settings.ingest_http_port}"}]
    return document
