"""``modelbus up`` with ``MODELBUS_API_WORKERS=2``: two API processes on one socket, as one API.

- both serve the port ``up`` bound; one SIGKILLed, the other keeps answering and ``up`` starts it again;
- an event stream on any of them delivers what was appended (the streams read Redis, not a process);
- the per-client limit on event streams holds for the whole API (seats in Redis), not once per process;
- ``/metrics`` from any of them counts the requests all of them served;
- a port another program holds stops ``up`` with one line before it starts anything.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from modelbus.services.client import ModelBusClient
from modelbus.services.config import AppConfig
from tests.client.conftest import model_config, put_file
from tests.waiting import wait_until

MODELBUS = str(Path(sys.executable).with_name("modelbus"))
PROCESSES = 2


class UpApi:
    """``modelbus up`` serving only the API (no workers) on a port the kernel picks."""

    def __init__(self, env: dict[str, str], root: Path) -> None:
        self.log_path = root / "up.log"
        self.proc = subprocess.Popen([MODELBUS, "up", "--workers", ""], env=env, stdout=self.log_path.open("wb"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        port = wait_until(self._port, 60, "up's API line", self.log)
        self.url = f"http://127.0.0.1:{port}"
        wait_until(lambda: len(self.api_pids()) == PROCESSES and all(self._answers() for _ in range(4)), 60,
                   "both API processes", self.log)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def _port(self) -> int | None:
        found = re.search(r"api:\s+http://127\.0\.0\.1:(\d+)/", self.log())
        return int(found.group(1)) if found else None

    def _answers(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=5, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    def api_pids(self) -> list[int]:
        try:
            children = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return []
        return sorted(c.pid for c in children if "uvicorn" in " ".join(_cmdline(c)))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def _env(modelbus_env: dict[str, str], **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELBUS_")}
    env.update(modelbus_env)
    env.update({"MODELBUS_API_WORKERS": str(PROCESSES), "MODELBUS_API_PORT": "0", **extra})
    env.pop("MODELBUS_API_ALLOWED_HOSTS", None)
    return env


@pytest.fixture()
def up_api(modelbus_env: dict[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[UpApi]:
    extra = getattr(request, "param", {})
    up = UpApi(_env(modelbus_env, **extra), Path(modelbus_env["MODELBUS_ROOT"]))
    try:
        yield up
    finally:
        up.stop()


def test_one_api_process_killed_the_other_answers_and_up_starts_it_again(up_api: UpApi) -> None:
    first = up_api.api_pids()
    assert len(first) == PROCESSES, up_api.log()
    os.kill(first[0], signal.SIGKILL)
    psutil.wait_procs([psutil.Process(first[1])], timeout=0.5)  # (only lets the kill land)
    # every new connection while the killed one is away is served by the other process
    answers = [httpx.get(f"{up_api.url}/api/v2/models", timeout=10, trust_env=False).status_code
               for _ in range(20)]
    assert answers == [200] * 20
    wait_until(lambda: len(up_api.api_pids()) == PROCESSES and first[0] not in up_api.api_pids(), 60,
               "the killed API process started again", up_api.log)
    assert "stack_process_restarted" in up_api.log()


def test_an_event_stream_on_either_process_delivers_what_was_appended(up_api: UpApi, app_config: AppConfig) -> None:
    got: list[list[str]] = [[] for _ in range(6)]
    opened = threading.Barrier(len(got) + 1, timeout=30)
    store = ModelBusClient(app_config).store
    since = f"{store.head('events')},{store.head('activity')}"  # (a stream may read its first batch late)

    def follow(i: int) -> None:  # each stream its own connection, so the kernel spreads them out
        with httpx.stream("GET", f"{up_api.url}/api/v2/events", params={"types": "ModelAdded", "since": since},
                          timeout=30, trust_env=False) as answer:
            assert answer.status_code == 200
            lines = answer.iter_lines()
            for line in lines:
                if line.startswith(": connected"):
                    break
            opened.wait()
            for line in lines:
                if line.startswith("data:"):
                    got[i].append(line)
                    return

    with ThreadPoolExecutor(len(got)) as pool:
        streams = [pool.submit(follow, i) for i in range(len(got))]
        opened.wait()
        put_file(app_config, "seen.safetensors")
        ModelBusClient(app_config).add_model("seen", model_config("seen", "seen.safetensors"))
        for s in streams:
            s.result(timeout=30)
    assert all(len(lines) == 1 and '"seen"' in lines[0] for lines in got), got


@pytest.mark.parametrize("up_api", [{"MODELBUS_API_MAX_STREAMS_PER_CLIENT": "2"}], indirect=True)
def test_the_stream_limit_per_client_holds_across_the_processes(up_api: UpApi) -> None:
    clients = [httpx.Client(base_url=up_api.url, timeout=30, trust_env=False) for _ in range(6)]
    held: list[httpx.Response] = []
    try:
        statuses = []
        for i, http in enumerate(clients):  # one connection each: counted per process, four of six would get in
            # a client naming other addresses in X-Forwarded-For is still the one socket address
            request = http.build_request("GET", "/api/v2/events", headers={"X-Forwarded-For": f"10.9.9.{i}"})
            answer = http.send(request, stream=True)
            statuses.append(answer.status_code)
            (held if answer.status_code == 200 else [answer]).append(answer)
            if answer.status_code != 200:
                assert "2 event streams open" in answer.read().decode(), answer.text
                answer.close()
        assert sorted(statuses) == [200, 200, 429, 429, 429, 429]
        held.pop().close()  # a stream that ends frees its seat, once its process notices, for the next one

        def another() -> bool:
            answer = clients[0].send(clients[0].build_request("GET", "/api/v2/events"), stream=True)
            if answer.status_code == 200:
                held.append(answer)
                return True
            answer.close()
            return False

        wait_until(another, 60, "a seat freed by the stream that ended", interval=0.5)
    finally:
        for answer in held:
            answer.close()
        for http in clients:
            http.close()


def test_metrics_of_any_process_count_the_requests_of_all(up_api: UpApi) -> None:
    served = 30
    for _ in range(served):  # new connections: the kernel hands them to either process
        assert httpx.get(f"{up_api.url}/api/v2/models", timeout=10, trust_env=False).status_code == 200
    scraped = httpx.get(f"{up_api.url}/metrics", timeout=10, trust_env=False).text
    counted = sum(float(m.group(1)) for m in re.finditer(
        r'^modelbus_http_requests_total\{[^}]*route="/api/v2/models"[^}]*status="200"[^}]*\} (\S+)$', scraped, re.MULTILINE))
    assert counted == served, scraped[-3000:]


def test_a_port_another_program_holds_stops_up_before_it_starts_anything(modelbus_env: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([MODELBUS, "up", "--workers", "install"], capture_output=True, text=True,
                              env=_env(modelbus_env, MODELBUS_API_PORT=str(port)), timeout=60, check=False)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and f"127.0.0.1:{port}" in errors[0] and "MODELBUS_API_PORT" in errors[0], done.stderr
    assert "modelbus is up" not in done.stdout
