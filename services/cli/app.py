"""The ``modelbus`` command line (typer + rich). Every command is a thin layer over ModelBusClient;
every failure is one line on stderr and an exit code (see services.cli.errors), unless --debug."""

from __future__ import annotations

import os
import sys
import traceback
from typing import Annotated, Any

import typer
from typer._click.core import Context
from typer._click.exceptions import TyperException
from typer.core import TyperGroup

from modelbus.events.errors import EventStoreError
from modelbus.events.logs import configure_logging
from modelbus.services.cli import jobs, lifecycle, modeldata, models, ops
from modelbus.services.cli import store as store_commands
from modelbus.services.cli.context import state
from modelbus.services.cli.errors import exit_code, one_line
from modelbus.services.cli.output import err_console
from modelbus.services.store import parse_store_url


class ModelBusGroup(TyperGroup):
    """Turns any exception escaping a command into one readable line and an exit code."""

    def invoke(self, ctx: Context) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, TyperException):  # typer's own: usage errors, exits
            raise
        except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - the CLI's one error boundary
            if state.debug:
                traceback.print_exc()
            else:
                err_console.print(f"[red]error:[/] {one_line(exc)}", highlight=False, markup=True,
                                  soft_wrap=True)
            raise typer.Exit(exit_code(exc)) from None
        finally:
            state.close()


app = typer.Typer(cls=ModelBusGroup, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="modelbus: an event-sourced model manager on Redis streams and RQ workers.")


@app.callback()
def main(debug: Annotated[bool, typer.Option("--debug", help="show tracebacks and debug logs")] = False) -> None:
    state.debug = debug or bool(os.environ.get("MODELBUS_DEBUG"))
    # logs go to stderr; a command's output is stdout
    configure_logging(os.environ.get("MODELBUS_LOG_FORMAT", "console"), "DEBUG" if state.debug else "WARNING")


StoreOption = Annotated[str | None, typer.Option(help="MODELBUS_STORE_URL for this run: shared or s3://bucket/prefix")]


def _use_store(url: str | None) -> None:
    """``--store``: the same setting as MODELBUS_STORE_URL, for this process and the workers it starts."""
    if url is not None:
        os.environ["MODELBUS_STORE_URL"] = parse_store_url(url).url  # a bad URL: StoreConfigError, exit 2


@app.command()
def up(workers: Annotated[str, typer.Option(help="worker processes, ';'-separated queue lists")] =
       "install;download;hash;gpu",
       api: Annotated[bool, typer.Option(help="serve the HTTP API")] = True,
       store: StoreOption = None) -> None:
    """Start the whole stack in the foreground: Redis (embedded unless MODELBUS_REDIS_URL), workers, API."""
    from modelbus.services.stack import Stack
    _use_store(store)
    config = state.config()
    configure_logging(config.log_format, config.log_level, config.secret_values)
    stack = Stack(config, worker_queues=[w for w in workers.split(";") if w], with_api=api)
    try:
        stack.start()
    except EventStoreError:  # Redis missing or unfit: exit code 5 by its kind
        stack.stop()
        raise
    typer.echo("modelbus is up (Ctrl-C stops it)")
    for line in stack.describe():
        typer.echo("  " + line)
    sys.stdout.flush()
    raise typer.Exit(stack.wait())


@app.command()
def worker(queues: Annotated[str, typer.Option(help="install,download,hash,gpu")] = "install,download,hash",
           burst: bool = False, device: str | None = None, ram_cache: str | None = None,
           vram_cache: str | None = None, name: str | None = None, store: StoreOption = None,
           concurrency: Annotated[int | None, typer.Option(help="jobs at once (download-only: 4)")] = None) -> None:
    """Run one worker process on the given queues."""
    _use_store(store)
    args = [sys.executable, "-m", "modelbus.workers", "--queues", queues]
    if concurrency is not None:
        args += ["--concurrency", str(concurrency)]
    for flag, value in (("--device", device), ("--ram-cache", ram_cache), ("--vram-cache", vram_cache),
                        ("--name", name)):
        if value:
            args += [flag, value]
    if burst:
        args.append("--burst")
    os.execv(sys.executable, args)


app.command("install")(jobs.install)
app.command("cancel")(jobs.cancel)
app.command("scan")(jobs.scan)
app.command("sync")(jobs.sync)
app.command("list")(models.list_models)
app.command("show")(models.show)
app.command("rm")(models.rm)
app.command("rename")(models.rename)
app.command("update")(models.update)
app.command("history")(models.history)
app.command("load")(models.load)
app.command("unload")(models.unload)
app.command("workers")(ops.workers)
app.command("doctor")(ops.doctor)
app.command("import-yaml")(ops.import_yaml)

events = typer.Typer(help="Print events (with --follow: as they happen); `events quarantine`: the refused ones.")
events.callback(invoke_without_command=True)(ops.events)
events.command("quarantine")(ops.quarantine)
app.add_typer(events, name="events")

records = typer.Typer(help="The record projection.", no_args_is_help=True)
records.command("rebuild")(ops.records_rebuild)
app.add_typer(records, name="records")

store = typer.Typer(help="The model store (MODELBUS_STORE_URL).", no_args_is_help=True)
store.command("push")(store_commands.push)
store.command("verify")(store_commands.verify)
store.command("gc")(store_commands.gc)
app.add_typer(store, name="store")

jobs_group = typer.Typer(help="List install jobs; `jobs pause|resume|restart JOB` controls one.")
jobs_group.callback(invoke_without_command=True)(jobs.jobs)
jobs_group.command("pause")(lifecycle.pause)
jobs_group.command("resume")(lifecycle.resume)
jobs_group.command("restart")(lifecycle.restart)
app.add_typer(jobs_group, name="jobs")
app.command("verify")(lifecycle.verify)
app.command("prune")(lifecycle.prune)
app.command("ls-remote")(lifecycle.ls_remote)
app.command("settings")(modeldata.settings)
app.command("link")(modeldata.link)
app.command("unlink")(modeldata.unlink)
app.command("links")(modeldata.links)
app.command("starters")(modeldata.starters)
app.command("convert")(modeldata.convert)
cover = typer.Typer(help="A model's cover image: set, get, rm.", no_args_is_help=True)
cover.command("set")(modeldata.cover_set)
cover.command("get")(modeldata.cover_get)
cover.command("rm")(modeldata.cover_rm)
app.add_typer(cover, name="cover")
