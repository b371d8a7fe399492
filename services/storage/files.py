"""The private cloud: the network's own file API for documents firms exchange.

Routes (each authenticated by a tenant key, :mod:`shared.httpauth`):

- ``POST /v1/files/uploads`` ``{"name", "size", "sha256", "labels": {"sensitivity", "kind"[,
  "residency"]}}`` — start an upload; the placement policy picks the store from the labels (the
  tenant label is the caller), the quota is checked against what the tenant stores and is
  uploading; ``201 {"upload_id", "offset": 0, "store", "rule"}``;
- ``PATCH /v1/files/uploads/{id}`` with ``Upload-Offset: n`` and the next bytes as the body,
  streamed (never a whole file in memory): bytes go to S3 multipart parts as they fill; a body
  cut at any byte keeps what arrived, so ``HEAD``/``GET /v1/files/uploads/{id}`` tells where to
  resume (``Upload-Offset``); a wrong offset is ``409`` with the right one;
- ``POST /v1/files/uploads/{id}/complete`` — assembles the file, checks its size and sha256
  against the declared ones (a mismatch is ``422`` and nothing is kept; a zero-byte file is
  never accepted), records it: ``201`` with the file;
- ``GET /v1/files`` — the caller's files and those shared with it;
- ``GET /v1/files/{file_id}`` — download, streamed, ``Range: bytes=a-b`` gives ``206``;
  readers: the owner and grantees of a grant covering ``file.<kind>`` (the one sharing rule);
- ``DELETE /v1/files/{file_id}`` — the owner removes it.

Where things live: file bytes at ``files/<tenant>/<file_id>`` in the store placement chose;
file records (``files-meta/<tenant>/<file_id>.json``), upload records and the tail of an upload
that has not filled a part yet (``uploads/<tenant>/<id>.json|.tail``) in the private store.
Uploads untouched for ``storage_upload_expiry_seconds`` are aborted and removed
(:meth:`FileStore.expire`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import StreamReader, web
from botocore.exceptions import ClientError
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from schemas.events import TenantId
from services.storage.placement import Decision, PlacementError, Policy
from services.storage.settings import StorageSettings
from services.storage.stores import Store
from shared.codec import DecodeError, decode, encode, json_response
from shared.httpauth import REGISTRY_KEY, authenticated_tenant

log = logging.getLogger(__name__)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class UploadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=255, description="File name.")
    size: int = Field(gt=0, description="Bytes; a zero-byte file is never accepted.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="Hex SHA-256 of the content.")
    labels: dict[str, str] = Field(description="sensitivity, kind and optionally residency.")
    content_type: str = Field("application/octet-stream", max_length=200)


class Upload(BaseModel):
    """An upload in progress (kept as JSON in the private store)."""

    model_config = ConfigDict(extra="forbid")

    upload_id: str
    tenant: TenantId
    name: str
    size: int
    sha256: str
    content_type: str
    labels: dict[str, str]
    store: str
    rule: str
    key: str
    s3_upload_id: str
    offset: int = 0
    parts: list[dict[str, Any]] = Field(default_factory=list)
    tail: int = 0
    created_at: AwareDatetime
    updated_at: AwareDatetime


class StoredFile(BaseModel):
    """A file of the private cloud: what it is, where it is, under which rule."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file_id: str
    tenant: TenantId
    name: str
    size: int
    sha256: str
    content_type: str
    labels: dict[str, str]
    store: str
    rule: str
    key: str
    created_at: AwareDatetime


class FileError(Exception):
    def __init__(self, status: int, reason: str, **details: Any) -> None:
        super().__init__(reason)
        self.status, self.reason, self.details = status, reason, details

    def response(self) -> web.Response:
        return json_response({"error": self.reason, **self.details}, status=self.status)


def owner_of(file_id: str) -> str:
    """File ids are ``<tenant>.<random>``: the owner is part of the id."""
    owner, dot, rest = file_id.rpartition(".")
    if not dot or not owner or not re.fullmatch(r"[0-9a-f]{16,32}", rest):
        raise FileError(404, "no such file")
    return owner


def file_grant_type(kind: str) -> str:
    """The type a grant names to share files of ``kind`` (``file.drawing``)."""
    return f"file.{kind}"


