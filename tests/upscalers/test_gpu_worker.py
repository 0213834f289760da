"""A GPU worker of this venv (its own process, on the CPU) loads an upscaler through the real queue and
reports it; one recorded as an upscaler that is none comes back refused, naming the file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from modelbus.events.errors import ModelbusError
from modelbus.events.store import RedisEventStore
from modelbus.services import routing
from modelbus.services.client import ModelBusClient
from modelbus.services.config import AppConfig
from modelbus.services.probe import probe
from tests.upscalers import builders, require_spandrel
from tests.waiting import wait_until

require_spandrel()
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def gpu_worker(modelbus_env: dict[str, str], tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    log = tmp_path / "gpu.log"
    cmd = [sys.executable, "-m", "modelbus.workers", "--queues", "gpu", "--device", "cpu", "--name", "gpu-vision"]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **modelbus_env}, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)
    config = AppConfig.load()
    store = RedisEventStore.from_config(config)
    try:
        wait_until(lambda: any(s["id"] == "gpu-vision" for s in routing.worker_states(store.client, config.namespace)),
                   90, "the GPU worker to register", details=lambda: log.read_text()[-2000:])
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_a_worker_loads_an_upscaler_through_the_queue(gpu_worker: subprocess.Popen[bytes],
                                                      app_config: AppConfig) -> None:
    client = ModelBusClient(app_config)
    app_config.models_path.mkdir(parents=True, exist_ok=True)
    path = app_config.models_path / "RealESRGAN_x4plus.pth"
    builders.write("realesrgan_x4plus", path)
    found = probe(path)
    client.add_model("upscaler-key", {"name": "RealESRGAN_x4plus", "path": path.name, "hash": "upscaler-key",
                                      **found.as_config_fields()})
    assert client.get_model("upscaler-key").scale == 4  # type: ignore[union-attr]

    outcome = client.load("upscaler-key", timeout=120)
    assert (outcome.state, outcome.worker, outcome.device) == ("loaded", "gpu-vision", "cpu")
    completed = [d.event.payload for d in client.events(types=["model_load_completed"])]  # type: ignore[attr-defined]
    assert any(p["model_key"] == "upscaler-key" and p["worker"] == "gpu-vision" for p in completed)

    torch.save({"fc.weight": torch.zeros(4, 4)}, app_config.models_path / "not-an-upscaler.pth")
    client.add_model("bad-key", {"name": "bad", "path": "not-an-upscaler.pth", "hash": "bad-key", "base_model": "any",
                                 "model_type": "spandrel_image_to_image", "model_format": "checkpoint"})
    with pytest.raises(ModelbusError, match="not an architecture Spandrel knows") as refused:
        client.load("bad-key", timeout=120)
    assert "not-an-upscaler.pth" in str(refused.value) and "\n" not in str(refused.value)
    print(f"refused load: {type(refused.value).__name__}: {refused.value}")
    assert gpu_worker.poll() is None, "the worker survives a refused load"
