"""Local sources, attacked (issue 12, section 2), with real worker processes:

- a folder whose ``unet/x`` is a symlink to a secret used to copy the secret into the models directory:
  the link is refused by name, by the worker and by the hand-over alike;
- ``{"source": "<a secret outside the roots>"}`` through the API used to make a worker copy it to staging
  before refusing it by suffix: the API answers 403 naming the import roots and publishes nothing, and
  a worker refuses such a command even when it reaches the queue another way;
- the suffix and header checks come before the copy;
- the user at the keyboard still installs any file they can read: the CLI hands it over.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from modelbus.events.schema import InstallRequested
from modelbus.services.api import create_app
from modelbus.services.cli import app as cli_app
from modelbus.services.install import InstallStatus, ModelInstallService
from modelbus.services.install.commands import enqueue_install
from modelbus.services.install.errors import InvalidCommandError, SourceForbiddenError
from modelbus.services.install.placement import copy_into, staging_dir
from modelbus.services.install.roots import import_area
from tests.fixtures.model_files import make_lora_diffusers, make_lora_kohya
from tests.install.conftest import Bus, _bus, make_service

TIMEOUT = 60
SECRET = b"root:$6$not-for-your-eyes:19000:0:99999:7:::\n"


@pytest.fixture(scope="module")
def bus(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bus]:
    """A namespace, root and environment with one worker on the install, download and hash queues."""
    yield from _bus(redis_url, tmp_path_factory.mktemp("hostile-sources-bus"), start_workers=1)


@pytest.fixture()
def installer(bus: Bus) -> Iterator[ModelInstallService]:
    service = make_service(bus)
    yield service
    service.record_store.close()


@pytest.fixture()
def secret(tmp_path: Path) -> Path:
    """A file of the test's own standing in for /etc/shadow: outside every import root."""
    path = tmp_path / "etc" / "shadow"
    path.parent.mkdir()
    path.write_bytes(SECRET)
    return path


@pytest.fixture()
def http(bus: Bus) -> Iterator[TestClient]:
    with TestClient(create_app(bus.config)) as client:
        yield client


def _holding_secret(bus: Bus) -> list[Path]:
    roots = [bus.config.models_path, import_area(bus.config)]
    return [p for root in roots if root.exists() for p in root.rglob("*")
            if p.is_file() and not p.is_symlink() and SECRET in p.read_bytes()]


def _handed_over(bus: Bus) -> list[Path]:
    area = import_area(bus.config)
    return sorted(area.rglob("*")) if area.exists() else []


def _progress_of(installer: ModelInstallService, job_id: str) -> list[int]:
    return [s.event.payload.get("bytes", 0) for s in installer.event_store.read(stream="activity")
            if getattr(s.event, "kind", None) == "install_progress" and s.event.correlation_id == job_id]


def test_a_symlink_out_of_a_source_folder_is_refused_by_name(bus: Bus, installer: ModelInstallService,
                                                             secret: Path, tmp_path: Path) -> None:
    folder = make_lora_diffusers(bus.library / "linked_lora", folder=True)
    (folder / "unet").mkdir()
    os.symlink(secret, folder / "unet" / "x")
    done = installer.wait_for_job(installer.heuristic_import(str(folder)), timeout=TIMEOUT)
    assert done.status is InstallStatus.ERROR, (done, bus.worker_log())
    assert done.error_type == "SourceForbiddenError" and "unet/x" in (done.error or ""), done.error
    assert _holding_secret(bus) == []
    assert not staging_dir(bus.config, done.id).exists()

    # the user's own hand-over refuses it too (a downloaded folder must not carry the user's keys away)
    outside = make_lora_diffusers(tmp_path / "their_lora", folder=True)
    (outside / "unet").mkdir()
    os.symlink(secret, outside / "unet" / "x")
    head = installer.event_store.head()
    with pytest.raises(SourceForbiddenError, match="unet/x"):
        installer.heuristic_import(str(outside))
    assert installer.event_store.head() == head
    assert _holding_secret(bus) == [] and _handed_over(bus) == []


