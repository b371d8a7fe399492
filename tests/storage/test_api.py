"""The partner API of the storage service on both real stores: resumable uploads, downloads
with ranges, quotas, checksums, expiry, links, the catalog and the insight history."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from schemas.control import Grant
from services.storage.app import create_app
from services.storage.files import FILES_KEY
from services.storage.settings import StorageSettings
from shared.control import new_id
from shared.httpauth import REGISTRY_KEY
from tests.insight_helpers import Network, network

pytestmark = pytest.mark.integration


@dataclass
class Api:
    net: Network
    url: str
    app: Any
    session: aiohttp.ClientSession

    def auth(self, tenant: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.net.keys[tenant]}"}

    async def call(self, method: str, path: str, tenant: str, **kw: Any) -> tuple[int, Any]:
        async with self.session.request(
            method, self.url + path, headers={**self.auth(tenant), **kw.pop("headers", {})}, **kw
        ) as response:
            body = await response.read()
            try:
                return response.status, await response.json(content_type=None)
            except ValueError:
                return response.status, body

    async def upload(self, tenant: str, data: bytes, **labels: str) -> tuple[int, Any]:
        status, started = await self.call(
            "POST",
            "/v1/files/uploads",
            tenant,
            json={
                "name": "drawing.bin",
                "size": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "labels": {"sensitivity": "confidential", "kind": "drawing", **labels},
            },
        )
        if status != 201:
            return status, started
        upload_id = started["upload_id"]
        status, _ = await self.call(
            "PATCH",
            f"/v1/files/uploads/{upload_id}",
            tenant,
            data=data,
            headers={"Upload-Offset": "0"},
        )
        assert status == 200
        return await self.call("POST", f"/v1/files/uploads/{upload_id}/complete", tenant)

    async def grant(
        self, owner: str, grantee: str, types: list[str], expires_at: datetime | None = None
    ) -> Grant:
        grant = Grant(
            grant_id=new_id(),
            owner=owner,
            grantee=grantee,
            insight_types=types,
            created_at=datetime.now(UTC),
            expires_at=expires_at,
        )
        await self.net.writer.put_grant(grant)
        async with asyncio.timeout(30):
            registry = self.app[REGISTRY_KEY]
            while grant.grant_id not in registry.grants:
                await registry.wait_changed(registry.version, 1)
        return grant


@pytest.fixture
async def api(storage_settings: StorageSettings) -> AsyncIterator[Api]:
    settings = storage_settings.model_copy(
        update={"storage_archive": False, "storage_tenant_quotas": {}}
    )
    async with network(settings) as net:
        quotas = {net.b: 1000}
        settings = settings.model_copy(update={"storage_tenant_quotas": quotas})
        app = create_app(settings)
        async with TestServer(app, host="127.0.0.1") as server, aiohttp.ClientSession() as session:
            yield Api(net, str(server.make_url("")).rstrip("/"), app, session)


async def test_an_upload_cut_at_any_byte_resumes_to_the_same_sha256(api: Api) -> None:
    a = api.net.a
    data = os.urandom(11 * 1024 * 1024 + 12345)  # two full parts and a tail
    digest = hashlib.sha256(data).hexdigest()
    status, started = await api.call(
        "POST",
        "/v1/files/uploads",
        a,
        json={
            "name": "big.bin",
            "size": len(data),
            "sha256": digest,
            "labels": {"sensitivity": "confidential", "kind": "drawing"},
        },
    )
    assert status == 201 and started["store"] == "private"
    upload_id = started["upload_id"]
    cut = 6 * 1024 * 1024 + 777  # mid-part: a client that goes away after this byte
    where = urlsplit(api.url)
    head = (
        f"PATCH /v1/files/uploads/{upload_id} HTTP/1.1\r\nHost: {where.netloc}\r\n"
        f"Authorization: Bearer {api.net.keys[a]}\r\nUpload-Offset: 0\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode()
    _, writer = await asyncio.open_connection(where.hostname, where.port)
    writer.write(head + data[:cut])
    await writer.drain()
    writer.close()  # the client goes away mid-body, Content-Length not reached
    await writer.wait_closed()
    offset = 0
    async with asyncio.timeout(30):
        while offset != cut:
            await asyncio.sleep(0.1)
            status, state = await api.call("GET", f"/v1/files/uploads/{upload_id}", a)
            offset = state["offset"]
    # the wrong offset is refused with the right one
    status, refused = await api.call(
        "PATCH", f"/v1/files/uploads/{upload_id}", a, data=b"x", headers={"Upload-Offset": "0"}
    )
    assert status == 409 and refused["offset"] == cut
    status, _ = await api.call("POST", f"/v1/files/uploads/{upload_id}/complete", a)
    assert status == 409  # not complete yet
    status, _ = await api.call(
        "PATCH",
        f"/v1/files/uploads/{upload_id}",
        a,
        data=data[cut:],
        headers={"Upload-Offset": str(cut)},
    )
    assert status == 200
    status, stored = await api.call("POST", f"/v1/files/uploads/{upload_id}/complete", a)
    assert status == 201, stored
    assert stored["sha256"] == digest and stored["size"] == len(data)
    status, body = await api.call("GET", f"/v1/files/{stored['file_id']}", a)
    assert status == 200 and hashlib.sha256(body).hexdigest() == digest
    status, part = await api.call(
        "GET", f"/v1/files/{stored['file_id']}", a, headers={"Range": "bytes=100-199"}
    )
    assert status == 206 and part == data[100:200]
    status, _ = await api.call(
        "GET", f"/v1/files/{stored['file_id']}", a, headers={"Range": f"bytes={len(data)}-"}
    )
    assert status == 416
    # the private store holds it, the public bucket does not
    files = api.app[FILES_KEY]
    assert await files.stores["private"].get_or_none(f"files/{a}/{stored['file_id']}") is not None
    assert await files.stores["public"].get_or_none(f"files/{a}/{stored['file_id']}") is None


async def test_bad_uploads_are_refused_and_nothing_stored_is_lost(api: Api) -> None:
    a, b = api.net.a, api.net.b
    status, kept = await api.upload(a, b"the first drawing")
    assert status == 201
    # wrong checksum: refused after the bytes arrived, nothing kept
    status, started = await api.call(
        "POST",
        "/v1/files/uploads",
        a,
        json={
            "name": "x",
            "size": 5,
            "sha256": "0" * 64,
            "labels": {"sensitivity": "internal", "kind": "export"},
        },
    )
    assert status == 201 and started["store"] == "public"
    await api.call(
        "PATCH",
        f"/v1/files/uploads/{started['upload_id']}",
        a,
        data=b"hello",
        headers={"Upload-Offset": "0"},
    )
    status, refused = await api.call(
        "POST", f"/v1/files/uploads/{started['upload_id']}/complete", a
    )
    assert status == 422 and "checksum" in refused["error"]
    # a zero-byte file, unknown labels, a forbidden or missing target: clear errors
    status, _ = await api.upload(a, b"")
    assert status == 422
    status, refused = await api.upload(a, b"abc", colour="red")
    assert status == 422 and "unknown label" in refused["error"]
    status, refused = await api.upload(a, b"abc", sensitivity="secret")
    assert status == 422
    # over quota (b may hold 1000 bytes)
    status, refused = await api.upload(b, b"y" * 1001)
    assert status == 413 and refused["quota_bytes"] == 1000
    status, _ = await api.upload(b, b"y" * 600)
    assert status == 201
    status, refused = await api.upload(b, b"y" * 600)
    assert status == 413 and refused["used_bytes"] == 600
    # what was stored before is still there and intact
    status, body = await api.call("GET", f"/v1/files/{kept['file_id']}", a)
    assert status == 200 and body == b"the first drawing"
    status, listing = await api.call("GET", "/v1/files", a)
    assert [f["file_id"] for f in listing["files"]] == [kept["file_id"]]


async def test_abandoned_uploads_expire(api: Api) -> None:
    a = api.net.a
    status, started = await api.call(
        "POST",
        "/v1/files/uploads",
        a,
        json={
            "name": "x",
            "size": 10,
            "sha256": "1" * 64,
            "labels": {"sensitivity": "confidential", "kind": "contract"},
        },
    )
    assert status == 201
    await api.call(
        "PATCH",
        f"/v1/files/uploads/{started['upload_id']}",
        a,
        data=b"12345",
        headers={"Upload-Offset": "0"},
    )
    files = api.app[FILES_KEY]
    assert await files.expire(older_than_seconds=3600) == 0
    assert await files.expire(older_than_seconds=0) >= 1
    status, _ = await api.call("GET", f"/v1/files/uploads/{started['upload_id']}", a)
    assert status == 404


async def test_links_cover_only_what_a_grant_covers_and_expire_at_the_earliest_end(
    api: Api,
) -> None:
    a, b, bank = api.net.a, api.net.b, api.net.bank
    status, private = await api.upload(
        a, b"contract text", sensitivity="confidential", kind="contract"
    )
    status2, public = await api.upload(a, b"export rows", sensitivity="internal", kind="export")
    assert (status, status2) == (201, 201) and public["store"] == "public"
    # strangers: no download, no link
    status, _ = await api.call("GET", f"/v1/files/{private['file_id']}", b)
    assert status == 403
    status, _ = await api.call("POST", "/v1/links", b, json={"file_id": private["file_id"]})
    assert status == 403
    # the owner: a link limited by the store (7 days at most) or the request
    status, link = await api.call(
        "POST", "/v1/links", a, json={"file_id": private["file_id"], "expires_in": 10**7}
    )
    assert status == 201 and link["limited_by"] == "store" and link["expires_in"] <= 7 * 86400
    async with api.session.get(link["url"]) as response:  # no key: the link is the proof
        assert response.status == 200 and await response.read() == b"contract text"
    tampered = link["url"][:-3] + ("AAA" if not link["url"].endswith("AAA") else "BBB")
    async with api.session.get(tampered) as response:
        assert response.status == 403
    # a grantee: the link ends with the grant
    ends = datetime.now(UTC) + timedelta(hours=1)
    await api.grant(a, bank, ["file.contract", "file.export"], expires_at=ends)
    status, link = await api.call(
        "POST", "/v1/links", bank, json={"file_id": private["file_id"], "expires_in": 86400}
    )
    assert status == 201 and link["limited_by"] == "grant"
    assert datetime.fromisoformat(link["expires_at"]) <= ends
    async with api.session.get(link["url"]) as response:
        assert response.status == 200
    status, link = await api.call(
        "POST", "/v1/links", bank, json={"file_id": public["file_id"], "expires_in": 60}
    )
    assert status == 201 and link["limited_by"] == "requested" and link["store"] == "public"
    async with api.session.get(link["url"]) as response:  # an S3 presigned URL
        assert response.status == 200 and await response.read() == b"export rows"
    async with api.session.get(link["url"].replace("Signature=", "Signature=0")) as response:
        assert response.status == 403
    status, body = await api.call("GET", f"/v1/files/{private['file_id']}", bank)
    assert status == 200 and body == b"contract text"
    # the catalog: what, where, under which rule, who may read
    status, catalog = await api.call("GET", "/v1/catalog", a)
    assert status == 200
    entries = {e["file_id"]: e for e in catalog["entries"] if e["what"] == "file"}
    assert entries[private["file_id"]]["store"] == "private"
    assert entries[private["file_id"]]["rule"] == "confidential-stays-private"
    assert entries[private["file_id"]]["readers"] == sorted([a, bank])
    status, theirs = await api.call("GET", "/v1/catalog", b)
    assert all(e.get("file_id") not in entries for e in theirs["entries"])


async def test_without_a_key_nothing_is_served(api: Api) -> None:
    async with api.session.get(api.url + "/v1/catalog") as response:
        assert response.status == 401
    async with api.session.get(api.url + "/v1/insights/history") as response:
        assert response.status == 401
    async with api.session.get(api.url + "/healthz") as response:
        assert response.status == 200
