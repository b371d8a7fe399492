"""The web console's fixtures: the real gateway as a process (``python -m services.ingest``) on the
test broker, Debian's headless chromium driven by selenium through ``/usr/bin/chromedriver``
(never a browser or driver downloaded by Selenium Manager), tenants of one industry with keys.

Screenshots go to ``XIETONG_TEST_ARTEFACTS`` (default ``test-artefacts/console`` of the checkout).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from schemas.control import Tenant
from shared.control import ControlRegistry, ControlWriter, issue_api_key, new_id
from shared.settings import XietongSettings, load_settings

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
INDUSTRY = "fasteners"
ARTEFACTS = Path(os.environ.get("XIETONG_TEST_ARTEFACTS", ROOT / "test-artefacts" / "console"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Platform:
    """The running gateway: its partner URL, operator token and Kafka settings."""

    url: str
    operator_token: str
    settings: XietongSettings
    env: dict[str, str]

    def http(
        self, method: str, path: str, key: str | None = None, body: Any = None
    ) -> tuple[int, dict[str, str], bytes]:
        """One request (stdlib): status, headers, body."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        if key:
            request.add_header("Authorization", f"Bearer {key}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return answer.status, dict(answer.headers), answer.read()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read()

    def get_json(self, path: str, key: str | None = None) -> Any:
        status, _, body = self.http("GET", path, key)
        assert status == 200, (status, body[:300])
        return json.loads(body)


def start_gateway(
    kafka_bootstrap: str, state_dir: Path, **extra: str
) -> tuple[subprocess.Popen[bytes], Platform]:
    port, metrics_port = free_port(), free_port()
    token = secrets.token_urlsafe(24)
    env = {
        **os.environ,
        "XIETONG_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "XIETONG_INGEST_HTTP_PORT": str(port),
        "XIETONG_INGEST_METRICS_PORT": str(metrics_port),
        "XIETONG_OPERATOR_TOKEN": token,
        "XIETONG_OPERATOR_SCRAPE": json.dumps({"ingest": f"http://127.0.0.1:{metrics_port}"}),
        "XIETONG_NETWORK_SECRET": "test-network-secret",
        "XIETONG_KAFKA_PARTITIONS": "3",
        "XIETONG_KAFKA_FETCH_TIMEOUT_MS": "100",
        "XIETONG_STATE_DIR": str(state_dir),
        "XIETONG_LOG_FORMAT": "text",
        **extra,
    }
    state_dir.mkdir(parents=True, exist_ok=True)
    log = (state_dir / "gateway.log").open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "services.ingest"], env=env, cwd=ROOT, stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        if process.poll() is not None:
            raise AssertionError(f"the gateway exited: see {state_dir / 'gateway.log'}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as answer:
                if answer.status == 200:
                    break
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            process.terminate()
            raise AssertionError("the gateway did not get ready in 90 s")
        time.sleep(0.3)
    settings = load_settings(
        kafka_bootstrap_servers=kafka_bootstrap,
        kafka_partitions=3,
        kafka_fetch_timeout_ms=100,
        network_secret="test-network-secret",
    )
    return process, Platform(url, token, settings, env)


def stop_gateway(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="module")
def platform(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    process, running = start_gateway(kafka_bootstrap, tmp_path_factory.mktemp("console-gateway"))
    try:
        yield running
    finally:
        stop_gateway(process)


def new_driver(width: int = 1400, height: int = 1000) -> WebDriver:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail(
            "chromium and chromium-driver are missing: `make test` (make browser) installs them"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={width},{height}",
        "--enable-precise-memory-info",
        "--js-flags=--expose-gc",  # the memory measurement collects garbage before each sample
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


@pytest.fixture
def driver() -> Iterator[WebDriver]:
    browser = new_driver()
    try:
        yield browser
    finally:
        browser.quit()


@pytest.fixture
def screenshot(request: pytest.FixtureRequest) -> Callable[[WebDriver, str], Path]:
    def take(browser: WebDriver, name: str) -> Path:
        ARTEFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTEFACTS / f"{name}.png"
        browser.save_screenshot(str(path))
        return path

    return take


@dataclass(frozen=True)
class Firms:
    """Tenants ``a`` and ``b`` (partners of :data:`INDUSTRY`) and ``bank`` (a consumer)."""

    a: str
    b: str
    bank: str
    keys: dict[str, str]


async def _register(settings: XietongSettings) -> Firms:
    tenants = {f"a{new_id()}": "partner", f"b{new_id()}": "partner", f"bank{new_id()}": "consumer"}
    keys: dict[str, str] = {}
    async with ControlWriter(settings) as writer, ControlRegistry(settings) as registry:
        for tenant, kind in tenants.items():
            await writer.put_tenant(
                Tenant(
                    tenant=tenant,
                    name=f"Firm {tenant[:5]}",
                    kind=kind,  # type: ignore[arg-type]
                    industry=INDUSTRY,
                    region="cn-east",
                    created_at=datetime.now(UTC),
                )
            )
            keys[tenant], record = issue_api_key(tenant)
            await writer.put_key(record)
        async with asyncio.timeout(30):
            while any(registry.authenticate(key) is None for key in keys.values()):
                await registry.wait_changed(registry.version, 1)
    a, b, bank = tenants
    return Firms(a, b, bank, keys)


@pytest.fixture
def firms(platform: Platform) -> Firms:
    return register(platform)


def register(platform: Platform) -> Firms:
    """New firms whose keys the running gateway already honours."""
    found = asyncio.run(_register(platform.settings))
    # the gateway's own registry reads the keys a moment later
    deadline = time.monotonic() + 30
    while platform.http("GET", "/v1/console/me", found.keys[found.bank])[0] != 200:
        assert time.monotonic() < deadline, "the gateway never learned the new keys"
        time.sleep(0.2)
    return found


def wait(browser: WebDriver, condition: Callable[[WebDriver], Any], timeout: float = 90) -> Any:
    return WebDriverWait(browser, timeout, poll_frequency=0.1).until(condition)


def sign_in(browser: WebDriver, platform: Platform, key: str, role: str = "partner") -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"{platform.url}/console/")
    wait(browser, lambda b: b.execute_script("return document.body.dataset.view") == "signin")
    browser.find_element(By.ID, "key").send_keys(key)
    browser.find_element(By.CSS_SELECTOR, f"input[name=role][value={role}]").click()
    browser.find_element(By.ID, "signin-button").click()
