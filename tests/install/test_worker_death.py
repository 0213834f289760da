"""A worker killed with SIGKILL in the middle of a download: RQ's maintenance pass gives the job to
another worker, which resumes from the partial file and finishes the install."""

from __future__ import annotations

import time
from pathlib import Path

from rq.registry import StartedJobRegistry

from modelbus.events.keys import Keys
from modelbus.services.install import InstallStatus
from modelbus.services.install.placement import staging_dir
from tests.fixtures.model_files import make_lora_kohya
from tests.install.conftest import Bus, make_service
from tests.servers import Fault
from tests.waiting import wait_until

STALL_AFTER = 64 << 10


def _maintenance_pass(bus: Bus, client, queue: str) -> None:  # type: ignore[no-untyped-def]
    """What a surviving worker's maintenance does once the dead worker's heartbeat expired (65 s with
    the RQ settings in workers.defaults); here with the clock moved past that expiry instead of waiting."""
    name = Keys(bus.env["MODELBUS_NAMESPACE"]).queue(queue)
    StartedJobRegistry(name, connection=client).cleanup(timestamp=time.time() + 3600)


def test_killed_worker_job_is_finished_by_another_worker(idle_bus: Bus, tmp_path: Path) -> None:
    bus = idle_bus
    service = make_service(bus)
    data = make_lora_kohya(tmp_path / "survivor_lora.safetensors", rank=64).read_bytes()
    assert len(data) > 4 * STALL_AFTER
    name = "files/survivor_lora.safetensors"
    bus.files.add_file(name, data)
    # the first request stalls after 64 KiB: the worker is surely mid-download when it is killed
    bus.files.set_fault(name, Fault(stall_after=STALL_AFTER, stall_seconds=120, times=1))
    victim = bus.start_worker(name="victim")
    job = service.heuristic_import(bus.files.url_for(name))
    partial = staging_dir(bus.config, job.id) / "survivor_lora.safetensors.part.json"
    wait_until(lambda: partial.exists() and service.get_job_by_id(job.id).bytes > 0, 90, "the download to start")
    bus.kill(victim)
    assert service.get_job_by_id(job.id).status is InstallStatus.DOWNLOADING

    _maintenance_pass(bus, service.event_store.client, "download")
    rescuer = bus.start_worker(burst=True, name="rescuer")
    done = service.wait_for_job(job, timeout=90)
    assert done.status is InstallStatus.COMPLETED, (done.error, bus.worker_log())
    rescuer.wait(timeout=30)
    record = service.record_store.get_model(done.key)
    assert (bus.config.models_path / record.path).read_bytes() == data
    # the second worker resumed: it asked for the rest of the file, not for all of it again
    ranges = [r.headers.get("Range", "") for r in bus.files.requests if r.path.endswith(name)]
    resumed = [r for r in ranges if r.startswith("bytes=") and not r.startswith("bytes=0-")]
    assert resumed, ranges
    assert not staging_dir(bus.config, job.id).exists()
    service.record_store.close()
