"""Helpers for tests that run a service as an operator would: ``python -m services.<name>``."""

from __future__ import annotations

import asyncio

import aiohttp


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
