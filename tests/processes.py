"""Helpers for tests that run a service as an operator would: ``python -m services.<name>``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp

from deploy.local.infra import free_port
from shared.settings import XietongSettings


async def wait_until_ready(
    session: aiohttp.ClientSession, url: str, process: asyncio.subprocess.Process
) -> None:
    """Poll ``/readyz`` until it answers 200; fail if the process exits first (60 s at most)."""
    async with asyncio.timeout(60):
        while True:
            if process.returncode is not None:
                raise AssertionError(f"the service exited with {process.returncode}")
            try:
                async with session.get(f"{url}/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.2)


@contextlib.contextmanager
def gateway_process(settings: XietongSettings, log_path: Path, **env: str) -> Iterator[str]:
    """``python -m services.ingest`` on free ports against ``settings``' broker (``env``: more
    ``XIETONG_*`` variables), its output in ``log_path``; yields its URL once ``/readyz`` says
    200 (60 s at most); stopped with SIGTERM, which must be clean (exit 0)."""
    port = free_port()
    variables = {
        **os.environ,
        "XIETONG_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "XIETONG_INGEST_HTTP_PORT": str(port),
        "XIETONG_INGEST_METRICS_PORT": str(free_port()),
        "XIETONG_LOG_FORMAT": "text",
        **env,
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.ingest"],
            env=variables,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                assert process.poll() is None, log_path.read_text()
                try:
                    with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
                        if response.status == 200:
                            break
                except OSError:  # not listening yet, or not answering yet
                    pass
                assert time.monotonic() < deadline, "the gateway did not become ready"
                time.sleep(0.2)
            yield url
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
