"""``/healthz`` answers from a probe at most a refresh interval old, and one probe serves every request
that arrives while it runs: a storm of health checks costs Redis one round of reads, not one per call.
Counted on the real Redis (its PING calls: only the health probe pings)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis

from modelbus.events.store import RedisEventStore
from modelbus.services.api import create_app
from modelbus.services.api.health_state import HealthState
from modelbus.services.client import ModelBusClient
from modelbus.services.config import AppConfig
from tests.api.conftest import serve
from tests.waiting import wait_until

REQUESTS = 40


def _pings(connection: redis.Redis) -> int:
    return int(connection.info("commandstats").get("cmdstat_ping", {}).get("calls", 0))


def _storm(app_config: AppConfig, refresh_seconds: float) -> tuple[int, list[httpx.Response]]:
    """REQUESTS concurrent /healthz calls on a live server; the PINGs Redis saw while they ran."""
    client = ModelBusClient(app_config)
    app = create_app(app_config, client=client)
    app.state.health = HealthState(client, refresh_seconds=refresh_seconds)
    server, thread, base = serve(app)
    try:
        with httpx.Client(base_url=base, timeout=60) as http, ThreadPoolExecutor(8) as pool:
            before = _pings(client.redis)
            answers = list(pool.map(lambda _: http.get("/healthz"), range(REQUESTS)))
            return _pings(client.redis) - before, answers
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.mark.parametrize("refresh_seconds", [3600.0, 0.0])
def test_one_probe_answers_a_storm_of_health_checks(app_config: AppConfig, refresh_seconds: float) -> None:
    # 0 s is the behaviour before the cache (every request probes): the count tells them apart. (A new
    # pooled connection may PING once too, hence "a few" rather than exactly one: on a loaded machine the
    # probe's reads open more connections; 5 were seen on a 2-core VM at load 8.)
    pinged, answers = _storm(app_config, refresh_seconds)
    if refresh_seconds:
        assert 1 <= pinged <= REQUESTS // 4
    else:
        assert pinged >= REQUESTS
    assert {(r.status_code, r.json()["status"], r.json()["redis"]["ok"]) for r in answers} == {(200, "degraded", True)}


def test_the_answer_follows_the_state_within_the_interval(app_config: AppConfig, event_store: RedisEventStore) -> None:
    from fastapi.testclient import TestClient

    from modelbus.workers.runner import Heartbeat
    with TestClient(create_app(app_config)) as http:
        assert http.get("/healthz").json()["workers_alive"] == 0
        beat = Heartbeat(event_store.client, event_store.keys, "w-health", ["install"], state=dict)
        beat.beat()
        try:
            health = wait_until(lambda: (h := http.get("/healthz").json())["workers_alive"] == 1 and h, 30,
                                "the next probe to see the worker")
            assert health["status"] == "ok"
            assert http.get("/healthz", params={"require_workers": "true"}).status_code == 200
        finally:
            beat.stop()
        wait_until(lambda: http.get("/healthz", params={"require_workers": "true"}).status_code == 503, 60,
                   "the stopped worker to lapse")


def test_a_dead_redis_is_remembered_as_unavailable(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient
    config = AppConfig.load(root=tmp_path, redis_url="redis://127.0.0.1:1/0", namespace="down")
    with TestClient(create_app(config)) as http:
        first, second = http.get("/healthz"), http.get("/healthz")
    assert first.status_code == second.status_code == 503
    assert first.json() == second.json() and first.json()["status"] == "unavailable"
