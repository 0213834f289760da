"""The CLI in-process (typer's runner) against a real Redis: output, --json, errors and exit codes."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from modelbus.events.store import RedisEventStore
from modelbus.services.cli import app
from modelbus.services.client import ModelBusClient
from modelbus.services.config import AppConfig
from tests.client.conftest import model_config, put_file
from tests.fixtures.activity import download_payload, load_payload


@pytest.fixture()
def cli(app_config: AppConfig):  # type: ignore[no-untyped-def]
    app_config.models_path.mkdir(parents=True, exist_ok=True)
    runner = CliRunner()

    def run(*args: str, code: int = 0):  # type: ignore[no-untyped-def]
        result = runner.invoke(app, list(args))
        assert result.exit_code == code, (args, result.exit_code, result.stdout, result.stderr)
        return result
    return run


@pytest.fixture()
def seeded(app_config: AppConfig) -> ModelBusClient:
    client = ModelBusClient(app_config)
    for i, base in enumerate(("sd-1", "sdxl")):
        put_file(app_config, f"m{i}.safetensors")
        client.add_model(f"k{i}", model_config(f"model-{i}", f"m{i}.safetensors", base_model=base))
    return client


def test_list_show_update_rename_history_rm(cli, seeded, app_config) -> None:  # type: ignore[no-untyped-def]
    listed = json.loads(cli("list", "--json").stdout)
    assert [m["key"] for m in listed] == ["k0", "k1"]
    assert [m["key"] for m in json.loads(cli("list", "--base", "sdxl", "--json").stdout)] == ["k1"]
    assert "model-0" in cli("list").stdout  # the table
    assert json.loads(cli("show", "k0", "--json").stdout)["name"] == "model-0"
    updated = json.loads(cli("update", "k0", "--set", "description=hello world", "--set", 'tags=["a","b"]',
                             "--json").stdout)
    assert updated["description"] == "hello world" and updated["tags"] == ["a", "b"]
    cli("rename", "k0", "zero")
    history = json.loads(cli("history", "k0", "--json").stdout)
    assert [h["type"] for h in history] == ["ModelAdded", "ModelUpdated", "ModelRenamed"]
    cli("rm", "k0", "--delete-files")
    assert not app_config.model_path("m0.safetensors").exists()
    assert [m["key"] for m in json.loads(cli("list", "--json").stdout)] == ["k1"]


def test_errors_are_one_line_with_an_exit_code(cli, seeded) -> None:  # type: ignore[no-untyped-def]
    missing = cli("show", "nope", code=3)
    assert missing.stderr.strip() == "error: no model has the key, a key starting with, or the name 'nope'"
    invalid = cli("update", "k0", "--set", "base_model=sd-9", code=2)
    assert invalid.stderr.startswith("error: ") and "base_model" in invalid.stderr
    assert len(invalid.stderr.strip().splitlines()) == 1 and "Traceback" not in invalid.stderr
    cli("update", "k0", "--set", "nonsense", code=2)
    cli("list", "--type", "spaceship", code=2)
    debug = cli("--debug", "show", "nope", code=3)
    assert "Traceback" in debug.stderr


def test_unreachable_redis(cli, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MODELBUS_REDIS_URL", "redis://127.0.0.1:1/0")
    result = cli("list", code=5)
    assert "127.0.0.1:1" in result.stderr and "Traceback" not in result.stderr


def test_events_history_and_follow(cli, event_store: RedisEventStore) -> None:  # type: ignore[no-untyped-def]
    event_store.publish_activity("download_progress", download_payload(bytes=1))
    event_store.publish_activity("model_load_started", load_payload("k"))
    past = [json.loads(line) for line in cli("events", "--json").stdout.splitlines()]
    assert [e["type"] for e in past] == ["download_progress", "model_load_started"]
    only = cli("events", "--type", "model_load_started", "--json").stdout.splitlines()
    assert len(only) == 1

    since = event_store.head("activity")  # the follower may start after the events: it resumes from here

    def publish_later() -> None:
        time.sleep(0.5)
        event_store.publish_activity("download_progress", download_payload(bytes=2))
        event_store.publish_activity("model_load_completed", load_payload("k", cache_hit=True))
    threading.Thread(target=publish_later, daemon=True).start()
    followed = cli("events", "--follow", "--type", "model_load_completed", "--since", since, "--count", "1",
                   "--json").stdout
    assert [json.loads(line)["event"]["payload"] for line in followed.splitlines()] == [load_payload("k", cache_hit=True)]


def test_workers_and_doctor(cli, app_config, event_store) -> None:  # type: ignore[no-untyped-def]
    from modelbus.workers.runner import Heartbeat
    beat = Heartbeat(event_store.client, event_store.keys, "w-1", ["install", "download"])
    beat.beat()
    try:
        workers = json.loads(cli("workers", "--json").stdout)
        assert [w["id"] for w in workers] == ["w-1"]
        assert "w-1" in cli("workers").stdout
        checks = {c["name"]: c for c in json.loads(cli("doctor", "--json").stdout)}
    finally:
        beat.stop()
    assert checks["redis"]["status"] == "ok"
    assert checks["eviction"]["status"] == "ok" and checks["persistence"]["status"] == "ok"
    assert checks["queue install"]["status"] == "ok" and checks["queue gpu"]["status"] == "warn"
    assert checks["disk"]["status"] in ("ok", "warn") and "gpu" in checks


def test_doctor_fails_on_an_evicting_redis(cli, event_store) -> None:  # type: ignore[no-untyped-def]
    event_store.client.config_set("maxmemory-policy", "allkeys-lru")
    try:
        result = cli("doctor", code=1)
    finally:
        event_store.client.config_set("maxmemory-policy", "noeviction")
    # the store refuses to open on such a server, so the redis check itself fails, naming the policy
    assert "allkeys-lru" in " ".join(result.stdout.split()) and "1 check(s) failed: redis" in result.stderr


def test_records_rebuild_and_import_yaml(cli, seeded, tmp_path: Path, app_config) -> None:  # type: ignore[no-untyped-def]
    report = json.loads(cli("records", "rebuild", "--json").stdout)
    assert report["models"] == 2
    legacy = tmp_path / "models.yaml"
    put_file(app_config, "legacy.safetensors", b"legacy" * 10)
    legacy.write_text("__metadata__:\n  version: 3.0.0\n"
                      "sd-1/main/old-model:\n  path: legacy.safetensors\n  description: from v2\n"
                      "sd-9/main/broken:\n  path: x.safetensors\n")
    result = cli("import-yaml", str(legacy), code=1)
    assert "imported 1 model(s)" in result.stdout and "unknown base model 'sd-9'" in result.stdout
    assert "1 entry not imported" in result.stderr
    assert "old-model" in [m["name"] for m in json.loads(cli("list", "--json").stdout)]
    cli("import-yaml", str(tmp_path / "missing.yaml"), code=2)


def test_install_without_workers_then_cancel(cli, app_config) -> None:  # type: ignore[no-untyped-def]
    model = put_file(app_config, "../incoming/tiny.safetensors")
    out = cli("install", str(model), "--json").stdout
    job = json.loads(out)
    assert job["state"] == "waiting" and job["source"] == str(model)
    assert [j["id"] for j in json.loads(cli("jobs", "--json").stdout)] == [job["id"]]
    assert "cancelled" in cli("cancel", job["id"]).stdout
    assert list((app_config.root / "import").iterdir()) == []  # the hand-over copy went with the job
    cli("cancel", "no-such-job", code=3)
    cli("install", " ", code=2)
