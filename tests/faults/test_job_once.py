"""A download runs exactly once even when its worker is SIGKILLed or frozen in the middle of it.

- ``kill -9`` of the worker's pid alone (not its process group): RQ's work-horse used to run on in a
  process group of its own, and the re-run RQ started a minute later wrote the same ``.part`` beside it.
  Now the horse dies with its worker, and the job is handed on within seconds (measured, printed).
- A worker frozen (SIGSTOP) until it is given up for dead, then woken: the re-run took the job's lease
  over (fencing token 2) and waits on the partial file's lock; the woken run finds its lease lost and
  stops without writing, which releases the lock; the re-run resumes and finishes the install.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from modelbus.services.install import InstallStatus
from modelbus.services.install.placement import staging_dir
from tests.faults.jobs import alive, children, count_in_logs, lease_token, log_of, registered, stop
from tests.fixtures.model_files import lora_kohya_shapes, write_checkpoint
from tests.install.conftest import Bus, make_service
from tests.servers import Fault
from tests.waiting import wait_until

STALL_AFTER = 1 << 20


@pytest.fixture()
def mine(idle_bus: Bus) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start a worker of this test, stopped when the test ends (the next test of the module must not
    meet it)."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(queues: str, name: str) -> subprocess.Popen[bytes]:
        procs.append(idle_bus.start_worker(queues=queues, name=name))
        return procs[-1]

    yield start
    stop(procs)


def _slow_install(bus: Bus, tmp_path: Path, label: str):  # type: ignore[no-untyped-def]
    """A model whose first transfer stalls after 1 MiB (the server trickles no more for a minute)."""
    service = make_service(bus)
    model = write_checkpoint(tmp_path / f"once_{label}_lora.safetensors", lora_kohya_shapes("sd-1", 3000),
                             {"ss_network_module": "networks.lora", "fault": f"once-{label}"})
    name = f"files/once_{label}_lora.safetensors"
    data = model.read_bytes()
    bus.files.add_file(name, data)
    bus.files.set_fault(name, Fault(stall_after=STALL_AFTER, stall_seconds=60, times=1))
    return service, bus.files.url_for(name), data


def _finished(bus: Bus, service, job_id: str, data: bytes) -> None:  # type: ignore[no-untyped-def]
    done = service.wait_for_job(job_id, timeout=180)
    assert done.status is InstallStatus.COMPLETED, (done.error, bus.worker_log()[-4000:])
    record = service.record_store.get_model(done.key)
    assert (bus.config.models_path / record.path).read_bytes() == data
    wait_until(lambda: not staging_dir(bus.config, job_id).exists(), 30, "the staging folder to go")
    assert count_in_logs(bus, "install_file_downloaded", job_id) == 1, "the download step completed twice"
    service.record_store.close()


def test_a_killed_workers_job_process_dies_with_it_and_the_job_is_handed_on(idle_bus: Bus, tmp_path: Path,
                                                                           mine) -> None:  # type: ignore[no-untyped-def]
    bus = idle_bus
    service, url, data = _slow_install(bus, tmp_path, "killed")
    client = service.event_store.client
    victim = mine(queues="download", name="once-killed-victim")
    helper = mine(queues="install,hash", name="once-killed-helper")
    job = service.heuristic_import(url)
    wait_until(lambda: service.get_job_by_id(job.id).bytes > 0, 120, "the download to start", bus.worker_log)
    horse = wait_until(lambda: children(victim.pid), 10, "the download's work-horse")[0]
    rescuer = mine(queues="download", name="once-killed-rescuer")
    wait_until(lambda: registered(bus, client, "once-killed-rescuer"), 120, "the second worker", bus.worker_log)
    assert lease_token(bus, client, f"{job.id}-dl0") == 1

    killed = time.monotonic()
    os.kill(victim.pid, signal.SIGKILL)  # the worker's pid only, as `kill -9 <pid>` does
    victim.wait(timeout=10)
    wait_until(lambda: not alive(horse), 10, "the work-horse to die with its worker",
               lambda: f"horse {horse} still running after its worker was killed")
    horse_gone = time.monotonic() - killed
    wait_until(lambda: lease_token(bus, client, f"{job.id}-dl0") == 2, 120, "another worker to take the job over",
               bus.worker_log)
    rescued = time.monotonic() - killed
    _finished(bus, service, job.id, data)
    print(f"\n[kill -9 worker pid] work-horse gone {horse_gone:.2f} s after its worker; the job was taken over "
          f"by another worker {rescued:.1f} s after the kill (lease token 2)")
    assert helper.poll() is None and rescuer.poll() is None


def test_a_frozen_run_given_up_for_dead_stops_without_writing(idle_bus: Bus, tmp_path: Path, mine) -> None:  # type: ignore[no-untyped-def]
    bus = idle_bus
    service, url, data = _slow_install(bus, tmp_path, "frozen")
    client = service.event_store.client
    victim = mine(queues="download", name="once-frozen-victim")
    helper = mine(queues="install,hash", name="once-frozen-helper")
    job = service.heuristic_import(url)
    part = staging_dir(bus.config, job.id) / "once_frozen_lora.safetensors.part"
    wait_until(lambda: service.get_job_by_id(job.id).bytes > 0, 120, "the download to start", bus.worker_log)
    rescuer = mine(queues="download", name="once-frozen-rescuer")
    wait_until(lambda: registered(bus, client, "once-frozen-rescuer"), 120, "the second worker", bus.worker_log)

    horse = wait_until(lambda: children(victim.pid), 10, "the download's work-horse")[0]
    frozen = time.monotonic()
    for pid in (victim.pid, horse):  # the worker and its work-horse (a group of its own): a machine that hangs
        os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: lease_token(bus, client, f"{job.id}-dl0") == 2, 120,
                   "another worker to take the frozen job over", bus.worker_log)
        taken_over = time.monotonic() - frozen
        size_at_wake = part.stat().st_size
    finally:
        for pid in (horse, victim.pid):
            os.kill(pid, signal.SIGCONT)
    wait_until(lambda: "install_download_superseded" in log_of(bus, "once-frozen-victim"), 60,
               "the woken run to find its lease lost", lambda: log_of(bus, "once-frozen-victim")[-3000:])
    _finished(bus, service, job.id, data)
    stale = log_of(bus, "once-frozen-victim")
    assert "lease_lost" in stale and "download.file_complete" not in stale
    print(f"\n[SIGSTOP worker] taken over {taken_over:.1f} s after the freeze (lease token 2); the woken run "
          f"stopped without writing (partial file {size_at_wake} bytes when it woke); one completed download")
    assert all(proc.poll() is None for proc in (victim, helper, rescuer)), "a worker died"
