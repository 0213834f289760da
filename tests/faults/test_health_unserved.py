"""``/healthz`` is degraded while a queue holds jobs that no live worker serves (the download worker
died, the others live): it used to say "ok" as long as any worker was alive, while the job stayed stuck."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from rq import Queue

from modelbus.events.keys import Keys
from modelbus.services.api import create_app
from modelbus.services.config import AppConfig
from tests.waiting import wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def start_worker(modelbus_env: dict[str, str], tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    procs: list[subprocess.Popen[bytes]] = []

    def start(queues: str) -> subprocess.Popen[bytes]:
        log = (tmp_path / f"worker-{queues}.log").open("wb")
        procs.append(subprocess.Popen([sys.executable, "-m", "modelbus.workers", "--queues", queues], cwd=REPO_ROOT,
                                      env={**os.environ, **modelbus_env}, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
        return procs[-1]

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def test_a_queue_with_jobs_and_no_live_worker_is_degraded(app_config: AppConfig, start_worker) -> None:  # type: ignore[no-untyped-def]
    app_config.models_path.mkdir(parents=True, exist_ok=True)
    with TestClient(create_app(app_config)) as http:
        start_worker("install,hash")
        downloader = start_worker("download")
        wait_until(lambda: http.get("/healthz").json()["workers_alive"] == 2, 90, "both workers")
        assert http.get("/healthz").json()["status"] == "ok"

        os.killpg(downloader.pid, signal.SIGKILL)  # the download worker is gone, the other one lives
        downloader.wait(timeout=10)
        wait_until(lambda: http.get("/healthz").json()["workers_alive"] == 1, 60, "the dead worker's state to lapse")
        client = http.app.state.client  # type: ignore[attr-defined]
        Queue(Keys(app_config.namespace).queue("download"), connection=client.redis).enqueue("os.getcwd")
        # /healthz answers from a probe at most a second old: the next probe sees the job
        health = wait_until(lambda: (h := http.get("/healthz").json())["unserved"] and h, 30, "a probe after it")
        print(f"\n[download worker killed, a download queued] /healthz: {health['status']}, "
              f"unserved {health['unserved']}, {health['workers_alive']} live worker(s)")
        assert health["status"] == "degraded" and health["unserved"] == ["download"]
        assert health["workers_alive"] == 1

        start_worker("download")  # a worker for the queue again: it runs the job, health is ok again
        wait_until(lambda: http.get("/healthz").json()["status"] == "ok", 90, "the queue to be served")
