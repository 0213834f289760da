"""Constructors, the projection files (SQLite and YAML) and their recovery: wrong kinds, deleted or stale
files, the spec's ``open`` steps, a shared connection."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelbus.events import defaults as event_defaults
from modelbus.events.errors import StoreUnavailableError
from modelbus.events.store import InMemoryEventStore, StoredEvent
from modelbus.services.config import AppConfig
from modelbus.services.records import (
    ModelRecordServiceBase,
    ModelRecordServiceFile,
    ModelRecordServiceSQL,
)
from modelbus.services.records.errors import EventLogError
from modelbus.services.records.rebuild import rebuild

from .conftest import main_config, set_older_layout


@pytest.fixture()
def log() -> InMemoryEventStore:
    return InMemoryEventStore()


def test_from_db_file_picks_by_extension(tmp_path: Path, log: InMemoryEventStore, config: AppConfig) -> None:
    sql = ModelRecordServiceBase.from_db_file(tmp_path / "a.db", log, config=config)
    yml = ModelRecordServiceBase.from_db_file(tmp_path / "a.yaml", log, config=config)
    assert isinstance(sql, ModelRecordServiceSQL) and isinstance(yml, ModelRecordServiceFile)
    assert (tmp_path / "a.db").exists() and (tmp_path / "a.yaml").exists()  # created and initialised
    sql.close()
    with pytest.raises(AssertionError, match="unknown record store extension '.txt'"):
        ModelRecordServiceBase.from_db_file(tmp_path / "a.txt", log, config=config)


def test_wrong_kind_of_existing_file_is_an_assertion_error(tmp_path: Path, log: InMemoryEventStore,
                                                            config: AppConfig) -> None:
    yaml_named_db = tmp_path / "records.db"
    yaml_named_db.write_text("__metadata__: {version: '3.2'}\n")
    with pytest.raises(AssertionError, match="not an SQLite database"):
        ModelRecordServiceBase.from_db_file(yaml_named_db, log, config=config)
    db_named_yaml = tmp_path / "records.yaml"
    sqlite3.connect(db_named_yaml).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(AssertionError):
        ModelRecordServiceBase.from_db_file(db_named_yaml, log, config=config)


def test_files_without_our_schema_are_refused(tmp_path: Path, log: InMemoryEventStore, config: AppConfig) -> None:
    foreign = tmp_path / "foreign.db"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE model_record_meta (name TEXT PRIMARY KEY, value TEXT)")
    conn.execute("INSERT INTO model_record_meta VALUES ('kind', 'something-else')")
    conn.commit()
    conn.close()
    with pytest.raises(AssertionError, match="something-else"):
        ModelRecordServiceSQL.from_db_file(foreign, log, config=config)
    malformed = tmp_path / "bad.yaml"
    malformed.write_text("key: [unclosed\n")
    with pytest.raises(AssertionError, match="malformed YAML"):
        ModelRecordServiceFile.from_db_file(malformed, log, config=config)
    legacy = tmp_path / "models.yaml"
    legacy.write_text("__metadata__:\n  version: 3.0.0\nsd-1/main/x:\n  path: x\n")
    with pytest.raises(AssertionError, match="import-yaml"):
        ModelRecordServiceFile.from_db_file(legacy, log, config=config)
    headerless = tmp_path / "plain.yaml"
    headerless.write_text("a: 1\n")
    with pytest.raises(AssertionError, match="no __metadata__ header"):
        ModelRecordServiceFile.from_db_file(headerless, log, config=config)


def test_sqlite_layout(tmp_path: Path, log: InMemoryEventStore, config: AppConfig) -> None:
    with ModelRecordServiceSQL.from_db_file(tmp_path / "r.db", log, config=config) as service:
        service.add_model("k1", main_config(tags=["x", "y"], compatible_bases=["sd-2"]))
    conn = sqlite3.connect(tmp_path / "r.db")
    meta = dict(conn.execute("SELECT name, value FROM model_record_meta"))
    assert meta["version"] == "3.2" and meta["checkpoint"] == log.head()
    row = conn.execute("SELECT name, base, type, format, path, hash FROM model_records").fetchone()
    assert row == ("sd15", "sd-1", "main", "checkpoint", "sd-1/main/sd15.safetensors", "k1")
    assert sorted(conn.execute("SELECT tag FROM model_record_tags")) == [("x",), ("y",)]
    assert sorted(conn.execute("SELECT base FROM model_record_bases")) == [("sd-1",), ("sd-2",)]
    indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {f"model_records_{c}" for c in ("name", "base", "type", "format", "path", "hash")} <= indexes


def test_yaml_layout_and_atomic_rewrite(tmp_path: Path, log: InMemoryEventStore, config: AppConfig) -> None:
    path = tmp_path / "store" / "r.yaml"
    service = ModelRecordServiceFile.from_db_file(path, log, config=config)
    service.add_model("k1", main_config(tags=["x"]))
    data = yaml.safe_load(path.read_text())
    assert data["__metadata__"]["version"] == "3.2" and data["__metadata__"]["checkpoint"] == log.head()
    assert data["k1"]["name"] == "sd15" and data["k1"]["tags"] == ["x"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["r.yaml", "r.yaml.lock"]  # no temp files left


@pytest.mark.parametrize("suffix", [".db", ".yaml"])
def test_deleted_projection_is_rebuilt_on_open(tmp_path: Path, log: InMemoryEventStore, config: AppConfig,
                                               suffix: str) -> None:
    path = tmp_path / f"r{suffix}"
    service = ModelRecordServiceBase.from_db_file(path, log, config=config)
    service.add_model("k1", main_config())
    service.add_model("k2", main_config(path="two"))
    service.del_model("k1")
    service.close()
    path.unlink()
    again = ModelRecordServiceBase.from_db_file(path, log, config=config)
    assert [m.key for m in again.all_models()] == ["k2"]
    # the aggregate versions came back too: the next write expects the right one
    again.add_model("k1", main_config(name="back"))
    assert again.get_model("k1").name == "back"


@pytest.mark.parametrize("suffix", [".db", ".yaml"])
def test_projection_from_another_log_is_rebuilt(tmp_path: Path, config: AppConfig, suffix: str) -> None:
    old_log = InMemoryEventStore()
    path = tmp_path / f"r{suffix}"
    first = ModelRecordServiceBase.from_db_file(path, old_log, config=config)
    first.add_model("old", main_config())
    first.close()
    new_log = InMemoryEventStore()
    # the file's checkpoint is ahead of this log's head: its rows cannot be trusted
    reopened = ModelRecordServiceBase.from_db_file(path, new_log, config=config)
    assert reopened.all_models() == []
    reopened.add_model("new", main_config())
    assert [m.key for m in reopened.all_models()] == ["new"]


@pytest.mark.parametrize("suffix", [".db", ".yaml"])
def test_projection_from_a_longer_other_log_is_rebuilt(tmp_path: Path, config: AppConfig, suffix: str) -> None:
    path = tmp_path / f"r{suffix}"
    old_log = InMemoryEventStore()
    first = ModelRecordServiceBase.from_db_file(path, old_log, config=config)
    first.add_model("old", main_config())
    first.close()
    new_log = InMemoryEventStore()
    writer = ModelRecordServiceBase.from_db_file(tmp_path / f"w{suffix}", new_log, config=config)
    for i in range(3):  # this log's positions are past the file's checkpoint
        writer.add_model(f"new{i}", main_config(path=f"n{i}"))
    writer.close()
    reopened = ModelRecordServiceBase.from_db_file(path, new_log, config=config)
    assert sorted(m.key for m in reopened.all_models()) == ["new0", "new1", "new2"]
    reopened.close()


@pytest.mark.parametrize("suffix", [".db", ".yaml"])
def test_stale_projection_catches_up_on_open(tmp_path: Path, log: InMemoryEventStore, config: AppConfig,
                                             suffix: str) -> None:
    path = tmp_path / f"r{suffix}"
    ModelRecordServiceBase.from_db_file(path, log, config=config).close()
    writer = ModelRecordServiceBase.from_db_file(tmp_path / f"other{suffix}", log, config=config)
    writer.add_model("k1", main_config())
    reopened = ModelRecordServiceBase.from_db_file(path, log, config=config)
    assert reopened.projection.checkpoint() == log.head()
    assert reopened.projection.count() == 1


def test_two_services_share_one_sqlite_file(tmp_path: Path, log: InMemoryEventStore, config: AppConfig) -> None:
    a = ModelRecordServiceSQL.from_db_file(tmp_path / "r.db", log, config=config)
    b = ModelRecordServiceSQL.from_db_file(tmp_path / "r.db", log, config=config)
    a.add_model("k1", main_config())
    assert b.get_model("k1").name == "sd15"
    b.rename_model("k1", "via b")
    assert a.get_model("k1").name == "via b"  # a's cached config was dropped when b moved the file on
    rows = sqlite3.connect(tmp_path / "r.db").execute("SELECT COUNT(*) FROM model_records").fetchone()
    assert rows == (1,)


def test_from_connection_shares_the_application_database(tmp_path: Path, log: InMemoryEventStore,
                                                          config: AppConfig) -> None:
    conn = sqlite3.connect(tmp_path / "app.db", check_same_thread=False)
    conn.execute("CREATE TABLE images (id INTEGER PRIMARY KEY)")
    conn.commit()
    lock = threading.Lock()
    service = ModelRecordServiceSQL.from_connection(conn, lock, log, config=config)
    service.add_model("k1", main_config())
    assert service.get_model("k1").key == "k1"
    assert not lock.locked()
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"images", "model_records", "model_record_meta"} <= tables
    service.close()  # not ours to close
    assert conn.execute("SELECT COUNT(*) FROM model_records").fetchone() == (1,)


def test_open_follows_the_spec_steps(root: Path, log: InMemoryEventStore, config: AppConfig) -> None:
    auto = ModelRecordServiceBase.open(config, event_store=log)
    assert isinstance(auto, ModelRecordServiceSQL) and (root / "databases" / "modelbus.db").exists()
    auto.close()
    conn, lock = sqlite3.connect(":memory:", check_same_thread=False), threading.Lock()
    shared = ModelRecordServiceBase.open(config, conn, lock, event_store=log)
    assert isinstance(shared, ModelRecordServiceSQL) and shared.conn is conn
    as_path = ModelRecordServiceBase.open(config.model_copy(update={"model_config_db": "configs/r.yaml"}),
                                          event_store=log)
    assert isinstance(as_path, ModelRecordServiceFile) and as_path.path == root / "configs" / "r.yaml"
    legacy = ModelRecordServiceBase.open(config.model_copy(update={"model_config_db": None}), event_store=log)
    assert isinstance(legacy, ModelRecordServiceFile) and legacy.path == root / "configs" / "models.yaml"


def test_open_without_event_store_uses_the_configured_redis(config: AppConfig) -> None:
    with ModelRecordServiceBase.open(config) as service:
        service.add_model("k1", main_config())
        assert service.event_store.namespace == config.namespace
    with ModelRecordServiceBase.open(config) as again:
        assert again.get_model("k1").name == "sd15"


def test_rebuild_replays_the_whole_log(tmp_path: Path, log: InMemoryEventStore, config: AppConfig) -> None:
    service = ModelRecordServiceSQL.from_db_file(tmp_path / "r.db", log, config=config)
    for i in range(5):
        service.add_model(f"k{i}", main_config(name=f"m{i}", path=f"p{i}"))
    service.rename_model("k0", "renamed")
    service.del_model("k4")
    before = service.all_models()
    # damage the projection behind the service's back: rebuild must repair it
    service.conn.execute("DELETE FROM model_records WHERE key = 'k1'")
    service.conn.commit()
    report = rebuild(service=service)
    assert report.models == 4 and report.checkpoint == log.head() and report.store == "ModelRecordServiceSQL"
    assert service.all_models() == before


class LogLostMidway(InMemoryEventStore):
    """The log's server going away after the first batch of a replay (as Redis restarting would)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads_left: int | None = None

    def read(self, *args: Any, **kwargs: Any) -> list[StoredEvent]:
        if self.reads_left is not None:
            if self.reads_left == 0:
                raise StoreUnavailableError("the log went away")
            self.reads_left -= 1
        return super().read(*args, **kwargs)


