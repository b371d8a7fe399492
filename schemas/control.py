"""Control-plane contracts: partner firms, their API keys and their sharing agreements.

They travel on compacted topics keyed by id, so every gateway replica rebuilds the same registry
by reading the topic from the start, and a change (a revoked key, a revoked grant) reaches every
replica within moments. Keys are stored as SHA-256 digests of a 256-bit random secret: the
secret itself is shown once, when it is issued, and never stored.
"""

from __future__ import annotations

from typing import Literal

from pydantic import AwareDatetime, Field

from schemas.events import Contract, TenantId


class Tenant(Contract):
    """A participant of the network: a partner firm or a consumer such as a bank."""

    tenant: TenantId
    name: str = Field(min_length=1, description="Display name.")
    kind: Literal["partner", "consumer", "operator"] = Field(
        "partner", description="partner: publishes and subscribes; consumer: subscribes only."
    )
    industry: str = Field("unknown", description="Industry code used for benchmarks.")
    region: str = Field("unknown", description="Region used for benchmarks.")
    active: bool = True
    created_at: AwareDatetime


class ApiKey(Contract):
    """An API key of a tenant; only its digest is kept."""

    key_id: str = Field(pattern=r"^[a-z0-9]{8,32}$", description="Public part of the key.")
    tenant: TenantId
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the secret part.")
    label: str = ""
    created_at: AwareDatetime
    revoked_at: AwareDatetime | None = None


class Grant(Contract):
    """A sharing agreement: ``owner`` lets ``grantee`` read its insights of ``insight_types``."""

    grant_id: str = Field(pattern=r"^[a-z0-9]{8,32}$")
    owner: TenantId
    grantee: TenantId
    insight_types: list[str] = Field(min_length=1, description="Insight types shared.")
    purpose: str = Field("", description="Why the data is shared (kept for the audit trail).")
    created_at: AwareDatetime
    expires_at: AwareDatetime | None = Field(
        None, description="End of the agreement; None: until revoked."
    )
    revoked_at: AwareDatetime | None = None

    def active_at(self, moment: AwareDatetime) -> bool:
        if self.revoked_at is not None and self.revoked_at <= moment:
            return False
        return self.expires_at is None or moment < self.expires_at
