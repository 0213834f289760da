"""Fixtures of the record tests: every service test runs on each backend (SQL, YAML, memory) and on
each event store (a real Redis from tests/conftest.py, and the in-memory one)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelbus.events.store import EventStore
from modelbus.services.config import AppConfig
from modelbus.services.records import (
    ModelRecordServiceBase,
    ModelRecordServiceFile,
    ModelRecordServiceMemory,
    ModelRecordServiceSQL,
)

BACKENDS = ("sql", "file", "memory")
ServiceFactory = Callable[..., ModelRecordServiceBase]


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    (tmp_path / "records-root" / "models").mkdir(parents=True)
    return tmp_path / "records-root"


@pytest.fixture()
def config(root: Path, namespace: str, redis_url: str) -> AppConfig:
    return AppConfig.load(root=root, namespace=namespace, redis_url=redis_url)


@pytest.fixture()
def make_service(root: Path, config: AppConfig) -> Iterator[Callable[..., ModelRecordServiceBase]]:
    opened: list[ModelRecordServiceBase] = []

    def make(backend: str, store: EventStore, name: str = "records") -> ModelRecordServiceBase:
        service: ModelRecordServiceBase
        if backend == "sql":
            service = ModelRecordServiceSQL.from_db_file(root / f"{name}.db", store, config=config)
        elif backend == "file":
            service = ModelRecordServiceFile.from_db_file(root / f"{name}.yaml", store, config=config)
        else:
            service = ModelRecordServiceMemory(store, config=config)
        opened.append(service)
        return service

    yield make
    for service in opened:
        service.close()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture()
def service(make_service: ServiceFactory, backend: str, log_store: EventStore) -> ModelRecordServiceBase:
    return make_service(backend, log_store)


def main_config(name: str = "sd15", path: str = "sd-1/main/sd15.safetensors", **extra: Any) -> dict[str, Any]:
    return {"name": name, "model_type": "main", "model_format": "checkpoint", "base_model": "sd-1",
            "path": path, "config": "configs/stable-diffusion/v1-inference.yaml", **extra}


def vae_config(name: str = "vae", path: str = "sd-1/vae/vae.safetensors", **extra: Any) -> dict[str, Any]:
    return {"name": name, "model_type": "vae", "model_format": "checkpoint", "base_model": "sd-1",
            "path": path, **extra}


def set_older_layout(path: Path, schema: int, sql: str, edit_yaml: Callable[[dict[str, Any]], None]) -> None:
    """Make a closed store file look written by an older layout of ours: its schema number set back to
    ``schema``, then ``sql`` run on it (SQLite) or ``edit_yaml`` applied to the parsed file (YAML)."""
    if path.suffix == ".db":
        conn = sqlite3.connect(path)
        conn.execute("UPDATE model_record_meta SET value = ? WHERE name = 'schema'", (str(schema),))
        conn.execute(sql)
        conn.commit()
        conn.close()
    else:
        data = yaml.safe_load(path.read_text())
        data["__metadata__"]["schema"] = schema
        edit_yaml(data)
        path.write_text(yaml.safe_dump(data))