def test_the_api_refuses_a_local_path_outside_the_roots_before_reading_it(
        bus: Bus, installer: ModelInstallService, http: TestClient, secret: Path) -> None:
    models = bus.config.models_path
    models.mkdir(parents=True, exist_ok=True)
    link = models / "shadow.safetensors"
    os.symlink(secret, link)
    dotdot = f"{models}/{os.path.relpath(secret, models)}"  # spelled from inside the models dir
    head = installer.event_store.head()
    jobs = {j.id for j in installer.list_jobs()}
    for source in (str(secret), dotdot, str(link)):
        answer = http.post("/api/v2/models/install", json={"source": source})
        assert answer.status_code == 403, (source, answer.text)
        error = answer.json()["error"]
        assert error["type"] == "SourceForbiddenError", error
        assert "import roots" in error["message"] and str(models) in error["message"], error
    assert installer.event_store.head() == head  # nothing published, nothing queued
    assert {j.id for j in installer.list_jobs()} == jobs
    assert _holding_secret(bus) == []


def test_a_worker_refuses_a_queued_command_outside_the_roots(bus: Bus, installer: ModelInstallService,
                                                             secret: Path) -> None:
    store = installer.event_store
    job_id = "forged-local-source"
    store.append([InstallRequested(aggregate_id=job_id, source=str(secret), options={"config": {}},
                                   correlation_id=job_id)], expected_version=0)
    enqueue_install(store, bus.config, job_id, None)  # past the submission checks, straight to the queue
    done = installer.wait_for_job(job_id, timeout=TIMEOUT)
    assert done.status is InstallStatus.ERROR and done.error_type == "SourceForbiddenError", (done, bus.worker_log())
    assert _progress_of(installer, job_id) == []  # not a byte copied
    assert _holding_secret(bus) == []


def test_suffix_and_headers_are_checked_before_the_copy(bus: Bus, installer: ModelInstallService) -> None:
    notes = bus.library / "notes.txt"
    notes.write_bytes(SECRET * 1000)
    done = installer.wait_for_job(installer.heuristic_import(str(notes)), timeout=TIMEOUT)
    assert done.status is InstallStatus.ERROR and done.error_type == "ModelIdentificationError", done
    assert _progress_of(installer, done.id) == []  # refused before a byte was copied to staging
    assert _holding_secret(bus) == []


def test_the_cli_hands_over_a_users_file_the_api_refuses(bus: Bus, installer: ModelInstallService,
                                                         http: TestClient, tmp_path: Path) -> None:
    downloads = tmp_path / "Downloads"
    source = make_lora_kohya(downloads / "handed_over.safetensors", rank=20)
    result = CliRunner().invoke(cli_app, ["install", str(source), "--wait", "--json", "--timeout", str(TIMEOUT)])
    assert result.exit_code == 0, (result.stdout, result.stderr, bus.worker_log())
    job = json.loads(result.stdout)
    assert job["state"] == "completed" and job["source"] == str(source), job
    record = installer.record_store.get_model(job["key"])
    assert record.source == str(source)  # the user's path, not the hand-over copy
    assert (bus.config.models_path / record.path).read_bytes() == source.read_bytes()
    assert source.exists() and _handed_over(bus) == []  # the hand-over copy went once installed

    refused = http.post("/api/v2/models/install", json={"source": str(source), "force": True})
    assert refused.status_code == 403 and "import roots" in refused.json()["error"]["message"], refused.text


def test_a_hand_over_no_job_takes_is_removed(bus: Bus, installer: ModelInstallService, tmp_path: Path) -> None:
    source = make_lora_kohya(tmp_path / "twice.safetensors", rank=24)
    with pytest.raises(InvalidCommandError):
        installer.heuristic_import(str(source), command_id="has spaces")
    assert _handed_over(bus) == []
    first = installer.heuristic_import(str(source), command_id="cmd-hand-over-twice")
    again = installer.heuristic_import(str(source), command_id="cmd-hand-over-twice")  # a repeated command
    assert again.id == first.id
    done = installer.wait_for_job(first, timeout=TIMEOUT)
    assert done.status is InstallStatus.COMPLETED, (done, bus.worker_log())
    assert _handed_over(bus) == []


def test_a_folder_swapped_for_a_link_while_copying_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "racy_model"
    (source / "sub").mkdir(parents=True)
    (source / "a.bin").write_bytes(b"a" * 1024)
    (source / "sub" / "b.bin").write_bytes(b"b" * 1024)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "b.bin").write_bytes(SECRET)
    swapped: list[bool] = []

    def swap_once() -> None:  # runs between blocks of the first file: the attacker's moment
        if not swapped:
            os.rename(source / "sub", source / "sub-was")
            os.symlink(elsewhere, source / "sub")
            swapped.append(True)

    staging = tmp_path / "staging"
    with pytest.raises(SourceForbiddenError, match="outside the source"):
        copy_into(source, staging, check=swap_once)
    assert swapped and not [p for p in staging.rglob("*") if p.is_file() and SECRET in p.read_bytes()]
