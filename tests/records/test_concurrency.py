"""Racing writers on a real Redis: separate processes adding one key (or one path) end with exactly one
success, and every reader sees writes acknowledged before its read began."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from modelbus.events.store import RedisEventStore
from modelbus.services.config import AppConfig
from modelbus.services.records import ModelRecordServiceMemory, ModelRecordServiceSQL

from .conftest import main_config

RACER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from modelbus.services.config import AppConfig
    from modelbus.services.records import ModelRecordServiceSQL, DuplicateModelException
    root, index = Path(sys.argv[1]), sys.argv[2]
    service = ModelRecordServiceSQL.from_db_file(root / f"racer{index}.db", config=AppConfig.load())
    (root / f"ready{index}").touch()
    while not (root / "go").exists():
        time.sleep(0.001)
    # first race: one key, different paths; second race: different keys, one path
    for key, path in (("samekey", "own" + index), ("key" + index, "same/path.safetensors")):
        config = dict(name="racer" + index, model_type="main", model_format="checkpoint", base_model="sd-1",
                      path=path)
        try:
            service.add_model(key, config)
            print("won")
        except DuplicateModelException as exc:
            print("lost", exc)
""")

RACERS = 3


def _race(root: Path) -> list[list[str]]:
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(root), str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(RACERS)]
    deadline = time.monotonic() + 60
    while not all((root / f"ready{i}").exists() for i in range(RACERS)):
        assert time.monotonic() < deadline, "racers did not start"
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.01)
    (root / "go").touch()
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        # logs may share stdout: keep the verdict lines
        outs.append([line for line in out.splitlines() if line.startswith(("won", "lost"))])
    return outs


@pytest.mark.usefixtures("modelbus_env")
def test_processes_racing_for_one_key_or_one_path_one_wins(config: AppConfig, event_store: RedisEventStore) -> None:
    outs = _race(config.root)
    key_race, path_race = [o[0] for o in outs], [o[1] for o in outs]
    assert sum(o == "won" for o in key_race) == 1, key_race
    assert all(o == "won" or "'samekey' already exists" in o for o in key_race)
    assert event_store.version("samekey") == 1
    assert sum(o == "won" for o in path_race) == 1, path_race
    assert all(o == "won" or "already used by model" in o for o in path_race)
    reader = ModelRecordServiceMemory(event_store, config=config)
    models = reader.all_models()
    assert len(models) == 2 and "samekey" in {m.key for m in models}
    assert len(reader.search_by_name(model_type="main")) == 2


def test_threads_updating_one_model_all_land(tmp_path: Path, event_store: RedisEventStore,
                                             config: AppConfig) -> None:
    services = [ModelRecordServiceSQL.from_db_file(tmp_path / f"t{i}.db", event_store, config=config)
                for i in range(4)]
    services[0].add_model("k", main_config())
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for n in range(5):
                services[i].update_model("k", {"description": f"{i}-{n}"})
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert event_store.version("k") == 1 + 4 * 5
    final = {s.get_model("k").description for s in services}
    assert len(final) == 1  # every projection converged on the last write
    for s in services:
        s.close()


def test_a_reader_sees_a_write_made_by_another_process(config: AppConfig, modelbus_env: dict[str, str],
                                                       event_store: RedisEventStore) -> None:
    reader = ModelRecordServiceSQL.from_db_file(config.root / "reader.db", event_store, config=config)
    assert not reader.exists("fromchild")
    script = ("from services.records import ModelRecordServiceBase\n"
              "from services.config import AppConfig\n"
              "s = ModelRecordServiceBase.open(AppConfig.load())\n"
              "s.add_model('fromchild', dict(name='c', model_type='lora', model_format='lycoris',"
              " base_model='sdxl', path='c.safetensors'))\n")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    assert reader.get_model("fromchild").base_model.value == "sdxl"
    reader.close()


WRITER = textwrap.dedent("""
    import sys
    from modelbus.services.config import AppConfig
    from modelbus.services.records import ModelRecordServiceBase
    service = ModelRecordServiceBase.open(AppConfig.load())
    for n in range(int(sys.argv[1])):
        service.add_model(f"w{n}", dict(name=f"w{n}", model_type="lora", model_format="lycoris",
                                         base_model="sd-1", path=f"w{n}.safetensors"))
        print(f"w{n}", flush=True)  # acknowledged: the reader may look now
        sys.stdin.readline()         # and says when it has
""")


@pytest.mark.parametrize("tracking", [True, False])
def test_every_write_of_another_process_is_seen_by_the_next_read(config: AppConfig, modelbus_env: dict[str, str],
                                                                  event_store: RedisEventStore,
                                                                  tracking: bool) -> None:
    """Read-your-writes across processes, with and without the log watch: the writer acknowledges, the
    reader reads at once (no sleep, no retry) and must find the model, a hundred times over."""
    reader = ModelRecordServiceSQL.from_db_file(config.root / "reader.db", event_store,
                                                config=config.model_copy(update={"records_read_tracking": tracking}))
    assert (reader._watch is not None) is tracking
    writes = 100
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(writes)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert writer.stdin is not None and writer.stdout is not None
    try:
        assert not reader.exists("w0")  # (the watch connects on the first read)
        seen = 0
        for line in writer.stdout:
            key = line.strip()
            if not key.startswith("w"):
                continue  # a log line
            assert reader.get_model(key).name == key
            seen += 1
            writer.stdin.write("\n")
            writer.stdin.flush()
        assert writer.wait(timeout=60) == 0
        assert seen == writes
        print(f"\n{writes} writes by another process, each read at once by this one "
              f"({'log watch' if tracking else 'round trip per read'}): all seen")
    finally:
        writer.kill()
        reader.close()
