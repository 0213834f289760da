"""The /api/v2/models routes over a real Redis: filters, pagination, errors with the right statuses."""

from __future__ import annotations

from fastapi.testclient import TestClient

from modelbus.services.client import ModelBusClient
from modelbus.services.config import AppConfig
from tests.client.conftest import model_config, put_file


def _seed(app_config: AppConfig, n: int = 3) -> ModelBusClient:
    client = ModelBusClient(app_config)
    for i in range(n):
        put_file(app_config, f"m{i}.safetensors")
        client.add_model(f"k{i}", model_config(f"model-{i}", f"m{i}.safetensors",
                                               base_model="sdxl" if i == 2 else "sd-1", tags=["t"] if i else []))
    return client


def test_list_filter_and_paginate(http: TestClient, app_config: AppConfig) -> None:
    _seed(app_config)
    page = http.get("/api/v2/models", params={"limit": 2}).json()
    assert page["total"] == 3 and [m["key"] for m in page["items"]] == ["k0", "k1"]
    assert [m["key"] for m in http.get("/api/v2/models", params={"offset": 2}).json()["items"]] == ["k2"]
    assert [m["key"] for m in http.get("/api/v2/models", params={"base": "sdxl"}).json()["items"]] == ["k2"]
    assert http.get("/api/v2/models", params={"tag": "t", "base": "sd-1"}).json()["total"] == 1
    bad = http.get("/api/v2/models", params={"base": "sd-9"})
    assert bad.status_code == 422 and bad.json()["error"]["details"][0]["field"] == "query.base"


def test_get_patch_rename_history_delete(http: TestClient, app_config: AppConfig) -> None:
    _seed(app_config)
    assert http.get("/api/v2/models/i/k1").json()["name"] == "model-1"
    patched = http.patch("/api/v2/models/i/k1", json={"description": "nice"})
    assert patched.status_code == 200 and patched.json()["description"] == "nice"
    assert http.post("/api/v2/models/i/k1/rename", json={"name": "renamed"}).json()["name"] == "renamed"
    history = http.get("/api/v2/models/i/k1/history").json()
    assert [h["type"] for h in history] == ["ModelAdded", "ModelUpdated", "ModelRenamed"]
    removed = http.delete("/api/v2/models/i/k1", params={"delete_files": "true"})
    assert removed.json() == {"key": "k1", "deleted_files": True}
    assert not app_config.model_path("m1.safetensors").exists()
    gone = http.get("/api/v2/models/i/k1")
    assert gone.status_code == 404 and gone.json()["error"]["type"] == "UnknownModelException"


def test_errors_are_json_with_the_right_status(http: TestClient, app_config: AppConfig) -> None:
    _seed(app_config)
    invalid = http.patch("/api/v2/models/i/k1", json={"base_model": "sd-9"})
    assert invalid.status_code == 422 and invalid.json()["error"]["details"][0]["field"] == "base_model"
    duplicate = http.patch("/api/v2/models/i/k1", json={"path": "m0.safetensors"})  # k0's path
    assert duplicate.status_code == 409, duplicate.text
    assert "already used" in duplicate.json()["error"]["message"]
    assert http.get("/api/v2/models/i/k1").json()["path"] == "m1.safetensors"  # unchanged
    assert http.post("/api/v2/models/i/k1/rename", json={"name": ""}).status_code == 422
    assert http.delete("/api/v2/models/i/nope").status_code == 404
    assert http.get("/api/v2/models/i/bad%20key").status_code == 422


def test_workers_show_heartbeats_with_cache_contents(http: TestClient, app_config: AppConfig) -> None:
    from modelbus.events.store import RedisEventStore
    from modelbus.events.workers import CachedModel, WorkerCache
    from modelbus.workers.runner import Heartbeat
    store = RedisEventStore.from_config(app_config)
    beat = Heartbeat(store.client, store.keys, "gpu-test-1", ["gpu"],
                     state=lambda: WorkerCache(device="cpu", models=(CachedModel(key="k1", model_key="k1", bytes=1234),)))
    beat.beat()
    try:
        workers = http.get("/api/v2/models/workers").json()
        assert [(w["id"], w["alive"], w["models"][0]["key"]) for w in workers] == [("gpu-test-1", True, "k1")]
        health = http.get("/healthz").json()
        assert health["status"] == "ok" and health["workers_alive"] == 1 and health["redis"]["ok"]
        metrics = http.get("/metrics").text
        assert 'modelbus_cache_bytes{worker="gpu-test-1"} 1234.0' in metrics
    finally:
        beat.stop()
    assert http.get("/api/v2/models/workers").json() == []


def test_list_by_format_and_part_of_the_name(http: TestClient, app_config: AppConfig) -> None:
    _seed(app_config)
    assert [m["key"] for m in http.get("/api/v2/models", params={"contains": "DEL-1"}).json()["items"]] == ["k1"]
    assert http.get("/api/v2/models", params={"contains": "model", "format": "checkpoint"}).json()["total"] == 3
    assert http.get("/api/v2/models", params={"format": "diffusers"}).json()["total"] == 0
    bad = http.get("/api/v2/models", params={"format": "zip"})
    assert bad.status_code == 422 and bad.json()["error"]["details"][0]["field"] == "query.format"
