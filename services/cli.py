"""The ``modelbus`` command line."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from events.errors import EventStoreError
from events.logs import configure_logging
from services.config import AppConfig, ConfigError

app = typer.Typer(help="modelbus: an event-sourced model manager on Redis streams and RQ workers.",
                  no_args_is_help=True, pretty_exceptions_enable=False)


def _config() -> AppConfig:
    try:
        return AppConfig.load()
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


@app.command()
def up(workers: Annotated[str, typer.Option(help="worker processes, ';'-separated queue lists")] =
       "install;download;hash;gpu",
       api: Annotated[bool, typer.Option(help="serve the HTTP API")] = True) -> None:
    """Start the whole stack in the foreground: Redis (embedded unless MODELBUS_REDIS_URL), workers, API."""
    from services.stack import Stack
    config = _config()
    configure_logging(config.log_format, config.log_level)
    stack = Stack(config, worker_queues=[w for w in workers.split(";") if w], with_api=api)
    try:
        stack.start()
    except EventStoreError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo("modelbus is up (Ctrl-C stops it)")
    for line in stack.describe():
        typer.echo("  " + line)
    raise typer.Exit(stack.wait())


@app.command()
def worker(queues: Annotated[str, typer.Option(help="install,download,hash,gpu")] = "install,download,hash",
           burst: bool = False, device: str | None = None, ram_cache: str | None = None,
           vram_cache: str | None = None, name: str | None = None) -> None:
    """Run one worker process on the given queues."""
    args = [sys.executable, "-m", "workers", "--queues", queues]
    for flag, value in (("--device", device), ("--ram-cache", ram_cache), ("--vram-cache", vram_cache),
                        ("--name", name)):
        if value:
            args += [flag, value]
    if burst:
        args.append("--burst")
    os.execv(sys.executable, args)


if __name__ == "__main__":
    app()
