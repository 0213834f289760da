"""``jobs pause|resume|restart``: a paused download keeps its partial file and resumes with a range; a
failed job restarts; every state that does not allow the command refuses it and changes nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from modelbus.services.client import AsyncModelBusClient, ModelBusClient
from modelbus.services.install.errors import JobStateError
from modelbus.services.install.placement import staging_dir
from tests.fixtures.model_files import make_lora_kohya
from tests.install.conftest import Bus
from tests.lifecycle.conftest import TIMEOUT, Cli, cli_json, stalled_install
from tests.servers.file_server import Fault
from tests.waiting import wait_until


def _client(http: TestClient) -> ModelBusClient:
    return http.app.state.client  # type: ignore[attr-defined,no-any-return]


def _parts(bus: Bus, job_id: str) -> list[Path]:
    folder = staging_dir(bus.config, job_id)
    return sorted(folder.rglob("*.part")) if folder.exists() else []


def test_pause_keeps_the_partial_file_and_resume_continues_it_with_a_range(bus: Bus, cli: Cli, http: TestClient,
                                                                            tmp_path: Path) -> None:
    data = make_lora_kohya(tmp_path / "paused.safetensors", rank=64).read_bytes()
    half = len(data) // 2
    url = bus.files.add_file("files/paused.safetensors", data)
    bus.files.set_fault("files/paused.safetensors", Fault(stall_after=half, stall_seconds=120))
    client = _client(http)
    job = client.install(url)
    wait_until(lambda: client.job(job["id"])["bytes"] >= half, TIMEOUT, "half of the file downloaded",
               bus.worker_log)
    paused = cli_json(cli, "jobs", "pause", job["id"])
    assert paused["state"] == "paused"
    wait_until(lambda: _parts(bus, job["id"]), TIMEOUT, "the partial file kept")
    wait_until(lambda: "install_download_paused" in bus.worker_log(), TIMEOUT, "the download stopped")
    assert _parts(bus, job["id"]) and client.job(job["id"])["state"] == "paused"
    # refusals while paused: a second pause, a restart
    assert "only a waiting or downloading job" in cli("jobs", "pause", job["id"], code=4).stderr
    assert "only a failed or cancelled job" in cli("jobs", "restart", job["id"], code=4).stderr
    bus.files.reset_log()
    resumed = http.post(f"/api/v2/models/install/{job['id']}/resume")
    assert resumed.status_code == 200 and resumed.json()["attempt"] == 1
    done = client.wait(job, timeout=TIMEOUT)
    assert done["state"] == "completed", (done, bus.worker_log())
    assert bus.config.model_path(client.get_model(done["key"]).path).read_bytes() == data
    ranges = [r.headers.get("Range") or r.headers.get("range") for r in bus.files.requests
              if r.path.endswith("paused.safetensors")]
    # the resume asks for the bytes it lacks (after a probe of the file's validators), not the whole file again
    starts = [int(r.removeprefix("bytes=").split("-")[0]) for r in ranges if r and r.startswith("bytes=")]
    assert any(0 < start <= half for start in starts), ranges
    states = [s.event.type for s in client.store.history(job["id"])]
    assert states.count("InstallPaused") == 1 and states.count("InstallResumed") == 1
    # a finished job: nothing to pause, resume or restart, and its history stays as it is
    for command in ("pause", "resume", "restart"):
        refused = cli("jobs", command, job["id"], code=4)
        assert "completed" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
        assert http.post(f"/api/v2/models/install/{job['id']}/{command}").status_code == 409
    assert [s.event.type for s in client.store.history(job["id"])] == states


def test_restart_runs_a_failed_job_again(bus: Bus, cli: Cli, http: TestClient, tmp_path: Path) -> None:
    client = _client(http)
    url = bus.files.url_for("files/later.safetensors")  # not there yet: 404
    failed = client.wait(client.install(url), timeout=TIMEOUT)
    assert failed["state"] == "error"
    bus.files.add_file("files/later.safetensors", make_lora_kohya(tmp_path / "later.safetensors", rank=5).read_bytes())

    def restarted() -> dict | None:  # type: ignore[type-arg]
        try:
            return client.restart(failed["id"])
        except JobStateError as exc:  # its last steps are still ending (the hash step cleans up)
            assert "still stopping" in str(exc)
            return None
    job = wait_until(restarted, TIMEOUT, "the restart accepted")
    assert job["state"] == "waiting" and job["attempt"] == 1 and job["error"] is None
    done = client.wait(job, timeout=TIMEOUT)
    assert done["state"] == "completed", (done, bus.worker_log())
    assert [j["id"] for j in cli_json(cli, "jobs")].count(failed["id"]) == 1


def test_job_control_refusals(bus: Bus, cli: Cli, http: TestClient, tmp_path: Path) -> None:
    assert cli("jobs", "pause", "no-such-job", code=3).stderr.startswith("error: ")
    assert http.post("/api/v2/models/install/no-such-job/resume").status_code == 404
    assert http.post("/api/v2/models/install/bad%20id/pause").status_code == 422
    client = _client(http)
    local = client.wait(client.install(str(make_lora_kohya(tmp_path / "ctl.safetensors", rank=7))), timeout=TIMEOUT)
    assert local["state"] == "completed"
    assert "completed" in cli("jobs", "resume", local["id"], code=4).stderr


def test_cancelling_a_paused_job_removes_its_partial_files(bus: Bus, cli: Cli, http: TestClient,
                                                           tmp_path: Path) -> None:
    client = _client(http)
    job = stalled_install(bus, client, tmp_path / "dropped.safetensors")
    client.pause(job["id"])
    wait_until(lambda: _parts(bus, job["id"]), TIMEOUT, "the partial file kept")
    cancelled = cli("cancel", job["id"])
    assert "cancelled" in cancelled.stdout
    wait_until(lambda: not staging_dir(bus.config, job["id"]).exists(), TIMEOUT, "the staging folder removed")
    assert client.job(job["id"])["state"] == "cancelled"
    assert "only a paused job" in cli("jobs", "resume", job["id"], code=4).stderr



def test_the_async_client_pauses_and_resumes(bus: Bus, http: TestClient, tmp_path: Path) -> None:
    """AsyncModelBusClient.pause/.resume: the same job control, the same events, the same refusal."""
    client = _client(http)
    path = tmp_path / "async-paused.safetensors"
    job = stalled_install(bus, client, path)

    async def pause() -> dict[str, Any]:
        async with AsyncModelBusClient(bus.config) as aclient:
            return await aclient.pause(job["id"])  # type: ignore[attr-defined,no-any-return]

    async def resume() -> dict[str, Any]:
        async with AsyncModelBusClient(bus.config) as aclient:
            return await aclient.resume(job["id"])  # type: ignore[attr-defined,no-any-return]
    assert asyncio.run(pause())["state"] == "paused"
    wait_until(lambda: _parts(bus, job["id"]), TIMEOUT, "the partial file kept")
    with pytest.raises(JobStateError, match="only a waiting or downloading job"):
        asyncio.run(pause())
    bus.files.set_fault(f"files/{path.name}", None)  # the server serves the rest now
    assert asyncio.run(resume())["state"] in ("waiting", "downloading")
    done = client.wait(job, timeout=TIMEOUT)
    assert done["state"] == "completed", (done, bus.worker_log())
    assert bus.config.model_path(client.get_model(done["key"]).path).read_bytes() == path.read_bytes()
    states = [s.event.type for s in client.store.history(job["id"])]
    assert states.count("InstallPaused") == 1 and states.count("InstallResumed") == 1
    with pytest.raises(JobStateError, match="completed"):
        asyncio.run(resume())
    assert [s.event.type for s in client.store.history(job["id"])] == states
