"""A worker SIGKILLed in the middle of an install step (install, download, hash): the step finishes
on another worker; exactly one record; every install event once; no file left behind.

To be sure the kill lands *during* the step, the test polls the step's RQ StartedJobRegistry and
freezes the worker's process group (SIGSTOP) the moment the step shows up there, checks that the
step is still running, then SIGKILLs it. RQ's maintenance pass then finds the dead worker's job;
here it is run with the clock moved past the heartbeat expiry instead of waiting for it."""

from __future__ import annotations

import collections
import os
import signal
import time
from pathlib import Path

import pytest
from rq.registry import StartedJobRegistry

from modelbus.events.keys import Keys
from modelbus.events.schema import ModelAdded
from modelbus.services.install import InstallStatus
from modelbus.services.install.placement import staging_dir
from tests.fixtures.model_files import lora_kohya_shapes, write_checkpoint
from tests.install.conftest import Bus, make_service
from tests.servers import Fault

CLEAN_RUN_EVENTS = {"InstallRequested": 1, "InstallStarted": 2, "InstallDownloaded": 1, "InstallCompleted": 1}
RANK = 20000  # a 130 MB LoRA: its copy and its hash take long enough to be caught in the act


def _registry(bus: Bus, client, queue: str) -> StartedJobRegistry:  # type: ignore[no-untyped-def]
    return StartedJobRegistry(Keys(bus.env["MODELBUS_NAMESPACE"]).queue(queue), connection=client)


def _catch(bus: Bus, client, queue: str, job_prefix: str, victim, timeout: float = 90) -> list[str]:  # type: ignore[no-untyped-def]
    """Freeze ``victim`` as soon as a job of this install runs on ``queue``; the running job ids."""
    registry = _registry(bus, client, queue)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # the job's status turns "started" in the forked work-horse, after the registry entry: RQ's
        # maintenance pass only rescues a job in that state, so the freeze waits for it
        running = [j for j in registry.get_job_ids() if j.startswith(job_prefix)
                   and client.hget(f"rq:job:{j}", "status") in (b"started", "started")]
        if running:
            os.killpg(victim.pid, signal.SIGSTOP)
            return running
        if victim.poll() is not None:
            raise AssertionError(f"the worker exited before the {queue} step ran:\n{bus.worker_log()[-3000:]}")
        time.sleep(0.001)
    raise AssertionError(f"no {queue} job of {job_prefix} started within {timeout} s:\n{bus.worker_log()[-3000:]}")


@pytest.mark.parametrize("step", ["install", "download", "hash"])
def test_worker_killed_during_a_step(idle_bus: Bus, tmp_path: Path, step: str) -> None:
    bus = idle_bus
    service = make_service(bus)
    client = service.event_store.client
    # distinct content per test (the metadata): the same bytes would be refused as already installed
    model = write_checkpoint(tmp_path / f"killed_{step}_lora.safetensors", lora_kohya_shapes("sd-1", RANK),
                             {"ss_network_module": "networks.lora", "fault": step})
    data = model.read_bytes()
    if step == "install":
        source = str(model)  # a local path: the install step copies it into staging
    else:
        name = f"files/killed_{step}_lora.safetensors"
        bus.files.add_file(name, data)
        if step == "download":  # the transfer stalls after 1 MiB: the worker is surely mid-download
            bus.files.set_fault(name, Fault(stall_after=1 << 20, stall_seconds=60, times=1))
        source = bus.files.url_for(name)

    victim = bus.start_worker(name=f"victim-{step}")
    job = service.heuristic_import(source)
    running = _catch(bus, client, step, job.id, victim)
    frozen = service.get_job_by_id(job.id)
    still_running = [j for j in _registry(bus, client, step).get_job_ids() if j in running]
    bus.kill(victim)
    print(f"\n[SIGKILL during {step}] froze then killed worker pid {victim.pid} while RQ job(s) {running} ran; "
          f"install status then: {frozen.status.value}, {frozen.bytes} bytes")
    assert still_running and not frozen.status.terminal, "the kill did not land during the step"

    _registry(bus, client, step).cleanup(timestamp=time.time() + 3600)  # the maintenance pass
    rescuer = bus.start_worker(burst=True, name=f"rescuer-{step}")
    done = service.wait_for_job(job, timeout=120)
    rescuer.wait(timeout=60)
    assert done.status is InstallStatus.COMPLETED, (done.error_type, done.error, bus.worker_log()[-3000:])

    events = [s.event for s in service.event_store.read_all()]
    mine = collections.Counter(e.type for e in events if e.aggregate_id == job.id)
    added = [e for e in events if isinstance(e, ModelAdded) and e.aggregate_id == done.key]
    records = [m for m in service.record_store.all_models() if m.name == f"killed_{step}_lora"]
    models = bus.config.models_path
    files = sorted(p.relative_to(models).as_posix() for p in models.rglob("*")
                   if p.is_file() and f"killed_{step}" in p.name)
    service.record_store.close()
    print(f"[SIGKILL during {step}] rescued: job {done.status.value}; install events {dict(mine)}; "
          f"ModelAdded for the key: {len(added)}; records: {len(records)}; files: {files}; "
          f"staging left: {staging_dir(bus.config, job.id).exists()}")
    # the same events as an install that met no fault (InstallStarted: once by the install step, once
    # by the hash step); a step run twice must not add its events twice
    assert dict(mine) == CLEAN_RUN_EVENTS
    assert len(added) == 1 and len(records) == 1
    assert files == [records[0].path] and (models / records[0].path).read_bytes() == data
    assert not staging_dir(bus.config, job.id).exists()


