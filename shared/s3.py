"""S3 client on the platform settings (AWS S3 or any S3-compatible store such as SeaweedFS)."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any

import aioboto3
from botocore.config import Config

from shared.settings import XietongSettings


def s3_client(settings: XietongSettings) -> AbstractAsyncContextManager[Any]:
    """``async with s3_client(settings) as s3:`` — closed when the block ends."""
    session = aioboto3.Session()
    return session.client(  # type: ignore[no-any-return]
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.s3_region,
        aws_access_key_id=settings.s3_access_key_id.get_secret_value()
        if settings.s3_access_key_id
        else None,
        aws_secret_access_key=(
            settings.s3_secret_access_key.get_secret_value()
            if settings.s3_secret_access_key
            else None
        ),
        config=Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 3, "mode": "standard"},
            # SigV4 everywhere, presigned URLs too (SigV2 presigning with response headers fails)
            signature_version="s3v4",
        ),
    )
