"""The storage service's test settings: both S3 stores (public and private, two SeaweedFS
servers), unique buckets, topics and consumer group per test, short flush times."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from services.storage.settings import StorageSettings, load_storage_settings
from shared.settings import XietongSettings
from tests.conftest import S3Endpoint

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def storage_settings(
    settings: XietongSettings,
    s3_endpoint: S3Endpoint,
    private_s3_endpoint: S3Endpoint,
    unique_name: Callable[[str], str],
) -> StorageSettings:
    bucket = unique_name("bucket").replace(".", "-")
    base = settings.model_dump(
        exclude={"s3_endpoint_url", "s3_access_key_id", "s3_secret_access_key"}
    )
    return load_storage_settings(
        **base,
        s3_endpoint_url=s3_endpoint.endpoint_url,
        s3_access_key_id=s3_endpoint.access_key_id,
        s3_secret_access_key=s3_endpoint.secret_access_key,
        storage_private_s3_endpoint_url=private_s3_endpoint.endpoint_url,
        storage_private_s3_access_key_id=private_s3_endpoint.access_key_id,
        storage_private_s3_secret_access_key=private_s3_endpoint.secret_access_key,
        storage_public_bucket=f"{bucket}-pub",
        storage_private_bucket=f"{bucket}-priv",
        storage_group_id=unique_name("storage"),
        storage_policy_file=str(ROOT / "deploy" / "placement-policy.yaml"),
        storage_default_residency="any",
        storage_segment_max_seconds=0.5,
        storage_late_max_seconds=1.0,
        storage_flush_check_seconds=0.1,
        storage_part_bytes=5 * 1024 * 1024,
    )
