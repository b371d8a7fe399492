"""Keyed pseudonyms: the same value gives the same token under one key, another under another.

A pseudonym is ``<KIND>:<20 hex>`` (80 bits of an HMAC-SHA256 of the kind and the value).
Nothing keeps a way back: the map from value to token is the HMAC itself, and its key is
derived from the network secret (``XIETONG_NETWORK_SECRET``), which no partner holds, so a
token cannot be turned back into a phone number by trying every number either.

The key of a token is the key of the sharing agreement it is shown under. An owner's text
insights are written once, under :func:`owner_key` (the owner's agreement with itself), and
every reader the sharing rule lets read them — the owner and its grantees — sees that
rendering: the same value gives the same pseudonym in every insight of that owner, and
another owner's insights give the same value an unrelated pseudonym, so no two owners' data
can be joined on what was redacted.
"""

from __future__ import annotations

import hashlib
import hmac

TOKEN_HEX = 20


def derive_key(network_key: bytes, purpose: str, subject: str) -> bytes:
    """A key for one purpose and subject (a tenant, a model) from the network secret."""
    return hmac.new(network_key, f"xietong/{purpose}/{subject}".encode(), hashlib.sha256).digest()


def owner_key(network_key: bytes, owner: str) -> bytes:
    """The key of an owner's rendering of its redacted values."""
    return derive_key(network_key, "pseudonym-owner", owner)


def pseudonym(key: bytes, kind: str, value: str) -> str:
    """``KIND:<hex>`` for ``value`` under ``key``."""
    mac = hmac.new(key, f"{kind}\x00{value}".encode(), hashlib.sha256).hexdigest()
    return f"{kind}:{mac[:TOKEN_HEX]}"
