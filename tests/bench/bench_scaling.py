"""Horizontal scaling: the same hash-heavy install load (distinct LoRA files installed from local
paths: a copy into staging, an imohash key, a BLAKE3 hash and a probe each) run by 1, 2 and 4 worker
processes (``python -m modelbus.workers --queues install,download,hash``). Prints models/s and each figure as
a ratio against one worker, measured in the same run.

    .venv/bin/python tests/bench/bench_scaling.py        # MODELBUS_BENCH_SCALE=2 doubles the load
    MODELBUS_BENCH_WORKERS=1,2,4,8,12 MODELBUS_BENCH_SCALE=10 python3 tests/bench/bench_scaling.py  # 16 cores

``MODELBUS_BENCH_PROFILE=DIR`` runs every worker's job processes under cProfile (tests/bench/profile_hook)
and prints, after each round, where the job processes' time went (tests/bench/profile_report.py).

The workers are started and registered before the jobs are queued, so their start-up (torch import)
is not counted; they are stopped warm (SIGTERM: the current job finishes) after each round.

Each round also reports where an install's time goes, from the times of its events in the log (median
seconds per install, and the share of the sum): ``queued`` (requested -> the install step starts),
``copy`` (the install step: probe and copy into staging -> downloaded), ``hash wait`` (-> the hash step
starts: RQ's dependency hand-over and the hash queue), ``hash+record`` (BLAKE3, imohash, probe,
placement, ModelAdded -> completed). Then what each install asked of Redis (the one thread every worker
shares): commands by name with their share of Redis's time, round trips (requests Redis read: a pipeline
is one), and Redis's CPU time per install beyond what it spends with the workers idle.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import redis

from modelbus.events.embedded import EmbeddedRedis
from modelbus.services.install import InstallStatus
from tests.fixtures.model_files import lora_kohya_shapes, write_checkpoint
from tests.install.conftest import _bus, make_service

SCALE = float(os.environ.get("MODELBUS_BENCH_SCALE", "1"))
MODELS = max(4, int(24 * SCALE))
RANK = 3000  # about 20 MB per model
WORKERS = tuple(int(n) for n in os.environ.get("MODELBUS_BENCH_WORKERS", "1,2,4").split(","))
PROFILE = os.environ.get("MODELBUS_BENCH_PROFILE")
HOOK = Path(__file__).resolve().parent / "profile_hook"


def _models(folder: Path, round_id: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    shapes = lora_kohya_shapes("sd-1", RANK)
    return [write_checkpoint(folder / f"scale_{round_id}_{n}.safetensors", shapes,
                             {"ss_network_module": "networks.lora", "n": f"{round_id}-{n}"})
            for n in range(MODELS)]


def _wait_registered(client: redis.Redis, count: int, timeout: float = 120) -> None:
    from rq import Worker
    deadline = time.monotonic() + timeout
    while len(Worker.all(connection=client)) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count} workers did not register within {timeout} s")
        time.sleep(0.1)


PHASES = ("queued", "copy", "hash wait", "hash+record")


def phases(store: Any, job_id: str) -> dict[str, float]:
    """Seconds an install spent in each of ``PHASES``, from its events' times."""
    marks = [(s.event.type, s.event.time.timestamp()) for s in store.history(job_id)]
    started = [t for kind, t in marks if kind == "InstallStarted"]
    at = {kind: t for kind, t in marks if kind != "InstallStarted"}
    if len(started) < 2 or not {"InstallRequested", "InstallDownloaded", "InstallCompleted"} <= at.keys():
        return {}
    points = [at["InstallRequested"], started[0], at["InstallDownloaded"], started[-1], at["InstallCompleted"]]
    return {name: b - a for name, a, b in zip(PHASES, points, points[1:], strict=False)}


def report_phases(workers: int, per_job: list[dict[str, float]]) -> None:
    per_job = [p for p in per_job if p]
    if not per_job:
        return
    medians = {name: statistics.median(p[name] for p in per_job) for name in PHASES}
    sums = {name: sum(p[name] for p in per_job) for name in PHASES}
    total = sum(sums.values()) or 1.0
    print(f"    {workers} worker{'s' if workers > 1 else ''}: per install (median s, share) " + ", ".join(
        f"{name} {medians[name]:.3f} ({sums[name] / total:.0%})" for name in PHASES), flush=True)


