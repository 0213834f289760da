"""A model owns its own files and nothing else (issue 12, section 2), attacked through the HTTP API:

- ``PATCH {"path": "sd-1"}`` then ``DELETE ?delete_files=true`` used to delete every other model under
  ``models/sd-1``: a path holding (or inside) another model's path is refused, naming it;
- a delete removes exactly the manifest recorded at install (ModelAdded ``files``), and the folders that
  leaves empty, nothing else;
- a record written before manifests (empty ``files``) that shares its folder with another is refused;
- a new path must exist and lie in an import root, and is hashed again (a new manifest in the log).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from modelbus.events.schema import FileEntry, ModelAdded, ModelUpdated
from modelbus.events.store import RedisEventStore
from modelbus.services.api import create_app
from modelbus.services.config import AppConfig
from modelbus.services.install import ModelInstallService
from modelbus.services.install.manifest import model_manifest, resolve_manifest
from modelbus.services.store import open_store
from tests.client.conftest import model_config, put_file
from tests.fixtures.model_files import make_lora_diffusers, make_lora_kohya


@pytest.fixture()
def service(app_config: AppConfig, event_store: RedisEventStore) -> Iterator[ModelInstallService]:
    svc = ModelInstallService(app_config, event_store=event_store)
    yield svc
    svc.record_store.close()


@pytest.fixture()
def http(app_config: AppConfig) -> Iterator[TestClient]:
    app_config.models_path.mkdir(parents=True, exist_ok=True)
    app: FastAPI = create_app(app_config)
    with TestClient(app) as client:
        yield client


def _files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def _install_loras(service: ModelInstallService, tmp_path: Path, n: int) -> list[str]:
    return [service.install_path(make_lora_kohya(tmp_path / f"src{i}" / f"lora{i}.safetensors", rank=4 + 4 * i))
            for i in range(n)]


def test_patching_a_path_onto_a_base_folder_is_refused_and_delete_keeps_the_others(
        http: TestClient, service: ModelInstallService, app_config: AppConfig, tmp_path: Path) -> None:
    victim, *others = _install_loras(service, tmp_path, 4)
    models = app_config.models_path
    before = _files_under(models / "sd-1")
    assert len(before) == 4

    patched = http.patch(f"/api/v2/models/i/{victim}", json={"path": "sd-1"})
    assert patched.status_code == 409, patched.text
    error = patched.json()["error"]
    assert error["type"] == "ModelPathConflictError" and any(k in error["message"] for k in others)
    assert http.get(f"/api/v2/models/i/{victim}").json()["path"] == "sd-1/lora/lora0.safetensors"  # unchanged

    removed = http.delete(f"/api/v2/models/i/{victim}", params={"delete_files": "true"})
    assert removed.status_code == 200, removed.text
    assert _files_under(models / "sd-1") == before - {"lora/lora0.safetensors"}
    for key in others:
        assert (models / service.record_store.get_model(key).path).is_file()


def test_a_path_inside_another_models_folder_is_refused(http: TestClient, service: ModelInstallService,
                                                        app_config: AppConfig, tmp_path: Path) -> None:
    folder_key = service.install_path(make_lora_diffusers(tmp_path / "folder_lora", folder=True))
    [single] = _install_loras(service, tmp_path, 1)
    folder = service.record_store.get_model(folder_key).path
    inside = http.patch(f"/api/v2/models/i/{single}", json={"path": f"{folder}/pytorch_lora_weights.safetensors"})
    assert inside.status_code == 409 and folder_key in inside.json()["error"]["message"], inside.text
    events = [s.event.type for s in service.record_store.history(single)]
    assert events == ["ModelAdded"]  # nothing was written


def test_delete_removes_exactly_the_recorded_manifest(http: TestClient, service: ModelInstallService,
                                                      app_config: AppConfig, tmp_path: Path) -> None:
    key = service.install_path(make_lora_diffusers(tmp_path / "kept_lora", folder=True))
    record = service.record_store.get_model(key)
    folder = app_config.model_path(record.path)
    [added] = [s.event for s in service.record_store.history(key)]
    assert isinstance(added, ModelAdded)
    weights = folder / "pytorch_lora_weights.safetensors"
    assert [(f.path, f.size, f.blake3) for f in added.files] == [
        ("pytorch_lora_weights.safetensors", weights.stat().st_size, blake3.blake3(weights.read_bytes()).hexdigest())]
    assert resolve_manifest(folder, added.files) == [weights]
    assert model_manifest(folder) == added.files  # the one function a store computes it with

    (folder / "notes").mkdir()
    (folder / "notes" / "mine.txt").write_text("the user's own file, put there later")
    assert http.delete(f"/api/v2/models/i/{key}", params={"delete_files": "true"}).status_code == 200
    assert not weights.exists()
    assert _files_under(folder) == {"notes/mine.txt"}  # not the model's: kept, and so is its folder


def test_a_record_without_manifest_sharing_its_folder_is_not_deleted(
        http: TestClient, service: ModelInstallService, app_config: AppConfig, tmp_path: Path) -> None:
    inner = _install_loras(service, tmp_path, 2)
    put_file(app_config, "sd-1/readme.safetensors")
    # a record as written before manifests existed, pointing at the whole base folder
    service.record_store.add_model("old-record", model_config("old", "sd-1"))
    before = _files_under(app_config.models_path)
    refused = http.delete("/api/v2/models/i/old-record", params={"delete_files": "true"})
    assert refused.status_code == 409, refused.text
    assert any(k in refused.json()["error"]["message"] for k in inner)
    assert _files_under(app_config.models_path) == before
    assert http.get("/api/v2/models/i/old-record").status_code == 200  # nothing changed

    # an old record alone in its folder is removed as it always was
    put_file(app_config, "old-alone/model.safetensors")
    service.record_store.add_model("old-alone", model_config("alone", "old-alone"))
    assert http.delete("/api/v2/models/i/old-alone", params={"delete_files": "true"}).status_code == 200
    assert not (app_config.models_path / "old-alone").exists()


def test_a_new_path_must_exist_lie_in_a_root_and_is_hashed_again(
        http: TestClient, service: ModelInstallService, app_config: AppConfig, tmp_path: Path) -> None:
    [key] = _install_loras(service, tmp_path, 1)
    old = service.record_store.get_model(key)
    missing = http.patch(f"/api/v2/models/i/{key}", json={"path": "sd-1/lora/nothing-here.safetensors"})
    assert missing.status_code == 422 and "no such file" in missing.json()["error"]["message"], missing.text
    secret = tmp_path / "outside" / "secret.safetensors"
    make_lora_kohya(secret, rank=12)
    outside = http.patch(f"/api/v2/models/i/{key}", json={"path": str(secret)})
    assert outside.status_code == 403 and "import roots" in outside.json()["error"]["message"], outside.text
    link = app_config.models_path / "sneaky.safetensors"
    os.symlink(secret, link)  # inside the models dir by name, outside by what it points to
    assert http.patch(f"/api/v2/models/i/{key}", json={"path": "sneaky.safetensors"}).status_code == 403
    for bad in ("a" * 300, "sd-1/" + "b" * 300 + "/x.safetensors", 7, ""):  # bad input: 422, never a 500
        answer = http.patch(f"/api/v2/models/i/{key}", json={"path": bad})
        assert answer.status_code == 422, (bad, answer.text)
    long_source = http.post("/api/v2/models/install", json={"source": str(app_config.models_path / ("c" * 300))})
    assert long_source.status_code == 422 and "no such file" in long_source.text, long_source.text
    nul = http.post("/api/v2/models/install", json={"source": "/models/x\x00y.safetensors"})
    assert nul.status_code == 422 and "NUL" in nul.text, nul.text
    handed = app_config.root / "import" / "someones-hand-over" / "x.safetensors"
    make_lora_kohya(handed, rank=16)
    for nobodys in (".", str(handed)):  # the models directory itself; a transient hand-over copy
        answer = http.patch(f"/api/v2/models/i/{key}", json={"path": nobodys})
        assert answer.status_code == 422 and "not a place" in answer.json()["error"]["message"], answer.text
    assert [s.event.type for s in service.record_store.history(key)] == ["ModelAdded"]

    moved = app_config.models_path / "moved" / "lora0.safetensors"
    moved.parent.mkdir()
    os.replace(app_config.model_path(old.path), moved)
    moved.write_bytes(moved.read_bytes() + b" ")  # the content changed too: the record must say so
    done = http.patch(f"/api/v2/models/i/{key}", json={"path": "moved/lora0.safetensors"})
    assert done.status_code == 200, done.text
    assert done.json()["path"] == "moved/lora0.safetensors"
    update = service.record_store.history(key)[-1].event
    assert isinstance(update, ModelUpdated) and update.files is not None
    assert [(f.path, f.blake3) for f in update.files] == [
        ("lora0.safetensors", blake3.blake3(moved.read_bytes()).hexdigest())]
    assert done.json()["hash"] == f"blake3:{update.files[0].blake3}" != old.hash
    assert http.delete(f"/api/v2/models/i/{key}", params={"delete_files": "true"}).status_code == 200
    assert not moved.exists() and moved.parent.is_dir()  # its file; the folder holding it is not the model's


def test_a_forged_manifest_cannot_reach_outside_the_model(http: TestClient, service: ModelInstallService,
                                                          app_config: AppConfig, tmp_path: Path) -> None:
    victim = put_file(app_config, "sd-1/lora/neighbour.safetensors")  # no record: nobody's file
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    put_file(app_config, "sd-1/lora/forged.safetensors")
    put_file(app_config, "forged-a/model.safetensors")
    put_file(app_config, "forged-b/model.safetensors")
    forged = {"single": ("sd-1/lora/forged.safetensors", "neighbour.safetensors"),
              "folder": ("forged-a", "../../outside.txt"),
              "absolute": ("forged-b", str(outside))}
    for key, (path, entry) in forged.items():
        service.record_store.add_model(key, model_config(key, path), files=[FileEntry(path=entry, size=1, blake3="0")])
        refused = http.delete(f"/api/v2/models/i/{key}", params={"delete_files": "true"})
        assert refused.status_code == 422 and "manifest entry" in refused.json()["error"]["message"], refused.text
        assert http.get(f"/api/v2/models/i/{key}").status_code == 200  # nothing changed
    assert victim.is_file() and outside.read_text() == "keep me"


def test_in_place_models_outside_the_models_dir_lose_only_unchanged_files_in_a_root(
        modelbus_env: dict[str, str], event_store: RedisEventStore, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    library = tmp_path / "library"
    monkeypatch.setenv("MODELBUS_IMPORT_ROOTS", str(library))
    service = ModelInstallService(AppConfig.load(), event_store=event_store)
    try:
        unchanged = service.register_path(make_lora_kohya(library / "unchanged.safetensors", rank=4))
        changed_file = make_lora_kohya(library / "changed.safetensors", rank=8)
        changed = service.register_path(changed_file)
        elsewhere_file = make_lora_kohya(tmp_path / "elsewhere" / "mine.safetensors", rank=12)
        elsewhere = service.register_path(elsewhere_file)  # in process: the user's own, outside every root
        changed_file.write_bytes(changed_file.read_bytes() + b"edited by the user since")

        assert service.delete(unchanged).removed == [str(library / "unchanged.safetensors")]
        assert "changed since" in service.delete(changed).kept[str(changed_file)]
        assert "outside the import roots" in service.delete(elsewhere).kept[str(elsewhere_file)]
        assert changed_file.is_file() and elsewhere_file.is_file() and library.is_dir()
        assert service.record_store.all_models() == []
    finally:
        service.record_store.close()


def test_a_model_placed_under_a_free_name_deletes_that_file(http: TestClient, service: ModelInstallService,
                                                            app_config: AppConfig, tmp_path: Path) -> None:
    first = service.install_path(make_lora_kohya(tmp_path / "a" / "same.safetensors", rank=4))
    second = service.install_path(make_lora_kohya(tmp_path / "b" / "same.safetensors", rank=8))
    assert service.record_store.get_model(second).path == "sd-1/lora/same_1.safetensors"
    assert http.delete(f"/api/v2/models/i/{second}", params={"delete_files": "true"}).status_code == 200
    lora = app_config.models_path / "sd-1" / "lora"
    assert sorted(p.name for p in lora.iterdir()) == ["same.safetensors"]
    assert service.record_store.get_model(first).path == "sd-1/lora/same.safetensors"


def test_a_moved_path_is_published_to_the_store_before_it_is_recorded(
        modelbus_env: dict[str, str], event_store: RedisEventStore, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELBUS_STORE_URL", f"file://{tmp_path / 'blobs'}")
    config = AppConfig.load()
    service = ModelInstallService(config, event_store=event_store)
    try:
        key = service.install_path(make_lora_kohya(tmp_path / "src" / "stored.safetensors", rank=4))
        moved = config.models_path / "elsewhere" / "stored.safetensors"
        moved.parent.mkdir()
        os.replace(config.model_path(service.record_store.get_model(key).path), moved)
        moved.write_bytes(moved.read_bytes() + b"new content")
        service.update_model(key, {"path": "elsewhere/stored.safetensors"})
        update = service.record_store.history(key)[-1].event
        assert isinstance(update, ModelUpdated) and update.files
        store = open_store(config)
        assert store is not None and store.missing((f.blake3, f.size) for f in update.files) == []
    finally:
        service.record_store.close()
