"""Text insights as each reader gets them: pseudonyms per sharing agreement on every read path.

The owner's text insights are published with owner-keyed pseudonyms, as the nlp service writes
them; the gateway's list and stream routes and the SDK's Subscriber re-key them per grant.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from schemas.insights import Insight, TextInsight
from services.nlp.redact import redact
from shared.pseudonyms import grant_key, owner_key, rekey
from shared.sdk import Subscriber
from shared.settings import XietongSettings
from tests.insight_helpers import Gateway, gateway_app, provenance, publish

pytestmark = pytest.mark.integration

PHONE = "13812345678"


@pytest.fixture
async def gateway(settings: XietongSettings) -> AsyncIterator[Gateway]:
    async with gateway_app(settings) as running:
        yield running


def owner_insight(settings: XietongSettings, owner: str, text: str) -> TextInsight:
    """What the nlp service publishes for ``text``: the owner's pseudonyms, never the value."""
    redacted = redact(text, owner_key(settings.network_key(), owner))
    return TextInsight(
        tenant=owner,
        provenance=provenance(),
        document_event_id=uuid.uuid4(),
        language="zh",
        entities=sorted(redacted.entities),
    )


def entities_by_doc(insights: list[Insight], owner: str) -> dict[str, list[str]]:
    return {
        str(i.document_event_id): i.entities
        for i in insights
        if isinstance(i, TextInsight) and i.tenant == owner
    }


async def test_each_agreement_has_its_own_pseudonyms_on_list_stream_and_subscriber(
    gateway: Gateway, settings: XietongSettings
) -> None:
    net = gateway.net
    first = owner_insight(settings, net.a, f"电话{PHONE}，请尽快发货")
    second = owner_insight(settings, net.a, f"call me on {PHONE} about the delay")
    owner_token = first.entities[0]
    assert second.entities == [owner_token]  # one value, one owner pseudonym

    async with (
        gateway.client(net.a) as a,
        gateway.client(net.b) as b,
        gateway.client(net.bank) as bank,
    ):
        to_b = await a.grant(net.b, ["text_insight"])
        to_bank = await a.grant(net.bank, ["text_insight"])
        await publish(settings, [first, second])
        await gateway.caught_up()
        # replay: the stream's own path (a reconnect on a busy broker replays them again)
        async with gateway.stream(net.b, types=["text_insight"], owner=net.a, replay=2) as stream:
            streamed: list[Insight] = []
            async with asyncio.timeout(60):
                async for insight in stream:
                    streamed.append(insight)
                    if len(streamed) == 2:
                        break
        listed = {
            reader: entities_by_doc(await client.insights(owner=net.a), net.a)
            for reader, client in ((net.a, a), (net.b, b), (net.bank, bank))
        }

    docs = {str(first.document_event_id), str(second.document_event_id)}
    assert all(set(seen) == docs for seen in listed.values())
    # The owner reads its own rendering.
    assert set(map(tuple, listed[net.a].values())) == {(owner_token,)}
    # A grantee sees one pseudonym for the value across documents, its agreement's.
    b_token = rekey(grant_key(settings.network_key(), to_b.grant_id), owner_token)
    bank_token = rekey(grant_key(settings.network_key(), to_bank.grant_id), owner_token)
    assert set(map(tuple, listed[net.b].values())) == {(b_token,)}
    assert set(map(tuple, listed[net.bank].values())) == {(bank_token,)}
    assert len({owner_token, b_token, bank_token}) == 3
    # The stream gives the grantee the same rendering as the list.
    assert entities_by_doc(streamed, net.a) == listed[net.b]

    # The SDK's Subscriber (trusted path over Kafka) renders as the gateway does.
    async with Subscriber(
        settings, net.bank, net.registry, types=["text_insight"], group_id=f"t.{uuid.uuid4()}"
    ) as subscriber:
        got: list[Insight] = []
        async with asyncio.timeout(60):
            while not await subscriber.at_end() or not got:
                got += await subscriber.poll(timeout_ms=200)
    assert entities_by_doc(got, net.a) == listed[net.bank]

    everything = repr([listed, streamed, got])
    assert PHONE not in everything and "138 1234" not in everything
