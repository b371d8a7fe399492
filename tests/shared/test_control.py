from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiokafka import ConsumerRecord, TopicPartition

from schemas.control import Grant, Tenant
from schemas.topics import CONTROL_TENANTS
from shared.codec import encode
from shared.control import (
    ControlRegistry,
    ControlWriter,
    issue_api_key,
    may_read,
    new_id,
    parse_api_key,
)
from shared.settings import XietongSettings, load_settings

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


def offline_registry() -> ControlRegistry:
    """A registry that is never started: its waiting and applying need no broker."""
    return ControlRegistry(load_settings(kafka_bootstrap_servers="127.0.0.1:1"))


def finishes(scenario: Callable[[], Coroutine[Any, Any, None]], timeout: float) -> bool:
    """Run ``scenario`` on its own loop in a thread: a deadlocked loop fails the test, not CI."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            asyncio.run(scenario())
            outcome.append(None)
        except BaseException as error:
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if outcome and outcome[0] is not None:
        raise outcome[0]
    return bool(outcome)


def test_cancelled_waiters_never_break_the_registry() -> None:
    assert finishes(cancel_waiters_at_random_moments, timeout=20), "the registry deadlocked"


async def cancel_waiters_at_random_moments() -> None:
    # Streams wait for changes and are cancelled when their clients go away, at any moment.
    # Before the fix, a waiter cancelled while re-acquiring the condition's lock raised
    # "Lock is not acquired" and left the lock held: the tail's next apply blocked forever,
    # so revocations stopped reaching the gateway (it failed open).
    registry = offline_registry()
    for round_ in range(30):
        waiters = [
            asyncio.create_task(registry.wait_changed(registry.version, 0.001 * (i % 5)))
            for i in range(40)
        ]
        await asyncio.sleep(0.001 * (round_ % 4))
        for i, waiter in enumerate(waiters):
            if i % 3 == 0:
                waiter.cancel()
        before = registry.version
        registry.apply({})  # synchronous now: no waiter can hold it up
        assert registry.version == before + 1
        results = await asyncio.gather(*waiters, return_exceptions=True)
        assert not [r for r in results if isinstance(r, RuntimeError)]


async def test_a_waiter_wakes_on_the_next_change() -> None:
    registry = offline_registry()
    waiter = asyncio.create_task(registry.wait_changed(registry.version, 30))
    await asyncio.sleep(0)
    registry.apply({})
    async with asyncio.timeout(5):
        assert await waiter == registry.version


async def test_keyless_unreadable_and_mis_keyed_control_records_are_skipped() -> None:
    # Before: record.key.decode() raised in the tail task, which died silently; from then on
    # the registry applied nothing (keys issued later: 401; keys revoked later: still valid).
    # (A compacted topic refuses keyless records, but a control topic created by hand may not be
    # compacted, and the registry must not depend on how its topics were made.)
    registry = offline_registry()
    tenant = Tenant(tenant="acme", name="Acme", created_at=T0)
    good = encode(tenant)
    records = [
        ConsumerRecord(CONTROL_TENANTS, 0, n, 0, 0, key, value, None, 0, 0, [])
        for n, (key, value) in enumerate(
            [
                (None, good),
                (b"acme", b"{not json"),
                (b"rival", good),  # filed under another id: would shadow that tenant
                (b"acme", good),
            ]
        )
    ]
    registry.apply({TopicPartition(CONTROL_TENANTS, 0): records})
    assert registry.tenants == {"acme": tenant}
