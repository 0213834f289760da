"""The spec's record-service samples and sentences, run as the spec writes them (only the package
name changed): the config classes it names, the startup pattern, a foreign database, the dict rename."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from pathlib import Path

import pytest
from pydantic import TypeAdapter

from modelbus.events.store import EventStore, InMemoryEventStore
from modelbus.services.config import AppConfig
from modelbus.services.records import (
    AnyModelConfig,
    InvalidModelConfigException,
    IPAdapterConfig,
    LoRAConfig,
    LoRADiffusersConfig,
    LoRALycorisConfig,
    ModelRecordServiceBase,
    ModelRecordServiceSQL,
    ModelType,
)
from modelbus.services.records import models as config_module

from .conftest import main_config, vae_config


def _lora(fmt: str, name: str) -> dict[str, str]:
    return {"name": name, "model_type": "lora", "model_format": fmt, "base_model": "sd-1",
            "path": f"sd-1/lora/{name}"}


def _ip_adapter(fmt: str, name: str) -> dict[str, str]:
    return {"name": name, "model_type": "ip_adapter", "model_format": fmt, "base_model": "sd-1",
            "path": f"sd-1/ip_adapter/{name}"}


# --- "There are a series of such classes ... including LoRAConfig, IPAdapterConfig" ------------------

def test_lora_and_ip_adapter_configs_are_the_bases_of_their_records(service: ModelRecordServiceBase) -> None:
    assert config_module.LoRAConfig is LoRAConfig and config_module.IPAdapterConfig is IPAdapterConfig
    service.add_model("l1", _lora("lycoris", "kohya"))
    service.add_model("l2", _lora("diffusers", "peft"))
    service.add_model("i1", _ip_adapter("invokeai", "ip-folder"))
    service.add_model("i2", _ip_adapter("checkpoint", "ip-file"))
    service.add_model("m1", main_config())
    loras = service.search_by_name(model_type=ModelType.Lora)
    assert {c.key for c in loras} == {"l1", "l2"} and all(isinstance(c, LoRAConfig) for c in loras)
    assert type(service.get_model("l1")) is LoRALycorisConfig and type(service.get_model("l2")) is LoRADiffusersConfig
    adapters = service.search_by_name(model_type=ModelType.IPAdapter)
    assert {c.key for c in adapters} == {"i1", "i2"} and all(isinstance(c, IPAdapterConfig) for c in adapters)
    assert not isinstance(service.get_model("m1"), LoRAConfig | IPAdapterConfig)
    # the union picks the concrete class, which is a LoRAConfig, for either format
    union = TypeAdapter(AnyModelConfig)
    for fmt in ("lycoris", "diffusers"):
        assert isinstance(union.validate_python({**_lora(fmt, "x"), "key": "k"}), LoRAConfig)


def test_a_lora_config_built_directly_is_stored_as_its_concrete_class(service: ModelRecordServiceBase) -> None:
    added = service.add_model("l1", LoRAConfig(key="l1", hash="l1", **_lora("lycoris", "kohya")))  # type: ignore[arg-type]
    assert type(added) is LoRALycorisConfig and type(service.get_model("l1")) is LoRALycorisConfig
    with pytest.raises(InvalidModelConfigException, match="model_format"):
        service.add_model("l2", {**_lora("lycoris", "x"), "model_format": "checkpoint"})
    assert not service.exists("l2")


# --- "So a typical startup pattern would be:" ---------------------------------------------------

def test_the_typical_startup_pattern(modelbus_env: dict[str, str], tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("MODELBUS_DB_PATH", "MODELBUS_MODELS_DIR", "MODELBUS_CONF_PATH", "MODELBUS_MODEL_CONFIG_DB"):
        monkeypatch.delenv(var, raising=False)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a working directory that is not the root
    root = Path(modelbus_env["MODELBUS_ROOT"])

    # the spec's sample, as written
    lock = threading.Lock()
    config = AppConfig.get_config()
    db_conn = sqlite3.connect(config.db_path.as_posix(), check_same_thread=False)
    store = ModelRecordServiceBase.open(config, db_conn, lock)

    try:
        assert config.db_path == root / "databases" / "modelbus.db"
        assert config.models_dir == root / "models" and config.conf_path == root / "configs" / "models.yaml"
        store.add_model("k1", main_config())
        assert isinstance(store, ModelRecordServiceSQL) and store.conn is db_conn
    finally:
        store.close()
        db_conn.close()
    assert list(elsewhere.iterdir()) == []  # nothing opened relative to the working directory
    # the same file is the one the service opens by itself ("as simple as open(config)")
    with ModelRecordServiceBase.open(config) as again:
        assert again.get_model("k1").name == "sd15"


def test_path_settings_stay_relative_to_the_root_and_absolute_ones_stay(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = AppConfig.load(root="home", models_dir="m", db_path=tmp_path / "abs.db", conf_path="c/models.yaml")
    assert config.root == tmp_path / "home"
    assert config.models_dir == tmp_path / "home" / "m" and config.models_path == config.models_dir
    assert config.db_path == tmp_path / "abs.db" and config.db_file == config.db_path
    assert config.conf_path == tmp_path / "home" / "c" / "models.yaml" and config.conf_file == config.conf_path
    assert config.model_path("sd-1/x") == tmp_path / "home" / "m" / "sd-1" / "x"  # resolved once, not twice


# --- "does not contain the expected schema metainformation, then ... AssertionError" -------------

def _foreign_database(path: Path) -> str:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE images (id INTEGER PRIMARY KEY, name TEXT)")
    conn.execute("INSERT INTO images (name) VALUES ('cat.png')")
    conn.commit()
    conn.close()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_from_db_file_refuses_a_foreign_database_and_leaves_it_alone(tmp_path: Path, config: AppConfig) -> None:
    log: EventStore = InMemoryEventStore()
    other = tmp_path / "other.db"
    digest = _foreign_database(other)
    for opener in (ModelRecordServiceBase, ModelRecordServiceSQL):
        with pytest.raises(AssertionError) as info:
            opener.from_db_file(other, log, config=config)
        message = str(info.value)
        assert str(other) in message and "model_record_meta" in message and "images" in message
    assert hashlib.sha256(other.read_bytes()).hexdigest() == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.db", "records-root"]  # no -wal, no -shm
    # sharing that database is what from_connection is for: its tables go in beside the others
    conn = sqlite3.connect(other, check_same_thread=False)
    with ModelRecordServiceSQL.from_connection(conn, threading.Lock(), log, config=config) as shared:
        shared.add_model("k1", main_config())
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"images", "model_records", "model_record_meta"} <= tables
    conn.close()
    # now it carries the metainformation, so from_db_file opens it too
    with ModelRecordServiceBase.from_db_file(other, log, config=config) as reopened:
        assert reopened.get_model("k1").name == "sd15"


def test_from_db_file_initialises_an_empty_database(tmp_path: Path, config: AppConfig) -> None:
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()  # an empty SQLite file: nothing to protect
    with ModelRecordServiceBase.from_db_file(empty, InMemoryEventStore(), config=config) as store:
        store.add_model("k1", vae_config())
        assert store.get_model("k1").name == "vae"


# --- "the call is equivalent to: store.rename_model(key, {'name': 'new_name'})" ------------------

def test_rename_model_takes_the_name_or_the_specs_dict(service: ModelRecordServiceBase) -> None:
    key = "k1"
    service.add_model(key, main_config())
    store = service
    renamed = store.rename_model(key, {'name': 'new_name'})
    assert renamed.name == "new_name" and service.get_model(key).name == "new_name"
    assert type(renamed) is type(service.get_model(key))
    assert store.rename_model(key, "plain").name == "plain" and service.get_model(key).name == "plain"


@pytest.mark.parametrize("bad", [{"name": "x", "path": "elsewhere"}, {"description": "d"}, {}, {"name": ""},
                                 {"name": 3}])
def test_rename_model_refuses_anything_but_a_name(service: ModelRecordServiceBase, bad: dict[str, object]) -> None:
    service.add_model("k1", main_config())
    before = len(service.history("k1"))
    with pytest.raises(InvalidModelConfigException) as info:
        service.rename_model("k1", bad)  # type: ignore[arg-type]
    assert "name" in str(info.value) or any(k in str(info.value) for k in bad)
    got = service.get_model("k1")
    assert got.name == "sd15" and got.path == main_config()["path"] and len(service.history("k1")) == before
