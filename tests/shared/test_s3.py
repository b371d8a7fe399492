"""aioboto3 against the real local SeaweedFS S3 gateway."""

from __future__ import annotations

import uuid

import pytest
from botocore.exceptions import ClientError
from pydantic import SecretStr

from shared.s3 import s3_client
from shared.settings import XietongSettings

pytestmark = pytest.mark.integration


async def test_an_object_written_is_read_back(s3_settings: XietongSettings) -> None:
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    body = "协同 partner archive\n".encode() * 1000
    async with s3_client(s3_settings) as s3:
        await s3.create_bucket(Bucket=bucket)
        await s3.put_object(Bucket=bucket, Key="archive/part-0.ndjson", Body=body)
        got = await s3.get_object(Bucket=bucket, Key="archive/part-0.ndjson")
        assert await got["Body"].read() == body
        listed = await s3.list_objects_v2(Bucket=bucket, Prefix="archive/")
        assert [o["Key"] for o in listed["Contents"]] == ["archive/part-0.ndjson"]


async def test_a_wrong_secret_is_refused(s3_settings: XietongSettings) -> None:
    wrong = s3_settings.model_copy(update={"s3_secret_access_key": SecretStr("not-the-secret")})
    async with s3_client(wrong) as s3:
        with pytest.raises(ClientError) as info:
            await s3.list_buckets()
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
