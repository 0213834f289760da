"""Redis SIGKILLed in the middle of a download and started again (AOF) after a few seconds, or after
longer than every timeout of the worker (its RQ registration, the job's heartbeat, the lease): the
worker process rides the outage out, the install resumes or is retried and completes once, and the
same worker goes on serving installs. It used to die, leaving the job stuck."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelbus.services.install import InstallStatus
from modelbus.workers import defaults
from tests.faults.jobs import count_in_logs
from tests.faults.redis_proc import PrivateRedis
from tests.fixtures.model_files import lora_kohya_shapes, write_checkpoint
from tests.install.conftest import Bus, _bus, make_service
from tests.servers import Fault
from tests.waiting import wait_until

LONG = defaults.WORKER_TTL + 10  # s; longer than the worker's TTL, the job's heartbeat TTL and the lease


@pytest.fixture()
def outage_bus(tmp_path: Path) -> Iterator[tuple[PrivateRedis, Bus]]:
    server = PrivateRedis(tmp_path / "redis", appendfsync="always").start()
    (tmp_path / "bus").mkdir()
    buses = _bus(server.url, tmp_path / "bus", 1)
    try:
        yield server, next(buses)
    finally:
        if server.process is None or server.process.poll() is not None:
            server.start()  # a failed test may leave it stopped: the bus's clean-up needs it
        next(buses, None)
        server.stop()


@pytest.mark.parametrize("down_for", [3.0, float(LONG)], ids=["short", "longer-than-timeouts"])
def test_a_worker_rides_out_a_redis_outage_mid_download(outage_bus: tuple[PrivateRedis, Bus], tmp_path: Path,
                                                        down_for: float) -> None:
    server, bus = outage_bus
    worker = bus.processes[0]
    service = make_service(bus)
    model = write_checkpoint(tmp_path / "outage_lora.safetensors", lora_kohya_shapes("sd-1", 3000),
                             {"ss_network_module": "networks.lora", "fault": f"outage-{down_for}"})
    name = "files/outage_lora.safetensors"
    data = model.read_bytes()
    bus.files.add_file(name, data)
    bus.files.set_fault(name, Fault(stall_after=1 << 20, stall_seconds=2, times=1))
    job = service.heuristic_import(bus.files.url_for(name))
    wait_until(lambda: service.get_job_by_id(job.id).bytes > 0, 120, "the download to start", bus.worker_log)

    server.stop(signal.SIGKILL)
    time.sleep(down_for)
    assert worker.poll() is None, f"the worker died while Redis was away:\n{bus.worker_log()[-3000:]}"
    server.start()
    back = time.monotonic()

    done = service.wait_for_job(job.id, timeout=240)
    finished = time.monotonic() - back
    assert done.status is InstallStatus.COMPLETED, (done.error, bus.worker_log()[-4000:])
    assert (bus.config.models_path / service.record_store.get_model(done.key).path).read_bytes() == data
    assert count_in_logs(bus, "install_file_downloaded", job.id) == 1
    assert worker.poll() is None

    # the same worker process still serves the queues
    second = write_checkpoint(tmp_path / "after_outage_lora.safetensors", lora_kohya_shapes("sd-1", 8),
                              {"ss_network_module": "networks.lora", "fault": f"after-{down_for}"})
    again = service.wait_for_job(service.heuristic_import(
        bus.files.add_file("files/after_outage_lora.safetensors", second.read_bytes())).id, timeout=120)
    assert again.status is InstallStatus.COMPLETED, again.error
    service.record_store.close()
    print(f"\n[redis down {down_for:g} s mid-download] worker pid {worker.pid} survived; the install completed "
          f"{finished:.1f} s after Redis came back; the worker then ran another install")
