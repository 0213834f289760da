"""The staging janitor of ``modelbus prune``: staging folders older than MODELBUS_STAGING_TTL that no running job
uses are reclaimed (each an ``InstallStagingReclaimed`` event), the others stay; ``prune --dry-run`` and ``doctor``
report the staging figures; a staging name from a job cannot leave the staging folder."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from modelbus.events.schema import InstallFailed, InstallFileDownloaded, InstallRequested, InstallStarted
from modelbus.services.cli import app as cli_app
from modelbus.services.client import ModelBusClient
from modelbus.services.client.aio import AsyncModelBusClient
from modelbus.services.install.errors import InvalidStagingNameError
from modelbus.services.install.placement import staging_dir, staging_root
from modelbus.services.install.staging import STAGING_AGGREGATE
from tests.install.conftest import Bus
from tests.lifecycle.conftest import Cli, cli_json
from tests.waiting import wait_until

DAY = 86400.0


def _client(http: TestClient) -> ModelBusClient:
    return http.app.state.client  # type: ignore[attr-defined,no-any-return]


@pytest.fixture(autouse=True)
def _hash_worker_up(bus: Bus) -> None:
    """The module's worker has registered (it starts with the module: prune runs on it)."""
    with ModelBusClient(bus.config) as client:
        wait_until(lambda: any("hash" in w.queues for w in client.workers()), 120, "a worker on the hash queue",
                   bus.worker_log)


def _stage(bus: Bus, name: str, files: dict[str, int], age_days: float) -> Path:
    """A staging folder as an install leaves it, every entry last changed ``age_days`` ago."""
    folder = staging_root(bus.config) / name
    for rel, size in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(b"s" * size)
    _age(folder, age_days)
    return folder


def _age(folder: Path, days: float) -> None:
    when = time.time() - days * DAY
    for path in [*folder.rglob("*"), folder]:
        os.utime(path, (when, when), follow_symlinks=False)


def _old_job(client: ModelBusClient, days: float) -> str:
    """An install job that started ``days`` ago and never ended (its worker was killed): its events' own times."""
    job_id = uuid.uuid4().hex
    then = datetime.now(UTC) - timedelta(days=days)
    client.store.append([InstallRequested(aggregate_id=job_id, source="acme/killed", time=then, correlation_id=job_id),
                         InstallStarted(aggregate_id=job_id, worker="gone", time=then, correlation_id=job_id)],
                        expected_version=0)
    return job_id


def test_stale_staging_is_reclaimed_and_running_jobs_keep_theirs(bus: Bus, cli: Cli, http: TestClient,
                                                                  tmp_path: Path) -> None:
    client = _client(http)
    running = _old_job(client, 0)  # started just now: however old its files look, it keeps its folder
    running_dir = _stage(bus, running, {"w.safetensors.part": 5}, 30)
    killed = _old_job(client, 9)  # a worker killed mid-install 9 days ago: nothing holds its lease
    killed_dir = _stage(bus, killed, {"model/unet/w.safetensors.part": 3000, "model/config.json": 20}, 9)
    leased = _old_job(client, 9)  # as old, but a live worker holds the lease of its download step
    leased_dir = _stage(bus, leased, {"w.safetensors.part": 10}, 9)
    ms = int(time.time() * 1000)
    client.store.client.hset(client.store.keys.lease(f"{leased}-dl0"),
                             mapping={"holder": "w-alive", "expires": ms + 600_000, "token": 1})
    local_dir = _stage(bus, f"local-{uuid.uuid4().hex}", {"copy.safetensors": 500}, 8)  # an in-process install's
    fresh_dir = _stage(bus, "convert-some-model", {"unet/x.safetensors": 7}, 1)  # a conversion of yesterday
    planned = cli_json(cli, "prune", "--dry-run")["staging"]
    assert set(planned["reclaimable"]) == {killed, local_dir.name} and planned["reclaimed"] == []
    assert planned["reclaimable_bytes"] == 3020 + 500 and planned["ttl"] == 7 * DAY
    assert planned["count"] >= 5 and planned["bytes"] >= 3020 + 500 + 10 + 7
    assert datetime.fromisoformat(planned["oldest"]) < datetime.now(UTC) - timedelta(days=29)
    assert killed_dir.is_dir() and local_dir.is_dir()  # a dry run removes nothing and records nothing
    assert client.store.history(STAGING_AGGREGATE) == []

    async def dry_run() -> dict[str, Any]:  # the async client, the same call
        async with AsyncModelBusClient(bus.config) as aclient:
            return await aclient.prune(dry_run=True)  # type: ignore[attr-defined,no-any-return]
    assert asyncio.run(dry_run())["staging"]["reclaimable"] == planned["reclaimable"]
    shown = cli("prune", "--dry-run").stdout
    assert "would reclaim 2 (3.4 KiB) older than 1w that no running job uses" in " ".join(shown.split()), shown
    doctor = {c["name"]: c for c in json.loads(cli("doctor", "--json", code=0).stdout)}
    assert doctor["staging"]["status"] == "warn" and "modelbus prune removes them" in doctor["staging"]["detail"]

    done = http.post("/api/v2/models/prune", json={}).json()["staging"]
    assert set(done["reclaimed"]) == {killed, local_dir.name} and done["reclaimed_bytes"] == 3520
    assert not killed_dir.exists() and not local_dir.exists()
    assert running_dir.is_dir() and leased_dir.is_dir() and fresh_dir.is_dir()
    on_job = [s.event for s in client.store.history(killed)][-1]
    assert on_job.type == "InstallStagingReclaimed" and on_job.folder == killed and on_job.bytes == 3020
    assert on_job.files == 2 and on_job.modified < datetime.now(UTC) - timedelta(days=8)
    loose = [s.event for s in client.store.history(STAGING_AGGREGATE)]
    assert [(e.type, e.folder, e.bytes) for e in loose] == [("InstallStagingReclaimed", local_dir.name, 500)]
    assert [e.type for e in (s.event for s in client.store.history(leased))] == ["InstallRequested",
                                                                                 "InstallStarted"]
    assert client.job(killed)["state"] == "downloading"  # the janitor reclaims files, it does not end jobs
    again = cli_json(cli, "prune")["staging"]
    assert again["reclaimed"] == [] and len(client.store.history(STAGING_AGGREGATE)) == 1
    doctor = {c["name"]: c for c in json.loads(cli("doctor", "--json").stdout)}
    assert doctor["staging"]["status"] == "ok"
    # the lease lapses (its worker died too): the folder goes at the next prune
    client.store.client.hset(client.store.keys.lease(f"{leased}-dl0"), "expires", ms - 1)
    assert cli_json(cli, "prune")["staging"]["reclaimed"] == [leased] and not leased_dir.exists()


