"""``jobs restart``: a repo install whose download of one file failed keeps the files it downloaded whole and
verified, and the restart fetches only the failed and the missing ones (the hub counts the requests);
``--from-scratch`` fetches them all; a running or completed job refuses a restart and stays as it was. A resumed
repo install likewise fetches only what it lacked (its partial file continues with a range)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from modelbus.services.cli import app as cli_app
from modelbus.services.client import AsyncModelBusClient, ModelBusClient
from modelbus.services.install.errors import JobStateError
from modelbus.services.install.placement import staging_dir
from tests.fixtures.model_folders import make_tiny_sd_diffusers
from tests.install.conftest import Bus, make_service
from tests.lifecycle.conftest import TIMEOUT, Cli, stalled_install
from tests.servers.file_server import Fault
from tests.waiting import wait_until

BROKEN = "unet/diffusion_pytorch_model.safetensors"
INDEX = "model_index.json"  # (the install step reads it to choose the pipeline's files: a read, not a download)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_sd_diffusers(tmp_path_factory.mktemp("restart") / "tiny-sd")


def _client(http: TestClient) -> ModelBusClient:
    return http.app.state.client  # type: ignore[attr-defined,no-any-return]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _downloads(bus: Bus, repo: str) -> list[str]:
    """The files of ``repo`` the hub was asked for since its log was reset, once per request."""
    marker = f"/{repo}/resolve/"
    return [r.path.split(marker, 1)[1].split("?")[0].split("/", 1)[1] for r in bus.hub.requests
            if r.method == "GET" and marker in r.path]


def _failed_install(bus: Bus, client: ModelBusClient, repo: str, pipeline: Path) -> tuple[dict[str, Any], set[str]]:
    """A repo install whose weights of the unet fail (HTTP 500 every time); returns the job and the files it
    recorded as downloaded."""
    bus.hub.add_repo(repo, pipeline)
    bus.hub.set_fault(repo, BROKEN, Fault(status=500, times=None))
    failed = client.wait(client.install(repo), timeout=TIMEOUT)
    assert failed["state"] == "error" and "500" in failed["error"], (failed, bus.worker_log())
    events = [s.event for s in client.store.history(failed["id"])]
    downloaded = {e.file for e in events if e.type == "InstallFileDownloaded"}
    assert downloaded and BROKEN not in downloaded
    assert set(client.job(failed["id"])["downloaded_files"]) == downloaded  # what a restart will keep
    staging = staging_dir(bus.config, failed["id"]) / repo.split("/")[1]
    # the hash step ends the failed attempt: partial files go, the whole ones stay for the restart
    wait_until(lambda: not list(staging.rglob("*.part*")), TIMEOUT, "the partial files removed", bus.worker_log)
    assert set(_files(staging)) == downloaded
    return failed, downloaded


def _restart(client: ModelBusClient, job_id: str, restart: Any) -> Any:
    def accepted() -> Any:
        try:
            return restart()
        except JobStateError as exc:  # its last steps are still ending (the hash step cleans up)
            assert "still stopping" in str(exc)
            return None
    return wait_until(accepted, TIMEOUT, "the restart accepted")


def test_restart_fetches_only_the_failed_and_missing_files(bus: Bus, cli: Cli, http: TestClient,
                                                          pipeline: Path) -> None:
    client, repo = _client(http), "acme/restart-sd"
    failed, downloaded = _failed_install(bus, client, repo, pipeline)
    bus.hub.set_fault(repo, BROKEN, None)  # the hub is fixed
    # a kept file cut short on disk meanwhile is not the file its download recorded: fetched again
    damaged = "text_encoder/model.safetensors"
    assert damaged in downloaded
    staged = staging_dir(bus.config, failed["id"]) / repo.split("/")[1] / damaged
    staged.write_bytes(staged.read_bytes()[:-1])
    bus.hub.reset_log()

    def by_cli() -> str:
        result = CliRunner().invoke(cli_app, ["jobs", "restart", failed["id"]])
        if result.exit_code == 4 and "still stopping" in result.stderr:
            raise JobStateError(result.stderr)
        assert result.exit_code == 0, (result.stdout, result.stderr)
        return result.stdout
    line = _restart(client, failed["id"], by_cli)
    assert f"{len(downloaded)} downloaded file(s) kept" in " ".join(line.split())
    done = client.wait(failed["id"], timeout=TIMEOUT)
    assert done["state"] == "completed" and done["attempt"] == 1, (done, bus.worker_log())
    assert set(done["kept_files"]) == downloaded
    fetched = _downloads(bus, repo)
    assert not (set(fetched) & downloaded) - {INDEX, damaged}, fetched  # nothing kept is downloaded again
    assert fetched.count(INDEX) <= 1 and fetched.count(BROKEN) == 1 and fetched.count(damaged) == 1
    model = bus.config.model_path(client.get_model(done["key"]).path)
    installed = _files(model)
    # the failed file, those never fetched, and the damaged one
    assert set(fetched) - {INDEX} == (set(installed) - downloaded) | {damaged}
    assert installed == {name: data for name, data in _files(pipeline).items() if name in installed}
    restarts = [s.event for s in client.store.history(failed["id"]) if s.event.type == "InstallRestarted"]
    assert [(e.kept_files, e.from_scratch) for e in restarts] == [(sorted(downloaded), False)]
    assert not staging_dir(bus.config, failed["id"]).exists()
    # a completed job: the restart is refused (one line, exit 4 / 409) and its history stays as it is
    history = [s.event.event_id for s in client.store.history(failed["id"])]
    refused = cli("jobs", "restart", failed["id"], code=4).stderr
    assert "completed" in refused and len(refused.strip().splitlines()) == 1
    assert http.post(f"/api/v2/models/install/{failed['id']}/restart").status_code == 409
    with pytest.raises(JobStateError, match="completed"):  # the asyncio client: the same call, the same refusal
        asyncio.run(AsyncModelBusClient(client=client).restart(failed["id"], from_scratch=True))
    assert [s.event.event_id for s in client.store.history(failed["id"])] == history


def test_restart_from_scratch_downloads_every_file_again(bus: Bus, http: TestClient, pipeline: Path) -> None:
    client, repo = _client(http), "acme/restart-sd-scratch"
    failed, downloaded = _failed_install(bus, client, repo, pipeline)
    url = f"/api/v2/models/install/{failed['id']}/restart"
    assert http.post(url, json={"from_scratch": True, "bogus": 1}).status_code == 422  # nothing restarted
    assert client.job(failed["id"])["state"] == "error"
    bus.hub.set_fault(repo, BROKEN, None)
    bus.hub.reset_log()

    def restart() -> dict[str, Any]:
        answer = http.post(url, json={"from_scratch": True})
        if answer.status_code == 409 and "still stopping" in answer.text:
            raise JobStateError(answer.text)
        assert answer.status_code == 200, answer.text
        return answer.json()  # type: ignore[no-any-return]
    job = _restart(client, failed["id"], restart)
    assert job["kept_files"] == [] and job["attempt"] == 1
    done = client.wait(failed["id"], timeout=TIMEOUT)
    assert done["state"] == "completed", (done, bus.worker_log())
    fetched = _downloads(bus, repo)
    assert downloaded - {INDEX} <= set(fetched) and BROKEN in fetched


def test_forgetting_a_failed_job_removes_the_files_it_kept(bus: Bus, http: TestClient, pipeline: Path) -> None:
    client = _client(http)
    failed, _ = _failed_install(bus, client, "acme/restart-sd-forgotten", pipeline)
    staging = staging_dir(bus.config, failed["id"])
    assert staging.is_dir()
    installer = make_service(bus)
    try:
        assert installer.prune_jobs() >= 1
    finally:
        installer.record_store.close()
    assert not staging.exists() and failed["id"] not in {j.id for j in client.jobs()}


def test_a_running_job_refuses_a_restart(bus: Bus, cli: Cli, http: TestClient, tmp_path: Path) -> None:
    client = _client(http)
    job = stalled_install(bus, client, tmp_path / "running.safetensors")
    history = [s.event.event_id for s in client.store.history(job["id"])]
    refused = cli("jobs", "restart", job["id"], code=4).stderr
    assert "downloading" in refused and "only a failed or cancelled job" in refused
    answer = http.post(f"/api/v2/models/install/{job['id']}/restart", json={"from_scratch": True})
    assert answer.status_code == 409 and "downloading" in answer.json()["error"]["message"]
    assert [s.event.event_id for s in client.store.history(job["id"])] == history
    assert "cancelled" in cli("cancel", job["id"]).stdout


def test_a_resumed_repo_install_fetches_only_what_it_lacked(bus: Bus, http: TestClient, pipeline: Path) -> None:
    client, repo = _client(http), "acme/resume-sd"
    bus.hub.add_repo(repo, pipeline)
    size = (pipeline / BROKEN).stat().st_size
    bus.hub.set_fault(repo, BROKEN, Fault(stall_after=size // 2, stall_seconds=120))
    job = client.install(repo)

    def stalled() -> bool:
        return any(f.path == BROKEN and f.bytes >= size // 2 for f in client.job(job["id"]).files)
    wait_until(stalled, TIMEOUT, "half of the unet's weights downloaded", bus.worker_log)
    client.pause(job["id"])
    wait_until(lambda: "install_download_paused" in bus.worker_log(), TIMEOUT, "the download stopped")
    downloaded = {s.event.file for s in client.store.history(job["id"]) if s.event.type == "InstallFileDownloaded"}
    assert downloaded and BROKEN not in downloaded
    bus.hub.reset_log()
    resumed = client.resume(job["id"])
    assert set(resumed["kept_files"]) == downloaded
    done = client.wait(job["id"], timeout=TIMEOUT)
    assert done["state"] == "completed", (done, bus.worker_log())
    fetched = _downloads(bus, repo)
    assert not (set(fetched) & downloaded) - {INDEX}, fetched
    ranges = [r.headers.get("Range") or r.headers.get("range") or "" for r in bus.hub.requests
              if r.path.endswith(BROKEN)]
    starts = [int(r.removeprefix("bytes=").split("-")[0]) for r in ranges if r.startswith("bytes=")]
    assert any(0 < start < size for start in starts), ranges  # the partial file continued, not fetched again
    installed = _files(bus.config.model_path(client.get_model(done["key"]).path))
    assert installed == {name: data for name, data in _files(pipeline).items() if name in installed}
