"""Session fixtures: the real local Kafka broker and SeaweedFS, started on free ports with fresh
data directories — or the ones named by the environment, so the same suite runs against a real
cluster:

- ``XIETONG_TEST_KAFKA_BOOTSTRAP`` — use this Kafka instead of starting one;
- ``XIETONG_TEST_S3_ENDPOINT``, ``XIETONG_TEST_S3_ACCESS_KEY_ID``,
  ``XIETONG_TEST_S3_SECRET_ACCESS_KEY``.

Both start lazily: unit tests that ask for neither never start anything.

The suite never touches the checkout's ``.run/`` (a ``make demo`` may be using it): the run folder
(``XIETONG_RUN_DIR``, honoured by the demo and ``deploy.local.infra``) is a temporary one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from deploy.local import infra
from shared.settings import XietongSettings, load_settings

_RUN_DIR = Path(tempfile.mkdtemp(prefix="xietong-test-run-"))
os.environ["XIETONG_RUN_DIR"] = str(_RUN_DIR)


@pytest.fixture(scope="session", autouse=True)
def _temporary_run_dir() -> Iterator[Path]:
    yield _RUN_DIR
    shutil.rmtree(_RUN_DIR, ignore_errors=True)


@dataclass(frozen=True)
class S3Endpoint:
    endpoint_url: str
    access_key_id: str
    secret_access_key: str


@contextmanager
def kafka_for_tests() -> Iterator[str]:
    """The broker ``XIETONG_TEST_KAFKA_BOOTSTRAP`` names, or one started on free ports in a
    fresh folder for the block (the suite's fixture and the console measurement script)."""
    external = os.environ.get("XIETONG_TEST_KAFKA_BOOTSTRAP")
    if external:
        yield external
        return
    data_dir = Path(tempfile.mkdtemp(prefix="xietong-kafka-"))
    broker = infra.start_kafka(data_dir=data_dir)
    try:
        yield broker.bootstrap_servers
    finally:
        infra.stop(broker)
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    with kafka_for_tests() as bootstrap:
        yield bootstrap


def seaweedfs_or(env_prefix: str, folder_prefix: str) -> Iterator[S3Endpoint]:
    """The S3 server the environment names (``<env_prefix>_ENDPOINT``, ``..._ACCESS_KEY_ID``,
    ``..._SECRET_ACCESS_KEY``), or a SeaweedFS started on free ports in a fresh folder."""
    external = os.environ.get(f"{env_prefix}_ENDPOINT")
    if external:
        yield S3Endpoint(
            external,
            os.environ[f"{env_prefix}_ACCESS_KEY_ID"],
            os.environ[f"{env_prefix}_SECRET_ACCESS_KEY"],
        )
        return
    data_dir = Path(tempfile.mkdtemp(prefix=folder_prefix))
    server = infra.start_seaweedfs(data_dir=data_dir)
    try:
        yield S3Endpoint(server.endpoint_url, server.access_key_id, server.secret_access_key)
    finally:
        infra.stop(server)
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[S3Endpoint]:
    yield from seaweedfs_or("XIETONG_TEST_S3", "xietong-s3-")


@pytest.fixture(scope="session")
def private_s3_endpoint() -> Iterator[S3Endpoint]:
    """A second, separate S3 server: the storage service's private store (the other stands for
    the public cloud). ``XIETONG_TEST_PRIVATE_S3_ENDPOINT`` (with ``..._ACCESS_KEY_ID`` and
    ``..._SECRET_ACCESS_KEY``) names an existing one."""
    yield from seaweedfs_or("XIETONG_TEST_PRIVATE_S3", "xietong-s3-private-")


@pytest.fixture
def settings(kafka_bootstrap: str, tmp_path: Path) -> XietongSettings:
    """Platform settings pointing at the test broker, with state in a per-test folder."""
    return load_settings(
        kafka_bootstrap_servers=kafka_bootstrap,
        kafka_partitions=3,
        kafka_fetch_timeout_ms=100,
        state_dir=str(tmp_path / "state"),
        log_format="text",
        network_secret="test-network-secret",
    )


@pytest.fixture
def s3_settings(s3_endpoint: S3Endpoint, tmp_path: Path) -> XietongSettings:
    return load_settings(
        s3_endpoint_url=s3_endpoint.endpoint_url,
        s3_access_key_id=s3_endpoint.access_key_id,
        s3_secret_access_key=s3_endpoint.secret_access_key,
        state_dir=str(tmp_path / "state"),
    )


@pytest.fixture
def unique_name() -> Callable[[str], str]:
    """``unique_name("events")`` -> ``events.t1a2b3c4.v1``: a topic or bucket no other test uses."""

    def make(prefix: str = "test") -> str:
        return f"{prefix}.t{uuid.uuid4().hex[:10]}.v1"

    return make
