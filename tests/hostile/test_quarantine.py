"""One malformed event must never stop the system (issue 12, section 1).

Entries are forged with a raw XADD, as anyone with access to Redis could: a ModelAdded whose config is
no record (it lacks base_model), and ModelRemoved entries whose aggregate version is older than,
equal to, or past the next one. Every reader refuses them alike: they are quarantined once each, skipped
by all, reported (doctor, /healthz, /metrics, ``events quarantine``) and never applied."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import structlog
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from modelbus.events.errors import InvalidEventError
from modelbus.events.schema import (
    InstallCompleted,
    InstallRequested,
    ModelAdded,
    ModelRemoved,
    ModelRenamed,
    ModelUpdated,
)
from modelbus.events.store import RedisEventStore
from modelbus.services.api import create_app
from modelbus.services.cli import app as cli_app
from modelbus.services.client import ModelBusClient
from modelbus.services.config import AppConfig
from modelbus.services.install import InstallStatus, ModelInstallService
from modelbus.services.install.jobs import load_job
from modelbus.services.records import ModelRecordServiceFile, ModelRecordServiceMemory, ModelRecordServiceSQL
from modelbus.services.records.service import ModelRecordServiceBase
from tests.api.conftest import app, live_api  # noqa: F401 - fixtures: the API on a real uvicorn server
from tests.api.test_events_sse import read_events
from tests.client.conftest import model_config, put_file
from tests.fixtures.model_files import make_lora_kohya
from tests.install.conftest import Bus, bus, installer  # noqa: F401 - fixtures: a real worker process
from tests.record_configs import record_config
from tests.waiting import wait_until


def _now() -> str:
    return datetime.now(UTC).isoformat()


def forge(client: redis.Redis, store: RedisEventStore, type_: str, agg: str, ver: int, body: dict[str, Any]) -> str:
    """The raw XADD of the attack, as written in the issue."""
    raw = client.xadd(store.keys.events, {"type": type_, "v": "1", "agg": agg, "ver": str(ver), "time": _now(),
                                          "id": f"forged-{agg}-{ver}", "body": json.dumps(body)})
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _poison(store: RedisEventStore) -> str:
    return forge(redis.Redis.from_url(store.url or ""), store, "ModelAdded", "evil", 1, {"config": {"name": "x"}})


def _cli(*args: str, code: int = 0) -> Any:
    result = CliRunner().invoke(cli_app, list(args))
    assert result.exit_code == code, (args, result.exit_code, result.stdout, result.stderr)
    return result


def _services(config: AppConfig, store: RedisEventStore, tag: str = "") -> list[ModelRecordServiceBase]:
    return [ModelRecordServiceSQL.from_db_file(config.root / f"records{tag}.db", store, config=config),
            ModelRecordServiceFile.from_db_file(config.root / f"records{tag}.yaml", store, config=config),
            ModelRecordServiceMemory(store, config=config)]


def test_a_config_without_base_model_stops_no_reader(app_config: AppConfig, event_store: RedisEventStore) -> None:
    app_config.models_path.mkdir(parents=True, exist_ok=True)
    with ModelBusClient(app_config) as client:
        put_file(app_config, "a.safetensors")
        client.add_model("k1", model_config("first", "a.safetensors"))
        poisoned = _poison(event_store)
        put_file(app_config, "b.safetensors")
        client.add_model("k2", model_config("second", "b.safetensors"))  # a write after it
    assert [m["key"] for m in json.loads(_cli("list", "--json").stdout)] == ["k1", "k2"]
    assert json.loads(_cli("show", "k2", "--json").stdout)["name"] == "second"
    _cli("show", "evil", code=3)  # never applied
    assert "2 model(s)" in _cli("records", "rebuild").stdout
    services = _services(app_config, event_store)
    try:
        for service in services:  # every projection, and a rebuild of each, agree
            assert sorted(m.key for m in service.all_models()) == ["k1", "k2"], type(service).__name__
            service.rebuild()
            assert sorted(m.key for m in service.all_models()) == ["k1", "k2"], type(service).__name__
    finally:
        for service in services:
            service.close()
    # many readers saw it: it is quarantined once
    entries = event_store.quarantined()
    assert [(q.position, q.type, q.aggregate_id, q.aggregate_version) for q in entries] == \
        [(poisoned, "ModelAdded", "evil", 1)]
    assert "field required" in entries[0].reason
    assert event_store.quarantine_count() == 1
    print(f"\npoison at {poisoned}: list/show/add/rebuild of 3 projections went on; quarantine: {entries[0].reason}")


def test_an_install_after_the_poison_completes(bus: Bus, installer: ModelInstallService,  # noqa: F811
                                               tmp_path: Path) -> None:
    store = RedisEventStore.from_config(bus.config)
    poisoned = _poison(store)
    source = make_lora_kohya(tmp_path / "after_poison.safetensors", rank=4)
    done = installer.wait_for_job(installer.heuristic_import(str(source)), timeout=60)
    assert done.status is InstallStatus.COMPLETED, (done.error, bus.worker_log())
    assert installer.record_store.get_model(done.key).name == "after_poison"
    assert poisoned in {q.position for q in store.quarantined()}


def _removal(key: str) -> dict[str, Any]:
    return {"path": f"sd-1/lora/{key}.safetensors"}


def test_forged_removals_out_of_sequence_are_not_applied(app_config: AppConfig,
                                                         event_store: RedisEventStore) -> None:
    raw = redis.Redis.from_url(event_store.url or "")
    event_store.append([ModelAdded(aggregate_id="k", config=record_config("k"))], expected_version=0)
    event_store.append([ModelUpdated(aggregate_id="k", changes={"name": "kept"},
                                     config=record_config("k", "kept"))], expected_version=1)
    start = event_store.head()
    late = ModelRecordServiceSQL.from_db_file(app_config.root / "late.db", event_store, config=app_config)
    forged = [forge(raw, event_store, "ModelRemoved", "k", ver, _removal("k")) for ver in (1, 2, 9)]
    services = _services(app_config, event_store)
    try:
        for service in [*services, late]:
            assert service.get_model("k").name == "kept", type(service).__name__
            assert [s.event.aggregate_version for s in service.history("k")] == [1, 2]
        reasons = {q.position: q.reason for q in event_store.quarantined()}
        assert list(reasons) == forged
        assert "older than" in reasons[forged[0]] and "repeats" in reasons[forged[1]] \
            and "skips past" in reasons[forged[2]]
        # subscribers: from the start, and from a position after the real events (no history seen)
        for since in ("0-0", start):
            seen = [s.position for s in event_store.subscribe(since, block_ms=50, stop=_after(1))]
            assert not set(seen) & set(forged), since
        with ModelBusClient(app_config) as client:
            assert not {d.position for d in client.events(since="0")} & set(forged)
            live = [d.position for d in client.subscribe(since=start, block_ms=50, stop=_after(1))]
            assert not set(live) & set(forged)
        # the real next removal is version 3, and every projection applies it
        services[0].del_model("k")
        for service in services:
            assert not service.exists("k"), type(service).__name__
        assert len(event_store.quarantined()) == 3
    finally:
        for service in [*services, late]:
            service.close()


def _after(calls: int) -> Any:
    """A stop() that is true from its ``calls + 1``-th call on (a subscriber polls once, then ends)."""
    count = [0]

    def stop() -> bool:
        count[0] += 1
        return count[0] > calls + 1
    return stop


def test_the_install_job_fold_skips_what_breaks_its_sequence(event_store: RedisEventStore) -> None:
    raw = redis.Redis.from_url(event_store.url or "")
    event_store.append([InstallRequested(aggregate_id="job1", source="/x.safetensors")], expected_version=0)
    # a forger who also pushes the entry onto the job's index, so that the job's history holds it
    body = {"key": "k", "config": record_config("k"), "total_bytes": 1}
    forged = forge(raw, event_store, "InstallCompleted", "job1", 1, body)
    raw.rpush(event_store.keys.aggregate_index("job1"), forged)
    job = load_job(event_store, "job1")
    assert job.status is InstallStatus.WAITING and job.version == 1
    assert [q.position for q in event_store.quarantined()] == [forged]
    event_store.append([InstallCompleted(aggregate_id="job1", key="k", config=record_config("k"))],
                       expected_version=1)
    assert load_job(event_store, "job1").status is InstallStatus.COMPLETED


def test_rebuild_is_the_same_with_or_without_the_poison(app_config: AppConfig, redis_url: str,
                                                        namespace: str) -> None:
    clean = RedisEventStore.from_url(redis_url, namespace + "-clean")
    dirty = RedisEventStore.from_url(redis_url, namespace)
    raw = redis.Redis.from_url(redis_url)
    try:
        states = []
        for store, poisoned in ((clean, False), (dirty, True)):
            for n in range(5):
                key = f"m{n}"
                store.append([ModelAdded(aggregate_id=key, config=record_config(key))], expected_version=0)
                if poisoned:
                    forge(raw, store, "ModelRemoved", key, 1, _removal(key))  # a replayed version
                    forge(raw, store, "ModelAdded", f"x{n}", 1, {"config": {"name": "x"}})
                    forge(raw, store, "ModelUpdated", key, 2, {"changes": {}, "config": {"key": key}})
                store.append([ModelUpdated(aggregate_id=key, changes={"name": f"n{n}"},
                                           config=record_config(key, f"n{n}"))], expected_version=1)
            services = _services(app_config, store, tag="-dirty" if poisoned else "-clean")
            try:
                for service in services:
                    service.rebuild()
                states.append([[m.model_dump(mode="json") for m in s.all_models()] for s in services])
            finally:
                for service in services:
                    service.close()
        assert states[0] == states[1] and len(states[0][0]) == 5
        assert all(projection == states[1][0] for projection in states[1])
        assert dirty.quarantine_count() == 15 and clean.quarantine_count() == 0
    finally:
        for key in raw.scan_iter(match=f"*{{{namespace}-clean}}*"):
            raw.delete(key)


def test_modelbus_itself_cannot_append_what_readers_refuse(event_store: RedisEventStore) -> None:
    refused = [
        ModelAdded(aggregate_id="evil", config={"name": "x"}),  # the config: no base_model
        ModelAdded(aggregate_id="evil", config=record_config("other")),  # a config for another key
        ModelUpdated(aggregate_id="evil", changes={}, config={**record_config("evil"), "base_model": "sd-9"}),
        ModelAdded(aggregate_id="evil", config=record_config("evil"), aggregate_version=5),  # not its slot
        ModelRemoved.model_construct(type="ModelRemoved", aggregate_id="evil", path=7),  # schema broken after
    ]
    for event in refused:
        with pytest.raises(InvalidEventError) as caught:
            event_store.append([event], expected_version=0)
        assert "evil" in str(caught.value)
    assert event_store.head() == "0-0" and event_store.version("evil") == 0
    assert event_store.append([ModelAdded(aggregate_id="evil", config=record_config("evil"))]).version == 1


def test_quarantine_is_reported_by_doctor_healthz_metrics_and_the_cli(app_config: AppConfig,
                                                                      event_store: RedisEventStore) -> None:
    app_config.models_path.mkdir(parents=True, exist_ok=True)
    with TestClient(create_app(app_config)) as http:
        assert http.get("/healthz").json()["quarantined"] == 0
        assert "modelbus_quarantined_events_total 0.0" in http.get("/metrics").text
        assert "0 quarantined" in _cli("events", "quarantine").stdout
        poisoned = _poison(event_store)
        assert _cli("list", "--json").stdout.strip() == "[]"  # a reader refuses it, and quarantines it
        # /healthz answers from a probe at most a second old: the next probe sees it
        health = wait_until(lambda: (h := http.get("/healthz")).json()["quarantined"] and h, 30, "a probe after it")
        assert health.status_code == 200 and health.json()["status"] == "degraded"
        assert health.json()["quarantined"] == 1
        assert "modelbus_quarantined_events_total 1.0" in http.get("/metrics").text
    listed = json.loads(_cli("events", "quarantine", "--json").stdout)
    assert [(q["position"], q["aggregate_id"]) for q in listed] == [(poisoned, "evil")]
    assert "model_type" in listed[0]["reason"]
    table = _cli("events", "quarantine").stdout
    assert poisoned in table and "1 quarantined entry" in table
    # (the exit code is the other checks' business: no worker and no GPU here)
    doctor = json.loads(CliRunner().invoke(cli_app, ["doctor", "--json"]).stdout)
    check = next(c for c in doctor if c["name"] == "event log")
    assert check["status"] == "warn" and "1 entry quarantined" in check["detail"]


def test_sse_never_sends_a_forged_entry(live_api: str, event_store: RedisEventStore) -> None:  # noqa: F811
    raw = redis.Redis.from_url(event_store.url or "")
    event_store.append([ModelAdded(aggregate_id="k", config=record_config("k"))], expected_version=0)
    forged = [forge(raw, event_store, "ModelRemoved", "k", ver, _removal("k")) for ver in (1, 5)]
    forged.append(_poison(event_store))
    real = event_store.append([ModelRenamed(aggregate_id="k", old_name="k", new_name="renamed")],
                              expected_version=1).positions[0]
    with httpx.Client(base_url=live_api, timeout=10) as http, \
            http.stream("GET", "/api/v2/events", params={"since": "0",
                                                         "types": "ModelAdded,ModelRemoved,ModelRenamed"}) as r:
        got = []
        for message in read_events(r):
            got.append(json.loads(message["data"]))
            if got[-1]["position"] == real:
                break
    assert [m["type"] for m in got] == ["ModelAdded", "ModelRenamed"]
    assert {q.position for q in event_store.quarantined()} == set(forged)


def test_a_poisoned_tail_does_not_make_every_open_rebuild(app_config: AppConfig,
                                                          event_store: RedisEventStore) -> None:
    event_store.append([ModelAdded(aggregate_id="k", config=record_config("k"))], expected_version=0)
    _poison(event_store)  # the last entry: the projection's checkpoint sits on it
    path = app_config.root / "tail.db"
    ModelRecordServiceSQL.from_db_file(path, event_store, config=app_config).close()
    with structlog.testing.capture_logs() as logs, \
            ModelRecordServiceSQL.from_db_file(path, event_store, config=app_config) as service:
        assert [m.key for m in service.all_models()] == ["k"]
    assert not [e for e in logs if e["event"] == "records_rebuild_on_open"]


def test_events_follow_in_the_cli_skips_forged_entries(app_config: AppConfig, event_store: RedisEventStore) -> None:
    raw = redis.Redis.from_url(event_store.url or "")
    event_store.append([ModelAdded(aggregate_id="k", config=record_config("k"))], expected_version=0)
    forged = {forge(raw, event_store, "ModelRemoved", "k", 1, _removal("k")), _poison(event_store)}
    event_store.append([ModelRenamed(aggregate_id="k", old_name="k", new_name="renamed")], expected_version=1)
    for args in (("events", "--json"), ("events", "--follow", "--since", "0", "--count", "2", "--json")):
        lines = [json.loads(line) for line in _cli(*args).stdout.splitlines()]
        assert [(d["type"], d["event"]["aggregate_version"]) for d in lines] == [("ModelAdded", 1), ("ModelRenamed", 2)]
        assert not {d["position"] for d in lines} & forged
