"""A service whose HTTP port is taken says so in one line and exits, instead of a traceback
(``shared.observability.serve_health`` for the workers, the gateway's two ports)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from deploy.local.infra import ROOT, free_port
from shared.observability import serve_health


async def ready() -> str | None:
    return None


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", free_port()))
        sock.listen()
        yield int(sock.getsockname()[1])


async def test_a_worker_s_busy_health_port_is_one_line_naming_it_and_its_setting(
    busy_port: int,
) -> None:
    with pytest.raises(SystemExit) as stopped:
        await serve_health("clean", "127.0.0.1", busy_port, ready)
    message = str(stopped.value)
    assert str(busy_port) in message and "XIETONG_CLEAN_HTTP_PORT" in message
    assert "\n" not in message


@pytest.mark.integration
@pytest.mark.parametrize("which", ["XIETONG_INGEST_HTTP_PORT", "XIETONG_INGEST_METRICS_PORT"])
def test_the_gateway_on_a_busy_port_exits_with_one_line_not_a_traceback(
    kafka_bootstrap: str, busy_port: int, which: str
) -> None:
    env = {
        **os.environ,
        "XIETONG_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "XIETONG_NETWORK_SECRET": "test-network-secret",
        "XIETONG_LOG_FORMAT": "text",
        "XIETONG_INGEST_HTTP_PORT": str(free_port()),
        "XIETONG_INGEST_METRICS_PORT": str(free_port()),
    }
    env[which] = str(busy_port)
    gateway = subprocess.run(
        [sys.executable, "-m", "services.ingest"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert gateway.returncode == 1, gateway.stderr[-2000:]
    assert "Traceback" not in gateway.stderr, gateway.stderr[-2000:]
    last = gateway.stderr.strip().splitlines()[-1]
    assert last.startswith("ingest: ") and str(busy_port) in last and which in last
