"""Fixtures of the load tests: a real record store (memory projection over a real Redis log) and
tiny real model files written under the models directory."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from modelbus.services.config import AppConfig
from modelbus.services.load import ModelLoadService
from modelbus.services.records import ModelRecordServiceMemory
from tests.fixtures import loadable as builders


@pytest.fixture()
def config(modelbus_env: dict[str, str]) -> AppConfig:
    cfg = AppConfig.load(device="cpu", ram_cache_size="256M", vram_cache_size="0")
    cfg.models_path.mkdir(parents=True, exist_ok=True)
    return cfg


@pytest.fixture()
def store(config: AppConfig, event_store: Any) -> ModelRecordServiceMemory:
    return ModelRecordServiceMemory(event_store, config=config)


@pytest.fixture()
def events() -> list[tuple[str, dict[str, Any]]]:
    return []


@pytest.fixture()
def service(config: AppConfig, store: Any, events: list[tuple[str, dict[str, Any]]]) -> ModelLoadService:
    return ModelLoadService(config, store, publisher=lambda e: events.append((e.kind, e.payload.model_dump(by_alias=True))))


Add = Callable[..., str]


@pytest.fixture()
def add(store: Any) -> Add:
    """Add a record; returns its key."""
    def add_(path: str, model_type: str, model_format: str, base: str = "sd-1", **extra: Any) -> str:
        key = uuid.uuid4().hex
        store.add_model(key, {"name": Path(path).stem, "model_type": model_type, "model_format": model_format,
                              "base_model": base, "path": path, "hash": key, **extra})
        return key
    return add_


@pytest.fixture()
def pipeline(config: AppConfig, add: Add) -> tuple[str, dict[str, torch.nn.Module]]:
    models = builders.write_pipeline(config.models_path / "tiny-sd1")
    return add("tiny-sd1", "main", "diffusers"), models


@pytest.fixture()
def checkpoint(config: AppConfig, add: Add) -> tuple[str, dict[str, torch.nn.Module]]:
    models = builders.write_sd1_checkpoint(config.models_path / "tiny-sd1.safetensors", dtype=torch.float32)
    yaml_path = builders.write_original_yaml(config.root / "tiny-inference.yaml")
    return add("tiny-sd1.safetensors", "main", "checkpoint", config=str(yaml_path)), models
