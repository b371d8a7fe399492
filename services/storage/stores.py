"""The two S3 stores: ``public`` (the platform's S3 endpoint) and ``private`` (the network's own).

Each :class:`Store` is one aioboto3 client and one bucket, owned by :func:`open_stores` (an async
context manager that creates missing buckets and closes the clients).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

from services.storage.settings import StorageSettings
from shared.s3 import s3_client


@dataclass
class Store:
    name: str
    bucket: str
    client: Any

    async def put(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> None:
        await self.client.put_object(
            Bucket=self.bucket, Key=key, Body=data, ContentType=content_type
        )

    async def get(self, key: str) -> bytes:
        response = await self.client.get_object(Bucket=self.bucket, Key=key)
        async with response["Body"] as body:
            data: bytes = await body.read()
        return data

    async def get_or_none(self, key: str) -> bytes | None:
        try:
            return await self.get(key)
        except ClientError as error:
            if _not_found(error):
                return None
            raise

    async def delete(self, key: str) -> None:
        await self.client.delete_object(Bucket=self.bucket, Key=key)

    async def keys(self, prefix: str) -> AsyncIterator[tuple[str, int]]:
        """``(key, size)`` of every object under ``prefix``, in key order."""
        paginator = self.client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            for item in page.get("Contents", ()):
                yield item["Key"], int(item["Size"])

    async def prefixes(self, prefix: str) -> list[str]:
        """The "directories" just below ``prefix`` (which ends with ``/``)."""
        found: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix, Delimiter="/"):
            found += [p["Prefix"] for p in page.get("CommonPrefixes", ())]
        return found

    async def presign(self, key: str, seconds: int, filename: str | None = None) -> str:
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if filename:
            params["ResponseContentDisposition"] = f'attachment; filename="{filename}"'
        url: str = await self.client.generate_presigned_url(
            "get_object", Params=params, ExpiresIn=seconds
        )
        return url


def _not_found(error: ClientError) -> bool:
    code = str(error.response.get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound")


def private_settings(settings: StorageSettings) -> StorageSettings:
    """The settings with the private store's endpoint in place of the public one's."""
    return settings.model_copy(
        update={
            "s3_endpoint_url": settings.storage_private_s3_endpoint_url,
            "s3_access_key_id": settings.storage_private_s3_access_key_id,
            "s3_secret_access_key": settings.storage_private_s3_secret_access_key,
        }
    )


async def ensure_bucket(client: Any, bucket: str) -> None:
    try:
        await client.head_bucket(Bucket=bucket)
    except ClientError:
        with contextlib.suppress(ClientError):  # a replica racing us created it
            await client.create_bucket(Bucket=bucket)
        await client.head_bucket(Bucket=bucket)


@contextlib.asynccontextmanager
async def open_stores(settings: StorageSettings) -> AsyncIterator[dict[str, Store]]:
    """``{"public": Store, "private": Store}`` with their buckets, closed when the block ends."""
    if not settings.storage_private_s3_endpoint_url:
        raise SystemExit(
            "XIETONG_STORAGE_PRIVATE_S3_ENDPOINT_URL is not set: the private store must be a "
            "separate S3 endpoint (make up starts one and writes it to .run/local.env)"
        )
    async with (
        s3_client(settings) as public,
        s3_client(private_settings(settings)) as private,
    ):
        stores = {
            "public": Store("public", settings.storage_public_bucket, public),
            "private": Store("private", settings.storage_private_bucket, private),
        }
        for store in stores.values():
            await ensure_bucket(store.client, store.bucket)
        yield stores