def test_a_rebuild_that_fails_midway_leaves_the_old_rows(tmp_path: Path, config: AppConfig,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(event_defaults, "REBUILD_BATCH", 2)
    log = LogLostMidway()
    service = ModelRecordServiceSQL.from_db_file(tmp_path / "r.db", log, config=config)
    for i in range(5):
        service.add_model(f"k{i}", main_config(name=f"m{i}", path=f"p{i}"))
    service.rename_model("k0", "renamed")
    before, checkpoint = service.all_models(), service.projection.checkpoint()
    service.runner.batch_size = 2
    log.reads_left = 1  # the first batch (2 of 6 events) is applied, then the log goes away
    with pytest.raises(EventLogError, match="the log went away"):
        service.rebuild()
    # the whole rebuild was one transaction: the old rows, checkpoint and search indexes are all there
    assert service.projection.checkpoint() == checkpoint
    indexes = {r[0] for r in service.conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"model_records_name", "model_records_path", "model_records_hash"} <= indexes
    assert service.conn.execute("PRAGMA synchronous").fetchone() == (1,)  # NORMAL again
    log.reads_left = None
    assert service.all_models() == before
    assert rebuild(service=service).models == 5 and service.all_models() == before


def test_writes_defer_the_projection_but_reads_see_them(tmp_path: Path, log: InMemoryEventStore,
                                                        config: AppConfig) -> None:
    service = ModelRecordServiceSQL.from_db_file(tmp_path / "r.db", log, config=config)
    service.add_model("k1", main_config())
    assert service.projection.checkpoint() == "0-0"  # the write did not wait for the projection...
    assert service.get_model("k1").name == "sd15"     # ...the next read caught up
    service.add_model("k2", main_config(path="two"))
    service.rename_model("k2", "renamed")  # a write to a key we wrote catches up first
    assert service.get_model("k2").name == "renamed"
    service.add_model("k3", main_config(path="three"))
    service.close()  # close applies what is pending
    conn = sqlite3.connect(tmp_path / "r.db")
    assert conn.execute("SELECT COUNT(*) FROM model_records").fetchone() == (3,)


def test_read_staleness_never_hides_our_own_writes(tmp_path: Path, log: InMemoryEventStore,
                                                   config: AppConfig) -> None:
    reader = ModelRecordServiceSQL.from_db_file(tmp_path / "r.db", log, config=config)
    reader.read_staleness = 3600.0
    other = ModelRecordServiceSQL.from_db_file(tmp_path / "o.db", log, config=config)
    assert reader.all_models() == []
    other.add_model("theirs", main_config())
    assert not reader.exists("theirs")  # within the staleness window, by choice
    reader.add_model("mine", main_config(path="mine"))
    assert {m.key for m in reader.all_models()} == {"theirs", "mine"}  # our write forced a catch-up
    reader.read_staleness = 0.0
    other.del_model("theirs")
    assert not reader.exists("theirs")


def test_rebuild_by_configuration(config: AppConfig, log: InMemoryEventStore) -> None:
    with ModelRecordServiceBase.open(config, event_store=log) as service:
        service.add_model("k1", main_config())
    report = rebuild(config, event_store=log)
    assert report.models == 1 and report.location == str(config.db_file)


def test_an_unreachable_log_is_our_error(tmp_path: Path, config: AppConfig) -> None:
    from modelbus.events.embedded import free_port
    from modelbus.events.store import RedisEventStore
    from modelbus.services.records.errors import EventLogError, RecordServiceError

    dead = RedisEventStore.from_url(f"redis://127.0.0.1:{free_port()}/0", "dead", retry_deadline=0.2)
    with pytest.raises(EventLogError, match="opening the record projection") as info:
        ModelRecordServiceSQL.from_db_file(tmp_path / "r.db", dead, config=config)
    assert isinstance(info.value, RecordServiceError) and "unreachable" in str(info.value)


def test_two_services_share_one_yaml_file(tmp_path: Path, log: InMemoryEventStore, config: AppConfig) -> None:
    path = tmp_path / "shared.yaml"
    a = ModelRecordServiceFile.from_db_file(path, log, config=config)
    b = ModelRecordServiceFile.from_db_file(path, log, config=config)
    a.add_model("k1", main_config())
    b.add_model("k2", main_config(path="two"))  # b reloads a's rewrite before writing its own
    a.rename_model("k1", "renamed")
    data = yaml.safe_load(path.read_text())
    assert sorted(k for k in data if k != "__metadata__") == ["k1", "k2"]
    assert data["k1"]["name"] == "renamed" and data["__metadata__"]["checkpoint"] == log.head()
    assert b.get_model("k1").name == "renamed"


@pytest.mark.parametrize("suffix", [".db", ".yaml"])
def test_an_older_layout_of_ours_is_rebuilt(tmp_path: Path, log: InMemoryEventStore, config: AppConfig,
                                            suffix: str) -> None:
    path = tmp_path / f"r{suffix}"
    with ModelRecordServiceBase.from_db_file(path, log, config=config) as service:
        service.add_model("k1", main_config())
    set_older_layout(path, 0, "DELETE FROM model_records", lambda data: data.pop("k1"))
    with ModelRecordServiceBase.from_db_file(path, log, config=config) as again:
        assert [m.key for m in again.all_models()] == ["k1"]
