"""What a caller's ``config`` may say at register/install: a type that does not fit the files is refused
by name, and a chosen ``key`` is used (checked like any key), never silently dropped."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from events.store import RedisEventStore
from services.config import AppConfig
from services.install import DuplicateInstallError, ModelInstallService
from services.records import InvalidModelConfigException, UnknownModelException
from tests.fixtures.model_files import make_lora_kohya, make_textual_inversion, make_vae_checkpoint


@pytest.fixture()
def service(app_config: AppConfig, event_store: RedisEventStore) -> Iterator[ModelInstallService]:
    svc = ModelInstallService(app_config, event_store=event_store)
    yield svc
    svc.record_store.close()


def _nothing_recorded(service: ModelInstallService, event_store: RedisEventStore) -> None:
    assert service.record_store.all_models() == []
    assert [s.event.type for s in event_store.read("0-0")] == []
    assert [p for p in service.config.models_path.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("how", ["register_path", "install_path"])
def test_a_type_that_does_not_fit_the_format_is_refused_by_name(how: str, service: ModelInstallService,
                                                               event_store: RedisEventStore, tmp_path: Path) -> None:
    embedding = make_textual_inversion(tmp_path / "emb.safetensors", fmt="safetensors")
    with pytest.raises(InvalidModelConfigException) as info:
        getattr(service, how)(embedding, {"model_type": "lora"})
    message = str(info.value)
    assert "lora" in message and "embedding_file" in message and "KeyError" not in message
    _nothing_recorded(service, event_store)
    # the same file without the override is an embedding, and installs
    key = getattr(service, how)(embedding)
    assert service.record_store.get_model(key).model_type.value == "embedding"


@pytest.mark.parametrize("how", ["register_path", "install_path"])
def test_a_chosen_key_is_the_records_key(how: str, service: ModelInstallService, tmp_path: Path) -> None:
    path = make_vae_checkpoint(tmp_path / "vae.safetensors")
    key = getattr(service, how)(path, {"key": "xyzzy", "name": "chosen"})
    assert key == "xyzzy"
    record = service.record_store.get_model("xyzzy")
    assert record.key == "xyzzy" and record.name == "chosen" and record.hash.startswith("blake3:")
    assert [m.key for m in service.record_store.all_models()] == ["xyzzy"]


def test_a_taken_key_is_refused_and_the_first_model_kept(service: ModelInstallService, tmp_path: Path) -> None:
    first = service.register_path(make_lora_kohya(tmp_path / "a.safetensors", rank=4), {"key": "xyzzy"})
    second = make_lora_kohya(tmp_path / "b.safetensors", rank=8)
    with pytest.raises(DuplicateInstallError, match="'xyzzy' is already used") as info:
        service.register_path(second, {"key": "xyzzy"})
    assert info.value.existing_key == "xyzzy"
    with pytest.raises(DuplicateInstallError, match="xyzzy"):
        service.register_path(second, {"key": "xyzzy"}, force=True)  # force copies content, never takes a key
    [only] = service.record_store.all_models()
    assert only.key == first and only.path == str((tmp_path / "a.safetensors").resolve())


@pytest.mark.parametrize("bad", ["", "has space", "a/b", "../up", "x" * 257, 42, "ключ"])
def test_a_bad_key_is_refused_before_any_work(bad: object, service: ModelInstallService,
                                              event_store: RedisEventStore, tmp_path: Path) -> None:
    path = make_vae_checkpoint(tmp_path / "vae.safetensors")
    for how in (service.register_path, service.install_path):
        with pytest.raises(InvalidModelConfigException, match="key="):
            how(path, {"key": bad})
    with pytest.raises(InvalidModelConfigException, match="key="):
        service.heuristic_import(str(path), {"key": bad})  # refused at submit, not by a worker later
    assert service.list_jobs() == []
    _nothing_recorded(service, event_store)
    with pytest.raises(UnknownModelException):
        service.record_store.get_model(str(bad))


def test_a_record_key_is_checked_like_any_key(service: ModelInstallService) -> None:
    config = {"name": "n", "model_type": "vae", "model_format": "checkpoint", "base_model": "sd-1", "path": "p"}
    with pytest.raises(InvalidModelConfigException, match="key="):
        service.record_store.add_model("no spaces allowed", config)
    assert service.record_store.add_model("ok_key-1.2:3", config).key == "ok_key-1.2:3"
