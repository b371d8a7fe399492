"""nlp rows: the service against the plain pipeline on the same documents, in the same run.

In-process (no broker), each chunk of 500 documents run by every side in turn (rotating order,
CPU time of this process), so the drift of a shared machine falls on all sides alike:

- ``nlp.docs`` — :func:`services.nlp.handlers.analyse_batch` (decode, check, redact, tokenise,
  one ``transform`` + ``predict_proba`` per task and language, key terms, insights built and
  encoded, windows) over the chunk, against the plain pipeline: tokenise (jieba precise / nltk
  RegexpTokenizer) + ``vectorizer.transform`` + ``predict_proba`` per task and language over the
  same chunk (target >= 0.7).
- ``nlp.single`` — the same service work against the plain pipeline one document at a time
  (target >= 3).
- ``nlp.redact`` — MB/s of :func:`services.nlp.redact.redact` on the same mixed en/zh texts
  (about one in ten with a phone number, a resident id, an e-mail or a name), one core, over
  the 10 MB/s the issue asks for (target >= 1.0).

Through the broker (same documents pre-filled in a fresh topic, drained from the first fetch to
the append time of the last per-document insight):

- ``nlp.kafka`` — :func:`services.nlp.app.run_nlp` (the service: consumer group, windows,
  commit points, ``acks=all``) against the plain pipeline in-process over the same documents
  (information: what the Kafka hop costs).

A Faust agent running the same handler (``stream.take_events`` batches of 500, windows per
partition, outputs sent without awaiting each delivery) was measured here against both on the
same broker, same documents (commit 20d51ba has that code): 0.30-0.42 of the plain pipeline and
about 0.55 of the aiokafka service, so the service is not a Faust app (README, nlp figures).
"""

from __future__ import annotations

import random
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import cache, partial
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import orjson

from services.nlp.classify import KIND_TASK, TextClassifier, model_name, train
from services.nlp.corpus import generate, load_zh_sentiment
from services.nlp.handlers import Keys, Limits, Models, analyse_batch
from services.nlp.redact import redact
from services.nlp.tokens import load_jieba, tokenize
from services.nlp.training import to_examples
from services.nlp.windows import PartitionTexts
from shared.kafka import OutRecord
from shared.models import ModelRegistry
from shared.settings import XietongSettings

if TYPE_CHECKING:
    from bench.harness import Options, Progress
    from bench.results import Row

CHUNK = 500
REDACT_TARGET_MB = 10.0
"""Redaction per core the issue asks for (MB/s): the denominator of ``nlp.redact``."""
KEY = b"k" * 32


class _Record(NamedTuple):
    topic: str
    partition: int
    offset: int
    key: bytes
    value: bytes
    timestamp: int


def documents(n: int, seed: int = 5) -> list[dict[str, Any]]:
    """``n`` clean ``text_document`` events: Chinese feedback (the shipped sample), English
    feedback and supplier notes in both languages (generated, some with personal data)."""
    rng = random.Random(seed)
    pool = [(d.text, "zh", "customer_feedback") for d in load_zh_sentiment()[:1000]]
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


@cache
def models() -> Models:
    """The four classifiers, trained once per process on the shipped and generated sets."""
    out: dict[tuple[str, str], TextClassifier] = {}
    for task in ("sentiment", "topic"):
        for language in ("en", "zh"):
            data = (
                load_zh_sentiment()
                if (task, language) == ("sentiment", "zh")
                else generate(task, language, 1200, seed=7)
            )
            out[(task, language)], _ = train(to_examples(data, b"b" * 32), task, language)
            out[(task, language)].version = 1
    return Models(out)


def plain_pipeline(docs: list[tuple[str, str, str]], batch: int, classifiers: Models) -> None:
    """Tokenise + ``vectorizer.transform`` + ``predict_proba`` per task and language."""
    for i in range(0, len(docs), batch):
        groups: dict[tuple[str, str], list[list[str]]] = {}
        for text, language, task in docs[i : i + batch]:
            groups.setdefault((task, language), []).append(tokenize(text, language, KEY).terms)
        for (task, language), terms in groups.items():
            model = classifiers.classifiers[(task, language)]
            model.model.predict_proba(model.vectorizer.transform(terms))


