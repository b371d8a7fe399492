"""nlp rows: the service's batch work against the plain pipeline on the same documents.

``nlp.docs`` — :func:`services.nlp.handlers.analyse_batch` (decode, redact, tokenise, one
``transform`` + ``predict_proba`` per task and language, insights encoded, windows) over
batches of 500 clean ``text_document`` events, against the plain pipeline: tokenise (jieba
precise / nltk RegexpTokenizer) + ``vectorizer.transform`` + ``predict_proba`` in batches of
500 (target >= 0.7), and against the same plain pipeline one document at a time (>= 3).
``nlp.redact`` — MB/s of :func:`services.nlp.redact.redact` on the same mixed texts, one core
(target >= 10). Both in-process, same documents, interleaved repeats; no broker.
"""

from __future__ import annotations

import random
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import orjson

from services.nlp.classify import KIND_TASK
from services.nlp.corpus import generate, load_zh_sentiment
from services.nlp.handlers import Keys, Limits, Models, analyse_batch
from services.nlp.tokens import load_jieba, tokenize
from services.nlp.training import to_examples
from services.nlp.windows import PartitionTexts


class _Record(NamedTuple):
    topic: str
    partition: int
    offset: int
    key: bytes
    value: bytes
    timestamp: int


def _documents(n: int) -> list[dict[str, Any]]:
    rng = random.Random(5)
    zh = load_zh_sentiment()
    pool = [(d.text, "zh", "customer_feedback") for d in zh[:1000]]
    pool += [(d.text, "en", "customer_feedback") for d in generate("sentiment", "en", 500, seed=9)]
    pool += [
        (d.text, d.language, "supplier_note")
        for lang in ("en", "zh")
        for d in generate("topic", lang, 500, seed=11)
    ]
    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    out = []
    for i in range(n):
        text, language, kind = rng.choice(pool)
        out.append(
            {
                "event_id": str(uuid.uuid4()),
                "tenant": f"firm-{i % 8}",
                "type": "text_document",
                "schema_version": 1,
                "occurred_at": (t0 + timedelta(minutes=i)).isoformat(),
                "source": {"system": "sdk"},
                "payload": {"kind": kind, "language": language, "text": text},
            }
        )
    return out


def _models() -> Models:
    from services.nlp.classify import train

    out = {}
    for task in ("sentiment", "topic"):
        for language in ("en", "zh"):
            data = (
                load_zh_sentiment()
                if (task, language) == ("sentiment", "zh")
                else generate(task, language, 1200, seed=7)
            )
            out[(task, language)], _ = train(to_examples(data, b"b" * 32), task, language)
    return Models(out)


def measure(n: int = 6000, repeats: int = 3) -> dict[str, float]:
    load_jieba()
    models = _models()
    events = _documents(n)
    values = [orjson.dumps(e) for e in events]
    key = b"k" * 32
    plain_docs = [
        (
            e["payload"]["text"],
            e["payload"]["language"],
            KIND_TASK.get(e["payload"]["kind"], "sentiment"),
        )
        for e in events
    ]
    ours: list[float] = []
    batched: list[float] = []
    single: list[float] = []
    redact_mb: list[float] = []

    def run_ours() -> float:
        windows = {0: PartitionTexts(86400, 3_600_000)}
        keys = Keys(key)
        start = time.perf_counter()
        for i in range(0, n, 500):
            records = [_Record("t", 0, j, b"", values[j], 0) for j in range(i, min(n, i + 500))]
            analyse_batch(records, models, windows, keys, Limits(), "t", datetime.now(UTC))
        return n / (time.perf_counter() - start)

    def run_plain(batch: int) -> float:
        start = time.perf_counter()
        for i in range(0, n, batch):
            groups: dict[tuple[str, str], list[list[str]]] = {}
            for text, language, task in plain_docs[i : i + batch]:
                groups.setdefault((task, language), []).append(tokenize(text, language, key).terms)
            for (task, language), docs in groups.items():
                model = models.classifiers[(task, language)]
                model.model.predict_proba(model.vectorizer.transform(docs))
        return n / (time.perf_counter() - start)

    def run_redact() -> float:
        from services.nlp.redact import redact

        texts = [t for t, _, _ in plain_docs]
        size = sum(len(t.encode()) for t in texts)
        start = time.perf_counter()
        for text in texts:
            redact(text, key)
        return size / (time.perf_counter() - start) / 1e6

    for r in range(repeats):
        for job in (
            (run_ours, ours),
            (lambda: run_plain(500), batched),
            (lambda: run_plain(1), single),
        )[:: 1 if r % 2 else -1]:
            job[1].append(job[0]())
        redact_mb.append(run_redact())
    return {
        "nlp.docs_per_s": statistics.median(ours),
        "plain.batched_docs_per_s": statistics.median(batched),
        "plain.single_docs_per_s": statistics.median(single),
        "nlp.docs_vs_batched": statistics.median(o / b for o, b in zip(ours, batched, strict=True)),
        "nlp.docs_vs_single": statistics.median(o / s for o, s in zip(ours, single, strict=True)),
        "nlp.redact_mb_per_s": statistics.median(redact_mb),
    }


if __name__ == "__main__":
    for name, value in measure().items():
        print(f"{name:28} {value:10.2f}")
