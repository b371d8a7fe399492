"""Download links to share files and archive objects.

``POST /v1/links`` ``{"file_id": ...}`` or ``{"archive_key": ..., "store": ...}`` with
``"expires_in"`` (seconds) gives a link only when the caller may read the thing (its own, or a
grant covering ``file.<kind>`` or the archive object's insight types: the one sharing rule);
another tenant's thing without such a grant is ``403``. The link expires at the earliest of the
requested time, the end of the grant it relies on and the store's limit
(``storage_link_max_seconds``, at most the 7 days S3 presigning allows); the answer says which
(``limited_by``). Objects in the public store get an S3 presigned URL; objects in the private
store a link to this service (``GET /v1/links/{token}``), HMAC-signed: a tampered or expired
link is ``403``, and the grant it relies on is checked again when it is used.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas.control import Grant
from services.storage.files import FILES_KEY, FileError, file_grant_type, stream_object
from services.storage.objects import Manifest, manifest_key
from shared.codec import DecodeError, decode, json_response
from shared.control import ControlRegistry, now, reading_grants
from shared.httpauth import REGISTRY_KEY, authenticated_tenant

LINK_PREFIX = "/v1/links/"


class LinkRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    file_id: str | None = None
    archive_key: str | None = None
    store: str | None = Field(None, description="public or private (archive objects).")
    expires_in: int = Field(3600, ge=1, description="Seconds the link should last.")


def link_expiry(
    requested_s: int, grant_ends: Iterable[datetime | None], store_limit_s: int, at: datetime
) -> tuple[datetime, str]:
    """The earliest of the requested time, the grant's end and the store's limit, and which."""
    candidates = [
        (at.timestamp() + requested_s, "requested"),
        (at.timestamp() + store_limit_s, "store"),
    ]
    ends = list(grant_ends)
    if ends and all(end is not None for end in ends):
        # Several agreements may allow it: the link lasts while the longest of them does.
        candidates.append((max(end.timestamp() for end in ends if end is not None), "grant"))
    moment, why = min(candidates, key=lambda item: item[0])
    return datetime.fromtimestamp(int(moment), UTC), why


def grant_end(grant: Grant) -> datetime | None:
    ends = [e for e in (grant.expires_at, grant.revoked_at) if e is not None]
    return min(ends) if ends else None


def sign(key: bytes, payload: dict[str, Any]) -> str:
    body = base64.urlsafe_b64encode(orjson.dumps(payload)).decode().rstrip("=")
    mac = hmac.new(key, body.encode(), hashlib.sha256).digest()
    return f"{body}.{base64.urlsafe_b64encode(mac).decode().rstrip('=')}"


def unsign(key: bytes, token: str) -> dict[str, Any]:
    """The payload of a genuine, unexpired token; ``ValueError`` otherwise."""
    body, dot, mac = token.partition(".")
    if not dot:
        raise ValueError("not a link")
    expected = (
        base64.urlsafe_b64encode(hmac.new(key, body.encode(), hashlib.sha256).digest())
        .decode()
        .rstrip("=")
    )
    if not hmac.compare_digest(expected, mac):
        raise ValueError("the link is not genuine")
    payload = orjson.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    if not isinstance(payload, dict):
        raise ValueError("not a link")
    if payload.get("e", 0) <= time.time():
        raise ValueError("the link has expired")
    return payload


def allowing(
    registry: ControlRegistry, reader: str, owner: str, visibility: str, types: Iterable[str]
) -> list[Grant] | None:
    """The grants that let ``reader`` read every one of ``types`` of ``owner`` (None: not all)."""
    at = now()
    grants = registry.grants_to(reader, at)
    found: list[Grant] = []
    for kind in types:
        allowed = reading_grants(
            reader, owner=owner, visibility=visibility, insight_type=kind, grants=grants, at=at
        )
        if allowed is None:
            return None
        found += allowed
    return found


async def _subject(request: web.Request, ask: LinkRequest) -> dict[str, Any]:
    files = request.app[FILES_KEY]
    if ask.file_id:
        stored = await files.load_file(ask.file_id)
        return {
            "s": stored.store,
            "k": stored.key,
            "o": stored.tenant,
            "v": "private",
            "y": [file_grant_type(stored.labels.get("kind", ""))],
            "n": stored.name,
            "t": stored.content_type,
            "z": stored.size,
        }
    if ask.archive_key and ask.store in files.stores:
        raw = await files.stores[ask.store].get_or_none(manifest_key(ask.archive_key))
        if raw is None or not ask.archive_key.endswith(".parquet"):
            raise FileError(404, "no such archive object")
        manifest = Manifest.model_validate_json(raw)
        public = manifest.labels.get("sensitivity") == "public"
        return {
            "s": ask.store,
            "k": manifest.key,
            "o": manifest.tenant,
            "v": "public" if public else "private",
            "y": manifest.kinds,
            "n": manifest.key.rsplit("/", 1)[-1],
            "t": "application/vnd.apache.parquet",
            "z": manifest.object_bytes,
        }
    raise FileError(422, "name a file_id, or an archive_key and its store (public or private)")


async def create_link(request: web.Request) -> web.Response:
    reader = authenticated_tenant(request).tenant
    try:
        ask = LinkRequest.model_validate(decode(await request.read()))
    except DecodeError:
        raise FileError(400, "body must be JSON") from None
    except ValidationError as error:
        raise FileError(
            422, "invalid link request", errors=error.errors(include_url=False, include_input=False)
        ) from None
    subject = await _subject(request, ask)
    registry = request.app[REGISTRY_KEY]
    grants = allowing(registry, reader, subject["o"], subject["v"], subject["y"])
    if grants is None:
        raise FileError(403, "no agreement lets you read this")
    files = request.app[FILES_KEY]
    at = datetime.now(UTC)
    expires_at, limited_by = link_expiry(
        ask.expires_in,
        [grant_end(g) for g in grants],
        files.settings.storage_link_max_seconds,
        at,
    )
    seconds = max(1, int(expires_at.timestamp() - at.timestamp()))
    store = files.stores[subject["s"]]
    if store.name == "public":
        url = await store.presign(subject["k"], seconds, subject["n"])
    else:
        token = sign(
            files.settings.link_key(),
            {**subject, "r": reader, "e": int(expires_at.timestamp())},
        )
        url = f"{request.scheme}://{request.host}{LINK_PREFIX}{token}"
    return json_response(
        {
            "url": url,
            "store": store.name,
            "expires_at": expires_at.isoformat(),
            "expires_in": seconds,
            "limited_by": limited_by,
        },
        status=201,
    )


async def follow_link(request: web.Request) -> web.StreamResponse:
    """A private-store link: no API key, the signed token is the proof."""
    files = request.app[FILES_KEY]
    try:
        payload = unsign(files.settings.link_key(), request.match_info["token"])
    except (ValueError, TypeError) as error:
        raise FileError(403, str(error)) from None
    registry = request.app[REGISTRY_KEY]
    if registry.problem() is not None:
        raise FileError(503, "cannot verify the agreement behind this link right now")
    if allowing(registry, payload["r"], payload["o"], payload["v"], payload["y"]) is None:
        raise FileError(403, "the agreement behind this link has ended")
    return await stream_object(
        request,
        files.stores[payload["s"]],
        payload["k"],
        int(payload["z"]),
        content_type=payload["t"],
        filename=payload["n"],
    )


def setup_link_routes(app: web.Application) -> None:
    app.router.add_post("/v1/links", create_link)
    app.router.add_get(LINK_PREFIX + "{token}", follow_link)