def measure(n: int = 6000, repeats: int = 3) -> dict[str, list[float]]:
    """Per repeat: docs/s of the service's batch work and of the plain pipeline (batched and one
    at a time), and redaction MB/s, chunk by chunk in rotating order (CPU time)."""
    load_jieba()
    classifiers = models()
    events = documents(n)
    values = [orjson.dumps(e) for e in events]
    plain = [
        (
            e["payload"]["text"],
            e["payload"]["language"],
            KIND_TASK.get(e["payload"]["kind"], "sentiment"),
        )
        for e in events
    ]
    size = sum(len(t.encode()) for t, _, _ in plain)
    samples: dict[str, list[float]] = {"ours": [], "batched": [], "single": [], "redact": []}
    for _ in range(repeats):
        windows = {0: PartitionTexts(86400, 3_600_000)}
        keys = Keys(KEY)
        spent = dict.fromkeys(samples, 0.0)
        for chunk_no, start in enumerate(range(0, n, CHUNK)):
            stop = min(n, start + CHUNK)
            records = [_Record("t", 0, j, b"", values[j], 0) for j in range(start, stop)]
            docs = plain[start:stop]
            jobs: list[tuple[str, Callable[[], object]]] = [
                (
                    "ours",
                    partial(
                        analyse_batch,
                        records,
                        classifiers,
                        windows,
                        keys,
                        Limits(),
                        "t",
                        datetime.now(UTC),
                    ),
                ),
                ("batched", partial(plain_pipeline, docs, CHUNK, classifiers)),
                ("single", partial(plain_pipeline, docs, 1, classifiers)),
                ("redact", partial(_redact_all, docs)),
            ]
            shift = chunk_no % len(jobs)
            for name, job in jobs[shift:] + jobs[:shift]:
                began = time.process_time()
                job()
                spent[name] += time.process_time() - began
        for name in ("ours", "batched", "single"):
            samples[name].append(n / spent[name])
        samples["redact"].append(size / spent["redact"] / 1e6)
    return samples


def _redact_all(docs: list[tuple[str, str, str]]) -> None:
    for text, _, _ in docs:
        redact(text, KEY)


class _FixedRegistry:
    """The registry the service reads, holding this run's four classifiers (no S3 needed)."""

    version = 0

    def __init__(self, classifiers: Models) -> None:
        self.blobs = {model_name(*k): c.dumps() for k, c in classifiers.classifiers.items()}

    async def __aenter__(self) -> _FixedRegistry:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def resolve(self, name: str, alias: str) -> Any:
        return SimpleNamespace(name=name, version=1) if name in self.blobs else None

    async def fetch(self, card: Any) -> bytes:
        return self.blobs[card.name]

    def problem(self) -> str | None:
        return None


async def drain_service(
    settings: XietongSettings, source: str, target: str, n: int, timeout: float
) -> float:
    """docs/s of ``run_nlp`` from its first fetch to the append time of its last insight."""
    from bench.harness import drain_in_process
    from bench.workload import unique_topic
    from services.nlp.app import run_nlp
    from services.nlp.settings import load_nlp_settings

    state = tempfile.mkdtemp(prefix="xietong-bench-nlp-")
    try:
        nlp_settings = load_nlp_settings(
            **{
                **settings.model_dump(),
                "state_dir": state,
                "network_secret": "bench-network-secret-of-enough-length",
            },
            nlp_source_topic=source,
            nlp_insights_topic=target,
            nlp_summary_topic=unique_topic("nlp-summary"),
            nlp_group_id=f"bench-nlp-{uuid.uuid4().hex[:8]}",
            nlp_bootstrap_models=False,
        )
        registry = cast(ModelRegistry, _FixedRegistry(models()))
        return await drain_in_process(
            nlp_settings,
            lambda stop: run_nlp(nlp_settings, stop, registry=registry),
            source,
            target,
            n,
            timeout,
        )
    finally:
        shutil.rmtree(state, ignore_errors=True)