@dataclass
class FileStore:
    settings: StorageSettings
    stores: dict[str, Store]
    policy: Policy
    hashers: dict[str, tuple[int, Any]] = field(default_factory=dict)
    """upload id -> (bytes hashed, sha256 object) while this process saw every byte."""
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    @property
    def meta(self) -> Store:
        return self.stores["private"]

    def _lock(self, name: str) -> asyncio.Lock:
        return self.locks.setdefault(name, asyncio.Lock())

    # ------------------------------------------------------------------ records

    async def load_upload(self, tenant: str, upload_id: str) -> Upload:
        if not re.fullmatch(r"[0-9a-f]{32}", upload_id):
            raise FileError(404, "no such upload")
        raw = await self.meta.get_or_none(f"uploads/{tenant}/{upload_id}.json")
        if raw is None:
            raise FileError(404, "no such upload")
        return Upload.model_validate_json(raw)

    async def save_upload(self, upload: Upload) -> None:
        upload.updated_at = datetime.now(UTC)
        await self.meta.put(
            f"uploads/{upload.tenant}/{upload.upload_id}.json", encode(upload), "application/json"
        )

    async def load_file(self, file_id: str) -> StoredFile:
        owner = owner_of(file_id)
        raw = await self.meta.get_or_none(f"files-meta/{owner}/{file_id}.json")
        if raw is None:
            raise FileError(404, "no such file")
        return StoredFile.model_validate_json(raw)

    async def files_of(self, tenant: str) -> list[StoredFile]:
        found = []
        async for key, _ in self.meta.keys(f"files-meta/{tenant}/"):
            raw = await self.meta.get_or_none(key)
            if raw is not None:
                found.append(StoredFile.model_validate_json(raw))
        return found

    async def uploads_of(self, tenant: str | None = None) -> list[Upload]:
        found = []
        async for key, _ in self.meta.keys(f"uploads/{tenant}/" if tenant else "uploads/"):
            if key.endswith(".json"):
                raw = await self.meta.get_or_none(key)
                if raw is not None:
                    found.append(Upload.model_validate_json(raw))
        return found

    def quota_of(self, tenant: str) -> int:
        return self.settings.storage_tenant_quotas.get(tenant, self.settings.storage_quota_bytes)

    async def usage(self, tenant: str) -> int:
        """Bytes the tenant's files hold plus the declared sizes of its open uploads."""
        stored = sum(f.size for f in await self.files_of(tenant))
        return stored + sum(u.size for u in await self.uploads_of(tenant))

    # ------------------------------------------------------------------ uploads

    def place(self, tenant: str, labels: Mapping[str, str], subject: str) -> Decision:
        full = {
            "residency": self.settings.storage_tenant_residency.get(
                tenant, self.settings.storage_default_residency
            ),
            **{k: v for k, v in labels.items()},
            "tenant": tenant,
        }
        if labels.get("tenant") not in (None, tenant):
            raise FileError(422, "the tenant label is the caller's own tenant")
        try:
            return self.policy.decide(full, subject=subject)
        except PlacementError as error:
            raise FileError(422, str(error)) from None

    async def start(self, tenant: str, request: UploadRequest) -> Upload:
        upload_id = secrets.token_hex(16)
        decision = self.place(tenant, request.labels, f"upload {tenant}/{upload_id}")
        async with self._lock(tenant):
            used = await self.usage(tenant)
            quota = self.quota_of(tenant)
            if used + request.size > quota:
                raise FileError(
                    413,
                    "quota exceeded",
                    quota_bytes=quota,
                    used_bytes=used,
                    requested_bytes=request.size,
                )
            file_id = f"{tenant}.{secrets.token_hex(8)}"
            key = f"files/{tenant}/{file_id}"
            store = self.stores[decision.store]
            created = await store.client.create_multipart_upload(
                Bucket=store.bucket, Key=key, ContentType=request.content_type
            )
            at = datetime.now(UTC)
            upload = Upload(
                upload_id=upload_id,
                tenant=tenant,
                name=request.name,
                size=request.size,
                sha256=request.sha256,
                content_type=request.content_type,
                labels=decision.labels,
                store=decision.store,
                rule=decision.rule,
                key=key,
                s3_upload_id=created["UploadId"],
                created_at=at,
                updated_at=at,
            )
            await self.save_upload(upload)
        self.hashers[upload_id] = (0, hashlib.sha256())
        return upload

    async def append(self, upload: Upload, offset: int, body: StreamReader) -> Upload:
        """Stream ``body`` into the upload from ``offset``; keeps whatever arrived."""
        if offset != upload.offset:
            raise FileError(409, "wrong Upload-Offset", offset=upload.offset)
        store = self.stores[upload.store]
        part_bytes = self.settings.storage_part_bytes
        buffer = bytearray()
        if upload.tail:
            buffer += await self.meta.get(self._tail_key(upload))
        hashed, hasher = self.hashers.get(upload.upload_id, (-1, None))
        if hashed != upload.offset:
            hasher = None  # another process saw some bytes: hash the result at completion
        in_flight: list[asyncio.Task[None]] = []
        received = 0
        next_part = max([int(p["PartNumber"]) for p in upload.parts], default=0) + 1
        interrupted: BaseException | None = None

        async def send_part(number: int, data: bytes) -> None:
            answer = await store.client.upload_part(
                Bucket=store.bucket,
                Key=upload.key,
                UploadId=upload.s3_upload_id,
                PartNumber=number,
                Body=data,
            )
            upload.parts.append({"PartNumber": number, "ETag": answer["ETag"]})

        cancelled: asyncio.CancelledError | None = None
        try:
            while True:
                try:
                    chunk = await body.readany()
                except asyncio.CancelledError as error:  # the server cancels on a lost client
                    cancelled = interrupted = error
                    break
                except Exception as error:  # the body ended early: keep what arrived
                    interrupted = error
                    break
                if not chunk:
                    break
                if upload.offset + received + len(chunk) > upload.size:
                    raise FileError(413, "more bytes than the declared size", size=upload.size)
                received += len(chunk)
                if hasher is not None:
                    hasher.update(chunk)
                buffer += chunk
                while len(buffer) >= part_bytes:
                    data = bytes(buffer[:part_bytes])
                    del buffer[:part_bytes]
                    in_flight.append(asyncio.create_task(send_part(next_part, data)))
                    next_part += 1
                    if len(in_flight) >= 2:  # bounded memory: at most two parts on their way
                        try:
                            await asyncio.shield(in_flight[0])
                        except asyncio.CancelledError as error:
                            cancelled = interrupted = error
                            break
                        in_flight.pop(0)
                if cancelled is not None:
                    break
        except BaseException:
            await asyncio.gather(*in_flight, return_exceptions=True)
            raise

        async def keep() -> None:
            """Record what arrived: parts sent, the rest as the upload's tail."""
            await asyncio.gather(*in_flight)
            upload.parts.sort(key=lambda p: int(p["PartNumber"]))
            upload.offset += received
            upload.tail = len(buffer)
            if buffer:
                await self.meta.put(self._tail_key(upload), bytes(buffer))
            if hasher is not None:
                self.hashers[upload.upload_id] = (upload.offset, hasher)
            await self.save_upload(upload)

        keeping = asyncio.create_task(keep())
        try:
            await asyncio.shield(keeping)
        except asyncio.CancelledError:
            await keeping  # finish recording what arrived, then give way
            raise
        if interrupted is not None:
            log.info(
                "upload interrupted; resumable",
                extra={"upload": upload.upload_id, "offset": upload.offset},
            )
        if cancelled is not None:
            raise cancelled
        return upload

    def _tail_key(self, upload: Upload) -> str:
        return f"uploads/{upload.tenant}/{upload.upload_id}.tail"

    async def complete(self, upload: Upload) -> StoredFile:
        if upload.offset != upload.size:
            raise FileError(
                409, "the upload is not complete", offset=upload.offset, size=upload.size
            )
        store = self.stores[upload.store]
        parts = list(upload.parts)
        if upload.tail:
            data = await self.meta.get(self._tail_key(upload))
            number = max([p["PartNumber"] for p in parts], default=0) + 1
            answer = await store.client.upload_part(
                Bucket=store.bucket,
                Key=upload.key,
                UploadId=upload.s3_upload_id,
                PartNumber=number,
                Body=data,
            )
            parts.append({"PartNumber": number, "ETag": answer["ETag"]})
        if not parts:
            raise FileError(422, "a zero-byte file is never accepted")
        await store.client.complete_multipart_upload(
            Bucket=store.bucket,
            Key=upload.key,
            UploadId=upload.s3_upload_id,
            MultipartUpload={"Parts": parts},
        )
        hashed, hasher = self.hashers.pop(upload.upload_id, (-1, None))
        digest = hasher.hexdigest() if hasher is not None and hashed == upload.size else None
        head = await store.client.head_object(Bucket=store.bucket, Key=upload.key)
        stored_size = int(head["ContentLength"])
        if digest is None:
            digest = await self._hash_object(store, upload.key)
        if stored_size != upload.size or digest != upload.sha256 or stored_size == 0:
            await store.delete(upload.key)
            await self._drop_upload(upload)
            raise FileError(
                422,
                "checksum mismatch: the file is not stored; upload it again",
                expected_sha256=upload.sha256,
                received_sha256=digest,
                received_bytes=stored_size,
            )
        stored = StoredFile(
            file_id=upload.key.rsplit("/", 1)[1],
            tenant=upload.tenant,
            name=upload.name,
            size=upload.size,
            sha256=digest,
            content_type=upload.content_type,
            labels=upload.labels,
            store=upload.store,
            rule=upload.rule,
            key=upload.key,
            created_at=datetime.now(UTC),
        )
        await self.meta.put(
            f"files-meta/{stored.tenant}/{stored.file_id}.json", encode(stored), "application/json"
        )
        await self._drop_upload(upload)
        log.info("file stored", extra={"file": stored.file_id, "store": stored.store})
        return stored

    async def _hash_object(self, store: Store, key: str) -> str:
        hasher = hashlib.sha256()
        response = await store.client.get_object(Bucket=store.bucket, Key=key)
        body = response["Body"]
        try:
            async for chunk in body.iter_chunks(1 << 20):
                hasher.update(chunk)
        finally:
            body.close()
        return hasher.hexdigest()

    async def _drop_upload(self, upload: Upload) -> None:
        if upload.tail:
            await self.meta.delete(self._tail_key(upload))
        await self.meta.delete(f"uploads/{upload.tenant}/{upload.upload_id}.json")
        self.hashers.pop(upload.upload_id, None)

    async def abort(self, upload: Upload) -> None:
        store = self.stores[upload.store]
        with contextlib.suppress(ClientError):
            await store.client.abort_multipart_upload(
                Bucket=store.bucket, Key=upload.key, UploadId=upload.s3_upload_id
            )
        await self._drop_upload(upload)

    async def expire(self, older_than_seconds: float | None = None) -> int:
        """Abort and remove uploads untouched for the expiry time; return how many."""
        limit = older_than_seconds
        if limit is None:
            limit = self.settings.storage_upload_expiry_seconds
        cutoff = time.time() - limit
        count = 0
        for upload in await self.uploads_of():
            if upload.updated_at.timestamp() <= cutoff:
                await self.abort(upload)
                log.info("abandoned upload removed", extra={"upload": upload.upload_id})
                count += 1
        return count

    # ------------------------------------------------------------------ reading

    def may_read(self, request: web.Request, stored: StoredFile) -> bool:
        return request.app[REGISTRY_KEY].may_read(
            authenticated_tenant(request).tenant,
            owner=stored.tenant,
            visibility="private",
            insight_type=file_grant_type(stored.labels.get("kind", "")),
        )


