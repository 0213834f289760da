"""Redis SIGKILLed and restarted (AOF, appendfsync always) while an install is downloading: every event
acknowledged before the kill is still in the log, and the install ends — completed or failed — with a
state that says which, and nothing half-done (one record or none, no staging files)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from modelbus.events.schema import ModelAdded
from modelbus.services.install import InstallStatus
from modelbus.services.install.placement import staging_dir
from tests.faults.redis_proc import PrivateRedis
from tests.fixtures.model_files import lora_kohya_shapes, write_checkpoint
from tests.install.conftest import _bus, make_service
from tests.servers import Fault
from tests.waiting import wait_until


def test_redis_killed_and_restarted_mid_install(tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path / "redis", appendfsync="always").start()
    (tmp_path / "bus").mkdir()
    buses = _bus(server.url, tmp_path / "bus", 1)
    bus = next(buses)
    try:
        service = make_service(bus)
        model = write_checkpoint(tmp_path / "mid_install_lora.safetensors", lora_kohya_shapes("sd-1", 3000))
        name = "files/mid_install_lora.safetensors"
        bus.files.add_file(name, model.read_bytes())
        # the transfer pauses for a few seconds after 1 MiB: the kill lands while the download runs
        bus.files.set_fault(name, Fault(stall_after=1 << 20, stall_seconds=4, times=1))
        job = service.heuristic_import(bus.files.url_for(name))
        wait_until(lambda: service.get_job_by_id(job.id).bytes > 0, 60, "the download to start")
        acknowledged = [s.position for s in service.event_store.read_all()]

        server.restart_after(signal.SIGKILL, down_for=2.0)
        print(f"redis killed with {len(acknowledged)} events acknowledged, restarted after 2 s")

        ended = service.wait_for_job(job.id, timeout=180)
        survivors = [s.position for s in service.event_store.read_all()]
        assert survivors[:len(acknowledged)] == acknowledged, "an acknowledged event was lost"
        records = [s for s in service.event_store.read_all() if isinstance(s.event, ModelAdded)]
        print(f"install ended {ended.status.value} ({ended.error or 'no error'}); {len(records)} record(s); "
              f"{len(survivors)} events in the log")
        assert ended.status in (InstallStatus.COMPLETED, InstallStatus.ERROR)
        if ended.status is InstallStatus.COMPLETED:
            assert len(records) == 1 and service.record_store.exists(ended.key or "")
        else:
            assert records == [] and ended.error
        wait_until(lambda: not staging_dir(bus.config, job.id).exists(), 30, "the staging folder to go")
    finally:
        try:
            next(buses)
        except StopIteration:
            pass
        server.stop()
        time.sleep(0.1)
