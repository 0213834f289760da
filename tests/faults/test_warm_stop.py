"""Scaling in: a worker told to stop (SIGTERM, RQ's warm shutdown) while a download runs finishes that
job first, then exits; nothing is lost and nothing is left for another worker to redo."""

from __future__ import annotations

import collections
import os
import signal
from pathlib import Path

from rq.job import Job

from modelbus.services.install import InstallStatus
from tests.fixtures.model_files import lora_kohya_shapes, write_checkpoint
from tests.install.conftest import Bus, make_service
from tests.servers import Fault
from tests.waiting import wait_until


def test_sigterm_lets_the_running_job_finish(idle_bus: Bus, tmp_path: Path) -> None:
    bus = idle_bus
    service = make_service(bus)
    model = write_checkpoint(tmp_path / "warm_stop_lora.safetensors", lora_kohya_shapes("sd-1", 2000),
                             {"ss_network_module": "networks.lora", "fault": "warm-stop"})
    name = "files/warm_stop_lora.safetensors"
    bus.files.add_file(name, model.read_bytes())
    bus.files.set_fault(name, Fault(stall_after=1 << 20, stall_seconds=3, times=1))  # a slow transfer
    worker = bus.start_worker(name="warm-stopper")
    job = service.heuristic_import(bus.files.url_for(name))
    wait_until(lambda: service.get_job_by_id(job.id).bytes > 0, 90, "the download to start")

    os.killpg(worker.pid, signal.SIGTERM)  # what systemd / Kubernetes send when scaling in
    print(f"\n[warm stop] SIGTERM sent mid-download ({service.get_job_by_id(job.id).bytes} bytes in)")
    worker.wait(timeout=90)
    download = Job.fetch(f"{job.id}-dl0", connection=service.event_store.client)
    print(f"[warm stop] worker exited with {worker.returncode}; its download job ended "
          f"{download.get_status()}, install status {service.get_job_by_id(job.id).status.value}")
    assert download.get_status() == "finished", "the download in progress was finished, not dropped"

    # the remaining steps (hash) were queued, not run by the stopping worker: a new worker takes them
    finisher = bus.start_worker(burst=True, name="finisher")
    done = service.wait_for_job(job, timeout=120)
    finisher.wait(timeout=60)
    events = collections.Counter(s.event.type for s in service.event_store.read_all() if s.event.aggregate_id == job.id)
    service.record_store.close()
    assert done.status is InstallStatus.COMPLETED, (done.error_type, done.error)
    assert events["InstallDownloaded"] == 1 and events["InstallCompleted"] == 1