# --------------------------------------------------------------------------- routes

FILES_KEY = web.AppKey("files", FileStore)


def _offset_of(request: web.Request) -> int:
    raw = request.headers.get("Upload-Offset")
    if raw is None or not raw.isdigit():
        raise FileError(400, "Upload-Offset must be the byte offset to continue from")
    return int(raw)


def _upload_view(upload: Upload) -> dict[str, Any]:
    return {
        "upload_id": upload.upload_id,
        "offset": upload.offset,
        "size": upload.size,
        "store": upload.store,
        "rule": upload.rule,
        "labels": upload.labels,
        "file_id": upload.key.rsplit("/", 1)[1],
        "part_bytes": None,
    }


async def create_upload(request: web.Request) -> web.Response:
    tenant = authenticated_tenant(request).tenant
    try:
        body = UploadRequest.model_validate(decode(await request.read()))
    except DecodeError:
        raise FileError(400, "body must be JSON") from None
    except ValidationError as error:
        raise FileError(
            422, "invalid upload", errors=error.errors(include_url=False, include_input=False)
        ) from None
    files = request.app[FILES_KEY]
    upload = await files.start(tenant, body)
    view = _upload_view(upload)
    view["part_bytes"] = files.settings.storage_part_bytes
    return json_response(view, status=201, headers={"Upload-Offset": "0"})


