"""The README's CSV columns of each event type, generated from the contracts.

A CSV body is read by :mod:`services.ingest.csvmap`: the header names the envelope columns and
the payload fields of the type the query names (``?type=&version=``). This module lists them
per type and version from :data:`schemas.events.PAYLOADS`, with what the header check requires
and the type a cell is converted to; ``python -m deploy.settings_doc`` writes the block between
the markers and a test fails when it drifts.
"""

from __future__ import annotations

from schemas.events import PAYLOADS
from services.ingest.csvmap import ENVELOPE_COLUMNS, REQUIRED_ENVELOPE_COLUMNS, declared_scalar

BEGIN = "<!-- csv-columns:begin -->"
END = "<!-- csv-columns:end -->"
CELL_TYPES = {float: "number", int: "integer", bool: "true/false"}
ENVELOPE_ORDER = ("occurred_at", "event_id", "record_id", "operation", "corrects")


def csv_columns(type_name: str, version: int) -> tuple[list[str], list[str]]:
    """``(required, optional)`` columns of a CSV of ``type_name`` v``version``, each with the
    type its cells are read as when it is not text."""
    assert set(ENVELOPE_ORDER) == ENVELOPE_COLUMNS
    required = [f"`{name}`" for name in ENVELOPE_ORDER if name in REQUIRED_ENVELOPE_COLUMNS]
    optional = [f"`{name}`" for name in ENVELOPE_ORDER if name not in REQUIRED_ENVELOPE_COLUMNS]
    for name, info in PAYLOADS[(type_name, version)].model_fields.items():
        kind = CELL_TYPES.get(declared_scalar(info.annotation))  # type: ignore[arg-type]
        column = f"`{name}` ({kind})" if kind else f"`{name}`"
        (required if info.is_required() else optional).append(column)
    return required, optional


def render_csv_columns() -> str:
    """The whole block, markers included."""
    lines = [
        BEGIN,
        "Generated from the contracts (`schemas/events.py`) by `python -m deploy.settings_doc`.",
        "",
        "| `?type=` (`&version=`) | required columns | optional columns |",
        "| --- | --- | --- |",
    ]
    for type_name, version in sorted(PAYLOADS):
        required, optional = csv_columns(type_name, version)
        lines.append(
            f"| `{type_name}` ({version}) | {', '.join(required)} | {', '.join(optional)} |"
        )
    lines.append(END)
    return "\n".join(lines)
