"""Benchmarks of the surfaces (client, HTTP API, SSE), each against a baseline measured in the same run.

- install commands published per second through ModelBusClient.install vs raw RQ ``enqueue`` (goal >= 0.5x)
- ``GET /api/v2/models`` with 10,000 models (a page of 100, and all 10,000): p50/p99 vs an in-process
  ``client.list_models()`` of the same data
- event delivery latency to an SSE client, p50/p99 vs a direct ``client.subscribe()`` in the same process
- ``client.load(key)`` of a model a GPU worker (on the CPU) already holds: p50/p90 vs a raw Redis round
  trip (goal <= 3 ms p50)
- ``GET /healthz`` under concurrent load (threads + httpx, bounded in count and time): requests/s and
  p50 with the cached state vs probing on every request (the behaviour before the cache; goal >= 10x)
- ``GET /api/v2/models?limit=100`` (2,000 models) under load from processes of their own, with ``modelbus
  up`` serving the API as ``MODELBUS_API_WORKERS`` processes (default: the cores, at most 4) vs one
  process: requests/s and p99 (goal >= 3x the rate at the same p99, on a host with the cores for it)

``.venv/bin/python tests/bench/bench_surfaces.py``; MODELBUS_BENCH_SCALE multiplies the counts,
MODELBUS_BENCH_SURFACES=health,api picks benches, MODELBUS_BENCH_LOADERS=N loads /healthz from N processes.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import httpx
from rq import Queue

from modelbus.events.schema import ModelAdded
from modelbus.services.api import create_app
from modelbus.services.client import ModelBusClient, defaults
from modelbus.services.config import AppConfig
from tests.api.conftest import serve
from tests.api.test_events_sse import read_events
from tests.bench.common import bench_redis, percentiles, rate, ratio_line, scale

MODELS = 10_000  # the figure; not scaled down


def _client(url: str) -> ModelBusClient:
    root = Path(tempfile.mkdtemp(prefix="modelbus-bench-surfaces-"))
    (root / "models").mkdir()
    config = AppConfig.load(root=root, redis_url=url, namespace=f"bench-{uuid.uuid4().hex[:8]}",
                            log_level="WARNING")
    return ModelBusClient(config)


def bench_install(url: str) -> None:
    client = _client(url)
    n = scale(300)
    rq_queue = Queue(client.store.keys.queue("bench-raw"), connection=client.redis)
    # submission refuses a path that does not exist (workers share the file system): make real files
    folder = client.config.root / "bench-sources"
    folder.mkdir()
    sources = []
    for i in range(n):
        source = folder / f"model-{i}.safetensors"
        source.write_bytes(b"")
        sources.append(str(source))
    ours = rate(n, lambda: [client.install(s) for s in sources])
    raw = rate(n, lambda: [rq_queue.enqueue("os.getcwd") for _ in range(n)])
    ratio_line("install commands published /s (vs RQ enqueue)", ours, raw, "cmd/s", ">= 0.5x")


def _seed(client: ModelBusClient, count: int) -> None:
    pipe_rate = time.perf_counter()
    for i in range(count):
        key = f"{i:032x}"
        config = {"key": key, "hash": key, "name": f"model-{i:05d}", "model_type": "lora", "model_format": "lycoris",
                  "base_model": "sd-1" if i % 2 else "sdxl", "path": f"loras/m{i}.safetensors", "tags": ["bench"]}
        client.store.append([ModelAdded(aggregate_id=key, config=config)], expected_version=0)
    print(f"  (seeded {count} models in {time.perf_counter() - pipe_rate:.1f}s)", flush=True)


def bench_list(url: str) -> None:
    client = _client(url)
    _seed(client, MODELS)
    app = create_app(client.config, client=client)
    server, thread, base = serve(app)
    rounds = scale(100)
    try:
        with httpx.Client(base_url=base, timeout=60) as http:
            http.get("/api/v2/models", params={"limit": 1})  # the projection catches up once
            for label, limit, n in (("a page of 100", 100, rounds), ("all 10,000", MODELS, max(5, rounds // 10))):
                api, direct = [], []
                for _ in range(n):
                    started = time.perf_counter()
                    r = http.get("/api/v2/models", params={"limit": limit})
                    api.append(time.perf_counter() - started)
                    assert r.status_code == 200 and r.json()["total"] == MODELS
                    started = time.perf_counter()
                    client.list_models()
                    direct.append(time.perf_counter() - started)
                (a50, a99), (d50, d99) = percentiles(api), percentiles(direct)
                ratio_line(f"GET /api/v2/models, {label}: p50", a50 * 1000, d50 * 1000, "ms", higher_is_better=False)
                ratio_line(f"GET /api/v2/models, {label}: p99", a99 * 1000, d99 * 1000, "ms", higher_is_better=False)
    finally:
        server.should_exit = True
        thread.join(10)


def _latencies_direct(client: ModelBusClient, n: int) -> list[float]:
    got: list[float] = []
    stop = threading.Event()
    sub = client.subscribe(types=["bench_tick"], stop=stop.is_set, block_ms=200)

    def consume() -> None:
        for d in sub:
            got.append(time.perf_counter() - d.event.payload["t"])  # type: ignore[attr-defined]
            if len(got) >= n:
                return
    t = threading.Thread(target=consume, daemon=True)
    t.start()
    _publish(client, n)
    t.join(60)
    stop.set()
    return got


def _latencies_sse(client: ModelBusClient, base: str, n: int) -> list[float]:
    got: list[float] = []
    since = client.store.head("activity")

    def consume() -> None:
        with httpx.stream("GET", f"{base}/api/v2/events", params={"types": "bench_tick", "since": since},
                          timeout=60) as r:
            import orjson
            for message in read_events(r):
                got.append(time.perf_counter() - orjson.loads(message["data"])["event"]["payload"]["t"])
                if len(got) >= n:
                    return
    t = threading.Thread(target=consume, daemon=True)
    t.start()
    time.sleep(0.5)
    _publish(client, n)
    t.join(60)
    return got


def _publish(client: ModelBusClient, n: int) -> None:
    for _ in range(n):
        client.store.publish_activity("bench_tick", {"t": time.perf_counter()})
        time.sleep(0.005)  # spaced: latency, not throughput


def bench_sse(url: str) -> None:
    client = _client(url)
    n = scale(300)
    server, thread, base = serve(create_app(client.config, client=client))
    try:
        sse = _latencies_sse(client, base, n)
        direct = _latencies_direct(client, n)
    finally:
        server.should_exit = True
        thread.join(10)
    (s50, s99), (d50, d99) = percentiles(sse), percentiles(direct)
    ratio_line("SSE event delivery latency p50", s50 * 1000, d50 * 1000, "ms", higher_is_better=False)
    ratio_line("SSE event delivery latency p99", s99 * 1000, d99 * 1000, "ms", higher_is_better=False)


HEALTH_THREADS = 8
HEALTH_SECONDS = 3.0  # per round and side; each thread also stops after HEALTH_REQUESTS


def _health_load(base: str, requests: int) -> tuple[float, list[float], int]:
    """HEALTH_THREADS threads each sending /healthz (keep-alive) until ``requests`` or HEALTH_SECONDS:
    answers/s over all of them, every latency, and how many answers were not 200 (a probe past its timeout
    on a starved machine)."""
    latencies: list[list[float]] = [[] for _ in range(HEALTH_THREADS)]
    errors: list[int] = []
    stop_at = time.perf_counter() + HEALTH_SECONDS

    def hammer(mine: list[float]) -> None:
        with httpx.Client(base_url=base, timeout=30) as http:
            while len(mine) < requests and time.perf_counter() < stop_at:
                started = time.perf_counter()
                if http.get("/healthz").status_code != 200:
                    errors.append(1)
                mine.append(time.perf_counter() - started)
    started = time.perf_counter()
    threads = [threading.Thread(target=hammer, args=(mine,)) for mine in latencies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HEALTH_SECONDS + 60)
    flat = [x for mine in latencies for x in mine]
    return len(flat) / (time.perf_counter() - started), flat, len(errors)


SERVE_HEALTH = """
import sys, uvicorn
from modelbus.services.api import create_app
from modelbus.services.api.health_state import HealthState
from modelbus.services.client import ModelBusClient
from modelbus.services.config import AppConfig
config = AppConfig.load(redis_url=sys.argv[1], namespace=sys.argv[2], root=sys.argv[3], log_level="WARNING")
client = ModelBusClient(config)
app = create_app(config, client=client)
app.state.health = HealthState(client, refresh_seconds=float(sys.argv[4]))
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[5]), log_level="warning")
"""


def _health_server(client: ModelBusClient, refresh: float) -> tuple[subprocess.Popen[bytes], str]:
    """The API in its own process (the load generator must not share its GIL)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = client.config
    proc = subprocess.Popen([sys.executable, "-c", SERVE_HEALTH, config.redis_url, config.namespace, str(config.root),
                             str(refresh), str(port)], cwd=Path(__file__).resolve().parents[2],
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            httpx.get(f"{base}/healthz", timeout=30)  # the first probe opens the connections too
            return proc, base
        except httpx.HTTPError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise
            time.sleep(0.2)


def bench_health(url: str) -> None:
    from concurrent.futures import ProcessPoolExecutor
    client = _client(url)
    requests = scale(500)
    servers = {refresh: _health_server(client, refresh)  # 0: every request probes, as before the cache
               for refresh in (defaults.HEALTH_REFRESH_SECONDS, 0.0)}
    errors = 0
    rates: dict[float, list[float]] = {r: [] for r in servers}
    samples: dict[float, list[float]] = {r: [] for r in servers}
    loaders = int(os.environ.get("MODELBUS_BENCH_LOADERS", "0"))  # >0: load from that many processes
    try:
        with ProcessPoolExecutor(max(1, loaders)) as pool:
            for i in range(3):  # alternating rounds: both sides meet the same load on a shared machine
                for refresh in (list(servers) if i % 2 == 0 else list(reversed(servers))):
                    if loaders:
                        started = time.perf_counter()
                        parts = list(pool.map(_page_hammer, [servers[refresh][1]] * loaders,
                                              [HEALTH_SECONDS] * loaders, [HEALTH_THREADS] * loaders,
                                              ["/healthz"] * loaders))
                        latencies = [x for part in parts for x in part]
                        per_s, failed = len(latencies) / (time.perf_counter() - started), 0
                    else:
                        per_s, latencies, failed = _health_load(servers[refresh][1], requests)
                    errors += failed
                    rates[refresh].append(per_s)
                    samples[refresh] += latencies
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)
    cached, probing = defaults.HEALTH_REFRESH_SECONDS, 0.0
    if errors:
        print(f"  ({errors} /healthz answers were not 200: probes past their timeout)", flush=True)
    ratio_line(f"GET /healthz, {HEALTH_THREADS} threads: req/s (vs probing)", statistics.median(rates[cached]),
               statistics.median(rates[probing]), "req/s", ">= 10x")
    (c50, _), (p50, _) = percentiles(samples[cached]), percentiles(samples[probing])
    ratio_line(f"GET /healthz, {HEALTH_THREADS} threads: p50 (vs probing)", c50 * 1000, p50 * 1000, "ms",
               higher_is_better=False)


