"""``make demo`` (``deploy/local/demo.py``): what it shows and which ports it needs."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

from deploy.local.demo import (
    HEALTH_PORT_OFFSETS,
    INGEST_METRICS_OFFSET,
    dead_letter_reasons,
    existing_services,
    service_ports,
)
from schemas.insights import FieldError
from shared.codec import decode, encode
from shared.deadletter import dead_letter


def test_the_dead_letter_panel_counts_each_field_with_its_reason() -> None:
    letters = [
        dead_letter(
            b"{}",
            "invalid event",
            service="ingest",
            errors=[
                FieldError(field="payload.quantity", reason="Input should be a valid number"),
                FieldError(field="occurred_at", reason="Input should have timezone info"),
            ],
        ),
        dead_letter(
            b"{}",
            "invalid event",
            service="clean",
            errors=[FieldError(field="payload.quantity", reason="Input should be a valid number")],
        ),
        dead_letter(b"\xff", "not JSON", service="clean"),
    ]
    reasons: Counter[str] = Counter()
    for letter in letters:
        reasons.update(dead_letter_reasons(decode(encode(letter))))
    assert reasons == {
        "payload.quantity: Input should be a valid number": 2,
        "occurred_at: Input should have timezone info": 1,
        "not JSON": 1,
    }
    assert letters[0].failed_at <= datetime.now(UTC)


def test_every_service_gets_a_port_of_its_own_and_up_checks_them_all() -> None:
    names = existing_services()
    ports = service_ports(names, gateway_port=8080, health_port_base=8081)
    assert ports[8080] == "ingest HTTP"
    assert ports[8081 + INGEST_METRICS_OFFSET] == "ingest metrics"
    assert len(ports) == len(names) + 1  # distinct: no two services share one
    for name, offset in HEALTH_PORT_OFFSETS.items():
        if name in names:
            assert ports[8081 + offset] == f"{name} HTTP"
