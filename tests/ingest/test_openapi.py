"""The gateway's OpenAPI document says what the gateway does (no broker: the app is built, not
started). The whole document against the running gateway: tests/ingest/test_schemathesis.py."""

from __future__ import annotations

import re
from typing import Any

import pytest
from aiohttp.test_utils import make_mocked_request

from schemas.control import Grant
from schemas.events import PAYLOADS
from services.ingest.app import create_app
from services.ingest.insights import parse_filter, revoke_share, share_audit
from services.ingest.openapi import build_openapi
from services.ingest.settings import IngestSettings


@pytest.fixture
def document() -> dict[str, Any]:
    return build_openapi(create_app(IngestSettings(ingest_with_insights=True)))


async def test_delete_on_the_audit_route_is_no_revocation_of_a_grant_named_audit() -> None:
    app = create_app(IngestSettings(ingest_with_insights=True))
    audit = await app.router.resolve(make_mocked_request("DELETE", "/v1/shares/audit", app=app))
    assert audit.http_exception is not None and audit.http_exception.status == 405
    assert audit.http_exception.allowed_methods == {"GET", "HEAD"}  # type: ignore[attr-defined]
    assert (
        await app.router.resolve(make_mocked_request("GET", "/v1/shares/audit", app=app))
    ).handler is share_audit
    grant = await app.router.resolve(make_mocked_request("DELETE", "/v1/shares/ab12cd34", app=app))
    assert grant.handler is revoke_share and grant["grant_id"] == "ab12cd34"


def test_the_grant_id_parameter_has_the_grants_own_shape(document: dict[str, Any]) -> None:
    (parameter,) = document["paths"]["/v1/shares/{grant_id}"]["delete"]["parameters"]
    assert (
        parameter["schema"]["pattern"]
        == Grant.model_json_schema()["properties"]["grant_id"]["pattern"]
    )


def _parameter(document: dict[str, Any], path: str, name: str) -> dict[str, Any]:
    operation = document["paths"][path]["get" if path != "/v1/events" else "post"]
    return next(p for p in operation["parameters"] if p["name"] == name)


def test_an_empty_window_start_is_refused_as_the_document_says(document: dict[str, Any]) -> None:
    assert _parameter(document, "/v1/insights", "window_start")["schema"]["format"] == "date-time"
    with pytest.raises(ValueError, match="window_start"):
        parse_filter({"window_start": ""}, lambda name: [])


@pytest.mark.parametrize(
    ("value", "accepted"),
    [
        ("statistics", True),
        ("statistics,benchmark", True),
        (" statistics , benchmark ", True),
        ("", False),
        ("statistics,", False),
        ("gossip", False),
    ],
)
def test_the_type_parameter_pattern_accepts_what_the_gateway_accepts(
    document: dict[str, Any], value: str, accepted: bool
) -> None:
    pattern = _parameter(document, "/v1/insights", "type")["schema"]["items"]["pattern"]
    assert (re.fullmatch(pattern, value) is not None) == accepted
    try:
        parse_filter({}, lambda name: [value] if name == "type" else [])
        parsed = True
    except ValueError:
        parsed = False
    assert parsed == accepted


def test_bounded_values_carry_their_bounds(document: dict[str, Any]) -> None:
    version = _parameter(document, "/v1/events", "version")["schema"]
    assert version["enum"] == sorted({v for _, v in PAYLOADS})
    share = document["paths"]["/v1/shares"]["post"]["requestBody"]["content"]["application/json"]
    assert "statistics" in share["schema"]["properties"]["insight_types"]["items"]["enum"]
    stream = document["paths"]["/v1/insights/stream"]["get"]["responses"]["200"]["content"]
    event = stream["text/event-stream"]["schema"]  # OpenAPI 3.1: one event
    assert {"statistics", "gap", "end"} <= set(event["properties"]["event"]["enum"])


def test_every_route_behind_a_key_documents_401_and_503(document: dict[str, Any]) -> None:
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            if "security" not in operation:  # the document's default: a tenant key
                assert {"401", "503"} <= set(operation["responses"]), (method, path)
