"""Fixtures of the page tests: the API (with its page) served by uvicorn on 127.0.0.1 over a bus with a
real install worker, and Debian's chromium driven by Playwright (browsers cannot be downloaded here:
``executable_path`` points at the system's; ``.ci/run`` installs it when missing)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI

from modelbus.services.api import create_app
from modelbus.services.client import ModelBusClient
from tests.client.conftest import model_config, put_file
from tests.install.conftest import REPO_ROOT, Bus, _bus

CHROMIUM = os.environ.get("MODELBUS_TEST_CHROMIUM", "/usr/bin/chromium")
SHOTS = REPO_ROOT / "docs" / "screenshots"
TIMEOUT_MS = 60_000  # generous: the machine is shared


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    """One uvicorn server of one app on a fixed port (so a test can stop it and start another there)."""

    def __init__(self, app: FastAPI, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@pytest.fixture(scope="module")
def ui_bus(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bus]:
    """A bus with one worker on the install, download and hash queues (tests/install's)."""
    yield from _bus(redis_url, tmp_path_factory.mktemp("ui-bus"), start_workers=1)


@pytest.fixture(scope="module")
def ui_api(ui_bus: Bus) -> Iterator[str]:
    ui_bus.config.models_path.mkdir(parents=True, exist_ok=True)
    served = Served(create_app(ui_bus.config))
    yield served.url
    served.stop()


@pytest.fixture(scope="module")
def ui_client(ui_bus: Bus) -> Iterator[ModelBusClient]:
    with ModelBusClient(ui_bus.config) as client:
        yield client


def start_gpu_worker(env: dict[str, str], name: str, log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "modelbus.workers", "--queues", "gpu", "--device", "cpu", "--name", name]
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env={**os.environ, **env}, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def browser():  # type: ignore[no-untyped-def]
    # per module, not per session: Playwright's sync API keeps an event loop running in this thread while
    # it is started, and later tests (asyncio.run) must not find it
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium; .ci/run does)")
    from playwright.sync_api import expect, sync_playwright
    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"),
                                      args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture()
def new_page(browser):  # type: ignore[no-untyped-def]
    """Pages in a fresh browser context (1280x800 unless told otherwise); closed after the test."""
    contexts = []

    def make(**options):  # type: ignore[no-untyped-def]
        context = browser.new_context(viewport=options.pop("viewport", {"width": 1280, "height": 800}), **options)
        context.set_default_timeout(TIMEOUT_MS)
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        return page

    errors: list[str] = []
    yield make
    for context in contexts:
        context.close()
    assert not errors, f"script errors on the page: {errors}"


@pytest.fixture()
def page(new_page):  # type: ignore[no-untyped-def]
    return new_page()


def shoot(page, name: str) -> None:  # type: ignore[no-untyped-def]
    """A screenshot for the README (docs/screenshots/NAME.png)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"))


def ready(page, url: str) -> None:  # type: ignore[no-untyped-def]
    """Open ``url`` and wait for the page's script to have started."""
    page.goto(url)
    page.wait_for_selector("html[data-ready=yes]", state="attached")


def add_record(client: ModelBusClient, name: str, **extra: object) -> str:
    """A main checkpoint record whose file exists; returns its key."""
    key = f"ui-{uuid.uuid4().hex[:12]}"
    put_file(client.config, f"{key}.safetensors")
    client.add_model(key, model_config(name, f"{key}.safetensors", **extra))
    return key