PAGE_MODELS = 2_000
PAGE_SECONDS = 4.0  # per round and side
PAGE_CONNECTIONS = 48  # load-generator connections in all, over PAGE_LOADERS processes
PAGE_LOADERS = 4


def _page_hammer(base: str, seconds: float, connections: int, path: str = "/api/v2/models?limit=100",
                 ) -> list[float]:
    """One load-generator process: ``connections`` keep-alive threads on ``path`` for ``seconds``."""
    stop_at = time.perf_counter() + seconds
    latencies: list[list[float]] = [[] for _ in range(connections)]

    def hammer(mine: list[float]) -> None:
        with httpx.Client(base_url=base, timeout=60, trust_env=False) as http:
            while time.perf_counter() < stop_at:
                started = time.perf_counter()
                assert http.get(path).status_code == 200
                mine.append(time.perf_counter() - started)

    threads = [threading.Thread(target=hammer, args=(mine,)) for mine in latencies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [x for mine in latencies for x in mine]


def _up_api(client: ModelBusClient, processes: int) -> tuple[subprocess.Popen[bytes], str]:
    repo = Path(__file__).resolve().parents[2]
    config = client.config
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MODELBUS_")}, "PYTHONPATH": str(repo),
           "MODELBUS_REDIS_URL": config.redis_url or "", "MODELBUS_NAMESPACE": config.namespace,
           "MODELBUS_ROOT": str(config.root), "MODELBUS_LOG_LEVEL": "WARNING", "MODELBUS_API_PORT": "0",
           "MODELBUS_API_WORKERS": str(processes), "MODELBUS_API_MAX_REQUESTS": "256"}
    log = config.root / f"up-{processes}.log"
    proc = subprocess.Popen([str(Path(sys.executable).with_name("modelbus")), "up", "--workers", ""], env=env,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while True:
        found = re.search(r"api:\s+(http://127\.0\.0\.1:\d+)/", log.read_text(errors="replace"))
        if found:
            base = found.group(1)
            try:  # every process answers once (the projection catches up in each)
                for _ in range(4 * processes):
                    httpx.get(f"{base}/api/v2/models", params={"limit": 1}, timeout=60, trust_env=False)
                return proc, base
            except httpx.HTTPError:
                pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError(f"modelbus up did not serve the API: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.3)


def bench_api_processes(url: str) -> None:
    from concurrent.futures import ProcessPoolExecutor
    client = _client(url)
    _seed(client, PAGE_MODELS)
    many = int(os.environ.get("MODELBUS_BENCH_API_WORKERS", min(4, os.cpu_count() or 1)))
    sides = {n: _up_api(client, n) for n in (many, 1)}
    rates: dict[int, list[float]] = {n: [] for n in sides}
    samples: dict[int, list[float]] = {n: [] for n in sides}
    try:
        with ProcessPoolExecutor(PAGE_LOADERS) as pool:
            for i in range(3):  # alternating rounds
                for n in (list(sides) if i % 2 == 0 else list(reversed(sides))):
                    started = time.perf_counter()
                    parts = list(pool.map(_page_hammer, [sides[n][1]] * PAGE_LOADERS, [PAGE_SECONDS] * PAGE_LOADERS,
                                          [PAGE_CONNECTIONS // PAGE_LOADERS] * PAGE_LOADERS))
                    flat = [x for part in parts for x in part]
                    rates[n].append(len(flat) / (time.perf_counter() - started))
                    samples[n] += flat
    finally:
        for proc, _ in sides.values():
            proc.send_signal(signal.SIGINT)
            proc.wait(60)
    label = f"GET /api/v2/models?limit=100, {PAGE_CONNECTIONS} conns"
    ratio_line(f"{label}: req/s, {many} API processes (vs 1)", statistics.median(rates[many]),
               statistics.median(rates[1]), "req/s", ">= 3x")
    (m50, m99), (o50, o99) = percentiles(samples[many]), percentiles(samples[1])
    ratio_line(f"{label}: p99, {many} API processes (vs 1)", m99 * 1000, o99 * 1000, "ms", higher_is_better=False)
    print(f"  (p50 {m50 * 1000:.1f} ms vs {o50 * 1000:.1f} ms; {os.cpu_count()} cores shared with the load "
          "generator)", flush=True)


def bench_bus_load(url: str) -> None:
    from tests.fixtures import loadable as builders
    client = _client(url)
    config = client.config
    path = config.models_path / "bench-lora.safetensors"
    builders.write_lora(path, seed=1)
    client.add_model("bench-lora", {"name": "bench-lora", "model_type": "lora", "model_format": "lycoris",
                                    "base_model": "sd-1", "path": path.name, "hash": "bench-lora"})
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "MODELBUS_REDIS_URL": url, "MODELBUS_NAMESPACE": config.namespace,
           "MODELBUS_ROOT": str(config.root), "MODELBUS_LOG_LEVEL": "WARNING"}
    worker = subprocess.Popen([sys.executable, "-m", "modelbus.workers", "--queues", "gpu", "--device", "cpu", "--name",
                               "bench-gpu"], cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not any("gpu" in w.get("queues", []) for w in client.workers()):
            if time.monotonic() > deadline or worker.poll() is not None:
                raise RuntimeError("the GPU worker did not register")
            time.sleep(0.2)
        client.load("bench-lora", timeout=120)  # the miss: from disk into the worker's cache
        while not any(m.model_key == "bench-lora" for w in client.workers() for m in w.models):
            if time.monotonic() > deadline:  # its heartbeat says so within seconds: then loads are hits
                raise RuntimeError("the GPU worker's heartbeat does not list the model")
            time.sleep(0.2)
        n = scale(30)
        bus, raw = [], []
        for _ in range(n):
            started = time.perf_counter()
            client.load("bench-lora", timeout=60)
            bus.append(time.perf_counter() - started)
            started = time.perf_counter()
            client.redis.ping()
            raw.append(time.perf_counter() - started)
    finally:
        worker.terminate()
        worker.wait(30)
    for label, q in (("p50", 0.5), ("p90", 0.9)):
        ours, base = sorted(bus)[int(q * (n - 1))], sorted(raw)[int(q * (n - 1))]
        ratio_line(f"client.load of a cached model: {label} (vs PING)", ours * 1000, base * 1000, "ms",
                   "<= 3 ms" if label == "p50" else "", higher_is_better=False)


def main() -> int:
    from modelbus.events.logs import configure_logging
    configure_logging("console", "WARNING")
    benches = {"install": bench_install, "list": bench_list, "sse": bench_sse, "bus": bench_bus_load,
               "health": bench_health, "api": bench_api_processes}
    # MODELBUS_BENCH_SURFACES=health,api runs some of them (a lent many-core host)
    chosen = [n.strip() for n in os.environ.get("MODELBUS_BENCH_SURFACES", ",".join(benches)).split(",") if n.strip()]
    with bench_redis() as url:
        for name in chosen:
            benches[name](url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
