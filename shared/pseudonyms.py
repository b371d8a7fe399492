"""Keyed pseudonyms: the same value gives the same token under one key, another under another.

A pseudonym is ``<KIND>:<20 hex>`` (80 bits of an HMAC-SHA256 of the kind and the value).
Nothing keeps a way back: the map from value to token is the HMAC itself, and its key is
derived from the network secret (``XIETONG_NETWORK_SECRET``), which no partner holds, so a
token cannot be turned back into a phone number by trying every number either.

The key of a token is the key of the sharing agreement it is shown under:

- The nlp service writes an owner's text insights once, under :func:`owner_key` (the owner's
  agreement with itself); that is what the insight topics hold and what the owner reads.
- A grantee reads them under the grant that lets it (:func:`as_read`, called by every read
  path: the gateway's list and stream routes and the SDK's :class:`~shared.sdk.Subscriber`):
  each owner token is re-keyed, ``HMAC(k_G, owner token)`` with ``k_G`` derived from the network
  secret and the grant id (:func:`grant_key`). So the same value gives the same pseudonym in
  every insight one grantee reads under one agreement, another pseudonym under any other
  agreement (two grantees of one owner cannot join what they were shown on a redacted value),
  and no grantee sees the owner's own rendering. Re-keying a token needs only the token,
  so no value is ever stored or needed to re-key.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from typing import TypeVar

from pydantic import BaseModel

from schemas.control import Grant

TOKEN_HEX = 20
M = TypeVar("M", bound=BaseModel)


def derive_key(network_key: bytes, purpose: str, subject: str) -> bytes:
    """A key for one purpose and subject (a tenant, a model) from the network secret."""
    return hmac.new(network_key, f"xietong/{purpose}/{subject}".encode(), hashlib.sha256).digest()


def owner_key(network_key: bytes, owner: str) -> bytes:
    """The key of an owner's rendering of its redacted values."""
    return derive_key(network_key, "pseudonym-owner", owner)


def grant_key(network_key: bytes, grant_id: str) -> bytes:
    """The key of the rendering a grantee sees under one sharing agreement."""
    return derive_key(network_key, "pseudonym-grant", grant_id)


def pseudonym(key: bytes, kind: str, value: str) -> str:
    """``KIND:<hex>`` for ``value`` under ``key``."""
    mac = hmac.new(key, f"{kind}\x00{value}".encode(), hashlib.sha256).hexdigest()
    return f"{kind}:{mac[:TOKEN_HEX]}"


def rekey(key: bytes, token: str) -> str:
    """An owner's token as rendered under ``key`` (same kind, unrelated hex)."""
    kind = token.partition(":")[0]
    return pseudonym(key, kind, token)


def rendering_grant(allowing: Sequence[Grant]) -> Grant:
    """Of the agreements that let a grantee read, the one whose key renders: the oldest, so a
    grantee's pseudonyms stay the same while that agreement lasts."""
    return min(allowing, key=lambda grant: (grant.created_at, grant.grant_id))


def as_read(insight: M, allowing: Sequence[Grant] | None, network_key: bytes | None) -> M:
    """``insight`` as a reader sees it under ``allowing`` (what the sharing rule returned).

    Unchanged without pseudonyms, or when no agreement was needed (the owner, a public insight:
    an empty ``allowing``). Otherwise each pseudonym of ``entities`` is re-keyed under
    :func:`rendering_grant`; without the network secret there is no such key, and the grantee
    gets no pseudonyms rather than the owner's."""
    entities = getattr(insight, "entities", None)
    if not entities or not allowing:
        return insight
    if network_key is None:
        return insight.model_copy(update={"entities": []})
    key = grant_key(network_key, rendering_grant(allowing).grant_id)
    return insight.model_copy(update={"entities": sorted(rekey(key, t) for t in entities)})
