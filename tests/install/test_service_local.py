"""The service's synchronous side, in this process: register/install a path, duplicates, name collisions,
delete/unregister, scanning a folder and syncing the models directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from modelbus.events.store import RedisEventStore
from modelbus.services.config import AppConfig
from modelbus.services.install import (
    DuplicateInstallError,
    InvalidSourceError,
    ModelIdentificationError,
    ModelInstallService,
)
from modelbus.services.records import UnknownModelException
from tests.fixtures.model_files import make_lora_diffusers, make_lora_kohya, make_vae_checkpoint


@pytest.fixture()
def service(app_config: AppConfig, event_store: RedisEventStore) -> Iterator[ModelInstallService]:
    svc = ModelInstallService(app_config, event_store=event_store)
    yield svc
    svc.record_store.close()


def test_register_path_records_in_place(service: ModelInstallService, tmp_path: Path) -> None:
    path = make_vae_checkpoint(tmp_path / "my_vae.safetensors")
    key = service.register_path(path, config={"description": "a vae", "name": "My VAE"})
    record = service.record_store.get_model(key)
    assert len(key) == 32
    assert record.path == str(path.resolve())
    assert record.name == "My VAE" and record.description == "a vae"
    assert record.model_type.value == "vae" and record.base_model.value == "sd-1"
    assert record.hash.startswith("blake3:")


def test_install_path_resolves_name_collisions(service: ModelInstallService, tmp_path: Path) -> None:
    first = make_lora_kohya(tmp_path / "a" / "style.safetensors", rank=4)
    second = make_lora_kohya(tmp_path / "b" / "style.safetensors", rank=8)
    keys = [service.install_path(first), service.install_path(second)]
    paths = [service.record_store.get_model(k).path for k in keys]
    assert paths == ["sd-1/lora/style.safetensors", "sd-1/lora/style_1.safetensors"]
    models = service.config.models_path
    assert (models / paths[1]).read_bytes() == second.read_bytes()
    assert first.exists() and second.exists()
    assert not any((models / ".staging").iterdir())


def test_duplicate_content_names_the_existing_key(service: ModelInstallService, tmp_path: Path) -> None:
    path = make_lora_kohya(tmp_path / "dup.safetensors", rank=4)
    key = service.install_path(path)
    with pytest.raises(DuplicateInstallError, match=key) as caught:
        service.register_path(path)
    assert caught.value.existing_key == key
    other = service.register_path(path, force=True)
    assert other != key and service.record_store.get_model(other).hash == service.record_store.get_model(key).hash


def test_bad_paths_raise_and_leave_nothing(service: ModelInstallService, tmp_path: Path) -> None:
    with pytest.raises(InvalidSourceError, match="no such file"):
        service.install_path(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ModelIdentificationError, match="junk.safetensors"):
        service.install_path(junk)
    models = service.config.models_path
    assert [p for p in models.rglob("*") if p.is_file()] == []
    assert service.record_store.all_models() == []


def test_delete_removes_files_only_inside_the_models_dir(service: ModelInstallService, tmp_path: Path) -> None:
    outside = make_lora_kohya(tmp_path / "outside.safetensors", rank=4)
    inside_key = service.install_path(make_lora_kohya(tmp_path / "inside.safetensors", rank=8))
    outside_key = service.register_path(outside)
    inside_path = service.config.model_path(service.record_store.get_model(inside_key).path)
    service.delete(inside_key)
    assert not inside_path.exists()
    service.delete(outside_key)
    assert outside.exists()  # not ours to delete: only the record goes
    for key in (inside_key, outside_key):
        with pytest.raises(UnknownModelException):
            service.record_store.get_model(key)
    kept = service.install_path(make_lora_kohya(tmp_path / "kept.safetensors", rank=12))
    kept_path = service.config.model_path(service.record_store.get_model(kept).path)
    service.unregister(kept)
    assert kept_path.exists()


def test_scan_directory_registers_each_model_once(service: ModelInstallService, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    make_lora_kohya(tree / "loras" / "one.safetensors", rank=4)
    make_lora_diffusers(tree / "loras" / "two", folder=True)  # a model folder: one model, not its files
    make_vae_checkpoint(tree / "vae" / "three.safetensors")
    (tree / "notes.txt").write_text("not a model")
    (tree / ".hidden").mkdir()
    make_lora_kohya(tree / ".hidden" / "secret.safetensors", rank=8)
    keys = service.scan_directory(tree)
    names = sorted(service.record_store.get_model(k).name for k in keys)
    assert names == ["one", "three", "two"]
    assert service.scan_directory(tree) == []  # already registered


def test_sync_models_dir_adopts_untracked_and_reports_missing(service: ModelInstallService, tmp_path: Path) -> None:
    gone_key = service.install_path(make_lora_kohya(tmp_path / "gone.safetensors", rank=4))
    gone_path = service.config.model_path(service.record_store.get_model(gone_key).path)
    gone_path.unlink()
    dropped = make_lora_kohya(service.config.models_path / "sd-1" / "lora" / "dropped_in.safetensors", rank=8)
    report = service.sync_models_dir()
    assert report.missing == [gone_key]
    assert len(report.added) == 1
    assert service.record_store.get_model(report.added[0]).path == "sd-1/lora/dropped_in.safetensors"
    assert dropped.exists()
    again = service.sync_models_dir()
    assert again.added == [] and again.missing == [gone_key]