async def nlp_rows(settings: XietongSettings, options: Options, say: Progress) -> list[Row]:
    """nlp.docs, nlp.single, nlp.redact (in-process) and nlp.kafka (through the broker)."""
    from bench.results import Row, Side, paired
    from bench.workload import create_topics, prefill, unique_topic

    n = min(options.events, 6000)  # text is ~15 x slower per event than the hops' events
    rows = {
        "nlp.docs": Row(
            "nlp.docs",
            "nlp batch work / plain tokenise+transform+predict_proba, batches of 500 (docs/s)",
            target=">= 0.7",
            events=n,
        ),
        "nlp.single": Row(
            "nlp.single",
            "nlp batch work / the plain pipeline one document at a time (docs/s)",
            target=">= 3",
            events=n,
        ),
        "nlp.redact": Row(
            "nlp.redact",
            "redaction on mixed en/zh text, one core / the 10 MB/s asked for (MB/s)",
            target=">= 1.0",
            events=n,
        ),
        "nlp.kafka": Row(
            "nlp.kafka",
            "nlp service through Kafka / plain pipeline in-process, batches of 500 (docs/s)",
            events=n,
        ),
    }
    try:
        found = measure(n, options.warmup + options.repeats)
    except Exception as error:
        for key in ("nlp.docs", "nlp.single", "nlp.redact"):
            rows[key].status, rows[key].reason = "error", f"{type(error).__name__}: {error}"
    else:
        keep = slice(options.warmup, None)
        ours = Side("analyse_batch", "docs/s", found["ours"][keep])
        paired(rows["nlp.docs"], ours, Side("plain, batches", "docs/s", found["batched"][keep]))
        paired(rows["nlp.single"], ours, Side("plain, one by one", "docs/s", found["single"][keep]))
        redact_mb = found["redact"][keep]
        paired(
            rows["nlp.redact"],
            Side("redact", "MB/s", redact_mb),
            Side("target", "MB/s", [REDACT_TARGET_MB] * len(redact_mb)),
        )
        say(
            f"nlp in-process: {rows['nlp.docs'].ratio:.2f} of batched, "
            f"{statistics.median(redact_mb):.1f} MB/s"
        )
    row = rows["nlp.kafka"]
    try:
        events = documents(n, seed=17)
        records = [OutRecord(e["tenant"].encode(), orjson.dumps(e)) for e in events]
        plain = [
            (
                e["payload"]["text"],
                e["payload"]["language"],
                KIND_TASK.get(e["payload"]["kind"], "sentiment"),
            )
            for e in events
        ]
        service: list[float] = []
        baseline: list[float] = []
        for round_no in range(options.warmup + options.repeats):
            source, target = unique_topic("nlp-in"), unique_topic("nlp-out")
            await create_topics(
                settings, [source], partitions=options.partitions, append_time=False
            )
            await create_topics(settings, [target], partitions=options.partitions)
            await prefill(settings, [source], records)
            began = time.perf_counter()
            plain_pipeline(plain, CHUNK, models())
            rate = n / (time.perf_counter() - began)
            drained = await drain_service(settings, source, target, n, options.timeout)
            say(f"nlp round {round_no}: service via Kafka {drained:,.0f}, plain {rate:,.0f} docs/s")
            if round_no >= options.warmup:
                service.append(drained)
                baseline.append(rate)
    except Exception as error:
        row.status, row.reason = "error", f"{type(error).__name__}: {error}"
    else:
        paired(row, Side("run_nlp", "docs/s", service), Side("plain, batches", "docs/s", baseline))
        row.status = "info"
    return list(rows.values())


if __name__ == "__main__":
    for name, values in measure().items():
        print(f"{name:10} " + " ".join(f"{v:10.2f}" for v in values))
