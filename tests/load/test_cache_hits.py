"""Loads of a model a GPU worker already holds are answered from its cache without RQ (workers.gpu.HitServer):
the same outcome and load events as an RQ load, no RQ job; a model the worker no longer holds, a request
its caller stopped waiting for, or bytes that are no request get no hit, and the caller's load goes
through RQ as before."""

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
from rq.job import Job

from modelbus.events.jobs import CACHE_HIT_WAIT, CacheHitRequest
from modelbus.events.keys import Keys
from modelbus.events.schema import ModelLoadCompleted
from modelbus.events.store import RedisEventStore
from modelbus.services import routing
from modelbus.services.client import ModelBusClient
from modelbus.services.config import AppConfig
from tests.fixtures import loadable as builders
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
WORKER = "gpu-hits"


@pytest.fixture()
def gpu_worker(modelbus_env: dict[str, str], tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    log = tmp_path / "worker.log"
    proc = subprocess.Popen([sys.executable, "-m", "modelbus.workers", "--queues", "gpu", "--device", "cpu",
                             "--name", WORKER], cwd=REPO, env={**os.environ, **modelbus_env},
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    config = AppConfig.load()
    store = RedisEventStore.from_config(config)
    try:
        wait_until(lambda: any(s.id == WORKER for s in routing.worker_states(store.client, config.namespace)), 90,
                   "the GPU worker to register", lambda: log.read_text(errors="replace")[-3000:])
        yield proc
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
        try:
            proc.wait(timeout=8)
        except subprocess.TimeoutExpired:  # (a worker thawed from SIGSTOP may sit out RQ's stop)
            proc.kill()
            proc.wait()


def _lora(client: ModelBusClient, config: AppConfig, name: str) -> str:
    path = config.models_path / f"{name}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    builders.write_lora(path, seed=3)
    key = f"{name}-key"
    client.add_model(key, {"name": name, "model_type": "lora", "model_format": "lycoris", "base_model": "sd-1",
                           "path": path.name, "hash": key})
    return key


def _held(client: ModelBusClient, key: str) -> bool:
    return any(w.id == WORKER and any(m.model_key == key for m in w.models) for w in client.workers())


def _ask(client: ModelBusClient, namespace: str, request: CacheHitRequest | bytes, wait: float = 5) -> dict | None:
    keys = Keys(namespace)
    raw = request if isinstance(request, bytes) else request.model_dump_json().encode()
    client.redis.rpush(keys.gpu_hits(WORKER), raw)
    if isinstance(request, bytes):
        return None
    popped = client.redis.blpop([keys.gpu_reply(request.id)], timeout=wait)
    return orjson.loads(popped[1]) if popped else None


def _request(key: str, sent: float | None = None) -> CacheHitRequest:
    return CacheHitRequest(id=uuid.uuid4().hex, model_key=key, sent=time.time() if sent is None else sent)


def test_a_cached_load_is_answered_by_its_worker_without_an_rq_job(gpu_worker: subprocess.Popen[bytes],
                                                                  app_config: AppConfig) -> None:
    client = ModelBusClient(app_config)
    key = _lora(client, app_config, "hit")
    first = client.load(key, timeout=60)  # the miss: an RQ job reads the file
    assert Job.exists(first.job_id, connection=client.redis)
    wait_until(lambda: _held(client, key), 15, "the heartbeat to list the model")
    since = client.store.head("activity")
    again = client.load(key, timeout=60)
    assert again.state == "loaded" and again.worker == WORKER and again.model_key == key
    assert again.location == first.location and again.device == first.device
    assert not Job.exists(again.job_id, connection=client.redis), "a hit is no RQ job"
    # the same load events as an RQ load: started and completed, a cache hit, from this worker
    loads = [e.event for e in client.store.read(since, stream="activity") if isinstance(e.event, ModelLoadCompleted)]
    assert [(e.payload.model_key, e.payload.cache_hit, e.payload.worker) for e in loads] == [(key, True, WORKER)]


def test_what_the_worker_does_not_hold_stale_or_garbage_requests_get_no_hit(gpu_worker: subprocess.Popen[bytes],
                                                                          app_config: AppConfig) -> None:
    client = ModelBusClient(app_config)
    key = _lora(client, app_config, "cold")
    since = client.store.head("activity")
    assert _ask(client, app_config.namespace, _request(key)) == {"held": False, "outcome": None}
    assert _ask(client, app_config.namespace, _request("no-such-model")) == {"held": False, "outcome": None}
    assert not any(isinstance(e.event, ModelLoadCompleted) for e in client.store.read(since, stream="activity"))
    loaded = client.load(key, timeout=60)  # not held: through RQ
    assert Job.exists(loaded.job_id, connection=client.redis)
    _ask(client, app_config.namespace, b"\xff not json")
    _ask(client, app_config.namespace, b'{"id": "x", "model_key": 1}')
    stale = _request(key, sent=time.time() - CACHE_HIT_WAIT - 5)  # its caller went the RQ way long ago
    assert _ask(client, app_config.namespace, stale, wait=2) is None
    answer = _ask(client, app_config.namespace, _request(key))
    assert answer is not None and answer["held"] is True and answer["outcome"]["worker"] == WORKER
    assert gpu_worker.poll() is None


def test_a_frozen_worker_costs_the_hit_wait_then_the_load_goes_through_rq(gpu_worker: subprocess.Popen[bytes],
                                                                         app_config: AppConfig) -> None:
    client = ModelBusClient(app_config)
    key = _lora(client, app_config, "frozen")
    client.load(key, timeout=60)
    wait_until(lambda: _held(client, key), 15, "the heartbeat to list the model")
    gpu_worker.send_signal(signal.SIGSTOP)
    try:
        waiting = client.load(key, wait=False)  # not waited for: queued on RQ as before
        assert waiting.state == "queued" and Job.exists(waiting.job_id, connection=client.redis)
        started = time.monotonic()
        with pytest.raises(Exception, match="did not finish"):
            client.load(key, timeout=CACHE_HIT_WAIT + 1)
        assert time.monotonic() - started >= CACHE_HIT_WAIT  # the hit was asked first, then RQ
    finally:
        gpu_worker.send_signal(signal.SIGCONT)
    # the worker thawed answers the queued RQ loads and later hits alike
    assert client.load(key, timeout=60).state == "loaded"