def test_a_failed_jobs_kept_files_are_reclaimed_and_a_restart_has_none_to_keep(bus: Bus, cli: Cli, http: TestClient,
                                                                           tmp_path: Path) -> None:
    client = _client(http)
    job_id = _old_job(client, 10)
    then = datetime.now(UTC) - timedelta(days=10)
    client.store.append([InstallFileDownloaded(aggregate_id=job_id, file="unet/w.safetensors", size=4, time=then),
                         InstallFailed(aggregate_id=job_id, error_type="RemoteError", error="gone", time=then)],
                        expected_version=2)
    assert list(client.job(job_id)["downloaded_files"]) == ["unet/w.safetensors"]
    _stage(bus, job_id, {"model/unet/w.safetensors": 4}, 10)
    assert cli_json(cli, "prune")["staging"]["reclaimed"] == [job_id]
    view = client.job(job_id)
    assert view["state"] == "error" and not view["downloaded_files"]  # what a restart could have kept is gone


@pytest.mark.parametrize("ttl", ["7x", "0", "-2d", "soon"])
def test_a_bad_staging_ttl_is_one_line_and_nothing_changes(bus: Bus, http: TestClient, ttl: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _stage(bus, f"local-{uuid.uuid4().hex}", {"x.bin": 3}, 30)
    head = _client(http).store.head()
    monkeypatch.setenv("MODELBUS_STAGING_TTL", ttl)
    result = CliRunner().invoke(cli_app, ["prune"])
    assert result.exit_code == 2, result.stdout
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and f"MODELBUS_STAGING_TTL={ttl!r}" in line and "duration" in line
    assert folder.is_dir() and _client(http).store.head() == head
    shutil.rmtree(folder)


@pytest.mark.parametrize("name", ["../escape", "..", ".", "/etc", "a/b", ".hidden", "", "x" * 256, "-dash",
                                  "nul\x00", "back\\slash"])
def test_a_staging_name_from_a_job_cannot_leave_the_staging_folder(bus: Bus, name: str) -> None:
    with pytest.raises(InvalidStagingNameError, match="staging folder name"):
        staging_dir(bus.config, name)
    assert staging_dir(bus.config, "0123abcd").parent == staging_root(bus.config)


def test_a_starting_worker_runs_the_janitor(bus: Bus, http: TestClient) -> None:
    """A worker killed mid-install is mostly followed by a new one on its host: as it starts it reclaims what
    was left long ago (once, whoever else starts with it)."""
    client = _client(http)
    left = _stage(bus, f"local-{uuid.uuid4().hex}", {"half-copied.safetensors": 64}, 10)
    kept = _stage(bus, f"local-{uuid.uuid4().hex}", {"copying.safetensors": 8}, 0)
    before = len(client.store.history(STAGING_AGGREGATE))
    bus.start_worker()
    wait_until(lambda: not left.exists(), 120, "the new worker's janitor", bus.worker_log)
    assert kept.is_dir()
    events = [s.event for s in client.store.history(STAGING_AGGREGATE)][before:]
    assert [(e.folder, e.bytes) for e in events] == [(left.name, 64)]
    shutil.rmtree(kept)
