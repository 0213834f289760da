"""Model store benchmark: each figure a ratio against a baseline measured in the same run, against a
real S3 endpoint on 127.0.0.1 (moto's server mode, in its own process).

1. Fetch one model blob from the store into a host cache (parallel ranged GETs, BLAKE3 verified while
   streaming, laid out by a hard link) vs boto3's ``download_file`` (TransferManager, 10 threads) of the
   same object from the same server.                                                   (goal >= 1.0x)
2. Upload one blob (ours: s3transfer multipart, hashed as sent, HEAD-verified) vs boto3's
   ``upload_file`` (10 threads) of the same bytes.                                     (goal >= 1.0x)
3. Registering a model in place with ``s3://`` vs the shared directory: the time the upload adds to an
   install. The issue's goal is <= 1.3x; against moto (a Python server, ~100 MB/s on loopback) the
   upload is bounded by the server, not by us: ratio 2 (ours vs boto3) is the fair view of our part.
4. A load's fetch on a host that never saw the model (cold cache) vs a host whose cache holds it
   (warm: a new process re-hashes the cached blob once before trusting it).
5. A twelve-file Hugging Face repo installed with one download worker process at ``--concurrency 4``
   vs ``--concurrency 1`` (real worker processes, a local hub pacing each response at
   MODELBUS_BENCH_STORE_RATE MiB/s, default 16, as a far CDN does per connection). (goal >= 2.5x)

Size: MODELBUS_BENCH_STORE_MB (default 256; the issue's figure is for 1024). Rounds alternate ours and
the baseline (MODELBUS_BENCH_STORE_ROUNDS, default 3); the median of each is reported.
MODELBUS_BENCH_STORE_ONLY=store|concurrency runs one half.
Run: ``.venv/bin/python tests/bench/bench_store.py``.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

import redis
from boto3.s3.transfer import TransferConfig

from modelbus.events.keys import Keys
from modelbus.events.logs import configure_logging
from modelbus.events.schema import FileEntry
from modelbus.services.config import AppConfig
from modelbus.services.install import ModelInstallService
from modelbus.services.store import file_digest, parse_store_url
from modelbus.services.store.cache import HostCache
from modelbus.services.store.s3 import S3BlobStore
from tests.bench.common import bench_redis, ratio_line
from tests.fixtures.model_files import make_lora_diffusers, make_sparse_safetensors
from tests.servers.s3_server import CREDENTIALS, S3Server

SIZE = int(os.environ.get("MODELBUS_BENCH_STORE_MB", "256")) << 20
RATE = int(os.environ.get("MODELBUS_BENCH_STORE_RATE", "16")) << 20
REPO_FILES, REPO_FILE_SIZE = 12, 16 << 20
ONLY = os.environ.get("MODELBUS_BENCH_STORE_ONLY", "")
ROUNDS = int(os.environ.get("MODELBUS_BENCH_STORE_ROUNDS", "3"))
BUCKET = "bench-store"
BOTO = TransferConfig(max_concurrency=10)
# the repository first, then whatever the caller's path held (where modelbus is not installed, its path)
PYTHONPATH = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(ours: Callable[[int], object], baseline: Callable[[int], object]) -> tuple[float, float]:
    mine, theirs = [], []
    for i in range(ROUNDS):
        mine.append(timed(lambda i=i: ours(i)))  # type: ignore[misc]
        theirs.append(timed(lambda i=i: baseline(i)))  # type: ignore[misc]
    return statistics.median(mine), statistics.median(theirs)


def _repo(folder: Path) -> Path:
    """A diffusers LoRA folder and eleven 16 MiB files beside it: twelve files, one download job each."""
    make_lora_diffusers(folder, base="sdxl", folder=True)
    for i in range(REPO_FILES - 1):
        with (folder / f"shard-{i:02d}.txt").open("wb") as out:
            out.write(os.urandom(REPO_FILE_SIZE))
    return folder


def _worker(env: dict[str, str], queues: str, concurrency: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "modelbus.workers", "--queues", queues, "--concurrency",
                                 str(concurrency)], env=env, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _install_repo(tmp: Path, redis_url: str, hub: str, concurrency: int, i: int) -> float:
    """Seconds from submitting the repo's install to its record, one download worker at ``concurrency``."""
    namespace, root = f"bench-conc-{uuid.uuid4().hex[:8]}", tmp / f"croot-{concurrency}-{i}"
    env = {**os.environ, "MODELBUS_REDIS_URL": redis_url, "MODELBUS_NAMESPACE": namespace, "MODELBUS_ROOT": str(root),
           "MODELBUS_ALLOW_PRIVATE_DOWNLOADS": "1", "MODELBUS_HF_ENDPOINT": hub, "MODELBUS_STORE_URL": "shared",
           "MODELBUS_LOG_FORMAT": "json", "PYTHONPATH": PYTHONPATH}
    config = AppConfig.load(root=root, redis_url=redis_url, namespace=namespace, store_url="shared", hf_endpoint=hub,
                            allow_private_downloads=True)
    procs = [_worker(env, "download", concurrency, tmp / "workers.log"), _worker(env, "install,hash", 1,
                                                                                tmp / "workers.log")]
    client = redis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + 120
        while client.zcard(Keys(namespace).workers) < concurrency + 1 and time.monotonic() < deadline:
            time.sleep(0.1)  # every slot up and beating
        service = ModelInstallService(config)
        try:
            # what the user waits for: from the command (submitted by this process, as `modelbus install`
            # does) to the InstallCompleted in the log (a submit costs this process about 3 ms)
            began = time.time()
            job = service.wait_for_job(service.heuristic_import("bench/repo12"), timeout=600)
            done = [s.event.time.timestamp() for s in service.event_store.history(job.id)
                    if s.event.type == "InstallCompleted"]
        finally:
            service.record_store.close()
        if job.error or not done:
            raise RuntimeError(f"the repo's install failed: {job.error}")
        return done[-1] - began
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=60)