async def upload_status(request: web.Request) -> web.Response:
    tenant = authenticated_tenant(request).tenant
    upload = await request.app[FILES_KEY].load_upload(tenant, request.match_info["upload_id"])
    return json_response(_upload_view(upload), headers={"Upload-Offset": str(upload.offset)})


async def append_upload(request: web.Request) -> web.Response:
    tenant = authenticated_tenant(request).tenant
    files = request.app[FILES_KEY]
    upload_id = request.match_info["upload_id"]
    async with files._lock(f"upload:{upload_id}"):
        upload = await files.load_upload(tenant, upload_id)
        offset = _offset_of(request)
        upload = await files.append(upload, offset, request.content)
    return json_response(_upload_view(upload), headers={"Upload-Offset": str(upload.offset)})


async def complete_upload(request: web.Request) -> web.Response:
    tenant = authenticated_tenant(request).tenant
    files = request.app[FILES_KEY]
    upload_id = request.match_info["upload_id"]
    async with files._lock(f"upload:{upload_id}"):
        upload = await files.load_upload(tenant, upload_id)
        stored = await files.complete(upload)
    return json_response(stored.model_dump(mode="json"), status=201)


async def cancel_upload(request: web.Request) -> web.Response:
    tenant = authenticated_tenant(request).tenant
    files = request.app[FILES_KEY]
    upload = await files.load_upload(tenant, request.match_info["upload_id"])
    await files.abort(upload)
    return web.Response(status=204)


