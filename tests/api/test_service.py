"""Health, metrics, auth and Redis outages."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from rq import Queue

from modelbus.events.keys import Keys
from modelbus.events.store import RedisEventStore
from modelbus.services.api import create_app
from modelbus.services.config import AppConfig
from tests.fixtures.activity import load_payload


def test_healthz_without_workers_is_degraded(http: TestClient) -> None:
    health = http.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "degraded"
    assert http.get("/healthz", params={"require_workers": "true"}).status_code == 503


def test_unreachable_redis_answers_503(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = AppConfig.load(root=tmp_path, redis_url="redis://127.0.0.1:1/0", namespace="down")
    with TestClient(create_app(config)) as http:
        for method, url in (("GET", "/api/v2/models"), ("GET", "/api/v2/models/i/k1"),
                            ("GET", "/api/v2/models/workers"), ("GET", "/api/v2/events")):
            r = http.request(method, url)
            assert r.status_code == 503, (url, r.text)
            assert r.json()["error"]["type"] == "UnavailableError" and "127.0.0.1:1" in r.json()["error"]["message"]
        health = http.get("/healthz")
        assert health.status_code == 503 and health.json()["redis"]["ok"] is False
        assert "modelbus_redis_up 0.0" in http.get("/metrics").text


def test_metrics_read_queues_and_activity(http: TestClient, app_config: AppConfig,
                                          event_store: RedisEventStore) -> None:
    assert http.get("/metrics").status_code == 200  # the tally starts here
    Queue(Keys(app_config.namespace).queue("install"), connection=event_store.client).enqueue("os.getcwd")
    event_store.publish_activity("model_load_completed", load_payload(cache_hit=True, bytes=10, seconds=0.5))
    event_store.publish_activity("model_load_completed", load_payload(cache_hit=False, bytes=90, seconds=1.5))
    text = http.get("/metrics").text
    assert 'modelbus_queue_length{queue="install"} 1.0' in text
    assert 'modelbus_model_loads_total{cache="hit"} 1.0' in text
    assert 'modelbus_model_loads_total{cache="miss"} 1.0' in text
    assert "modelbus_model_load_bytes_total 100.0" in text
    assert 'modelbus_http_requests_total{method="GET",route="/metrics",status="200"}' in text


@pytest.fixture()
def secured(app_config: AppConfig) -> TestClient:
    return TestClient(create_app(app_config.model_copy(update={"api_token": "s3cret"})))


def test_bearer_token(secured: TestClient) -> None:
    missing = secured.get("/api/v2/models")
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["error"]["message"].startswith("missing or wrong bearer token")
    assert secured.get("/api/v2/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert secured.get("/api/v2/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert secured.get("/healthz").status_code == 200  # probes need no token


def test_token_from_the_environment(modelbus_env, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MODELBUS_API_TOKEN", "from-env")
    http = TestClient(create_app())
    assert http.get("/api/v2/models").status_code == 401
    assert http.get("/api/v2/models", headers={"Authorization": "Bearer from-env"}).status_code == 200


def test_openapi_documents_every_route(http: TestClient) -> None:
    doc = http.get("/openapi.json").json()
    paths = doc["paths"]
    for route in ("/api/v2/models", "/api/v2/models/i/{key}", "/api/v2/models/install",
                  "/api/v2/models/install/{job_id}", "/api/v2/models/scan", "/api/v2/models/sync",
                  "/api/v2/models/i/{key}/load", "/api/v2/models/workers", "/api/v2/events", "/healthz", "/metrics"):
        assert route in paths, route
    listing = paths["/api/v2/models"]["get"]["responses"]
    assert {"200", "401", "422", "503"} <= set(listing)
    assert "HTTPBearer" in doc["components"]["securitySchemes"]
