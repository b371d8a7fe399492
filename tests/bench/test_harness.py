"""The benchmark harness runs and reports every row — never how fast anything is."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bench.harness import Options, Progress, _rotate, run
from bench.pipeline import build_requests
from bench.readme import BEGIN, END, write_readme
from bench.results import ROW_KEYS, Row, Side, paired, table
from bench.storage import in_turn, storage_rows
from bench.workload import make_events
from schemas.events import validate_event
from shared.settings import load_settings

MEASURED = {"ok", "info"}


def test_the_bench_events_follow_the_contract_and_spread_over_tenants() -> None:
    events = make_events(64)
    for event in events:
        validate_event(event)
    assert len({e["tenant"] for e in events}) > 3
    assert len({e["event_id"] for e in events}) == len(events)


def test_requests_carry_one_tenants_events_with_that_tenants_key() -> None:
    events = make_events(50)
    keys = {e["tenant"]: f"key-of-{e['tenant']}" for e in events}
    requests = build_requests(events, keys, per_request=4)
    assert sum(r.events for r in requests) == len(events)
    for request in requests:
        lines = [json.loads(line) for line in request.body.split(b"\n")]
        tenants = {e["tenant"] for e in lines}
        assert len(tenants) == 1
        assert request.headers["Authorization"] == f"Bearer key-of-{tenants.pop()}"
        assert request.event_ids == tuple(e["event_id"] for e in lines)


def test_every_candidate_takes_every_place_in_turn() -> None:
    names = ["a", "b", "c"]
    firsts = {_rotate(names, n)[0] for n in range(6)}
    lasts = {_rotate(names, n)[-1] for n in range(6)}
    assert firsts == lasts == set(names)


async def test_ours_and_plain_take_turns_running_first() -> None:
    order: list[str] = []

    async def ours() -> float:
        order.append("ours")
        return 1.0

    async def plain() -> float:
        order.append("plain")
        return 2.0

    assert await in_turn(0, ours, plain) == (1.0, 2.0)
    assert await in_turn(1, ours, plain) == (1.0, 2.0)
    assert order == ["ours", "plain", "plain", "ours"]


async def test_storage_rows_whose_stores_do_not_start_say_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    @contextlib.asynccontextmanager
    async def no_stores(*_: object) -> AsyncIterator[None]:
        raise RuntimeError("no SeaweedFS here")
        yield

    monkeypatch.setattr("bench.storage.storage_stage", no_stores)
    options = Options(events=10, repeats=1, warmup=0, output=None)
    rows = await storage_rows(load_settings(), options, Progress(quiet=True))
    assert [row.key for row in rows] == ["S1.archive", "S2.upload", "S2.download", "S3.replay"]
    for row in rows:
        assert row.status == "error" and row.reason and "no SeaweedFS here" in row.reason
        assert row.ratio is None and row.numerator is None


def test_ratio_is_the_median_of_per_repeat_ratios_and_verdict_follows_the_target() -> None:
    row = paired(
        Row("R9", "x", target=">= 1.0"),
        Side("ours", "events/s", [10.0, 30.0, 8.0]),
        Side("raw", "events/s", [20.0, 20.0, 10.0]),
    )
    assert row.ratio_samples == [0.5, 1.5, 0.8]
    assert row.ratio == 0.8
    assert row.spread == 0.5
    assert row.verdict == "miss"
    latency = paired(Row("R8", "y", target="<= 3"), Side("a", "ms", [6.0]), Side("b", "ms", [4.0]))
    assert latency.verdict == "pass"
    missing = Row("R7", "z", status="not available", reason="services.x does not exist yet")
    rendered = table([row, latency, missing])
    assert "not available: services.x does not exist yet" in rendered
    assert "| miss |" in rendered and "| pass |" in rendered


def test_the_readme_section_is_replaced_not_appended(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# Bench\n\nintro\n\n{BEGIN}\nold table\n{END}\n\nafter\n")
    document = {
        "environment": {
            "measured_at": "now",
            "machine": "m",
            "cpu_count": 2,
            "python": "3.11",
            "broker": "Apache Kafka 4.1.1",
            "events": 10,
            "repeats": 1,
            "warmup": 0,
            "command": "python -m bench",
            "libraries": {"aiokafka": "0.14.0"},
        },
        "table": "| new table |",
    }
    write_readme(readme, document)
    text = readme.read_text()
    assert "old table" not in text
    assert text.count(BEGIN) == 1 and "| new table |" in text
    assert text.startswith("# Bench\n\nintro") and text.rstrip().endswith("after")


@pytest.mark.integration
@pytest.mark.slow
def test_a_tiny_run_reports_every_row_and_writes_valid_results(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    output = tmp_path / "results.json"
    options = Options(
        events=300,
        repeats=1,
        warmup=0,
        connections=4,
        events_per_request=25,
        timeout=40.0,
        file_mib=1,
        output=output,
    )
    returned = run(options, bootstrap=kafka_bootstrap, quiet=True)

    document = json.loads(output.read_text())
    assert [row["key"] for row in document["rows"]] == list(ROW_KEYS)
    assert document["rows"] == returned["rows"]
    env = document["environment"]
    assert env["events"] == 300 and env["repeats"] == 1
    assert env["cpu_count"] >= 1 and env["python"] and env["broker"]
    assert env["libraries"]["aiokafka"] and env["libraries"]["confluent-kafka"]
    for row in document["rows"]:
        assert row["status"] in MEASURED | {"not available"}, (row["key"], row["reason"])
        if row["status"] == "not available":
            assert row["reason"] and row["ratio"] is None and row["numerator"] is None
            continue
        numerator = row["numerator"]
        assert numerator["samples"] and all(value > 0 for value in numerator["samples"])
        assert row["ratio"] is not None and row["ratio"] > 0
        assert row["spread"] is not None and row["spread"] >= 0
        assert row["repeats"] >= 1 and row["events"] == 300
        if row["key"] != "hop.baseline":
            denominator = row["denominator"]
            assert denominator["samples"] and all(value > 0 for value in denominator["samples"])
    by_key = {row["key"]: row for row in document["rows"]}
    # The raw baselines need nothing but Kafka: they are always measured.
    for key in ("hop.baseline", "hop.orjson", "hop.confluent", "R3"):
        assert by_key[key]["status"] in MEASURED
    # The storage rows start their own SeaweedFS servers and storage service: always measured.
    for key in ("S1.archive", "S2.upload", "S2.download", "S3.replay"):
        assert by_key[key]["status"] in MEASURED, (key, by_key[key]["reason"])
        assert by_key[key]["target"]
    assert "| R3 " in returned["table"]
