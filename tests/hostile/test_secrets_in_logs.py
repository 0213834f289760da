"""Secrets never reach a log line.

The attack: with ``MODELBUS_API_TOKEN`` set, a request that raises inside the API printed a rich
traceback with every frame's local variables (``credentials='s3cret'``), twice. Here a whole stack
runs with secrets everywhere (an API token, HF and Civitai tokens, an install from a URL with
``user:pass@`` and a ``?token=``, a per-install access token, a wrong token, a token in a query
string, a request that raises) and every line any process wrote is searched for each secret."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import Request

from modelbus.events.logs import REDACTED, Scrubber
from modelbus.services.api import create_app
from modelbus.services.config import AppConfig
from tests.api.conftest import serve
from tests.fixtures.model_files import make_lora_kohya
from tests.servers import FileServer, HFServer
from tests.waiting import wait_until

API_TOKEN = "s3cret-api-token-1"
SECRETS = {
    "api token": API_TOKEN,
    "HF_TOKEN": "hf_SECRETvalue2",
    "CIVITAI_TOKEN": "civ-SECRET-3",
    "password in the URL": "pa55word-SECRET-4",
    "token in the URL query": "qtok-SECRET-5",
    "access_token of one install": "acc-SECRET-6",
    "a wrong bearer token": "wrong-SECRET-7",
    "a token in the API query string": "query-SECRET-8",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_request_that_raises_logs_one_line_without_locals(app_config: AppConfig,
                                                            capfd: pytest.CaptureFixture[str]) -> None:
    app = create_app(app_config.model_copy(update={"api_token": "s3cret", "log_format": "json"}))

    @app.get("/raises")
    def raises(request: Request) -> None:
        credentials = request.headers["authorization"]  # a local holding the token, as in FastAPI's frames
        raise RuntimeError(f"failed while holding {len(credentials)} characters")

    server, thread, url = serve(app)
    try:
        answer = httpx.get(f"{url}/raises", headers={"Authorization": "Bearer s3cret"}, timeout=10)
    finally:
        server.should_exit = True
        thread.join(10)
    out, err = capfd.readouterr()
    logged = (out + err).splitlines()
    print(f"answer {answer.status_code} {answer.text}; {len(logged)} log lines:\n" + "\n".join(logged)[:3000])
    rid = answer.headers["x-request-id"]
    assert answer.status_code == 500 and rid in answer.json()["error"]["message"]
    assert answer.json()["error"]["type"] == "InternalError"
    errors = [json.loads(line) for line in logged if "api_internal_error" in line]
    assert len(errors) == 1, logged  # once: neither Starlette nor uvicorn prints it again
    assert errors[0]["request_id"] == rid and errors[0]["path"] == "/raises" and errors[0]["level"] == "error"
    assert "RuntimeError: failed while holding" in errors[0]["exception"]
    assert sum("Traceback" in line for line in logged) == 1
    assert "s3cret" not in out + err
    assert len(logged) < 20  # one line per event, not a page per frame


@pytest.mark.parametrize(("line", "secret"), [
    ("GET http://user:hunter2@host/x", "hunter2"),
    ("redis://:hunter2@127.0.0.1:6379/0", "hunter2"),
    ("https://cdn.example/f?X-Amz-Signature=hunter2&X-Amz-Credential=hunter3", "hunter2"),
    ("https://cdn.example/f?X-Amz-Signature=hunter2&X-Amz-Credential=hunter3", "hunter3"),
    ("/api/v2/models?token=hunter2", "hunter2"),
    ("[(b'authorization', b'Bearer hunter2')]", "hunter2"),
    ("{'Authorization': 'Basic aHVudGVyMg=='}", "aHVudGVyMg=="),
    ("run_download('j', 0, 'u', access_token='hunter2')", "hunter2"),
    ('credentials = "hunter2"', "hunter2"),
])
def test_the_scrubber_blanks_credentials_in_text(line: str, secret: str) -> None:
    scrubbed = Scrubber().text(line)
    assert secret not in scrubbed and REDACTED in scrubbed, scrubbed


def test_the_scrubber_blanks_secret_keys_and_configured_values() -> None:
    scrub = Scrubber(["configured-value"])
    event = scrub(None, "info", {"event": "x configured-value y", "authorization": "anything", "hf_token": "v",
                                 "nested": {"password": "p", "ok": 1, "list": ["configured-value"]},
                                 "tokenizer": "clip", "max_tokens": 5})
    text = json.dumps(event)
    assert "configured-value" not in text and '"anything"' not in text and '"p"' not in text
    assert event["tokenizer"] == "clip" and event["max_tokens"] == 5  # not every word with 'token' is one


class _Stack:
    """The API (uvicorn, access log on) and a worker for install, download and hash, each in its own
    process, every line they write into one file."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = int(env["MODELBUS_API_PORT"])
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self.log = log.open("wb")
        api = [sys.executable, "-m", "uvicorn", "modelbus.services.api:create_app", "--factory", "--host", "127.0.0.1",
               "--port", str(self.port), "--log-level", "debug"]
        worker = [sys.executable, "-m", "modelbus.workers", "--queues", "install,download,hash"]
        self.procs = [subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                       start_new_session=True) for cmd in (api, worker)]

    def lines(self) -> list[str]:
        return self.log_path.read_text(errors="replace").splitlines()

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.log.close()


