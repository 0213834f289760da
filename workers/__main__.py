"""``python -m workers --queues install,download,hash [--burst] [--device cuda:0 ...]``: one worker process."""

from __future__ import annotations

import argparse
import os
import sys

import structlog

from events.errors import EventStoreError
from events.logs import configure_logging
from events.store import RedisEventStore
from services.config import AppConfig, ConfigError, parse_size
from workers.context import WorkerContext, set_context
from workers.runner import Heartbeat, build_worker, parse_queues, worker_name


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m workers", description=__doc__)
    parser.add_argument("--queues", default="install,download,hash", help="comma-separated: install,download,hash,gpu")
    parser.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    parser.add_argument("--name", default=None, help="worker id (default: host-pid-random)")
    parser.add_argument("--device", default=None, help="gpu workers: cpu, cuda, cuda:N")
    parser.add_argument("--ram-cache", default=None, help="gpu workers: RAM cache size, e.g. 32G")
    parser.add_argument("--vram-cache", default=None, help="gpu workers: VRAM cache size, e.g. 60G")
    return parser.parse_args(argv)


JOB_MODULES = {"install": "workers.install", "download": "workers.download", "hash": "workers.hash",
               "gpu": "workers.gpu"}


def _preload(queues: list[str]) -> None:
    """Import the job modules (and torch with them) once, before forking: each forked job then starts
    warm instead of importing them again."""
    import importlib
    for queue in queues:
        importlib.import_module(JOB_MODULES[queue])


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
        configure_logging(config.log_format, config.log_level, config.secret_values)
        store = RedisEventStore.from_config(config)
    except (ConfigError, ValueError, EventStoreError) as exc:
        print(f"modelbus worker: {exc}", file=sys.stderr)
        return 2
    _preload(queues)
    name = args.name or worker_name("gpu" if "gpu" in queues else "mb")
    context = WorkerContext(config=config, store=store, worker_id=name, device=config.device)
    set_context(context)
    worker = build_worker(store.client, config.namespace, queues, name=name)
    state = None
    if "gpu" in queues:
        from workers.gpu import cache_state
        state = cache_state
    heartbeat = Heartbeat(store.client, store.keys, name, queues, state=state, worker=worker)
    heartbeat.beat()
    heartbeat.start()
    log = structlog.get_logger("workers")
    log.info("worker_started", worker=name, queues=queues, pid=os.getpid(), redis=store.url)
    try:
        worker.work(burst=args.burst, logging_level=config.log_level.upper(), with_scheduler=False)
    finally:
        heartbeat.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
