"""Install benchmarks, each figure a ratio against a baseline measured in the same run.

1. Registering a large safetensors file in place (probe + key + BLAKE3 + the ModelAdded append) against
   the floor: BLAKE3 of the same file plus reading its header. The file is sparse (no disk used).
   Size: MODELBUS_BENCH_REGISTER_MB (default 512; the issue's figure is for 2048).
2. Installing small LoRAs through the queues (install worker -> hash workers -> records) with one and
   with two hash worker processes: installs per second of each and their ratio.
   Count: MODELBUS_BENCH_LORAS (default 40; the issue's figure is for 200).

Run: ``.venv/bin/python tests/bench/bench_install.py`` (a private Redis is started when
MODELBUS_TEST_REDIS_URL is unset).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from modelbus.events.embedded import EmbeddedRedis
from modelbus.events.keys import Keys
from modelbus.events.logs import configure_logging
from modelbus.events.store import RedisEventStore
from modelbus.services.config import AppConfig
from modelbus.services.hashing import content_hash
from modelbus.services.install import InstallStatus, ModelInstallService
from modelbus.services.probe import read_safetensors_header
from tests.fixtures.model_files import lora_kohya_shapes, make_sparse_safetensors, write_checkpoint

REGISTER_MB = int(os.environ.get("MODELBUS_BENCH_REGISTER_MB", "512"))
LORAS = int(os.environ.get("MODELBUS_BENCH_LORAS", "40"))
REPEATS = 5
WORKER_MAIN = ("import sys, workers.install, workers.download, workers.hash; "
               "from workers.__main__ import main; sys.exit(main(sys.argv[1:]))")
MAIN_OVERRIDES = {"model_type": "main", "base_model": "sd-1", "model_format": "checkpoint"}


@contextmanager
def redis_url(tmp: Path) -> Iterator[str]:
    given = os.environ.get("MODELBUS_TEST_REDIS_URL")
    if given:
        yield given
        return
    server = EmbeddedRedis.ensure(tmp / "redis")
    try:
        yield server.url
    finally:
        server.stop()


def environment(url: str, root: Path) -> dict[str, str]:
    return {"MODELBUS_REDIS_URL": url, "MODELBUS_NAMESPACE": f"bench-install-{uuid.uuid4().hex[:8]}",
            "MODELBUS_ROOT": str(root), "MODELBUS_LOG_FORMAT": "json", "MODELBUS_LOG_LEVEL": "WARNING"}


def bench_register(url: str, tmp: Path) -> None:
    root = tmp / "register-root"
    root.mkdir()
    os.environ.update(environment(url, root))
    config = AppConfig.load()
    service = ModelInstallService(config, event_store=RedisEventStore.from_config(config))
    path = make_sparse_safetensors(tmp / "big.safetensors", REGISTER_MB << 20)
    content_hash(path, threads=config.hash_threads)  # warm the page cache: both sides then read from RAM

    def floor() -> float:
        start = time.perf_counter()
        content_hash(path, threads=config.hash_threads)
        read_safetensors_header(path)
        return time.perf_counter() - start

    def register() -> float:
        start = time.perf_counter()
        key = service.register_path(path, config=MAIN_OVERRIDES)
        elapsed = time.perf_counter() - start
        service.unregister(key)
        return elapsed

    floors, registers = [], []
    for _ in range(REPEATS):  # interleaved, so that drift on a shared machine hits both alike
        floors.append(floor())
        registers.append(register())
    best_floor, best_register = min(floors), min(registers)
    print(f"register {REGISTER_MB} MiB safetensors in place: {best_register * 1000:.0f} ms; "
          f"BLAKE3 + header: {best_floor * 1000:.0f} ms; ratio {best_register / best_floor:.2f}x (target <= 1.3x)")
    service.record_store.close()
    path.unlink()


def start_worker(env: dict[str, str], queues: str, logs: Path) -> subprocess.Popen[bytes]:
    log = (logs / f"{queues}-{uuid.uuid4().hex[:4]}.log").open("wb")
    return subprocess.Popen([sys.executable, "-c", WORKER_MAIN, "--queues", queues], cwd=REPO_ROOT,
                            env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for proc in processes:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in processes:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def install_loras(url: str, tmp: Path, loras: list[Path], hash_workers: int) -> float:
    """Installs per second of ``loras`` with one install worker and ``hash_workers`` hash workers."""
    root = tmp / f"queues-root-{hash_workers}"
    logs = tmp / f"logs-{hash_workers}"
    root.mkdir()
    logs.mkdir()
    env = environment(url, root)
    os.environ.update(env)
    config = AppConfig.load()
    store = RedisEventStore.from_config(config)
    service = ModelInstallService(config, event_store=store)
    processes = [start_worker(env, "install", logs)] + [start_worker(env, "hash", logs) for _ in range(hash_workers)]
    try:
        deadline = time.monotonic() + 120
        while store.client.zcard(Keys(config.namespace).workers) < len(processes):  # timed once all are up
            if time.monotonic() > deadline:
                raise RuntimeError("workers did not start; see " + str(logs))
            time.sleep(0.1)
        start = time.perf_counter()
        for path in loras:
            service.heuristic_import(path)
        jobs = service.wait_for_installs(timeout=600)
        elapsed = time.perf_counter() - start
    finally:
        stop(processes)
        service.record_store.close()
    failed = [j for j in jobs if j.status is not InstallStatus.COMPLETED]
    if failed:
        raise RuntimeError(f"{len(failed)} installs failed, e.g. {failed[0].error_type}: {failed[0].error}")
    return len(loras) / elapsed


def bench_queues(url: str, tmp: Path) -> None:
    (tmp / "loras").mkdir()
    # distinct content per file (the metadata differs), or the install would refuse duplicates
    loras = [write_checkpoint(tmp / "loras" / f"lora_{i:04d}.safetensors", lora_kohya_shapes("sd-1", 4),
                              {"ss_network_module": "networks.lora", "bench_seed": str(i)}) for i in range(LORAS)]
    one = install_loras(url, tmp, loras, hash_workers=1)
    two = install_loras(url, tmp, loras, hash_workers=2)
    print(f"install {LORAS} LoRAs through the queues: 1 hash worker {one:.1f}/s; 2 hash workers {two:.1f}/s; "
          f"ratio {two / one:.2f}x (cores here: {os.cpu_count()})")


def main() -> int:
    configure_logging("console", "WARNING")
    tmp = Path(tempfile.mkdtemp(prefix="modelbus-bench-install-"))
    try:
        with redis_url(tmp) as url:
            bench_register(url, tmp)
            bench_queues(url, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
