"""The clean hop's on-disk store, without a broker."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.clean.store import PartitionStore, digest


@pytest.fixture
def store(tmp_path: Path) -> Iterator[PartitionStore]:
    opened = PartitionStore(tmp_path / "0", memory_mb=1)
    yield opened
    opened.close()


def test_an_id_counts_as_seen_from_when_it_was_cleaned(store: PartitionStore) -> None:
    a, b = uuid.uuid4().bytes, uuid.uuid4().bytes
    store.write({a: 1_000})
    assert store.seen_since([a, b], 1_000) == [True, False]
    assert store.seen_since([a], 1_001) == [False]
    assert store.seen_since([], 0) == []


def test_expiry_removes_what_is_older_and_keeps_an_id_cleaned_again(
    store: PartitionStore,
) -> None:
    old, again, recent = (uuid.uuid4().bytes for _ in range(3))
    store.write({old: 1_000, again: 1_000})
    store.write({again: 5_000, recent: 4_000})  # forgotten by the hop, then cleaned again
    assert store.expire(3_000) == 2
    assert store.seen_since([old, again, recent], 0) == [False, True, True]
    assert store.expire(3_000) == 0  # nothing left before that moment
    assert store.expire(6_000) == 2
    assert store.seen_since([again, recent], 0) == [False, False]


def test_expiry_works_off_a_backlog_in_bounded_steps_oldest_first(store: PartitionStore) -> None:
    ids = [uuid.uuid4().bytes for _ in range(25)]
    store.write({event_id: 1_000 + i for i, event_id in enumerate(ids)})
    assert store.expire(2_000, limit=10) == 10
    assert store.seen_since(ids, 0) == [False] * 10 + [True] * 15
    assert store.expire(2_000, limit=10) == 10
    assert store.expire(2_000, limit=10) == 5
    assert store.expire(2_000, limit=10) == 0
    assert store.seen_since(ids, 0) == [False] * 25


def test_windows_carry_values_and_checkpoint_are_written_together_and_read_back(
    tmp_path: Path,
) -> None:
    store = PartitionStore(tmp_path / "3", memory_mb=1)
    assert store.checkpoint is None
    store.write(
        {},
        windows={("acme", "sales.quantity"): [1.5, 2.0, 1.5]},
        carry={("acme", "sales_order_line", ("BOLT-M8", "pcs"), "unit_price"): (4.25, 1.7e9)},
        checkpoint=42,
        tail=digest(b"the record at 41"),
    )
    store.close()
    reopened = PartitionStore(tmp_path / "3", memory_mb=1)
    try:
        assert reopened.checkpoint == 42
        assert reopened.tail == digest(b"the record at 41") != digest(b"another record")
        assert dict(reopened.windows()) == {("acme", "sales.quantity"): [1.5, 2.0, 1.5]}
        assert dict(reopened.carried()) == {
            ("acme", "sales_order_line", ("BOLT-M8", "pcs"), "unit_price"): (4.25, 1.7e9)
        }
    finally:
        reopened.close()
    PartitionStore.destroy(tmp_path / "3")
    assert not (tmp_path / "3").exists()