def _cpu_times() -> list[int]:
    """The machine's CPU time counters (/proc/stat's first line: user nice system idle iowait ...)."""
    try:
        with open("/proc/stat") as f:
            return [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return []


def _cpu_share(before: list[int], after: list[int]) -> tuple[float, float]:
    """(busy, iowait) shares of all CPUs between two readings of :func:`_cpu_times`."""
    if not before or not after:
        return 0.0, 0.0
    delta = [b - a for a, b in zip(before, after, strict=False)]
    total = sum(delta) or 1
    return 1 - (delta[3] + delta[4]) / total, delta[4] / total


def _redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def _redis_idle_rate(client: redis.Redis, seconds: float = 1.0) -> float:
    """Redis's CPU seconds per second with the workers idle (its timers, their blocking polls): taken off
    the round's figure, so that what is left per install is what the installs cost it."""
    before = _redis_cpu(client)
    time.sleep(seconds)
    return (_redis_cpu(client) - before) / seconds


def _redis_calls(client: redis.Redis) -> dict[str, tuple[int, int]]:
    """(calls, microseconds) per command so far, and under ``READS`` the requests Redis read (one per round
    trip of a client: a pipeline is one; INFO stats' total_reads_processed)."""
    calls = {name.removeprefix("cmdstat_"): (int(stat["calls"]), int(stat["usec"]))
             for name, stat in client.info("commandstats").items()}
    return {**calls, READS: (int(client.info("stats").get("total_reads_processed", 0)), 0)}


READS = "(reads)"


def report_calls(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]], installs: int,
                 redis_cpu_s: float = 0.0) -> None:
    """Redis commands per install, the busiest first, and the microseconds of Redis's time they took
    (scripts' inner commands are counted twice: as themselves and inside their EVALSHA); then Redis's own
    CPU time per install (INFO cpu: the commands, and the network reads and writes around them), the figure
    that bounds how many workers one Redis can serve."""
    calls = {n: (after[n][0] - before.get(n, (0, 0))[0]) / installs for n in after}
    usec = {n: (after[n][1] - before.get(n, (0, 0))[1]) / installs for n in after}
    reads = calls.pop(READS, 0.0)
    top = sorted((n for n in calls if calls[n] >= 0.05), key=lambda n: -usec[n])
    print(f"    Redis per install: {sum(calls.values()):.0f} commands in {reads:.0f} round trips (by time: " +
          ", ".join(f"{n} {calls[n]:.1f}x {usec[n]:.0f} us" for n in top[:10]) + ")", flush=True)
    print(f"    Redis CPU per install (beyond its idle load): {redis_cpu_s / installs * 1e6:.0f} us", flush=True)


def run_round(redis_url: str, workers: int, tmp: Path) -> float:
    """Models installed per second by ``workers`` worker processes (and where each install's time went)."""
    (tmp / f"bus{workers}").mkdir(parents=True)
    gen = _bus(redis_url, tmp / f"bus{workers}", start_workers=0)
    bus = next(gen)
    try:
        service = make_service(bus)
        paths = _models(tmp / f"src{workers}", f"w{workers}")
        if PROFILE:  # the workers started now inherit it (tests/bench/profile_hook)
            os.environ["MODELBUS_BENCH_PROFILE"] = str(Path(PROFILE) / f"w{workers}")
            os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HOOK), os.environ.get("PYTHONPATH")]))
        for i in range(workers):
            bus.start_worker(name=f"scale-{workers}-{i}")
        _wait_registered(service.event_store.client, workers)
        idle = _redis_idle_rate(service.event_store.client)
        cpu, redis_cpu = _cpu_times(), _redis_cpu(service.event_store.client)
        calls = _redis_calls(service.event_store.client)
        start = time.perf_counter()
        jobs = [service.heuristic_import(str(p)) for p in paths]
        submitted = time.perf_counter() - start
        done = [service.wait_for_job(j, timeout=600) for j in jobs]
        elapsed = time.perf_counter() - start
        busy, iowait = _cpu_share(cpu, _cpu_times())
        redis_used = _redis_cpu(service.event_store.client) - redis_cpu
        redis_work = max(0.0, redis_used - idle * elapsed)  # what the installs cost it, beyond its idle load
        redis_share = redis_used / elapsed
        calls_after = _redis_calls(service.event_store.client)
        print(f"    {workers} worker{'s' if workers > 1 else ''}: {elapsed:.2f} s, submitting took {submitted:.2f} s; "
              f"CPUs {busy:.0%} busy ({iowait:.0%} iowait), Redis {redis_share:.0%} of one core", flush=True)
        bad = [j for j in done if j.status is not InstallStatus.COMPLETED]
        if bad:
            raise RuntimeError(f"{len(bad)} installs failed: {bad[0].error_type}: {bad[0].error}")
        report_phases(workers, [phases(service.event_store, j.id) for j in done])
        report_calls(calls, calls_after, len(done), redis_work)
        service.record_store.close()
        return MODELS / elapsed
    finally:
        bus.stop()  # SIGTERM: a warm stop
        try:
            next(gen)
        except StopIteration:
            pass
        shutil.rmtree(tmp, ignore_errors=True)  # a round's sources and models: GBs at a large scale
        if PROFILE:
            from tests.bench.profile_report import report
            print(report(Path(PROFILE) / f"w{workers}", "horse", 25), flush=True)


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="modelbus-bench-scaling-"))
    server = EmbeddedRedis.ensure(tmp / "redis-root")
    try:
        print(f"bench_scaling: {MODELS} models of ~{RANK * 6.8 / 1000:.0f} MB installed from local paths, "
              f"on a machine with {os.cpu_count()} CPU cores (more workers than cores cannot scale further)")
        rates = {n: run_round(server.url, n, tmp / uuid.uuid4().hex[:6]) for n in WORKERS}
        base = rates[WORKERS[0]]
        for n, rate in rates.items():
            print(f"  {n} worker{'s' if n > 1 else ' '}: {rate:6.2f} models/s   x{rate / base:.2f} vs 1 worker")
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
