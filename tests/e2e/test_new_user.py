"""End to end, as a new user would: ``modelbus up`` in the background (its own namespace and root),
installs through the CLI from a local file and from the local Hugging Face test server, ``list``,
``load``, and the load events arriving both on ``modelbus events --follow`` and on the SSE stream."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from modelbus.services.client import Cursor
from tests.api.test_events_sse import read_events
from tests.fixtures.model_files import make_lora_diffusers, make_lora_kohya
from tests.servers import HFServer

MODELBUS = str(Path(sys.executable).with_name("modelbus"))
START_TIMEOUT = 90.0
STEP_TIMEOUT = 90.0
LOAD_EVENTS = ("model_load_started", "model_load_completed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stack:
    def __init__(self, env: dict[str, str], root: Path) -> None:
        self.env, self.root = env, root
        self.api = f"http://127.0.0.1:{env['MODELBUS_API_PORT']}"
        self.log = (root / "up.log").open("wb")
        self.proc = subprocess.Popen([MODELBUS, "up"], env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def cli(self, *args: str, timeout: float = STEP_TIMEOUT) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([MODELBUS, *args], check=False, env=self.env, capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, (args, result.returncode, result.stdout, result.stderr, self.logs())
        return result

    def logs(self) -> str:
        return (self.root / "up.log").read_text(errors="replace")[-6000:]

    def wait_ready(self) -> None:
        """Until the API answers and a worker serves every queue."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"modelbus up exited: {self.logs()}"
            try:
                workers = httpx.get(f"{self.api}/api/v2/models/workers", timeout=2).json()
                queues = {q for w in workers for q in w.get("queues", [])}
                if {"install", "download", "hash", "gpu"} <= queues:
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        pytest.fail(f"modelbus up not ready after {START_TIMEOUT}s: {self.logs()}")

    def stop(self) -> int:
        """Ctrl-C, as a user would; everything must stop by itself."""
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=40)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.log.close()


@pytest.fixture()
def hub() -> Iterator[HFServer]:
    with HFServer() as server:
        yield server


@pytest.fixture()
def stack(redis_url: str, tmp_path: Path, hub: HFServer) -> Iterator[Stack]:
    root = tmp_path / "root"
    root.mkdir()
    namespace = f"e2e-{uuid.uuid4().hex[:10]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODELBUS_", "HF_", "CIVITAI_"))}
    env.update({"MODELBUS_REDIS_URL": redis_url, "MODELBUS_NAMESPACE": namespace, "MODELBUS_ROOT": str(root),
                "MODELBUS_API_PORT": str(_free_port()), "MODELBUS_HF_ENDPOINT": hub.url,
                "MODELBUS_ALLOW_PRIVATE_DOWNLOADS": "1", "MODELBUS_DEVICE": "cpu", "MODELBUS_HASH_THREADS": "1",
                "MODELBUS_LOG_FORMAT": "json", "MODELBUS_LOG_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1"})
    s = Stack(env, root)
    try:
        yield s
    finally:
        code = s.stop()
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=f"*{{{namespace}}}*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i:i + 500])
    assert code == 0, s.logs()


def _collect_sse(url: str, since: str, out: list[dict[str, str]], want: int) -> None:
    with httpx.stream("GET", f"{url}/api/v2/events", params={"types": ",".join(LOAD_EVENTS), "since": since},
                      timeout=STEP_TIMEOUT) as response:
        for message in read_events(response):
            out.append(message)
            if len(out) >= want:
                return


def test_a_new_user_installs_lists_and_loads(stack: Stack, hub: HFServer, tmp_path: Path,
                                             redis_url: str) -> None:
    stack.wait_ready()
    # from a local file
    lora = make_lora_kohya(tmp_path / "my-style.safetensors")
    installed = stack.cli("install", str(lora), "--wait", "--json")
    local = json.loads(installed.stdout)
    assert local["state"] == "completed" and local["key"]
    # the progress on stderr names the file (not its number within the job)
    assert "my-style.safetensors" in installed.stderr.replace(str(lora), ""), installed.stderr
    # from the (local) Hugging Face hub
    folder = make_lora_diffusers(tmp_path / "repo", base="sdxl", folder=True)
    hub.add_repo("acme/tiny-lora", folder, card={"license": "mit"})
    remote = json.loads(stack.cli("install", "acme/tiny-lora", "--wait", "--json").stdout)
    assert remote["state"] == "completed", remote
    listed = {m["key"]: m for m in json.loads(stack.cli("list", "--json").stdout)}
    assert set(listed) == {local["key"], remote["key"]}
    assert listed[remote["key"]]["source"] and "acme/tiny-lora" in listed[remote["key"]]["source"]
    assert local["key"] in stack.cli("list").stdout  # the table a person reads

    # both event surfaces, from the same moment on
    store = redis.Redis.from_url(redis_url)
    ns = stack.env["MODELBUS_NAMESPACE"]
    heads = [store.xrevrange(f"{{{ns}}}:{s}", count=1) for s in ("events", "activity")]
    since = str(Cursor(*[(h[0][0].decode() if h else "0-0") for h in heads]))
    follower = subprocess.Popen([MODELBUS, "events", "--follow", "--since", since, "--count", "2", "--json",
                                 *[a for kind in LOAD_EVENTS for a in ("--type", kind)]],
                                env=stack.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sse: list[dict[str, str]] = []
    reader = threading.Thread(target=_collect_sse, args=(stack.api, since, sse, 2), daemon=True)
    reader.start()

    loaded = json.loads(stack.cli("load", local["key"], "--json").stdout)
    assert loaded["state"] == "loaded" and loaded["device"] == "cpu"

    out, err = follower.communicate(timeout=STEP_TIMEOUT)
    assert follower.returncode == 0, err
    cli_events = [json.loads(line) for line in out.splitlines()]
    assert [e["type"] for e in cli_events] == list(LOAD_EVENTS)
    assert all(e["event"]["payload"]["model_key"] == local["key"] for e in cli_events)
    reader.join(STEP_TIMEOUT)
    assert [m["event"] for m in sse] == list(LOAD_EVENTS)
    assert [json.loads(m["data"])["event"]["payload"]["model_key"] for m in sse] == [local["key"]] * 2
    workers = json.loads(stack.cli("workers", "--json").stdout)
    assert loaded["worker"] in [w["id"] for w in workers if "gpu" in w["queues"]]
