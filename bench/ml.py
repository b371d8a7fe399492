"""The ml rows: scoring and training against plain scikit-learn, and scoring latency.

- **ML1** scoring: the service's scoring step (:meth:`services.ml.handlers.Scorer.score_subjects`:
  encode the product, one vectorised input check, one ``predict_proba`` with ``n_jobs=1``, the
  Prediction records built and encoded) on batches of the service's size
  (``ml_batch_max_records``), against plain ``estimator.predict_proba(X)`` on the same numpy
  batches; target >= 0.5.
- **ML1.onerow** the same batched scoring against ``predict_proba`` one row at a time; >= 20.
- **ML2** training: the service's fit (:func:`services.ml.families.fit`) against plain
  ``RandomForestClassifier(...).fit`` on the same rows; <= 1.2. Building the feature rows and
  writing the artifact are measured separately and reported in the note.
- **ML3** the p99 from a purchase order's append to its prediction's append, one order a
  second, against the configured batch wait + 50 ms; <= 1.0.

All with the supplier-delay spec's 100-tree forest on rows from the simulated firms.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from bench.results import Row, Side, paired
from bench.workload import create_topics, unique_topic
from shared.codec import decode, encode
from shared.kafka import BatchPublisher, OutRecord, create_consumer, create_producer, started
from shared.settings import XietongSettings


def _rows(firms: int, per_firm: int) -> tuple[Any, list[dict[str, Any]], float]:
    from deploy.local.simulate import make_firms, supply_events
    from services.ml.features import parse_event
    from services.ml.specs import SUPPLIER_DELAY
    from services.ml.training import build_rows

    start = datetime(2026, 1, 1, tzinfo=UTC)
    envelopes: list[dict[str, Any]] = []
    for firm in make_firms(firms):
        stream = supply_events(firm, start=start, step=timedelta(hours=20))
        envelopes += itertools.islice(stream, per_firm)
    events = [parse_event(encode(e)) for e in envelopes]
    began = time.perf_counter()
    rows = build_rows(SUPPLIER_DELAY, events)
    return rows, envelopes, time.perf_counter() - began


def _served(rows: Any) -> Any:
    from schemas.models import ModelCard
    from services.ml.handlers import load_served
    from services.ml.specs import SUPPLIER_DELAY
    from services.ml.training import train
    from shared.models import sha256_of

    trained = train(SUPPLIER_DELAY, "sklearn-rf", rows, min_firms=1, evaluate_too=False)
    card = ModelCard.model_validate(
        {
            **trained.card,
            "version": 1,
            "artifact_bucket": "bench",
            "artifact_key": "bench",
            "sha256": sha256_of(trained.artifact),
            "size_bytes": len(trained.artifact),
            "created_at": datetime.now(UTC),
            "created_by": "bench",
        }
    )
    return load_served(card, trained.artifact), trained.artifact


def scoring_rows(options: Any, say: Any) -> list[Row]:
    from services.ml.handlers import Scorer
    from services.ml.settings import load_ml_settings

    batch = load_ml_settings().ml_batch_max_records
    rows, _, _ = _rows(6, 300)
    served, _ = _served(rows)
    scorer = Scorer(source="events.clean.v1")
    estimator = served.model.estimator
    position = served.names.index("product_code")
    total = min(options.events, 20_000)
    batch = min(batch, total)
    subjects = [rows.subjects[i % len(rows.subjects)] for i in range(total)]
    batches = [subjects[i : i + batch] for i in range(0, total, batch)]
    from services.ml.features import encode_products

    matrices = [encode_products(b, served.categories, position) for b in batches]
    one_row = matrices[0][: max(20, min(200, total // 50))]
    ours, plain, single = [], [], []
    say(f"ML1: scoring {total} rows in batches of {batch}, {options.repeats} repeats")
    for round_no in range(options.warmup + options.repeats):
        stamp = datetime.now(UTC).isoformat()
        sides = ["ours", "plain"] if round_no % 2 == 0 else ["plain", "ours"]
        measured: dict[str, float] = {}
        for side in sides:
            began = time.perf_counter()
            if side == "ours":
                for chunk in batches:
                    out: list[tuple[str, dict[str, Any]]] = []
                    scorer.score_subjects(served, chunk, out, stamp)
                    [encode(record) for _, record in out]
            else:
                for matrix in matrices:
                    estimator.predict_proba(matrix)
            measured[side] = total / (time.perf_counter() - began)
        began = time.perf_counter()
        for i in range(len(one_row)):
            estimator.predict_proba(one_row[i : i + 1])
        if round_no >= options.warmup:
            ours.append(measured["ours"])
            plain.append(measured["plain"])
            single.append(len(one_row) / (time.perf_counter() - began))
    return [
        paired(
            Row(
                "ML1",
                "ml scoring vs plain predict_proba",
                target=">= 0.5",
                events=options.events,
                note=f"{total} rows in batches of {batch} (ml_batch_max_records), 100 trees, "
                "n_jobs=1, "
                "11 features; ours includes the input check and the encoded Prediction records",
            ),
            Side("Scorer.score_subjects + encode", "rows/s", ours),
            Side("estimator.predict_proba(X)", "rows/s", plain),
        ),
        paired(
            Row(
                "ML1.onerow",
                "ml scoring vs one row at a time",
                target=">= 20",
                events=options.events,
                note=f"one row at a time: {len(one_row)} rows",
            ),
            Side("Scorer.score_subjects + encode", "rows/s", ours),
            Side("predict_proba one row", "rows/s", single),
        ),
    ]


def training_row(options: Any, say: Any) -> Row:
    from sklearn.ensemble import RandomForestClassifier

    from services.ml import families
    from services.ml.features import encode_products
    from services.ml.specs import SUPPLIER_DELAY

    per_firm = 300 if options.events < 10_000 else 1000
    rows, _, building = _rows(6, per_firm)
    params: dict[str, Any] = dict(SUPPLIER_DELAY.params["sklearn-rf"])
    categories = sorted({s.product for s in rows.subjects})
    matrix = encode_products(
        rows.subjects, categories, SUPPLIER_DELAY.feature_names.index("product_code")
    )
    ours, plain, dumps = [], [], []
    say(f"ML2: fitting {len(rows.labels)} rows, {options.repeats} repeats")
    for round_no in range(options.warmup + options.repeats):
        measured: dict[str, float] = {}
        for side in ["ours", "plain"] if round_no % 2 == 0 else ["plain", "ours"]:
            began = time.perf_counter()
            if side == "ours":
                model = families.fit("sklearn-rf", matrix, rows.labels, "classification", params)
                measured["dump"] = time.perf_counter()
                model.dump()
                measured["dump"] = time.perf_counter() - measured["dump"]
                measured[side] = time.perf_counter() - began - measured["dump"]
                continue
            else:
                RandomForestClassifier(random_state=0, n_jobs=1, **params).fit(matrix, rows.labels)
            measured[side] = time.perf_counter() - began
        if round_no >= options.warmup:
            ours.append(measured["ours"])
            plain.append(measured["plain"])
            dumps.append(measured["dump"])
    return paired(
        Row(
            "ML2",
            "ml training vs plain fit",
            target="<= 1.2",
            events=options.events,
            note=f"{len(rows.labels)} rows; building them from "
            f"{6 * per_firm} events took {building * 1000:.0f} ms, writing the artifact "
            f"{statistics.median(dumps) * 1000:.0f} ms (neither in the ratio)",
        ),
        Side("families.fit", "s", ours),
        Side("RandomForestClassifier.fit", "s", plain),
    )


async def latency_row(settings: XietongSettings, options: Any, say: Any) -> Row:
    from services.ml.app import ModelServer, run_scoring
    from services.ml.handlers import Scorer
    from services.ml.settings import load_ml_settings

    rows, envelopes, _ = _rows(6, 300)
    served, _ = _served(rows)
    source, target = unique_topic("ml-clean"), unique_topic("ml-predictions")
    await create_topics(settings, [source, target], partitions=3)
    ml = load_ml_settings(
        **{
            **settings.model_dump(),
            "ml_source_topic": source,
            "ml_predictions_topic": target,
            "ml_shadow_topic": unique_topic("ml-shadow"),
            "ml_drift_topic": unique_topic("ml-drift"),
            "ml_dead_letter_topic": unique_topic("ml-dlq"),
            "ml_group_id": f"bench-ml-{uuid.uuid4().hex[:8]}",
            "ml_models": ["supplier-delay"],
        }
    )
    scorer = Scorer(source=source, models=("supplier-delay",))
    scorer.champions["supplier-delay"] = served

    class Fixed(ModelServer):
        async def refresh(self) -> None:  # the model is given; no registry in this row
            return

    server = Fixed(None, scorer)  # type: ignore[arg-type]
    stop, ready = asyncio.Event(), asyncio.Event()
    loop = asyncio.create_task(run_scoring(ml, stop, server, ready=ready))
    count = max(5, min(30, options.events // 1000))
    orders = [e for e in envelopes if e["type"] == "purchase_order"][-count:]
    say(f"ML3: {count} purchase orders, one a second")
    appended: dict[str, int] = {}
    predicted: dict[str, int] = {}
    try:
        await asyncio.wait_for(ready.wait(), 60)
        async with (
            started(create_producer(settings)) as producer,
            started(create_consumer(settings, None, target)) as consumer,
        ):
            publisher = BatchPublisher(producer)
            await asyncio.sleep(1.0)  # the consumer's assignment, outside the measurement
            for order in orders:
                order = {**order, "event_id": str(uuid.uuid4())}
                await publisher.publish(
                    source, [OutRecord(order["tenant"].encode(), encode(order))]
                )
                appended[order["event_id"]] = 0
                deadline = time.monotonic() + 1.0
                while time.monotonic() < deadline:
                    batch = await consumer.getmany(timeout_ms=100)
                    for records in batch.values():
                        for record in records:
                            predicted[decode(record.value)["subject_event_id"]] = record.timestamp
            async with asyncio.timeout(30):
                while len(predicted) < len(appended):
                    batch = await consumer.getmany(timeout_ms=200)
                    for records in batch.values():
                        for record in records:
                            predicted[decode(record.value)["subject_event_id"]] = record.timestamp
        # the append times of the orders, read back from the source topic
        async with started(create_consumer(settings, None, source)) as reader:
            async with asyncio.timeout(30):
                while any(v == 0 for v in appended.values()):
                    batch = await reader.getmany(timeout_ms=200)
                    for records in batch.values():
                        for record in records:
                            event_id = decode(record.value)["event_id"]
                            if event_id in appended:
                                appended[event_id] = record.timestamp
    finally:
        stop.set()
        await asyncio.wait_for(loop, 30)
    latencies = sorted(predicted[k] - appended[k] for k in appended)
    p99 = float(np.percentile(latencies, 99))
    bound = ml.ml_batch_wait_ms + 50.0
    row = Row(
        "ML3",
        "ml p99 order append -> prediction append",
        target="<= 1.0",
        events=options.events,
        note=f"{len(latencies)} orders at 1/s; p50 {np.percentile(latencies, 50):.0f} ms, "
        f"p99 {p99:.0f} ms; bound = ml_batch_wait_ms {ml.ml_batch_wait_ms} + 50 ms",
    )
    return paired(row, Side("p99 latency", "ms", [p99]), Side("batch wait + 50 ms", "ms", [bound]))


async def ml_rows(settings: XietongSettings, options: Any, say: Any) -> list[Row]:
    """Every ml row; a row that fails says so and carries no number."""
    out: list[Row] = []
    for key, work in (
        ("ML1", lambda: asyncio.to_thread(scoring_rows, options, say)),
        ("ML2", lambda: asyncio.to_thread(training_row, options, say)),
        ("ML3", lambda: latency_row(settings, options, say)),
    ):
        try:
            made = await work()
            out += made if isinstance(made, list) else [made]
        except Exception as error:  # a broken row is reported, the run goes on
            out.append(Row(key, "ml", status="error", reason=repr(error)[:200]))
            if key == "ML1":
                out.append(Row("ML1.onerow", "ml", status="error", reason=repr(error)[:200]))
    return out
