"""The projection file deleted while the record service runs and a writer keeps writing: the service
keeps answering, a service opened on the same path rebuilds it from the log, and the answers are the
same as before the deletion (and the same in both services afterwards)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from modelbus.events.store import RedisEventStore
from modelbus.services.config import AppConfig
from modelbus.services.records import ModelRecordServiceBase


def _config(n: int) -> dict[str, Any]:
    return {"name": f"m{n}", "model_type": "lora", "model_format": "lycoris", "base_model": "sd-1",
            "path": f"sd-1/lora/m{n}.safetensors", "tags": ["even" if n % 2 == 0 else "odd"]}


def _answers(service: ModelRecordServiceBase) -> dict[str, Any]:
    """What a client would ask: every record, a search by name and base, a search by tag."""
    return {
        "all": sorted((m.key, m.name, m.path, tuple(m.tags or ())) for m in service.all_models()),
        "by_name": sorted(m.key for m in service.search_by_name("m3", "sd-1", "lora")),
        "by_tag": sorted(m.key for m in service.search_by_tag(["even"])),
    }


@pytest.mark.parametrize("suffix", [".db", ".yaml"])
def test_projection_deleted_while_the_service_runs(app_config: AppConfig, event_store: RedisEventStore,
                                                   suffix: str) -> None:
    path = Path(app_config.root) / f"records{suffix}"
    running = ModelRecordServiceBase.from_db_file(path, event_store, config=app_config)
    for n in range(20):
        running.add_model(f"k{n}", _config(n))
    running.rename_model("k1", "renamed")
    running.del_model("k2")
    before = _answers(running)

    # a writer keeps adding while the file disappears
    stop = threading.Event()
    written: list[str] = []

    def write() -> None:
        n = 100
        while not stop.is_set():
            running.add_model(f"k{n}", _config(n))
            written.append(f"k{n}")
            n += 1
            time.sleep(0.005)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        time.sleep(0.1)
        removed = [p.name for p in path.parent.glob(path.name + "*") if p.suffix != ".lock"]
        for name in removed:
            (path.parent / name).unlink()
        time.sleep(0.2)
    finally:
        stop.set()
        writer.join(timeout=10)

    after_running = _answers(running)
    rebuilt = ModelRecordServiceBase.from_db_file(path, event_store, config=app_config)
    try:
        after_rebuilt = _answers(rebuilt)
        running.add_model("late", _config(999))
        late_seen = rebuilt.exists("late") and running.exists("late")
        final_running, final_rebuilt = _answers(running), _answers(rebuilt)
    finally:
        rebuilt.close()
        running.close()
    print(f"\n[{suffix}] deleted {removed} while a writer added {len(written)} models; running service "
          f"answers {len(after_running['all'])} records, rebuilt one {len(after_rebuilt['all'])}; "
          f"file exists again: {path.exists()}")
    expected_keys = {k for k, *_ in before["all"]} | set(written)
    assert {k for k, *_ in after_running["all"]} == expected_keys
    assert after_rebuilt == after_running
    assert [r for r in after_rebuilt["all"] if r[0] in {k for k, *_ in before["all"]}] == before["all"]
    assert late_seen and final_running == final_rebuilt
    assert path.exists()
