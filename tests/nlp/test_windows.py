"""Windows restart exactly from every commit point."""

from __future__ import annotations

import random

from services.nlp.windows import PartitionTexts, TextEvent

HOUR = 3_600_000


def events(seed: int) -> list[TextEvent]:
    rng = random.Random(seed)
    t = {"acme": 0, "globex": 0}
    out = []
    for offset in range(400):
        tenant = rng.choice(list(t))
        t[tenant] += rng.randint(0, 3 * HOUR) - (HOUR if rng.random() < 0.2 else 0)
        out.append(
            TextEvent(
                offset,
                tenant,
                max(0, t[tenant]),
                rng.choice(["en", "zh"]),
                tuple(rng.sample(["late", "price", "好", "差"], 2)),
                "sentiment",
                rng.choice(["positive", "negative"]),
            )
        )
    return out


def summaries(state: PartitionTexts, stream: list[TextEvent]) -> list[tuple[object, ...]]:
    out = []
    for event in stream:
        state.add(event)
        out += [
            (w.tenant, w.start_ms, w.documents, sorted(w.terms.items())) for w in state.close_due()
        ]
    return out


def test_restart_from_every_commit_point_closes_the_same_windows() -> None:
    stream = events(5)
    whole = summaries(PartitionTexts(86400, HOUR), stream)
    assert whole
    for cut in range(0, len(stream), 7):
        state = PartitionTexts(86400, HOUR)
        before = summaries(state, stream[:cut])
        point = state.commit_point()
        if point is None:
            continue
        offset, metadata = point
        again = PartitionTexts.restore(86400, HOUR, metadata)
        after = summaries(again, stream[offset:])
        assert before + [s for s in after if s not in before] == whole, cut


def test_metadata_stays_within_kafka_limit() -> None:
    state = PartitionTexts(86400, 0)
    for i in range(2000):
        state.add(TextEvent(2 * i, f"tenant-{i:05d}", 10 * 86_400_000, "en", (), None, None))
        state.add(TextEvent(2 * i + 1, f"tenant-{i:05d}", 12 * 86_400_000, "en", (), None, None))
    state.close_due()
    _, metadata = state.commit_point() or (0, "")
    assert len(metadata) <= 4096
    restored = PartitionTexts.restore(86400, 0, metadata)
    assert not restored.add(TextEvent(4001, "tenant-00000", 5 * 86_400_000, "en", (), None, None))
