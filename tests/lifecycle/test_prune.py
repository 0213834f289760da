"""``modelbus prune [--dry-run]`` and ``POST /api/v2/models/prune``: files in the models directory that no
record owns go, and the folders that leaves empty; a record's files, the staging folder and what a link
points at stay; the deletion is an event; while a record's files are missing nothing is pruned."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from modelbus.services.client import ModelBusClient
from modelbus.services.install.placement import staging_root
from modelbus.services.install.prune import PRUNE_AGGREGATE
from tests.fixtures.model_files import make_lora_diffusers, make_lora_kohya
from tests.install.conftest import Bus
from tests.lifecycle.conftest import TIMEOUT, Cli, cli_json


def _client(http: TestClient) -> ModelBusClient:
    return http.app.state.client  # type: ignore[attr-defined,no-any-return]


def _tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() + ("/" if p.is_dir() and not p.is_symlink() else "")
            for p in root.rglob("*")}


def test_prune_deletes_only_what_no_record_owns(bus: Bus, cli: Cli, http: TestClient, tmp_path: Path) -> None:
    client = _client(http)
    models = bus.config.models_path
    single = client.wait(client.install(str(make_lora_kohya(tmp_path / "p_single.safetensors", rank=9))), TIMEOUT)
    bus.hub.add_repo("acme/prune-lora", make_lora_diffusers(tmp_path / "p_repo", base="sdxl", folder=True))
    folder = client.wait(client.install("acme/prune-lora"), TIMEOUT)
    assert single["state"] == folder["state"] == "completed"
    single_path = bus.config.model_path(client.get_model(single["key"]).path)
    folder_path = bus.config.model_path(client.get_model(folder["key"]).path)
    (folder_path / "notes.txt").write_text("inside a folder model: the model's")
    (models / "junk.bin").write_bytes(b"x" * 1000)
    (single_path.parent / "orphan.safetensors").write_bytes(b"y" * 10)
    (models / "empty" / "deeper").mkdir(parents=True)
    (models / "old" / "stuff").mkdir(parents=True)
    (models / "old" / "stuff" / "left.ckpt").write_bytes(b"z")
    os.symlink(single_path, models / "link-to-model.safetensors")  # the link goes, never what it points at
    partial = staging_root(bus.config) / "some-job" / "big.safetensors.part"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"p")
    doomed = {"junk.bin", f"{single_path.parent.relative_to(models).as_posix()}/orphan.safetensors",
              "old/stuff/left.ckpt", "link-to-model.safetensors"}
    before = _tree(models)
    planned = cli_json(cli, "prune", "--dry-run")
    assert set(planned["files"]) == doomed and planned["dry_run"]
    assert set(planned["folders"]) == {"empty", "empty/deeper", "old", "old/stuff"}
    assert planned["bytes"] >= 1011
    assert _tree(models) == before  # a dry run deletes nothing
    shown = cli("prune", "--dry-run").stdout
    assert "would delete 4 file(s)" in shown and "junk.bin" in shown
    done = http.post("/api/v2/models/prune", json={}).json()
    assert set(done["files"]) == doomed and not done["dry_run"]
    left = _tree(models)
    assert not any(d in left for d in doomed) and "empty/" not in left and "old/" not in left
    assert single_path.is_file() and (folder_path / "notes.txt").is_file() and partial.is_file()
    assert cli_json(cli, "verify")["healthy"]
    events = [s.event for s in client.store.history(PRUNE_AGGREGATE)]
    assert [e.type for e in events] == ["ModelsDirPruned"] and set(events[0].files) == doomed
    again = cli_json(cli, "prune")
    assert again["files"] == [] and again["folders"] == []
    assert len(client.store.history(PRUNE_AGGREGATE)) == 1  # nothing deleted: no event


def test_prune_with_a_record_whose_file_is_missing_changes_nothing(bus: Bus, cli: Cli, http: TestClient,
                                                                    tmp_path: Path) -> None:
    client = _client(http)
    gone = client.wait(client.install(str(make_lora_kohya(tmp_path / "p_gone.safetensors", rank=11))), TIMEOUT)
    path = bus.config.model_path(client.get_model(gone["key"]).path)
    path.unlink()
    junk = bus.config.models_path / "junk-while-missing.bin"
    junk.write_bytes(b"j")
    before = _tree(bus.config.models_path)
    events = len(client.store.history(PRUNE_AGGREGATE))
    refused = cli("prune", code=4)
    assert gone["key"] in refused.stderr and "nothing pruned" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert http.post("/api/v2/models/prune", json={"dry_run": True}).status_code == 409
    assert _tree(bus.config.models_path) == before and junk.exists()
    assert len(client.store.history(PRUNE_AGGREGATE)) == events
    assert http.post("/api/v2/models/prune", json={"dry_run": "maybe"}).status_code == 422
    client.delete_model(gone["key"])
    assert "junk-while-missing.bin" in cli_json(cli, "prune")["files"]


def test_prune_keeps_a_running_installs_destination_and_never_follows_a_link(bus: Bus, cli: Cli, http: TestClient,
                                                                            tmp_path: Path) -> None:
    from tests.servers.file_server import Fault
    from tests.waiting import wait_until

    client = _client(http)
    data = make_lora_kohya(tmp_path / "p_running.safetensors", rank=40).read_bytes()
    url = bus.files.add_file("files/p_running.safetensors", data)
    # every request stalls: a retry after the stall timeout (a slow, loaded run) must not finish the job
    bus.files.set_fault("files/p_running.safetensors",
                        Fault(stall_after=1024, stall_seconds=120, times=None))
    job = client.install(url)
    wait_until(lambda: client.job(job["id"])["state"] == "downloading", TIMEOUT, "the download running")
    # the bus's one worker is held by that download: the prune needs a hash worker of its own
    hasher = bus.start_worker(queues="hash")
    try:
        _prune_beside_the_download(bus, cli, client, job, tmp_path)
    finally:
        os.killpg(hasher.pid, signal.SIGTERM)
        hasher.wait(timeout=30)
        bus.files.set_fault("files/p_running.safetensors", None)


def _prune_beside_the_download(bus: Bus, cli: Cli, client: ModelBusClient, job: dict[str, Any],
                               tmp_path: Path) -> None:
    from modelbus.services.install.progress import ProgressBoard

    models = bus.config.models_path
    # where the job is moving its model (as the hash step says before its rename): not anybody's junk
    incoming = models / "sd-1" / "lora" / "incoming.safetensors"
    incoming.parent.mkdir(parents=True, exist_ok=True)
    incoming.write_bytes(b"being placed")
    ProgressBoard(client.redis, client.store.keys).set_placed(job["id"], incoming)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.bin").write_bytes(b"not in the models dir")
    os.symlink(outside, models / "link-to-outside")
    report = cli_json(cli, "prune")
    assert "link-to-outside" in report["files"]
    assert not any("incoming" in f for f in report["files"])
    assert incoming.exists() and (outside / "precious.bin").exists() and not (models / "link-to-outside").exists()
    assert client.cancel(job["id"])["state"] == "cancelled"
    assert "sd-1/lora/incoming.safetensors" in cli_json(cli, "prune")["files"]  # its job ended: now it is junk
