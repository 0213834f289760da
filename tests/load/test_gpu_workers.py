"""Two GPU worker processes (on the CPU here): loads go to the worker that holds the model, the caches
live from job to job, and a load whose worker dies is finished by the other one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelbus.events.store import RedisEventStore
from modelbus.services import routing
from modelbus.services.client import ModelBusClient
from modelbus.services.config import AppConfig
from tests.fixtures import loadable as builders
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]


def _start(name: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "modelbus.workers", "--queues", "gpu", "--device", "cpu", "--name", name]
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **env}, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)


@pytest.fixture()
def gpu_workers(modelbus_env: dict[str, str], tmp_path: Path) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    procs = {name: _start(name, modelbus_env, tmp_path / f"{name}.log") for name in ("gpu-a", "gpu-b")}
    config = AppConfig.load()
    store = RedisEventStore.from_config(config)
    try:
        wait_until(lambda: {s["id"] for s in routing.worker_states(store.client, config.namespace)} >= set(procs),
                  90, "both GPU workers to register")
        yield procs
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def _lora(client: ModelBusClient, config: AppConfig, name: str, seed: int) -> str:
    path = config.models_path / f"{name}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    builders.write_lora(path, seed=seed)
    key = f"{name}-key"
    client.add_model(key, {"name": name, "model_type": "lora", "model_format": "lycoris", "base_model": "sd-1",
                           "path": path.name, "hash": key})
    return key


def test_loads_follow_the_cache_and_survive_a_dead_worker(gpu_workers: dict[str, subprocess.Popen[bytes]],
                                                          app_config: AppConfig) -> None:
    client = ModelBusClient(app_config)
    first = _lora(client, app_config, "first", 1)
    second = _lora(client, app_config, "second", 2)

    placed = client.load(first, worker="gpu-b", timeout=60)
    assert placed["worker"] == "gpu-b"
    wait_until(lambda: any(m["model_key"] == first for w in client.workers() if w["id"] == "gpu-b"
                          for m in w.get("models", [])), 15, "gpu-b's heartbeat to list the model")
    again = client.load(first, timeout=60)
    assert again["worker"] == "gpu-b", "a load goes to the worker that already holds the model"

    # gpu-b holds `first`; freeze it so it never takes the next job, then kill it: the load must be
    # re-routed to gpu-a once gpu-b's heartbeat has expired
    victim = gpu_workers["gpu-b"]
    victim.send_signal(signal.SIGSTOP)
    started = time.monotonic()
    rescued = client.load(first, timeout=90)
    victim.send_signal(signal.SIGKILL)
    assert rescued["worker"] == "gpu-a", rescued
    print(f"load re-routed from the frozen gpu-b to gpu-a after {time.monotonic() - started:.1f}s")
    assert client.load(second, timeout=60)["worker"] == "gpu-a"

    events = [d.event for d in client.events(types=["model_load_completed"])]
    completed = [(e.payload["model_key"], e.payload["worker"], e.payload["cache_hit"]) for e in events]  # type: ignore[attr-defined]
    assert (first, "gpu-b", False) in completed and (first, "gpu-b", True) in completed
    assert (first, "gpu-a", False) in completed


def test_a_bnb_checkpoint_loads_kept_quantized_on_a_gpu_worker(gpu_workers: dict[str, subprocess.Popen[bytes]],
                                                               app_config: AppConfig) -> None:
    """An NF4 FLUX file in lllyasviel's layout, loaded by a worker process through the client: with no CUDA
    worker alive it goes to a CPU worker, where bitsandbytes' CPU backend loads it."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install -e .[dev])")
    from tests.fixtures import transformer_files as tf
    from tests.load.test_bnb_load import _bfl_quantized, _write

    client = ModelBusClient(app_config)
    path = _write(app_config.models_path / "flux1-dev-bnb-nf4.safetensors",
                  _bfl_quantized(tf.flux_transformer_state(), "nf4", True))
    key = "bnb-key"
    client.add_model(key, {"name": "flux1-dev-bnb-nf4", "model_type": "main", "model_format": "bnb_quantized_nf4b",
                           "base_model": "flux", "path": path.name, "hash": key, "quantization": "nf4"})
    loaded = client.load(key, submodel="transformer", timeout=90)
    assert loaded["worker"] in gpu_workers and loaded["device"] == "cpu"
    events = [d.event for d in client.events(types=["model_load_completed"])]
    assert any(e.payload["model_key"] == key for e in events)  # type: ignore[attr-defined]
