from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from schemas.control import Grant, Tenant
from shared.control import (
    ControlRegistry,
    ControlWriter,
    issue_api_key,
    may_read,
    new_id,
    parse_api_key,
)
from shared.settings import XietongSettings

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def grant(**changes: object) -> Grant:
    base = {
        "grant_id": "g1234567",
        "owner": "acme",
        "grantee": "bank",
        "insight_types": ["statistics"],
        "created_at": T0,
        "expires_at": T0 + timedelta(days=30),
    }
    return Grant.model_validate({**base, **changes})


def test_owner_and_public_are_always_readable_others_need_an_active_grant() -> None:
    rule = {
        "owner": "acme",
        "visibility": "private",
        "insight_type": "statistics",
        "at": T0 + timedelta(days=1),
    }
    assert may_read("acme", grants=[], **rule)  # type: ignore[arg-type]
    assert not may_read("rival", grants=[], **rule)  # type: ignore[arg-type]
    assert may_read("rival", grants=[], **{**rule, "visibility": "public"})  # type: ignore[arg-type]
    assert may_read("bank", grants=[grant()], **rule)  # type: ignore[arg-type]
    assert not may_read("bank", grants=[grant(insight_types=["prediction"])], **rule)  # type: ignore[arg-type]
    assert not may_read("bank", grants=[grant(expires_at=T0)], **rule)  # type: ignore[arg-type]
    assert not may_read("bank", grants=[grant(revoked_at=T0)], **rule)  # type: ignore[arg-type]
    assert not may_read("rival", grants=[grant()], **rule)  # type: ignore[arg-type]


def test_api_keys_parse_and_store_only_a_digest() -> None:
    plaintext, record = issue_api_key("acme")
    key_id, secret = parse_api_key(plaintext)  # type: ignore[misc]
    assert key_id == record.key_id and secret not in record.model_dump_json()
    assert parse_api_key("Bearer nonsense") is None


@pytest.mark.integration
async def test_registry_sees_tenants_keys_and_revocations(settings: XietongSettings) -> None:
    tenant = f"t{new_id()}"
    plaintext, key = issue_api_key(tenant)
    async with ControlWriter(settings) as writer, ControlRegistry(settings) as registry:
        await writer.put_tenant(
            Tenant(tenant=tenant, name="Acme", industry="fasteners", created_at=T0)
        )
        await writer.put_key(key)
        async with asyncio.timeout(20):
            while registry.authenticate(plaintext) is None:
                await registry.wait_changed(registry.version, 1)
        assert registry.authenticate(plaintext).tenant == tenant  # type: ignore[union-attr]
        assert registry.authenticate(plaintext + "x") is None
        await writer.put_key(key.model_copy(update={"revoked_at": datetime.now(UTC)}))
        async with asyncio.timeout(20):
            while registry.authenticate(plaintext) is not None:
                await registry.wait_changed(registry.version, 1)

    # A new replica rebuilds the same state from the compacted topics.
    async with ControlRegistry(settings) as fresh:
        assert fresh.tenant(tenant) is not None and fresh.authenticate(plaintext) is None
