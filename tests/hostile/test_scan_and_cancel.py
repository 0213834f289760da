"""Work on model files stays out of the API and stops when cancelled: ``POST /scan`` with a hostile path
is a 422 (never a 500); a scan runs on a worker of the hash queue (none: 503, nothing registered), only
inside the import roots; and a cancel stops a hash job that is busy hashing a very large file (a 1 TiB
sparse checkpoint, which would take many minutes) - the test polls for the job to end, it times nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from rq.job import Job

from modelbus.services.api import create_app
from modelbus.services.client import ModelBusClient
from modelbus.services.config import AppConfig
from tests.fixtures import model_files as fx
from tests.waiting import wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER_MAIN = ("import sys, workers.install, workers.download, workers.hash, workers.scan; "
               "from workers.__main__ import main; sys.exit(main(sys.argv[1:]))")
StartWorker = Callable[[str], subprocess.Popen[bytes]]


@pytest.fixture()
def start_worker(modelbus_env: dict[str, str], tmp_path: Path) -> Iterator[StartWorker]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(queues: str) -> subprocess.Popen[bytes]:
        log = (tmp_path / f"worker-{len(procs)}.log").open("wb")
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER_MAIN, "--queues", queues], cwd=REPO_ROOT,
                                      env={**os.environ, **modelbus_env}, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
        return procs[-1]

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _logs(tmp_path: Path) -> Callable[[], str]:
    return lambda: "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(tmp_path.glob("worker-*.log")))


@pytest.fixture()
def http(app_config: AppConfig) -> Iterator[TestClient]:
    app_config.models_path.mkdir(parents=True, exist_ok=True)
    with TestClient(create_app(app_config)) as client:
        yield client


@pytest.mark.parametrize("path", ["/" + "x" * 300, "/tmp/a\x00b", "/" + "\u00e9" * 200, "/" + "d/" * 2100,
                                  "x" * 5000], ids=["300-chars", "nul", "400-byte-name", "long-path", "5000-chars"])
def test_a_hostile_scan_path_is_422(http: TestClient, path: str) -> None:
    answer = http.post("/api/v2/models/scan", json={"path": path})
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["message"]


def test_an_install_source_with_a_nul_byte_is_422(http: TestClient) -> None:
    answer = http.post("/api/v2/models/install", json={"source": "/tmp/model\x00.safetensors"})
    assert answer.status_code == 422, answer.text
    assert "NUL" in answer.text


def test_a_scan_runs_on_a_worker_inside_the_import_roots(http: TestClient, app_config: AppConfig,
                                                         start_worker: StartWorker, tmp_path: Path) -> None:
    folder = app_config.models_path / "found"  # (in place: an import root, but not the hand-over area)
    fx.make_lora_kohya(folder / "style.safetensors")
    outside = tmp_path / "outside"
    fx.make_lora_kohya(outside / "other.safetensors", rank=8)

    # no worker on the hash queue: the API does not scan by itself
    refused = http.post("/api/v2/models/scan", json={"path": str(folder)})
    assert refused.status_code == 503, refused.text
    assert "hash queue" in refused.json()["error"]["message"]
    assert http.get("/api/v2/models").json()["total"] == 0

    start_worker("hash")
    wait_until(lambda: http.get("/healthz").json()["workers_alive"] >= 1, 120, "the hash worker", _logs(tmp_path),
               interval=0.5)
    found = http.post("/api/v2/models/scan", json={"path": str(folder)})
    assert found.status_code == 200, found.text
    [key] = found.json()["added"]
    assert http.get(f"/api/v2/models/i/{key}").json()["name"] == "style"
    assert http.post("/api/v2/models/sync").status_code == 200

    beyond = http.post("/api/v2/models/scan", json={"path": str(outside)})
    assert beyond.status_code == 403, beyond.text
    assert "import roots" in beyond.json()["error"]["message"]
    assert http.get("/api/v2/models").json()["total"] == 1


def test_a_cancel_stops_a_hash_job_in_the_middle_of_a_huge_file(app_config: AppConfig, start_worker: StartWorker,
                                                                tmp_path: Path) -> None:
    # 1 TiB of holes: hashing it whole would keep the worker busy for many minutes
    app_config.models_path.mkdir(parents=True, exist_ok=True)  # in place: an import root, not the hand-over area
    big = fx.make_sparse_safetensors(app_config.models_path / "huge.safetensors", 1 << 40)
    start_worker("install,hash")
    client = ModelBusClient(app_config)
    try:
        job = client.install(str(big), inplace=True)
        hash_job = f"{job['id']}-hash"

        def hashing() -> bool:
            return Job.exists(hash_job, connection=client.redis) and \
                Job.fetch(hash_job, connection=client.redis).get_status(refresh=True) == "started"

        wait_until(hashing, 180, "the hash job to start", _logs(tmp_path), interval=0.2)
        assert client.cancel(job["id"])["state"] == "cancelled"
        ended = wait_until(lambda: (s := Job.fetch(hash_job, connection=client.redis).get_status(refresh=True))
                           not in ("started", "queued") and s, 120, "the cancelled hash job to stop",
                           _logs(tmp_path), interval=0.2)
        print(f"\ncancelled while hashing 1 TiB: the hash job ended ({ended}); install {client.job(job['id'])['state']}")
        assert client.job(job["id"])["state"] == "cancelled"
        assert client.list_models_page()[0] == 0
    finally:
        client.close()
