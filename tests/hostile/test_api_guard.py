"""Attacks on the local API through a browser, against a real uvicorn on 127.0.0.1: DNS rebinding (a
page whose own name now resolves to 127.0.0.1 sends that name as Host), cross-site form posts and
``no-cors`` fetches (which need no preflight), reading answers cross-origin (CORS), and the token on
/metrics and the API documents."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import uvicorn

from modelbus.services.api import create_app
from modelbus.services.config import AppConfig
from tests.api.conftest import serve
from tests.client.conftest import model_config, put_file
from tests.waiting import wait_until

DOCUMENTS = ("/metrics", "/docs", "/redoc", "/openapi.json")


@contextmanager
def api(config: AppConfig, **changes: Any) -> Iterator[tuple[httpx.Client, int]]:
    """A real server on 127.0.0.1 with the default allowed hosts (the test environment's extra
    'testserver' removed) plus ``changes``; yields a client for it and its port."""
    config.models_path.mkdir(parents=True, exist_ok=True)
    app = create_app(config.model_copy(update={"api_allowed_hosts": (), **changes}))
    server, thread, url = serve(app)
    try:
        with httpx.Client(base_url=url, timeout=10, trust_env=False) as http:
            yield http, int(url.rsplit(":", 1)[1])
    finally:
        server.should_exit = True
        thread.join(10)


def _seed(config: AppConfig) -> None:
    from modelbus.services.client import ModelBusClient
    put_file(config, "m.safetensors")
    with ModelBusClient(config) as client:
        client.add_model("k1", model_config("seed", "m.safetensors"))


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "attacker.test.:{port}", "0.0.0.0:{port}",
                                  "127.0.0.1.evil.example", "[::2]:{port}", "localhost@evil.example", ""])
def test_dns_rebinding_a_foreign_host_is_refused(app_config: AppConfig, host: str) -> None:
    _seed(app_config)
    with api(app_config) as (http, port):
        value = host.format(port=port)
        for method, path in (("GET", "/api/v2/models"), ("GET", "/api/v2/models/i/k1"), ("DELETE", "/api/v2/models/i/k1"),
                             ("POST", "/api/v2/models/sync"), ("GET", "/metrics"), ("GET", "/openapi.json")):
            answer = http.request(method, path, headers={"Host": value})
            print(f"{method} {path} Host {value!r}: {answer.status_code} {answer.text[:120]}")
            assert answer.status_code == 400, (method, path, answer.text)
            assert answer.json()["error"]["type"] == "HostNotAllowed"
            assert answer.headers["x-request-id"]
        assert http.get("/api/v2/models/i/k1").status_code == 200  # the DELETE above changed nothing
        assert http.get("/healthz", headers={"Host": value}).status_code == 200  # probes send the pod IP as Host


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST.:{port}", "localhost",
                                  "[::1]:{port}", "127.0.0.1"])
def test_the_local_names_are_answered(app_config: AppConfig, host: str) -> None:
    with api(app_config) as (http, port):
        assert http.get("/api/v2/models", headers={"Host": host.format(port=port)}).status_code == 200


def test_the_address_the_server_listens_on_is_answered(app_config: AppConfig) -> None:
    """Bound to 127.0.0.2 (not a default name): its own address passes, another loopback address does not.
    (Bound to 0.0.0.0, uvicorn reports the address a connection arrived on: a pod IP, for probes.)"""
    app = create_app(app_config.model_copy(update={"api_allowed_hosts": ()}))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.2", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, 10, "uvicorn on 127.0.0.2")
        port = server.servers[0].sockets[0].getsockname()[1]
        with httpx.Client(base_url=f"http://127.0.0.2:{port}", timeout=10, trust_env=False) as http:
            assert http.get("/api/v2/models").status_code == 200  # Host: 127.0.0.2:<port>
            assert http.get("/api/v2/models", headers={"Host": f"127.0.0.3:{port}"}).status_code == 400
    finally:
        server.should_exit = True
        thread.join(10)


def test_configured_hosts_with_or_without_port(app_config: AppConfig) -> None:
    with api(app_config, api_allowed_hosts=("gpu-box", "models.lan:8443", "::5")) as (http, port):
        for ok in ("gpu-box", f"gpu-box:{port}", "GPU-BOX:1", "models.lan:8443", "[::5]:80"):
            assert http.get("/api/v2/models", headers={"Host": ok}).status_code == 200, ok
        for refused in ("models.lan", f"models.lan:{port}", "other-box"):
            assert http.get("/api/v2/models", headers={"Host": refused}).status_code == 400, refused
    with api(app_config, api_allowed_hosts=("*",)) as (http, _):
        assert http.get("/api/v2/models", headers={"Host": "anything.example"}).status_code == 200


@pytest.mark.parametrize("headers", [
    {"Origin": "http://evil.example"},
    {"Origin": "null"},
    {"Origin": "http://127.0.0.1:1"},  # another port of this machine: same-site, not same-origin
    {"Origin": "https://127.0.0.1:{port}"},
    {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "same-site"},
    {"Origin": "http://127.0.0.1:{port}", "Sec-Fetch-Site": "cross-site"},
])
def test_cross_site_browser_requests_cannot_change_anything(app_config: AppConfig, headers: dict[str, str]) -> None:
    _seed(app_config)
    with api(app_config) as (http, port):
        sent = {k: v.format(port=port) for k, v in headers.items()}
        # the requests a page can send without a preflight: a form post, a no-cors fetch
        delete = http.delete("/api/v2/models/i/k1", params={"delete_files": "true"}, headers=sent)
        rename = http.post("/api/v2/models/i/k1/rename", json={"name": "pwned"}, headers=sent)
        form = http.post("/api/v2/models/install", content=b'{"source": "x"}',
                         headers={**sent, "Content-Type": "text/plain"})
        print(f"\n{sent}: DELETE {delete.status_code}, rename {rename.status_code}, form {form.status_code}")
        for answer in (delete, rename, form):
            assert answer.status_code == 403 and answer.json()["error"]["type"] == "CrossSiteRequest", answer.text
        model = http.get("/api/v2/models/i/k1").json()
        assert model["name"] == "seed" and app_config.model_path("m.safetensors").exists()
        assert http.get("/api/v2/models/install").json() == []
        # reading is no change, and no CORS header lets the page see the answer
        read = http.get("/api/v2/models", headers=sent)
        assert read.status_code == 200 and "access-control-allow-origin" not in read.headers
        preflight = http.options("/api/v2/models/i/k1", headers={
            **sent, "Access-Control-Request-Method": "DELETE", "Access-Control-Request-Headers": "authorization"})
        assert "access-control-allow-origin" not in preflight.headers, preflight.headers


def test_same_origin_pages_and_token_holders_may_change_things(app_config: AppConfig) -> None:
    _seed(app_config)
    with api(app_config) as (http, port):
        own = {"Origin": f"http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"}  # e.g. the /docs page
        assert http.post("/api/v2/models/i/k1/rename", json={"name": "ok1"}, headers=own).status_code == 200
        user = {"Sec-Fetch-Site": "none"}  # typed by the user
        assert http.post("/api/v2/models/i/k1/rename", json={"name": "ok2"}, headers=user).status_code == 200
        assert http.post("/api/v2/models/i/k1/rename", json={"name": "ok3"}).status_code == 200  # not a browser
    with api(app_config, api_token="s3cret") as (http, _):
        foreign = {"Origin": "http://evil.example"}
        wrong = {**foreign, "Authorization": "Bearer nope"}
        for refused in (foreign, wrong):  # 401 where the token is checked first (limits.py), else 403
            answer = http.post("/api/v2/models/i/k1/rename", json={"name": "no"}, headers=refused)
            assert answer.status_code in (401, 403), answer.text
        assert http.get("/api/v2/models/i/k1", headers={"Authorization": "Bearer s3cret"}).json()["name"] == "ok3"
        token = {**foreign, "Authorization": "Bearer s3cret"}
        assert http.post("/api/v2/models/i/k1/rename", json={"name": "ok4"}, headers=token).status_code == 200
        assert http.get("/api/v2/models/i/k1", headers=token).json()["name"] == "ok4"


def test_with_a_token_metrics_and_documents_need_it(app_config: AppConfig) -> None:
    with api(app_config, api_token="s3cret") as (http, _):
        for path in DOCUMENTS:
            refused = http.get(path)
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer", path
            assert http.get(path, headers={"Authorization": "Bearer nope"}).status_code == 401, path
            assert http.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200, path
        assert http.get("/healthz").status_code == 200
    with api(app_config, api_token="s3cret", api_public_metrics=True) as (http, _):
        for path in DOCUMENTS:
            assert http.get(path).status_code == 200, path
        assert http.get("/api/v2/models").status_code == 401  # the API itself still needs it
    with api(app_config) as (http, _):  # no token: nothing to ask for
        for path in DOCUMENTS:
            assert http.get(path).status_code == 200, path


def test_every_answer_carries_a_request_id(app_config: AppConfig) -> None:
    with api(app_config) as (http, _):
        first, second = http.get("/api/v2/models"), http.get("/api/v2/models/i/nope")
        assert second.status_code == 404
        assert first.headers["x-request-id"] != second.headers["x-request-id"]
        assert http.get("/healthz", headers={"X-Request-ID": "trace-1.a_b"}).headers["x-request-id"] == "trace-1.a_b"
        forged = http.get("/healthz", headers={"X-Request-ID": "x\" injected=1"}).headers["x-request-id"]
        assert forged and " " not in forged and "injected" not in forged