async def list_files(request: web.Request) -> web.Response:
    """The caller's files, and the files others shared with it."""
    reader = authenticated_tenant(request).tenant
    files = request.app[FILES_KEY]
    registry = request.app[REGISTRY_KEY]
    owners = {reader} | {g.owner for g in registry.grants_to(reader)}
    found = []
    for owner in sorted(owners):
        for stored in await files.files_of(owner):
            if files.may_read(request, stored):
                found.append(stored.model_dump(mode="json"))
    return json_response({"count": len(found), "files": found})


_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(first, last)`` inclusive of a single ``bytes=`` range; None for the whole file;
    ``ValueError`` when it cannot be served (416)."""
    if not header:
        return None
    match = _RANGE.match(header.strip())
    if match is None or (not match.group(1) and not match.group(2)):
        raise ValueError("only one bytes=first-last range is served")
    first_text, last_text = match.groups()
    if not first_text:  # the last n bytes
        n = int(last_text)
        if n == 0:
            raise ValueError("an empty suffix range")
        return max(0, size - n), size - 1
    first = int(first_text)
    last = min(int(last_text), size - 1) if last_text else size - 1
    if first >= size or last < first:
        raise ValueError("the range is outside the file")
    return first, last


async def stream_object(
    request: web.Request,
    store: Store,
    key: str,
    size: int,
    *,
    content_type: str,
    filename: str | None = None,
    sha256: str | None = None,
) -> web.StreamResponse:
    """Stream an object (or the requested range of it) to the client, chunk by chunk."""
    try:
        wanted = parse_range(request.headers.get("Range"), size)
    except ValueError as error:
        return json_response(
            {"error": str(error)}, status=416, headers={"Content-Range": f"bytes */{size}"}
        )
    params: dict[str, Any] = {"Bucket": store.bucket, "Key": key}
    response = web.StreamResponse(status=200 if wanted is None else 206)
    response.content_type = content_type
    response.headers["Accept-Ranges"] = "bytes"
    if sha256:
        response.headers["X-Content-SHA256"] = sha256
    if filename:
        response.headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    if wanted is None:
        response.content_length = size
    else:
        first, last = wanted
        params["Range"] = f"bytes={first}-{last}"
        response.content_length = last - first + 1
        response.headers["Content-Range"] = f"bytes {first}-{last}/{size}"
    answer = await store.client.get_object(**params)
    await response.prepare(request)
    body = answer["Body"]
    try:
        async for chunk in body.iter_chunks(1 << 20):
            await response.write(chunk)
    finally:
        body.close()
    await response.write_eof()
    return response


async def download_file(request: web.Request) -> web.StreamResponse:
    files = request.app[FILES_KEY]
    stored = await files.load_file(request.match_info["file_id"])
    if not files.may_read(request, stored):
        raise FileError(403, "no agreement lets you read this file")
    return await stream_object(
        request,
        files.stores[stored.store],
        stored.key,
        stored.size,
        content_type=stored.content_type,
        filename=stored.name,
        sha256=stored.sha256,
    )


async def delete_file(request: web.Request) -> web.Response:
    tenant = authenticated_tenant(request).tenant
    files = request.app[FILES_KEY]
    stored = await files.load_file(request.match_info["file_id"])
    if stored.tenant != tenant:
        raise FileError(403, "only the owner deletes a file")
    await files.stores[stored.store].delete(stored.key)
    await files.meta.delete(f"files-meta/{stored.tenant}/{stored.file_id}.json")
    return web.Response(status=204)


@web.middleware
async def file_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except FileError as error:
        return error.response()


def setup_file_routes(app: web.Application) -> None:
    app.router.add_post("/v1/files/uploads", create_upload)
    app.router.add_get("/v1/files/uploads/{upload_id}", upload_status)
    app.router.add_patch("/v1/files/uploads/{upload_id}", append_upload)
    app.router.add_post("/v1/files/uploads/{upload_id}/complete", complete_upload)
    app.router.add_delete("/v1/files/uploads/{upload_id}", cancel_upload)
    app.router.add_get("/v1/files", list_files)
    app.router.add_get("/v1/files/{file_id}", download_file)
    app.router.add_delete("/v1/files/{file_id}", delete_file)
