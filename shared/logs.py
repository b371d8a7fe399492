"""Structured logs: one JSON object per line on stderr, with the service name on every line.

Extra context goes in ``extra={...}`` and comes out as fields (topic, partition, offset, ...).
Warnings and errors that repeat (a broker outage makes every client say the same thing many
times a second) are collapsed by :class:`RepeatFilter`: the first passes, the repeats within a
window are counted, and the next one after the window says how many were left out.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Any

import orjson

_STANDARD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class RepeatFilter(logging.Filter):
    """Let a warning or error through once per ``window`` seconds per kind, with a count.

    Two records are of one kind when they come from the same logger, level and line of code
    and say the same thing once their numbers are ignored (node ids, offsets, seconds). A
    record let through after repeats were held back carries ``repeated`` (how many) and says so
    at the end of its message. Below WARNING nothing is held back.
    """

    def __init__(self, window: float = 30.0, max_kinds: int = 1000) -> None:
        super().__init__()
        self.window = window
        self.max_kinds = max_kinds
        self._seen: dict[tuple[str, int, str, int, str], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        try:
            said = _NUMBERS.sub("#", record.getMessage())
        except Exception:  # a malformed record: let logging report it as it would
            return True
        kind = (record.name, record.levelno, record.pathname, record.lineno, said)
        seen = self._seen.get(kind)
        if seen is not None and record.created - seen[0] < self.window:
            seen[1] += 1
            return False
        if seen is not None and seen[1]:
            held = int(seen[1])
            record.repeated = held
            record.msg = f"{record.getMessage()} (and {held} more like it in {self.window:.0f} s)"
            record.args = None
        if len(self._seen) >= self.max_kinds:
            self._seen.clear()
        self._seen[kind] = [record.created, 0]
        return True


_NUMBERS = re.compile(r"\d+")


def configure_logging(service: str, level: str = "INFO", fmt: str = "json") -> None:
    """Route the root logger to stderr in the chosen format (call once per process)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s")
        )
    handler.addFilter(RepeatFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiokafka is chatty at INFO about every rebalance step.
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, root.level))
