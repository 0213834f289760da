"""What a caller's ``config`` may say at register/install: a type that does not fit the files is refused
by name, and a chosen ``key`` is used (checked like any key), never silently dropped."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelbus.events.store import RedisEventStore
from modelbus.services.install import DuplicateInstallError, ModelInstallService
from modelbus.services.records import InvalidModelConfigException, UnknownModelException
from tests.fixtures.model_files import make_lora_kohya, make_textual_inversion, make_vae_checkpoint


def _nothing_recorded(local_service: ModelInstallService, event_store: RedisEventStore) -> None:
    assert local_service.record_store.all_models() == []
    assert [s.event.type for s in event_store.read("0-0")] == []
    assert [p for p in local_service.config.models_path.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("how", ["register_path", "install_path"])
def test_a_type_that_does_not_fit_the_format_is_refused_by_name(how: str, local_service: ModelInstallService,
                                                               event_store: RedisEventStore, tmp_path: Path) -> None:
    embedding = make_textual_inversion(tmp_path / "emb.safetensors", fmt="safetensors")
    with pytest.raises(InvalidModelConfigException) as info:
        getattr(local_service, how)(embedding, {"model_type": "lora"})
    message = str(info.value)
    assert "lora" in message and "embedding_file" in message and "KeyError" not in message
    _nothing_recorded(local_service, event_store)
    # the same file without the override is an embedding, and installs
    key = getattr(local_service, how)(embedding)
    assert local_service.record_store.get_model(key).model_type.value == "embedding"


@pytest.mark.parametrize("how", ["register_path", "install_path"])
def test_a_chosen_key_is_the_records_key(how: str, local_service: ModelInstallService, tmp_path: Path) -> None:
    path = make_vae_checkpoint(tmp_path / "vae.safetensors")
    key = getattr(local_service, how)(path, {"key": "xyzzy", "name": "chosen"})
    assert key == "xyzzy"
    record = local_service.record_store.get_model("xyzzy")
    assert record.key == "xyzzy" and record.name == "chosen" and record.hash.startswith("blake3:")
    assert [m.key for m in local_service.record_store.all_models()] == ["xyzzy"]


def test_a_taken_key_is_refused_and_the_first_model_kept(local_service: ModelInstallService, tmp_path: Path) -> None:
    first = local_service.register_path(make_lora_kohya(tmp_path / "a.safetensors", rank=4), {"key": "xyzzy"})
    second = make_lora_kohya(tmp_path / "b.safetensors", rank=8)
    with pytest.raises(DuplicateInstallError, match="'xyzzy' is already used") as info:
        local_service.register_path(second, {"key": "xyzzy"})
    assert info.value.existing_key == "xyzzy"
    with pytest.raises(DuplicateInstallError, match="xyzzy"):
        local_service.register_path(second, {"key": "xyzzy"}, force=True)  # force copies content, never takes a key
    [only] = local_service.record_store.all_models()
    assert only.key == first and only.path == str((tmp_path / "a.safetensors").resolve())


@pytest.mark.parametrize("bad", ["", "has space", "a/b", "../up", "x" * 257, 42, "ключ"])
def test_a_bad_key_is_refused_before_any_work(bad: object, local_service: ModelInstallService,
                                              event_store: RedisEventStore, tmp_path: Path) -> None:
    path = make_vae_checkpoint(tmp_path / "vae.safetensors")
    for how in (local_service.register_path, local_service.install_path):
        with pytest.raises(InvalidModelConfigException, match="key="):
            how(path, {"key": bad})
    with pytest.raises(InvalidModelConfigException, match="key="):
        local_service.heuristic_import(str(path), {"key": bad})  # refused at submit, not by a worker later
    assert local_service.list_jobs() == []
    _nothing_recorded(local_service, event_store)
    with pytest.raises(UnknownModelException):
        local_service.record_store.get_model(str(bad))


def test_a_record_key_is_checked_like_any_key(local_service: ModelInstallService) -> None:
    config = {"name": "n", "model_type": "vae", "model_format": "checkpoint", "base_model": "sd-1", "path": "p"}
    with pytest.raises(InvalidModelConfigException, match="key="):
        local_service.record_store.add_model("no spaces allowed", config)
    assert local_service.record_store.add_model("ok_key-1.2:3", config).key == "ok_key-1.2:3"