def bench_concurrency(tmp: Path) -> None:
    repo = _repo(tmp / "repo12")
    hub_proc = subprocess.Popen([sys.executable, "-m", "tests.servers", "hf", f"bench/repo12={repo}", "--rate",
                                 str(RATE)], stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT,
                                env={**os.environ, "PYTHONPATH": PYTHONPATH})
    assert hub_proc.stdout is not None
    hub = hub_proc.stdout.readline().strip()
    try:
        with bench_redis() as redis_url:
            # each round's own figure (the command to its InstallCompleted), not the time of the whole call,
            # which also starts the worker processes, waits for their slots and stops them again
            fours, ones = [], []
            for i in range(ROUNDS):
                fours.append(_install_repo(tmp, redis_url, hub, 4, i))
                ones.append(_install_repo(tmp, redis_url, hub, 1, i))
            four, one = statistics.median(fours), statistics.median(ones)
            print(f"    rounds: concurrency 4 {', '.join(f'{t:.2f}' for t in fours)} s; "
                  f"concurrency 1 {', '.join(f'{t:.2f}' for t in ones)} s", flush=True)
    finally:
        hub_proc.terminate()
        hub_proc.wait()
    mb = (REPO_FILES - 1) * REPO_FILE_SIZE / (1 << 20)
    ratio_line(f"12-file repo ({mb:.0f} MiB, {RATE >> 20} MiB/s per body): conc 4 / 1 (s)", four, one, "s", ">= 2.5x",
               higher_is_better=False)


def main() -> int:
    configure_logging("console", "WARNING")
    os.environ.update(CREDENTIALS)
    tmp = Path(tempfile.mkdtemp(prefix="modelbus-bench-store-"))
    mb = SIZE / (1 << 20)
    try:
        if ONLY != "store":
            bench_concurrency(tmp)
        if ONLY == "concurrency":
            return 0
        with S3Server() as s3:
            client = s3.client()
            client.create_bucket(Bucket=BUCKET)
            store = S3BlobStore(parse_store_url(f"s3://{BUCKET}/fleet"), endpoint_url=s3.url)
            blob = tmp / "blob.bin"
            with blob.open("wb") as out:
                for _ in range(SIZE >> 20):
                    out.write(os.urandom(1 << 20))
            digest = file_digest(blob)

            # 2. upload: ours vs upload_file (each round a fresh key so nothing is skipped)
            def ours_up(i: int) -> None:
                store.delete(digest)
                store.put(digest, blob)

            up_ours, up_base = alternate(ours_up, lambda i: client.upload_file(str(blob), BUCKET, f"plain/{i}",
                                                                               Config=BOTO))
            # 1. fetch into a host cache vs download_file
            entry = FileEntry(path="model.safetensors", size=SIZE, blake3=digest)

            def ours_fetch(i: int) -> None:
                cache_dir = tmp / f"cache-{i}"
                HostCache(cache_dir, 4 * SIZE, store).ensure(f"k{i}", "model.safetensors", (entry,))

            def base_fetch(i: int) -> None:
                client.download_file(BUCKET, "plain/0", str(tmp / f"plain-{i}.bin"), Config=BOTO)

            fetch_ours, fetch_base = alternate(ours_fetch, base_fetch)
            ratio_line(f"fetch {mb:.0f} MiB into a host cache (MB/s)", mb / fetch_ours, mb / fetch_base, "MB/s",
                       ">= 1.0x")
            ratio_line(f"upload {mb:.0f} MiB blob (MB/s)", mb / up_ours, mb / up_base, "MB/s", ">= 1.0x")

            # 4. cold fetch vs warm cache (a new process: one hash of the cached blob)
            cold = statistics.median(timed(lambda i=i: ours_fetch(100 + i)) for i in range(ROUNDS))  # type: ignore[misc]
            warm = statistics.median(timed(lambda: HostCache(tmp / "cache-100", 4 * SIZE, store).ensure(
                "k100", "model.safetensors", (entry,))) for _ in range(ROUNDS))
            ratio_line("load's fetch: cold host / warm cache (s)", cold, warm, "s", "reported")
            print(f"    a cold host pays {cold - warm:.2f} s more than a warm one for {mb:.0f} MiB", flush=True)
            for folder in tmp.glob("cache-*"):
                shutil.rmtree(folder, ignore_errors=True)

            # 3. install (register in place): s3 vs shared
            with bench_redis() as redis_url:
                def register(url: str, i: int) -> None:
                    root = tmp / f"root-{uuid.uuid4().hex[:8]}"
                    config = AppConfig.load(root=root, redis_url=redis_url, namespace=f"bench-{uuid.uuid4().hex[:8]}",
                                            store_url=url, s3_endpoint_url=s3.url)
                    model = make_sparse_safetensors(tmp / f"m-{url[:2]}-{i}.safetensors", SIZE + 8 * (i + 1))
                    service = ModelInstallService(config)
                    try:
                        service.register_path(model)
                    finally:
                        service.record_store.close()
                        model.unlink()

                times: dict[str, list[float]] = {"s3": [], "shared": []}
                for i in range(ROUNDS):
                    times["s3"].append(timed(lambda i=i: register(f"s3://{BUCKET}/fleet", i)))  # type: ignore[misc]
                    times["shared"].append(timed(lambda i=i: register("shared", i)))  # type: ignore[misc]
                s3_t, shared_t = statistics.median(times["s3"]), statistics.median(times["shared"])
                ratio_line(f"register {mb:.0f} MiB in place: s3 / shared (s)", s3_t, shared_t, "s", "<= 1.3x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
