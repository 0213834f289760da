"""``python -m modelbus.workers --queues install,download,hash [--burst] [--concurrency N] [--device cuda:0 ...]``:
one worker process. With a concurrency above 1 it runs that many jobs at once (workers.pool): a download-only
worker does by default (``MODELBUS_DOWNLOAD_CONCURRENCY``, 4), any other runs one job at a time."""

from __future__ import annotations

import argparse
import os
import sys
import time

import redis
from rq.exceptions import StopRequested

from modelbus.events.errors import EventStoreError
from modelbus.events.logs import configure_logging, get_logger
from modelbus.events.store import RedisEventStore
from modelbus.services.config import AppConfig, ConfigError, parse_size
from modelbus.services.install.staging import reclaim
from modelbus.workers import defaults
from modelbus.workers.context import WorkerContext, set_context
from modelbus.workers.runner import Heartbeat, build_worker, parse_queues, worker_name


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m modelbus.workers", description=__doc__)
    parser.add_argument("--queues", default="install,download,hash", help="comma-separated: install,download,hash,gpu")
    parser.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    parser.add_argument("--name", default=None, help="worker id (default: host-pid-random)")
    parser.add_argument("--device", default=None, help="gpu workers: cpu, cuda, cuda:N")
    parser.add_argument("--ram-cache", default=None, help="gpu workers: RAM cache size, e.g. 32G")
    parser.add_argument("--vram-cache", default=None, help="gpu workers: VRAM cache size, e.g. 60G")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="jobs run at once (default: MODELBUS_DOWNLOAD_CONCURRENCY for a download-only worker, else 1)")
    return parser.parse_args(argv)


JOB_MODULES = {"install": "modelbus.workers.install", "download": "modelbus.workers.download", "hash": "modelbus.workers.hash",
               "gpu": "modelbus.workers.gpu"}


def _preload(queues: list[str]) -> None:
    """Import the job modules (and torch with them) once, before forking: each forked job then starts
    warm instead of importing them again.

    Then everything alive is frozen out of the garbage collector (``gc.freeze``): a forked job's full
    collection would otherwise walk every object the worker inherited, touching (and so copying, page
    by page) the memory it shares with its parent, about 80 ms of each job on a small VM, and more
    with every worker forking at once."""
    import gc
    import importlib
    for queue in queues:
        importlib.import_module(JOB_MODULES[queue])
    _build_validators()
    gc.collect()
    gc.freeze()


def _build_validators() -> None:
    """Build the validators of every pydantic model and adapter the job modules imported.

    They are declared with ``defer_build`` (a CLI command builds only what it uses), so unbuilt here
    each forked job would build the ones it touches again and throw them away when it exits: about
    a tenth of a local install's time (the record config classes, the events). Once here, before the
    fork, every job inherits them built."""
    from pydantic import BaseModel, TypeAdapter

    def subclasses(cls: type[BaseModel]) -> list[type[BaseModel]]:
        found = []
        for sub in cls.__subclasses__():
            found += [sub, *subclasses(sub)]
        return found

    for model in dict.fromkeys(subclasses(BaseModel)):
        if model.__module__.startswith("modelbus.") and not model.__pydantic_complete__:
            model.model_rebuild()
    for name, module in list(sys.modules.items()):
        if name.startswith("modelbus.") and module is not None:
            for value in list(vars(module).values()):
                if isinstance(value, TypeAdapter):
                    value.rebuild()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        overrides = {}
        if args.device:
            overrides["device"] = args.device
        if args.ram_cache:
            overrides["ram_cache_size"] = parse_size(args.ram_cache)
        if args.vram_cache:
            overrides["vram_cache_size"] = parse_size(args.vram_cache)
        config = AppConfig.load(**overrides)
        queues = parse_queues(args.queues)
        concurrency = choose_concurrency(args.concurrency, queues, config)
        configure_logging(config.log_format, config.log_level, config.secret_values)
        store = RedisEventStore.from_config(config)
    except (ConfigError, ValueError, EventStoreError) as exc:
        print(f"modelbus worker: {exc}", file=sys.stderr)
        return 2
    _preload(queues)
    if {"install", "hash"} & set(queues):
        _staging_janitor(config, store)
    name = args.name or worker_name("gpu" if "gpu" in queues else "mb")
    if concurrency == 1:
        return run_worker(config, store, queues, name, args.burst)
    from modelbus.workers.pool import Pool, slot_names

    def slot(slot_name: str) -> int:  # in the forked slot: a connection of its own
        assert store.url is not None
        own = RedisEventStore.from_url(store.url, config.namespace, activity_maxlen=store.activity_maxlen,
                                       replicas=store.replicas)
        return run_worker(config, own, queues, slot_name, args.burst)
    get_logger("workers").info("worker_pool_starting", worker=name, queues=queues, concurrency=concurrency)
    return Pool(slot_names(name, concurrency), slot, burst=args.burst).run()