def test_clean_install_events(idle_bus: Bus, tmp_path: Path) -> None:
    """The baseline the fault runs are compared with: the events of an install that met no fault."""
    bus = idle_bus
    service = make_service(bus)
    model = write_checkpoint(tmp_path / "clean_lora.safetensors", lora_kohya_shapes("sd-1", 8),
                             {"ss_network_module": "networks.lora", "fault": "none"})
    job = service.heuristic_import(bus.files.add_file("files/clean_lora.safetensors", model.read_bytes()))
    worker = bus.start_worker(burst=True, name="clean")
    done = service.wait_for_job(job, timeout=120)
    worker.wait(timeout=60)
    mine = collections.Counter(s.event.type for s in service.event_store.read_all() if s.event.aggregate_id == job.id)
    service.record_store.close()
    assert done.status is InstallStatus.COMPLETED, done.error
    assert dict(mine) == CLEAN_RUN_EVENTS


def test_same_install_command_delivered_twice(idle_bus: Bus, tmp_path: Path) -> None:
    """Two clients send one command (same command id) at once, and after it completed the RQ job is
    delivered again (as a requeue after a lost acknowledgement would): one job, one record."""
    import threading

    from modelbus.services.install.commands import enqueue_install

    bus = idle_bus
    services = [make_service(bus), make_service(bus)]
    model = write_checkpoint(tmp_path / "twice_lora.safetensors", lora_kohya_shapes("sd-1", 8),
                             {"ss_network_module": "networks.lora", "fault": "twice"})
    url = bus.files.add_file("files/twice_lora.safetensors", model.read_bytes())
    ids: list[str] = []
    barrier = threading.Barrier(2)

    def send(service) -> None:  # type: ignore[no-untyped-def]
        barrier.wait()
        ids.append(service.heuristic_import(url, command_id="cmd-twice").id)

    threads = [threading.Thread(target=send, args=(s,)) for s in services]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    worker = bus.start_worker(burst=True, name="twice-1")
    done = services[0].wait_for_job(ids[0], timeout=120)
    worker.wait(timeout=60)
    enqueue_install(services[0].event_store, bus.config, done.id, None)  # the same job, delivered again
    worker = bus.start_worker(burst=True, name="twice-2")
    worker.wait(timeout=60)
    again = services[0].heuristic_import(url, command_id="cmd-twice")
    events = [s.event for s in services[0].event_store.read_all()]
    added = [e for e in events if isinstance(e, ModelAdded) and e.aggregate_id == done.key]
    mine = collections.Counter(e.type for e in events if e.aggregate_id == done.id)
    records = [m for m in services[0].record_store.all_models() if m.name == "twice_lora"]
    for s in services:
        s.record_store.close()
    print(f"\n[command delivered twice] job ids {ids} + resubmitted {again.id}; job {done.status.value}; "
          f"install events {dict(mine)}; ModelAdded: {len(added)}; records: {len(records)}")
    assert ids == ["cmd-twice", "cmd-twice"] and again.id == "cmd-twice"
    assert done.status is InstallStatus.COMPLETED, done.error
    assert len(added) == 1 and len(records) == 1 and dict(mine) == CLEAN_RUN_EVENTS
