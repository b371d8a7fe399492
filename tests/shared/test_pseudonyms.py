"""Pseudonyms per sharing agreement: the pure re-keying every read path applies."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from schemas.control import Grant
from schemas.insights import TextInsight
from shared.pseudonyms import as_read, grant_key, owner_key, pseudonym, rekey, rendering_grant
from tests.insight_helpers import provenance

NETWORK = b"n" * 32
T0 = datetime(2026, 11, 1, tzinfo=UTC)
PHONE = "13812345678"


def grant(grantee: str, grant_id: str, minutes: int = 0) -> Grant:
    return Grant(
        grant_id=grant_id,
        owner="acme",
        grantee=grantee,
        insight_types=["text_insight"],
        created_at=T0 + timedelta(minutes=minutes),
    )


def text_insight(*values: str) -> TextInsight:
    key = owner_key(NETWORK, "acme")
    return TextInsight(
        tenant="acme",
        provenance=provenance(),
        document_event_id=uuid.uuid4(),
        language="zh",
        entities=sorted(pseudonym(key, "PHONE", v) for v in values),
    )


def test_two_grantees_see_different_pseudonyms_the_owner_its_own() -> None:
    doc = text_insight(PHONE)
    bank, rival = grant("bank", "grantbank01"), grant("rival", "grantrival1")
    owner_view = as_read(doc, [], NETWORK)
    bank_view, rival_view = as_read(doc, [bank], NETWORK), as_read(doc, [rival], NETWORK)
    assert owner_view is doc
    assert len({owner_view.entities[0], bank_view.entities[0], rival_view.entities[0]}) == 3
    assert all(e.startswith("PHONE:") for e in bank_view.entities + rival_view.entities)
    assert bank_view.entities == [rekey(grant_key(NETWORK, "grantbank01"), doc.entities[0])]
    for view in (owner_view, bank_view, rival_view):
        assert PHONE not in view.model_dump_json()
    assert doc.entities[0] not in bank_view.model_dump_json()


def test_one_grantee_sees_one_pseudonym_per_value_across_documents() -> None:
    bank = grant("bank", "grantbank01")
    first, second = text_insight(PHONE), text_insight(PHONE, "13900000000")
    seen_first = as_read(first, [bank], NETWORK).entities
    seen_second = as_read(second, [bank], NETWORK).entities
    assert set(seen_first) < set(seen_second)
    assert len(set(seen_second)) == 2


def test_the_oldest_agreement_renders_so_a_new_grant_changes_nothing() -> None:
    old, new = grant("bank", "grantold001", 0), grant("bank", "grantnew001", 5)
    doc = text_insight(PHONE)
    assert rendering_grant([new, old]) is old
    assert as_read(doc, [new, old], NETWORK) == as_read(doc, [old], NETWORK)


def test_without_the_network_secret_a_grantee_gets_no_pseudonyms() -> None:
    doc = text_insight(PHONE)
    assert as_read(doc, [grant("bank", "grantbank01")], None).entities == []
    assert as_read(doc, [], None) is doc
