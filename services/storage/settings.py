"""Settings of the storage service (environment prefix ``XIETONG_``: ``XIETONG_STORAGE_HTTP_PORT``).

Two S3 stores: the *public* one is the platform's ``XIETONG_S3_*`` endpoint (AWS S3 or any
S3-compatible cloud); the *private* one, the network's own cloud, is another endpoint
(``XIETONG_STORAGE_PRIVATE_S3_*``). The placement policy decides which receives what.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr

from schemas.topics import EVENTS_CLEAN, INSIGHT_TOPICS
from shared.settings import XietongSettings

DEFAULT_SENSITIVITY: dict[str, str] = {
    "text_document": "personal",  # customers' and suppliers' texts name people
    "workforce": "personal",
    "text_insight": "personal",
    "market_price": "public",
}


class StorageSettings(XietongSettings):
    """What the storage service needs beyond the platform settings."""

    storage_http_port: int = Field(8085, ge=0, le=65535, description="Partner API and health.")
    storage_group_id: str = Field("storage", min_length=1, description="Archive consumer group.")
    storage_topics: list[str] = Field(
        default_factory=lambda: [EVENTS_CLEAN, *INSIGHT_TOPICS.values()],
        description="Topics archived (JSON list in the environment).",
    )
    storage_insight_topics: dict[str, str] = Field(
        default_factory=lambda: dict(INSIGHT_TOPICS),
        description="Insight type -> topic, where the history reads the live tail (JSON).",
    )
    storage_archive: bool = Field(True, description="Run the archive loop in this process.")

    storage_public_bucket: str = Field("xietong-public", description="Bucket of the public store.")
    storage_private_bucket: str = Field(
        "xietong-private", description="Bucket of the private store."
    )
    storage_private_s3_endpoint_url: str | None = Field(
        None, description="Endpoint of the private store (the network's own S3 server)."
    )
    storage_private_s3_access_key_id: SecretStr | None = Field(
        None, description="Access key id of the private store."
    )
    storage_private_s3_secret_access_key: SecretStr | None = Field(
        None, description="Secret access key of the private store."
    )
    storage_policy_file: str = Field(
        str(Path(__file__).resolve().parents[2] / "deploy" / "placement-policy.yaml"),
        description="Placement rules (YAML); the shipped deploy/placement-policy.yaml by default.",
    )

    storage_segment_max_bytes: int = Field(
        64 * 1024 * 1024, ge=1, description="An open segment is flushed at this size."
    )
    storage_segment_max_seconds: float = Field(
        600.0,
        gt=0,
        description="An open segment (of an idle partition too) is flushed this long after its "
        "first record arrived.",
    )
    storage_late_max_seconds: float = Field(
        3600.0,
        gt=0,
        description="Late records (dated before a partition's newest date) collect this long "
        "before they are flushed, so they make few objects.",
    )
    storage_flush_check_seconds: float = Field(
        1.0, gt=0, description="How often the archive looks for segments due."
    )

    storage_quota_bytes: int = Field(
        10 * 1024**3, ge=0, description="Bytes of files (stored and being uploaded) per tenant."
    )
    storage_tenant_quotas: dict[str, int] = Field(
        default_factory=dict, description="Per-tenant quota overrides (JSON)."
    )
    storage_part_bytes: int = Field(
        8 * 1024 * 1024, ge=5 * 1024 * 1024, description="Multipart part size of uploads."
    )
    storage_upload_expiry_seconds: float = Field(
        86400.0, gt=0, description="An upload untouched this long is abandoned and removed."
    )
    storage_link_max_seconds: int = Field(
        7 * 86400,
        ge=1,
        le=7 * 86400,
        description="Longest life of a download link (S3 presigning allows 7 days).",
    )
    storage_link_secret: SecretStr | None = Field(
        None, description="Signs private-store links; defaults to the network secret."
    )
    storage_default_residency: str = Field(
        "cn",
        description="Residency label of a tenant's data unless storage_tenant_residency names "
        "one (cn keeps it out of the public store under every policy).",
    )
    storage_tenant_residency: dict[str, str] = Field(
        default_factory=dict, description="Tenant -> residency label (JSON)."
    )
    storage_kind_sensitivity: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_SENSITIVITY),
        description="Event or insight type -> sensitivity label (JSON); events not named are "
        "internal, private insights confidential, public insights public.",
    )
    storage_max_page: int = Field(1000, ge=1, description="Largest history page.")

    def link_key(self) -> bytes:
        for secret in (self.storage_link_secret, self.network_secret):
            if secret is not None and secret.get_secret_value():
                return secret.get_secret_value().encode()
        raise SystemExit(
            "XIETONG_STORAGE_LINK_SECRET or XIETONG_NETWORK_SECRET must be set: private-store "
            "download links are signed with it"
        )


def load_storage_settings(**overrides: object) -> StorageSettings:
    """Read the environment now; keyword arguments win over it."""
    return StorageSettings(**overrides)  # type: ignore[arg-type]
