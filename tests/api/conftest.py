"""API fixtures: the app on the test's Redis/namespace/root, an in-process client for plain calls and a
real uvicorn server on 127.0.0.1 for streams."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from modelbus.services.api import create_app
from modelbus.services.config import AppConfig


@pytest.fixture()
def app(app_config: AppConfig) -> FastAPI:
    app_config.models_path.mkdir(parents=True, exist_ok=True)
    return create_app(app_config)


@pytest.fixture()
def http(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as client:
        yield client


def serve(app: FastAPI) -> tuple[uvicorn.Server, threading.Thread, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{port}"


@pytest.fixture()
def live_api(app: FastAPI) -> Iterator[str]:
    server, thread, url = serve(app)
    yield url
    server.should_exit = True
    thread.join(10)
