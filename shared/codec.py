"""One codec for the whole platform: UTF-8 JSON via orjson.

The same functions serve aiokafka (bytes in, bytes out) and aiohttp (``json_response``).
Datetimes are written in RFC 3339 with their offset, UUIDs as strings; pydantic models are
dumped in JSON mode first.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel

_OPTIONS = orjson.OPT_UTC_Z | orjson.OPT_SERIALIZE_NUMPY


def _default(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def encode(value: Any) -> bytes:
    """Encode a pydantic model, dict, list or scalar as compact JSON bytes."""
    if isinstance(value, BaseModel):
        return value.__pydantic_serializer__.to_json(value)
    return orjson.dumps(value, default=_default, option=_OPTIONS)


def decode(data: bytes | bytearray | memoryview | str) -> Any:
    """Decode JSON bytes; raises :class:`DecodeError` (a ``ValueError``) on bad input."""
    return orjson.loads(data)


DecodeError = orjson.JSONDecodeError


def json_response(
    value: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """An aiohttp response encoded with the platform codec."""
    return web.Response(
        body=encode(value), status=status, content_type="application/json", headers=headers
    )
