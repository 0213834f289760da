"""``modelbus doctor``: is this installation fit to run? Each check says ok, warn or fail and why.

Redis (reachable, persistence on, eviction off), workers per queue, disk space, the staging folder (what the janitor
of ``prune`` would reclaim), the model store, GPU. A failing check
makes the exit code 1; warnings do not.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import redis

from modelbus.events.connection import redact
from modelbus.events.keys import QUEUES
from modelbus.services.client import ModelBusClient
from modelbus.services.config import AppConfig
from modelbus.services.store import StoreError, open_store

Status = Literal["ok", "warn", "fail"]
LOW_DISK_BYTES = 10 << 30  # models are gigabytes: less than this free is a warning


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def check_redis(client: ModelBusClient) -> Iterator[Check]:
    try:
        started = time.perf_counter()
        conn = client.redis
        info = conn.info()
    except Exception as exc:  # noqa: BLE001 - whatever stops us reaching Redis is the finding
        yield Check("redis", "fail", f"unreachable: {' '.join(str(exc).split())}")
        return
    latency = (time.perf_counter() - started) * 1000
    url = redact(client.store.url or "?")
    yield Check("redis", "ok", f"{url} (Redis {info.get('redis_version')}, {latency:.1f} ms, "
                               f"namespace {client.config.namespace})")
    try:
        persistence = conn.info("persistence")
        policy = _text(conn.config_get("maxmemory-policy").get("maxmemory-policy", "?"))
    except redis.ResponseError:
        yield Check("redis config", "warn", "CONFIG is disabled: cannot check persistence and eviction")
        return
    if int(persistence.get("aof_enabled", 0)):
        yield Check("persistence", "ok", "AOF on")
    elif persistence.get("rdb_last_save_time"):
        yield Check("persistence", "warn", "AOF off (RDB snapshots only): events since the last snapshot "
                                           "are lost on a crash; set appendonly yes")
    else:
        yield Check("persistence", "fail", "no persistence: the event log is lost on restart")
    if policy == "noeviction":
        yield Check("eviction", "ok", "maxmemory-policy noeviction")
    else:
        yield Check("eviction", "fail", f"maxmemory-policy {policy} can evict the event log; set noeviction")


def check_workers(client: ModelBusClient) -> Iterator[Check]:
    try:
        workers = client.workers()
        lengths = client.queue_lengths()
    except Exception as exc:  # noqa: BLE001 - reported as the finding
        yield Check("workers", "fail", f"cannot read worker heartbeats: {exc}")
        return
    for queue in QUEUES:
        serving = [w.id for w in workers if queue in w.queues]
        waiting = lengths.get(queue, 0)
        if serving:
            yield Check(f"queue {queue}", "ok", f"{len(serving)} worker(s), {waiting} job(s) waiting")
        else:
            yield Check(f"queue {queue}", "warn", f"no live worker, {waiting} job(s) waiting "
                                                  f"(start one: modelbus worker --queues {queue})")


def check_quarantine(client: ModelBusClient) -> Iterator[Check]:
    """Entries of the log every reader refused: the system runs on without them, an operator looks."""
    count = client.quarantine_count()
    if count:
        yield Check("event log", "warn", f"{count} entr{'y' if count == 1 else 'ies'} quarantined (refused by "
                                         "every reader, never applied): modelbus events quarantine")
    else:
        yield Check("event log", "ok", "no quarantined entries")


def check_disk(config: AppConfig) -> Iterator[Check]:
    target = config.models_path if config.models_path.exists() else config.root
    while not target.exists() and target != target.parent:
        target = target.parent
    usage = shutil.disk_usage(target)
    free_gib = usage.free / (1 << 30)
    status: Status = "ok" if usage.free >= LOW_DISK_BYTES else "warn"
    yield Check("disk", status, f"{free_gib:.1f} GiB free at {target}")


def check_staging(client: ModelBusClient) -> Iterator[Check]:
    """This host's staging folder: folders, bytes, the oldest; a warning when some are reclaimable."""
    # (the install service: only this command of the CLI needs it)
    from modelbus.services.cli.lifecycle import staging_line
    from modelbus.services.install.staging import figures, survey
    report = figures(client.config, survey(client.config, client.store))
    line = staging_line(report.as_dict(), dry_run=True)
    if report.reclaimable:
        yield Check("staging", "warn", line + ": modelbus prune removes them")
    else:
        yield Check("staging", "ok", line)


def check_store(config: AppConfig) -> Iterator[Check]:
    """The model store answers and lets us in (nothing to check for the shared models directory)."""
    try:
        store = open_store(config)
        if store is None:
            yield Check("store", "ok", f"shared models directory {config.models_path}")
            return
        store.check()
    except StoreError as exc:
        yield Check("store", "fail", str(exc))
        return
    yield Check("store", "ok", f"{store.url} reachable; host cache {config.cache_path} "
                               f"(limit {config.cache_size / (1 << 30):.0f} GiB)")


def check_gpu(config: AppConfig) -> Iterator[Check]:
    try:
        import torch
    except ImportError:
        yield Check("gpu", "fail", "torch is not installed")
        return
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        yield Check("gpu", "ok", f"CUDA {torch.version.cuda}: " + ", ".join(names))
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        yield Check("gpu", "ok", "Apple MPS")
    else:
        status: Status = "fail" if config.device.startswith("cuda") else "warn"
        yield Check("gpu", status, f"no GPU: models load on the CPU (device setting: {config.device})")


def run_checks(client: ModelBusClient) -> list[Check]:
    checks: list[Check] = [Check("config", "ok", f"root {client.config.root}, models {client.config.models_path}")]
    steps: list[Callable[[], Iterator[Check]]] = [
        lambda: check_redis(client), lambda: check_quarantine(client), lambda: check_workers(client),
        lambda: check_disk(client.config), lambda: check_staging(client), lambda: check_store(client.config),
        lambda: check_gpu(client.config)]
    for step in steps:
        checks.extend(step())
        if checks[-1].name == "redis" and checks[-1].status == "fail":
            checks.extend(check_disk(client.config))
            checks.extend(check_gpu(client.config))
            break
    return checks
