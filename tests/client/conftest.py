"""Client fixtures: a client on the test's Redis, namespace and root, and a tiny model record builder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from modelbus.services.client import ModelBusClient
from modelbus.services.config import AppConfig


def model_config(name: str = "tiny", path: str = "tiny.safetensors", **extra: Any) -> dict[str, Any]:
    """A main checkpoint record whose file exists (written by ``put_file``)."""
    return {"name": name, "model_type": "main", "model_format": "checkpoint", "base_model": "sd-1",
            "path": path, **extra}


def put_file(config: AppConfig, path: str, data: bytes = b"\0" * 64) -> Path:
    target = config.model_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return target


@pytest.fixture()
def client(app_config: AppConfig) -> Iterator[ModelBusClient]:
    app_config.models_path.mkdir(parents=True, exist_ok=True)
    with ModelBusClient(app_config) as c:
        yield c