@pytest.fixture()
def stack(modelbus_env: dict[str, str], tmp_path: Path) -> Iterator[tuple[_Stack, HFServer]]:
    with HFServer() as hub:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MODELBUS_", "HF_", "CIVITAI_"))}
        env.update(modelbus_env)
        env.update({"MODELBUS_API_PORT": str(_free_port()), "MODELBUS_API_TOKEN": API_TOKEN,
                    "MODELBUS_HF_ENDPOINT": hub.url, "HF_TOKEN": SECRETS["HF_TOKEN"],
                    "CIVITAI_TOKEN": SECRETS["CIVITAI_TOKEN"], "MODELBUS_LOG_LEVEL": "DEBUG",
                    "MODELBUS_LOG_FORMAT": "json", "MODELBUS_HASH_THREADS": "1", "PYTHONPATH": os.getcwd()})
        env.pop("MODELBUS_API_ALLOWED_HOSTS", None)
        s = _Stack(env, tmp_path / "stack.log")
        try:
            yield s, hub
        finally:
            s.stop()


def _job_done(http: httpx.Client, job_id: str) -> dict[str, Any] | None:
    job = http.get(f"/api/v2/models/install/{job_id}").json()
    return job if job["state"] in ("completed", "error", "cancelled") else None


def test_no_log_line_of_a_stack_run_carries_a_secret(stack: tuple[_Stack, HFServer], tmp_path: Path) -> None:
    s, hub = stack
    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    lora = make_lora_kohya(tmp_path / "repo" / "style.safetensors")
    hub.add_repo("acme/style", lora.parent)
    with FileServer() as files, httpx.Client(base_url=s.url, headers=auth, timeout=30, trust_env=False) as http:
        files.add_file("private/style.safetensors", lora.read_bytes())
        tail = lambda: "\n".join(s.lines()[-40:])
        wait_until(lambda: _up(http), 60, "the API and a worker", tail)
        secret_url = (f"http://alice:{SECRETS['password in the URL']}@127.0.0.1:{files.port}/private/"
                      f"style.safetensors?token={SECRETS['token in the URL query']}")
        jobs = [http.post("/api/v2/models/install", json={"source": secret_url,
                                                          "access_token": SECRETS["access_token of one install"]}),
                http.post("/api/v2/models/install", json={"source": "acme/style", "force": True})]
        assert all(j.status_code == 202 for j in jobs), [j.text for j in jobs]
        done = [wait_until(lambda j=j: _job_done(http, j.json()["id"]), 120, "the install", tail, interval=0.3)
                for j in jobs]
        print("jobs:", [(d["state"], d.get("error")) for d in done])
        # failing requests: a wrong token, a token in a query string, unknown things, bad bodies
        assert httpx.get(f"{s.url}/api/v2/models", headers={"Authorization": f"Bearer {SECRETS['a wrong bearer token']}"}
                         ).status_code == 401
        assert http.get("/api/v2/models", params={"token": SECRETS["a token in the API query string"]}
                        ).status_code == 200
        assert http.get("/api/v2/models/i/nope").status_code == 404
        assert http.patch("/api/v2/models/i/nope", json={"base_model": "sd-9"}).status_code in (404, 422)
        assert http.post("/api/v2/models/scan", json={"path": "/" + "x" * 300}).status_code != 200
        unresolvable = http.post("/api/v2/models/install",
                                 json={"source": "http://no-such-host.invalid/m.safetensors"})
        assert unresolvable.status_code == 202
        failed = wait_until(lambda: _job_done(http, unresolvable.json()["id"]), 120, "the failing install", tail,
                            interval=0.3)
        assert failed["state"] == "error" and failed["error_type"] == "UnresolvableHostError", failed
        assert "no-such-host.invalid" in failed["error"]
    s.stop()
    lines = s.lines()
    print(f"{len(lines)} log lines; the last ones:\n" + "\n".join(lines[-30:]))
    assert any('"logger": "uvicorn' in line for line in lines), "uvicorn's own lines go through structlog"
    assert any("style.safetensors" in line for line in lines), "the installs were logged"
    leaks = {what: [line for line in lines if secret in line] for what, secret in SECRETS.items()}
    assert not any(leaks.values()), "\n".join(f"{what} in {len(found)} lines, e.g. {found[0]}"
                                              for what, found in leaks.items() if found)
    assert any(REDACTED in line for line in lines), "something was redacted: the test reached a secret"
    assert not [line for line in lines if line.strip() and not line.startswith("{")], "every line is one JSON object"


def _up(http: httpx.Client) -> bool:
    try:
        health = http.get("/healthz").json()
    except (httpx.HTTPError, ValueError):
        return False
    return bool(health.get("workers_alive"))
