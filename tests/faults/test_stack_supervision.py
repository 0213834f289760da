"""``modelbus up`` supervises what it started, on its embedded Redis:

- a worker SIGKILLed is started again (logged with the signal); so is the embedded Redis, on the same
  port, and the workers ride its outage out: ``up`` used to stop the whole stack when one process died;
- the embedded Redis keeps its port across restarts of ``up`` (recorded under the root), so a follower
  (``modelbus events --follow``) started before the restart keeps receiving after it: each restart used
  to pick a new port, and followers retried the old one forever.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis

from modelbus.events.keys import Keys
from modelbus.events.store import RedisEventStore
from tests.fixtures.activity import load_payload
from tests.waiting import wait_until

MODELBUS = str(Path(sys.executable).with_name("modelbus"))


class Up:
    """One ``modelbus up`` in the background, on an embedded Redis of its own root."""

    def __init__(self, env: dict[str, str], root: Path, workers: str) -> None:
        self.env, self.root, self.workers = env, root, workers
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    def start(self) -> Up:
        self.runs += 1
        log = (self.root / f"up-{self.runs}.log").open("wb")
        self.proc = subprocess.Popen([MODELBUS, "up", "--workers", self.workers, "--no-api"], env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: self.server() is not None, 60, "the embedded Redis", self.log)
        return self

    def server(self) -> dict[str, object] | None:
        try:
            return orjson.loads((self.root / "redis" / "server.json").read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return None

    def url(self) -> str:
        server = self.server()
        assert server is not None, self.log()
        return str(server["url"])

    def log(self) -> str:
        return (self.root / f"up-{self.runs}.log").read_text(errors="replace")[-5000:]

    def workers_up(self) -> list[dict[str, object]]:
        client = redis.Redis.from_url(self.url(), socket_timeout=2)
        keys = Keys(self.env["MODELBUS_NAMESPACE"])
        ids = [i.decode() for i in client.zrange(keys.workers, 0, -1)]
        states = [client.get(keys.worker_state(i)) for i in ids]
        return [orjson.loads(s) for s in states if s]

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)


@pytest.fixture()
def up(tmp_path: Path) -> Iterator[Up]:
    root = tmp_path / "root"
    root.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODELBUS_", "HF_", "CIVITAI_"))}
    env.update({"MODELBUS_NAMESPACE": f"up-{uuid.uuid4().hex[:8]}", "MODELBUS_ROOT": str(root),
                "MODELBUS_LOG_FORMAT": "json", "MODELBUS_LOG_LEVEL": "INFO", "HF_HUB_OFFLINE": "1"})
    stack = Up(env, root, "install,download,hash")
    try:
        yield stack
    finally:
        if stack.proc is not None:
            stack.stop()


def _pid(worker: dict[str, object]) -> int:
    return int(str(worker["pid"]))


def test_up_restarts_a_killed_worker_and_its_embedded_redis(up: Up) -> None:
    up.start()
    first = wait_until(lambda: up.workers_up(), 120, "the worker", up.log)[0]
    os.kill(_pid(first), signal.SIGKILL)
    killed = time.monotonic()
    second = wait_until(lambda: [w for w in up.workers_up() if _pid(w) != _pid(first)], 120,
                        "up to start the worker again", up.log)[0]
    restarted_in = time.monotonic() - killed
    assert up.proc is not None and up.proc.poll() is None, up.log()
    assert "stack_process_exited" in up.log() and "killed by SIGKILL" in up.log()

    url = up.url()
    server = up.server()
    assert server is not None
    os.kill(int(str(server["pid"])), signal.SIGKILL)  # the embedded Redis dies too
    redis_killed = time.time()
    wait_until(lambda: "stack_redis_restarted" in up.log(), 60, "up to start its Redis again", up.log)
    assert up.url() == url, "the embedded Redis came back on another port"
    # the worker rode the outage out: the same process beats again on the restarted server
    wait_until(lambda: [w for w in up.workers_up() if _pid(w) == _pid(second) and float(str(w["time"])) > redis_killed],
               120, "the worker to come back to the restarted Redis", up.log)
    assert up.stop() == 0, up.log()
    print(f"\n[modelbus up] a SIGKILLed worker was running again {restarted_in:.1f} s later; the SIGKILLed "
          f"embedded Redis came back on {url}, and the worker (pid {_pid(second)}) reconnected by itself")


def test_a_follower_keeps_receiving_across_a_restart_of_up(up: Up) -> None:
    up.workers = "hash"
    up.start()
    url = up.url()
    namespace = up.env["MODELBUS_NAMESPACE"]
    RedisEventStore.from_url(url, namespace).publish_activity("model_load_completed", load_payload("before"))
    out = (up.root / "follower.log").open("wb")
    follower = subprocess.Popen([MODELBUS, "events", "--follow", "--type", "model_load_completed", "--since", "0",
                                 "--count", "2", "--json"], env=up.env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    lines = up.root / "follower.log"
    try:
        wait_until(lambda: "before" in lines.read_text(), 60, "the follower's first event", lines.read_text)
        assert up.stop() == 0, up.log()
        up.start()
        assert up.url() == url, f"the embedded Redis moved from {url} to {up.url()}"
        RedisEventStore.from_url(url, namespace).publish_activity("model_load_completed", load_payload("after"))
        assert follower.wait(timeout=120) == 0, lines.read_text()
    finally:
        if follower.poll() is None:
            os.killpg(follower.pid, signal.SIGKILL)
    text = lines.read_text()
    print(f"\n[modelbus up restarted] embedded Redis kept {url}; the follower, started before the restart, "
          f"received the event published after it")
    assert '"before"' in text and '"after"' in text
