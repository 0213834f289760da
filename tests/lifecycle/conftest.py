"""Fixtures of the lifecycle tests (job control, verify, prune, find, browse): one bus per module with a real
worker process and the local file, Hugging Face and Civitai servers; the CLI in-process (typer's runner)
and the HTTP API (Starlette's test client) on that bus."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner, Result

from modelbus.services.api import create_app
from modelbus.services.cli import app as cli_app
from modelbus.services.client import ModelBusClient
from tests.fixtures.model_files import make_lora_kohya
from tests.install.conftest import Bus, _bus
from tests.servers.file_server import Fault
from tests.waiting import wait_until

TIMEOUT = 90
Cli = Callable[..., Result]


@pytest.fixture(scope="module")
def bus(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bus]:
    yield from _bus(redis_url, tmp_path_factory.mktemp("lifecycle-bus"), start_workers=1,
                    extra_env={"MODELBUS_API_ALLOWED_HOSTS": "testserver"})


@pytest.fixture()
def cli(bus: Bus) -> Cli:
    runner = CliRunner()

    def run(*args: str, code: int = 0) -> Result:
        result = runner.invoke(cli_app, list(args))
        assert result.exit_code == code, (args, result.exit_code, result.stdout, result.stderr, bus.worker_log())
        return result
    return run


def stalled_install(bus: Bus, client: ModelBusClient, path: Path) -> dict[str, Any]:
    """An install of a URL whose server stalls after a third of the file, once that third has arrived."""
    data = make_lora_kohya(path, rank=48).read_bytes()
    url = bus.files.add_file(f"files/{path.name}", data)
    bus.files.set_fault(f"files/{path.name}", Fault(stall_after=len(data) // 3, stall_seconds=120))
    job = client.install(url)
    wait_until(lambda: client.job(job["id"])["bytes"] >= len(data) // 3, TIMEOUT, "a third downloaded",
               bus.worker_log)
    return job  # type: ignore[return-value]


def cli_json(cli: Cli, *args: str, code: int = 0) -> Any:
    return json.loads(cli(*args, "--json", code=code).stdout)


@pytest.fixture()
def http(bus: Bus) -> Iterator[TestClient]:
    bus.config.models_path.mkdir(parents=True, exist_ok=True)
    with TestClient(create_app(bus.config)) as client:
        yield client
