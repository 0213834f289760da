"""The disk fills during a download: the models directory is a 24 MiB tmpfs, and the test fills it while
a worker is part-way through downloading a model into it (and, apart, before the download starts).
Expected: a clear error naming the lack of space, the partial file removed, nothing recorded."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelbus.events.schema import ModelAdded
from modelbus.services.install import InstallStatus
from modelbus.services.install.placement import staging_dir
from tests.install.conftest import Bus, _bus, make_service
from tests.servers import Fault
from tests.waiting import wait_until

TMPFS_SIZE = 24 << 20  # the downloader keeps 16 MiB in reserve: the file must pass that check
MODEL_SIZE = 6 << 20
STALL_AFTER = 256 << 10


def _mount_tmpfs(path: Path) -> str | None:
    """Mount a small tmpfs at ``path``; the reason when this machine does not allow it."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(path)],
                          capture_output=True, text=True, check=False)
    return None if done.returncode == 0 else f"mount -t tmpfs refused: {done.stderr.strip()}"


def _fill(folder: Path) -> int:
    """Write a filler file until the filesystem is full; returns the bytes written."""
    written = 0
    with open(folder / "filler.bin", "wb", buffering=0) as out:
        block = b"\xff" * 4096
        while True:
            try:
                written += out.write(block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                return written


@pytest.fixture(scope="module")
def small_disk_bus(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bus]:
    for bus in _bus(redis_url, tmp_path_factory.mktemp("disk-full-bus"), start_workers=0):
        models = bus.config.models_path
        models.mkdir(parents=True, exist_ok=True)
        reason = _mount_tmpfs(models)
        if reason:
            pytest.skip(reason)
        try:
            bus.start_worker(name="diskfull-worker")
            yield bus
        finally:
            bus.stop()
            subprocess.run(["umount", "-l", str(models)], check=False)


@pytest.mark.parametrize("when", ["before", "during"])
def test_disk_fills_during_a_download(small_disk_bus: Bus, tmp_path: Path, when: str) -> None:
    bus = small_disk_bus
    models = bus.config.models_path
    (models / "filler.bin").unlink(missing_ok=True)
    service = make_service(bus)
    name = f"files/big_{when}.safetensors"
    bus.files.add_file(name, os.urandom(MODEL_SIZE))
    filled = 0
    if when == "before":
        filled = _fill(models)
        # leave less room than the file needs, but some: the check must be on free space, not on zero
        os.truncate(models / "filler.bin", filled - (8 << 20))
    else:
        bus.files.set_fault(name, Fault(stall_after=STALL_AFTER, stall_seconds=3, times=1))
    job = service.heuristic_import(bus.files.url_for(name))
    if when == "during":
        started = wait_until(lambda: service.get_job_by_id(job.id).bytes > 0
                             or service.get_job_by_id(job.id).status.terminal, 60, "the download to start")
        assert started and service.get_job_by_id(job.id).bytes > 0, service.get_job_by_id(job.id)
        filled = _fill(models)
    done = service.wait_for_job(job, timeout=90)
    # the staging folder goes with the job's last step (the hash job runs after a failed download too)
    staging = staging_dir(bus.config, done.id)
    try:
        wait_until(lambda: not staging.exists(), 20, "the staging folder to be removed")
    except AssertionError:
        pass  # asserted below, after the report
    leftovers = sorted(p.relative_to(models).as_posix() for p in models.rglob("*")
                       if p.is_file() and p.name != "filler.bin")
    added = [s for s in service.event_store.read_all() if isinstance(s.event, ModelAdded)]
    records = service.record_store.all_models()
    service.record_store.close()
    print(f"\n[disk full {when} the download] filled {filled} bytes of a {TMPFS_SIZE}-byte tmpfs; job "
          f"{done.status.value} ({done.error_type}: {done.error}); files left: {leftovers}; "
          f"ModelAdded events: {len(added)}; records: {len(records)}")
    assert done.status is InstallStatus.ERROR, (done.status, bus.worker_log()[-2000:])
    assert "space" in (done.error or "").lower(), done.error
    assert leftovers == [], leftovers
    assert not staging.exists(), sorted(p.name for p in staging.rglob("*"))
    assert added == [] and records == []
