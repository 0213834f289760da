"""The install job as the client, the API and the CLI show it: one typed view (events.jobs.InstallJobView)
with live per-file progress while the job runs, no secrets, the same JSON on every surface."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from modelbus.events.jobs import FileProgress, InstallJobView
from modelbus.services.api import create_app
from modelbus.services.cli import app as cli_app
from modelbus.services.client import ModelBusClient
from tests.install.conftest import Bus
from tests.servers.file_server import Fault
from tests.waiting import wait_until

TIMEOUT = 60
SIZE = 2 << 20
SENT = 64 << 10


@pytest.fixture()
def client(bus: Bus) -> Iterator[ModelBusClient]:
    with ModelBusClient(bus.config) as c:
        yield c


def _running_file(client: ModelBusClient, job_id: str) -> FileProgress | None:
    view = client.job(job_id)
    return next((f for f in view.files if f.bytes >= SENT), None)


def test_a_running_job_shows_each_file_and_every_surface_the_same_view(bus: Bus, client: ModelBusClient) -> None:
    name = "files/view_lora.safetensors"
    bus.files.add_file(name, b"\x00" * SIZE)
    # 64 KiB and then a stall: the job stays running with a known count while we look at it
    bus.files.set_fault(name, Fault(stall_after=SENT, stall_seconds=60, times=None))
    job = client.install(bus.files.url_for(name), access_token="s3cret-token")
    assert isinstance(job, InstallJobView) and job.state == "waiting" and not job.terminal
    assert "access_token" not in job.options and "claim" not in job.options
    running = wait_until(lambda: _running_file(client, job.id), TIMEOUT, "the first bytes of the file",
                         bus.worker_log)
    assert running.path.endswith("view_lora.safetensors") and running.total_bytes == SIZE
    view = client.job(job.id)
    assert view.state == "downloading" and view.bytes >= SENT and view.total_bytes == SIZE
    assert sum(f.bytes for f in view.files) == view.bytes
    assert [j.id for j in client.jobs() if j.id == job.id] == [job.id]

    with TestClient(create_app(bus.config)) as http:
        answer = http.get(f"/api/v2/models/install/{job.id}")
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert InstallJobView.model_validate(body).id == job.id  # the API's JSON is the view's
        assert body["files"][0]["total_bytes"] == SIZE and "s3cret-token" not in answer.text
        listed = http.get("/api/v2/models/install").json()
        assert job.id in [j["id"] for j in listed]

    shown = CliRunner().invoke(cli_app, ["jobs", "--json"])
    assert shown.exit_code == 0, shown.stderr
    from_cli = {j["id"]: InstallJobView.model_validate(j) for j in json.loads(shown.stdout)}
    assert from_cli[job.id].files and "s3cret-token" not in shown.stdout

    cancelled = client.cancel(job.id)
    assert isinstance(cancelled, InstallJobView) and cancelled.state == "cancelled" and cancelled.terminal
    final = client.wait(cancelled, timeout=TIMEOUT)  # a view is a job reference too
    assert final.state == "cancelled" and final.files == ()  # live progress is for running jobs only