def _staging_janitor(config: AppConfig, store: RedisEventStore) -> None:
    """Reclaim what installs left in staging long ago (services.install.staging), once, as the worker starts."""
    try:
        reclaim(config, store)
    except Exception as exc:  # noqa: BLE001 - the janitor's trouble never keeps a worker from starting
        get_logger("workers").warning("staging_janitor_failed", error=f"{type(exc).__name__}: {exc}")


def choose_concurrency(given: int | None, queues: list[str], config: AppConfig) -> int:
    """``--concurrency``, else the download default for a download-only worker, else 1; a GPU worker runs
    one job at a time (its cache and CUDA live in its own process)."""
    if given is not None and not 1 <= given <= 64:
        raise ValueError(f"--concurrency must be between 1 and 64, got {given}")
    if "gpu" in queues:
        if given not in (None, 1):
            raise ValueError("--concurrency: a gpu worker runs one job at a time (start more gpu workers instead)")
        return 1
    if given is not None:
        return given
    return config.download_concurrency if queues == ["download"] else 1


def run_worker(config: AppConfig, store: RedisEventStore, queues: list[str], name: str, burst: bool) -> int:
    """One RQ worker's life: its context, heartbeat and loop."""
    context = WorkerContext(config=config, store=store, worker_id=name, device=config.device)
    set_context(context)
    state, hits = None, None
    if "gpu" in queues:
        from modelbus.workers.gpu import HitServer, cache_state
        state = cache_state
        hits = HitServer(store.client, store.keys, name)  # loads of what this cache holds, without RQ
        hits.start()
    heartbeat = Heartbeat(store.client, store.keys, name, queues, state=state)
    log = get_logger("workers")
    try:
        serve(store, config.namespace, queues, name, heartbeat, burst=burst, level=config.log_level.upper())
    finally:
        heartbeat.stop()
        if hits is not None:
            hits.stop()
    log.info("worker_stopped", worker=name)
    return 0


def serve(store: RedisEventStore, namespace: str, queues: list[str], name: str, heartbeat: Heartbeat,
          burst: bool, level: str) -> None:
    """Run RQ's work loop until asked to stop (or, in burst mode, until the queues are empty), riding out
    Redis outages of any length: RQ's loop ends on a lost connection, so the worker waits for Redis with
    a doubling backoff and starts the loop again under the same name."""
    log = get_logger("workers")
    backoff = defaults.REDIS_BACKOFF_START
    try:
        while True:
            try:
                _forget_registration(store.client, name)
                worker = build_worker(store.client, namespace, queues, name=name)
                heartbeat.worker = worker
                heartbeat.beat()
                if not heartbeat.is_alive():
                    heartbeat.start()
                log.info("worker_started", worker=name, queues=queues, pid=os.getpid(), redis=store.url)
                worker.work(burst=burst, logging_level=level, with_scheduler=False)
                if burst or worker._stop_requested or worker._shutdown_requested_date is not None:
                    return
                log.warning("worker_loop_ended", worker=name, reason="RQ's loop ended without a stop request")
            except redis.RedisError as exc:
                log.warning("worker_lost_redis", worker=name, error=str(exc), retry_in=backoff)
            if _wait_for_redis(store.client, backoff):
                backoff = defaults.REDIS_BACKOFF_START
            else:
                backoff = min(defaults.REDIS_BACKOFF_MAX, backoff * 2)
    except StopRequested:  # SIGTERM while waiting for Redis
        log.info("worker_stop_requested", worker=name)


def _wait_for_redis(client: redis.Redis, delay: float) -> bool:
    """Sleep ``delay`` s, then whether Redis answers."""
    time.sleep(delay)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def _forget_registration(client: redis.Redis, name: str) -> None:
    """Our own RQ registration left by a loop that ended without unregistering (Redis was away): RQ refuses
    to register a name that is still registered. Only this process uses this name."""
    from rq import Worker
    client.delete(f"{Worker.redis_worker_namespace_prefix}{name}")


if __name__ == "__main__":
    sys.exit(main())
