"""One worker process running several jobs at once (``--concurrency``, workers.pool):

- a download worker at concurrency 4 brings the files of one repo four at a time, all from one process
  (the hub counts the response bodies it sends at once; each file is paced so that they overlap);
- a slot SIGKILLed mid-download is started again by its supervisor, and the job it ran is taken over
  once (lease token 2) and completes once;
- SIGTERM to the worker (its process group, as systemd or Kubernetes send it) reaches every slot once:
  the running download finishes (RQ's warm stop, not the cold one a second SIGTERM means), then all exit.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
import redis
from rq.job import Job

from modelbus.events.keys import Keys
from modelbus.services.install import InstallStatus
from tests.faults.jobs import alive, children, count_in_logs, lease_token, log_of, registered, stop
from tests.fixtures.model_files import lora_kohya_shapes, make_lora_diffusers, write_checkpoint
from tests.install.conftest import Bus, make_service
from tests.servers import Fault
from tests.waiting import wait_until

CLEAN_RUN_EVENTS = {"InstallRequested": 1, "InstallStarted": 2, "InstallDownloaded": 1, "InstallCompleted": 1}


@pytest.fixture()
def mine(idle_bus: Bus) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(queues: str, name: str, concurrency: int = 1) -> subprocess.Popen[bytes]:
        procs.append(idle_bus.start_worker(queues=queues, name=name, concurrency=concurrency))
        return procs[-1]

    yield start
    stop(procs)


def _state(bus: Bus, client: redis.Redis, name: str) -> dict[str, object]:
    raw = client.get(Keys(bus.env["MODELBUS_NAMESPACE"]).worker_state(name))
    assert raw is not None, f"worker {name} published no state"
    return dict(orjson.loads(raw))


def _stalled_model(bus: Bus, tmp_path: Path, label: str, rank: int, stall: float) -> tuple[str, bytes]:
    """A LoRA served so that its first transfer stalls ``stall`` s after 1 MiB: (its URL, its bytes)."""
    model = write_checkpoint(tmp_path / f"{label}_lora.safetensors", lora_kohya_shapes("sd-1", rank),
                             {"ss_network_module": "networks.lora", "fault": label})
    name = f"files/{label}_lora.safetensors"
    bus.files.add_file(name, model.read_bytes())
    bus.files.set_fault(name, Fault(stall_after=1 << 20, stall_seconds=stall, times=1))
    return bus.files.url_for(name), model.read_bytes()


def _slots_up(bus: Bus, client: redis.Redis, name: str, n: int) -> bool:
    return all(registered(bus, client, f"{name}-{i}") for i in range(n))


def test_one_download_worker_brings_four_files_at_once(idle_bus: Bus, tmp_path: Path, mine) -> None:  # type: ignore[no-untyped-def]
    bus = idle_bus
    service = make_service(bus)
    client = service.event_store.client
    folder = make_lora_diffusers(tmp_path / "pooled", base="sdxl", folder=True)
    for i in range(7):  # eight files in all, each long enough at the paced rate to overlap the others
        (folder / f"extra-{i}.txt").write_bytes(os.urandom(3 << 20))
    bus.hub.add_repo("acme/pooled-lora", folder)
    downloader = mine("download", "pool-dl", concurrency=4)
    mine("install,hash", "pool-ih")
    wait_until(lambda: _slots_up(bus, client, "pool-dl", 4) and registered(bus, client, "pool-ih"), 120,
               "the workers", bus.worker_log)
    slot_pids = {int(str(_state(bus, client, f"pool-dl-{i}")["pid"])) for i in range(4)}
    bus.hub.reset_log()
    bus.hub.rate = 1 << 20  # 1 MiB/s per body: a 3 MiB file takes 3 s
    try:
        done = service.wait_for_job(service.heuristic_import("acme/pooled-lora"), timeout=180)
    finally:
        bus.hub.rate = None
    peak = bus.hub.peak_sending
    print(f"\n[concurrency 4] one download worker process (slots {sorted(slot_pids)}) took up to {peak} "
          f"bodies at once from the hub for the 8 files of one repo")
    assert done.status is InstallStatus.COMPLETED, (done.error, bus.worker_log()[-3000:])
    record = service.record_store.get_model(done.key)
    assert all((bus.config.models_path / record.path / f"extra-{i}.txt").is_file() for i in range(7))
    service.record_store.close()
    assert slot_pids == set(children(downloader.pid)), "the slots are not the worker process's own children"
    assert peak == 4, f"expected four files in flight at once (the concurrency), saw {peak}"


def test_a_killed_slot_is_restarted_and_its_job_runs_once(idle_bus: Bus, tmp_path: Path, mine) -> None:  # type: ignore[no-untyped-def]
    bus = idle_bus
    service = make_service(bus)
    client = service.event_store.client
    url, data = _stalled_model(bus, tmp_path, "slot_killed", 3000, 60)
    pool = mine("download", "pool-kill", concurrency=2)
    mine("install,hash", "pool-kill-ih")
    wait_until(lambda: _slots_up(bus, client, "pool-kill", 2), 120, "the slots", bus.worker_log)
    job = service.heuristic_import(url)
    wait_until(lambda: service.get_job_by_id(job.id).bytes > 0, 120, "the download to start", bus.worker_log)
    slot = Job.fetch(f"{job.id}-dl0", connection=client).worker_name
    assert slot is not None
    victim = int(str(_state(bus, client, slot)["pid"]))
    horse = wait_until(lambda: children(victim), 10, "the slot's work-horse")[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: not alive(horse), 10, "the work-horse to die with its slot")

    wait_until(lambda: lease_token(bus, client, f"{job.id}-dl0") == 2, 120, "a slot to take the job over",
               bus.worker_log)
    done = service.wait_for_job(job.id, timeout=180)
    assert done.status is InstallStatus.COMPLETED, (done.error, bus.worker_log()[-3000:])
    restarted = wait_until(lambda: registered(bus, client, slot)
                           and int(str(_state(bus, client, slot)["pid"])) != victim, 60, "the slot to start again",
                           lambda: log_of(bus, "pool-kill")[-3000:])
    events = collections.Counter(s.event.type for s in service.event_store.read_all() if s.event.aggregate_id == job.id)
    record = service.record_store.get_model(done.key)
    assert (bus.config.models_path / record.path).read_bytes() == data
    service.record_store.close()
    print(f"\n[slot SIGKILLed] slot {slot} (pid {victim}) killed mid-download; started again by its supervisor: "
          f"{restarted}; job taken over (lease token 2) and completed; install events {dict(events)}")
    assert "worker_slot_died" in log_of(bus, "pool-kill")
    assert pool.poll() is None, "the supervisor died with its slot"
    assert dict(events) == CLEAN_RUN_EVENTS
    assert count_in_logs(bus, "install_file_downloaded", job.id) == 1, "the download completed twice"


def test_sigterm_stops_every_slot_after_its_running_job(idle_bus: Bus, tmp_path: Path, mine) -> None:  # type: ignore[no-untyped-def]
    bus = idle_bus
    service = make_service(bus)
    client = service.event_store.client
    url, _ = _stalled_model(bus, tmp_path, "pool_stop", 2000, 3)  # a slow transfer
    pool = mine("download", "pool-stop", concurrency=3)
    mine("install,hash", "pool-stop-ih")
    wait_until(lambda: _slots_up(bus, client, "pool-stop", 3), 120, "the slots", bus.worker_log)
    slots = set(children(pool.pid))
    job = service.heuristic_import(url)
    wait_until(lambda: service.get_job_by_id(job.id).bytes > 0, 120, "the download to start", bus.worker_log)

    os.killpg(pool.pid, signal.SIGTERM)
    assert pool.wait(timeout=120) == 0, log_of(bus, "pool-stop")[-3000:]
    download = Job.fetch(f"{job.id}-dl0", connection=client)
    text = log_of(bus, "pool-stop")
    stopped = [i for i in range(3) if any("worker_stopped" in line and f'"pool-stop-{i}"' in line
                                          for line in text.splitlines())]
    print(f"\n[pool SIGTERM] supervisor exited 0; slots {sorted(slots)} gone; the running download ended "
          f"{download.get_status()}")
    assert len(slots) == 3 and not any(alive(pid) for pid in slots)
    assert download.get_status() == "finished", "the running download was dropped (a cold stop)"
    assert len(stopped) == 3
    assert not any(client.exists(Keys(bus.env["MODELBUS_NAMESPACE"]).worker_state(f"pool-stop-{i}")) for i in range(3))
    done = service.wait_for_job(job.id, timeout=180)  # the hash step, on the install,hash worker
    service.record_store.close()
    assert done.status is InstallStatus.COMPLETED, (done.error, bus.worker_log()[-3000:])


@pytest.mark.parametrize(("args", "env", "message"), [
    (["--queues", "gpu", "--concurrency", "2"], {}, "a gpu worker runs one job at a time"),
    (["--queues", "download", "--concurrency", "0"], {}, "--concurrency must be between 1 and 64, got 0"),
    (["--queues", "download"], {"MODELBUS_DOWNLOAD_CONCURRENCY": "65"}, "MODELBUS_DOWNLOAD_CONCURRENCY='65'"),
])
def test_a_bad_concurrency_is_one_line_and_starts_nothing(tmp_path: Path, args: list[str], env: dict[str, str],
                                                          message: str) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MODELBUS_")}
    run = subprocess.run([sys.executable, "-m", "modelbus.workers", *args], check=False, capture_output=True,
                         text=True, timeout=120, env={**clean, "MODELBUS_ROOT": str(tmp_path), **env})
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], run.stderr
    assert not (tmp_path / "redis").exists(), "a worker refused at start-up started an embedded Redis"
