"""Schemathesis over the gateway's own ``/openapi.json``: ``python -m services.ingest`` (with the
insight and sharing routes) on the real test broker, with a valid tenant key, every operation
fuzzed from the document (coverage and fuzzing phases, a few hundred requests). It passes only
with no 5xx answer and every answer conforming to the document: status, content type, headers,
body schema, a request the document calls invalid refused, ``Allow`` true, no route answering
without a key.

``positive_data_acceptance`` is left out on purpose: some requests are valid by the document and
still refused, for reasons JSON Schema cannot say (a CSV header that does not fit its type, an
``expires_at`` in the past, a grant to oneself); each is documented as the 4xx it gets.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from schemas.control import Tenant
from shared.control import ControlWriter, issue_api_key, new_id
from shared.settings import XietongSettings
from tests.processes import gateway_process

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CONFIG = Path(__file__).with_name("schemathesis.toml")
MAX_EXAMPLES = 5
"""Per operation and phase: nine operations, about 300 requests in all."""


@pytest.fixture
def gateway(settings: XietongSettings, tmp_path: Path) -> Iterator[str]:
    """The real gateway process, insight and sharing routes included."""
    with gateway_process(
        settings,
        tmp_path / "gateway.log",
        XIETONG_INGEST_WITH_INSIGHTS="true",
        # the operator view on, so its routes answer as documented (401 without the token)
        XIETONG_OPERATOR_TOKEN="schemathesis-operator-token",
        XIETONG_STATE_DIR=str(tmp_path / "state"),
        XIETONG_LOG_LEVEL="WARNING",
    ) as url:
        yield url


async def tenant_key(settings: XietongSettings) -> str:
    tenant = f"t{new_id()}"
    plaintext, record = issue_api_key(tenant, "schemathesis")
    async with ControlWriter(settings) as writer:
        await writer.put_tenant(
            Tenant(tenant=tenant, name="Schema Test", created_at=datetime.now(UTC))
        )
        await writer.put_key(record)
    return plaintext


def known_by(url: str, key: str) -> None:
    """The gateway's registry learns a new key moments later: wait until it is accepted."""
    deadline = time.monotonic() + 60
    request = urllib.request.Request(f"{url}/v1/shares", headers={"Authorization": f"Bearer {key}"})
    while True:
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError as error:
            assert error.code in (401, 503), error.code  # not yet known, or not yet current
        except OSError:
            pass  # a slow answer on a busy machine
        assert time.monotonic() < deadline, "the gateway never learned the key"
        time.sleep(0.2)


def test_the_gateway_answers_as_its_openapi_document_says(
    settings: XietongSettings, gateway: str, tmp_path: Path
) -> None:
    key = asyncio.run(tenant_key(settings))
    known_by(gateway, key)
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(CONFIG),
        "--no-color",
        "run",
        f"{gateway}/openapi.json",
        "--header",
        f"Authorization: Bearer {key}",
        "--checks",
        "all",
        "--exclude-checks",
        "positive_data_acceptance",
        "--phases",
        "coverage,fuzzing",
        "--max-examples",
        str(MAX_EXAMPLES),
        # one worker: hypothesis' lambda descriptions are not thread-safe (an internal error)
        "--workers",
        "1",
        "--seed",
        "1",
    ]
    # Run from tmp_path: schemathesis writes its example database where it runs.
    result = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
    )
    (tmp_path / "schemathesis.txt").write_text(result.stdout + result.stderr)
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-2000:]
