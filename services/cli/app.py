"""The ``modelbus`` command line (typer + rich). Every command is a thin layer over ModelBusClient;
every failure is one line on stderr and an exit code (see services.cli.errors), unless --debug."""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from collections.abc import Callable
from typing import Annotated, Any

import typer
from typer._click.core import Context
from typer._click.exceptions import TyperException
from typer.core import TyperGroup

from modelbus.events.logs import configure_logging, configure_logging_later
from modelbus.services.cli.context import state
from modelbus.services.cli.startup import imports_uncollected

#: every command: its name, and the module of services.cli and the function that implement it
COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("app", "up"), "worker": ("app", "worker"),
    "install": ("jobs", "install"), "cancel": ("jobs", "cancel"), "scan": ("jobs", "scan"), "sync": ("jobs", "sync"),
    "list": ("models", "list_models"), "show": ("models", "show"), "rm": ("models", "rm"),
    "rename": ("models", "rename"), "update": ("models", "update"), "history": ("models", "history"),
    "load": ("models", "load"), "unload": ("models", "unload"),
    "workers": ("ops", "workers"), "doctor": ("ops", "doctor"), "import-yaml": ("ops", "import_yaml"),
    "verify": ("lifecycle", "verify"), "prune": ("lifecycle", "prune"), "ls-remote": ("lifecycle", "ls_remote"),
    "settings": ("modeldata", "settings"), "link": ("modeldata", "link"), "unlink": ("modeldata", "unlink"),
    "links": ("modeldata", "links"), "starters": ("modeldata", "starters"), "convert": ("modeldata", "convert"),
}


class Group:
    """A command group: its help, the callback that runs without a subcommand (or none), its commands."""

    def __init__(self, help: str, callback: tuple[str, str] | None, commands: dict[str, tuple[str, str]]) -> None:
        self.help, self.callback, self.commands = help, callback, commands

    def typer(self) -> typer.Typer:
        group = typer.Typer(help=self.help, no_args_is_help=self.callback is None)
        if self.callback is not None:
            group.callback(invoke_without_command=True)(_function(*self.callback))
        for name, where in self.commands.items():
            group.command(name)(_function(*where))
        return group


GROUPS: dict[str, Group] = {
    "events": Group("Print events (with --follow: as they happen); `events quarantine`: the refused ones.",
                    ("ops", "events"), {"quarantine": ("ops", "quarantine")}),
    "records": Group("The record projection.", None, {"rebuild": ("ops", "records_rebuild")}),
    "store": Group("The model store (MODELBUS_STORE_URL).", None,
                   {"push": ("store", "push"), "verify": ("store", "verify"), "gc": ("store", "gc")}),
    "jobs": Group("List install jobs; `jobs pause|resume|restart JOB` controls one.", ("jobs", "jobs"),
                  {"pause": ("lifecycle", "pause"), "resume": ("lifecycle", "resume"),
                   "restart": ("lifecycle", "restart")}),
    "cover": Group("A model's cover image: set, get, rm.", None,
                   {"set": ("modeldata", "cover_set"), "get": ("modeldata", "cover_get"),
                    "rm": ("modeldata", "cover_rm")}),
}


def _function(module: str, name: str) -> Callable[..., Any]:
    return getattr(importlib.import_module(f"modelbus.services.cli.{module}"), name)  # type: ignore[no-any-return]


def named_command(argv: list[str]) -> str | None:
    """The command a command line names (its first word after the global ``--debug``), or None: no
    command, another global option (``--help``, completion), or a completion request."""
    if any(k.endswith("_COMPLETE") for k in os.environ):
        return None
    for word in argv:
        if word != "--debug":
            return None if word.startswith("-") else word
    return None


class ModelBusGroup(TyperGroup):
    """Turns any exception escaping a command into one readable line and an exit code."""

    def invoke(self, ctx: Context) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, TyperException):  # typer's own: usage errors, exits
            raise
        except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - the CLI's one error boundary
            from modelbus.services.cli.errors import exit_code, one_line
            if state.debug:
                traceback.print_exc()
            else:
                from modelbus.services.cli.output import err_console
                err_console.print(f"[red]error:[/] {one_line(exc)}", highlight=False, markup=True,
                                  soft_wrap=True)
            raise typer.Exit(exit_code(exc)) from None
        finally:
            state.close()


HELP = "modelbus: an event-sourced model manager on Redis streams and RQ workers."


def main(debug: Annotated[bool, typer.Option("--debug", help="show tracebacks and debug logs")] = False) -> None:
    state.debug = debug or bool(os.environ.get("MODELBUS_DEBUG"))
    # logs go to stderr; a command's output is stdout; structlog comes with the first log line
    configure_logging_later(os.environ.get("MODELBUS_LOG_FORMAT", "console"), "DEBUG" if state.debug else "WARNING")


def _typer() -> typer.Typer:
    cli = typer.Typer(cls=ModelBusGroup, no_args_is_help=True, pretty_exceptions_enable=False, help=HELP)
    cli.callback()(main)
    return cli


class CommandLine(typer.Typer):
    """The ``modelbus`` app. Run as the console script it imports and builds only the command its command
    line names (``modelbus list`` never imports what ``install`` or ``convert`` need, nor builds their
    options); as a typer app (``typer.testing.CliRunner``, ``--help``, an unknown command) it is every
    command, imported on first use."""

    def __init__(self) -> None:
        self._everything: typer.Typer | None = None
        super().__init__(cls=ModelBusGroup, no_args_is_help=True, pretty_exceptions_enable=False, help=HELP)
        self.callback()(main)

    def _all(self) -> typer.Typer:
        if self._everything is None:
            self._everything = _typer()
            for name, where in COMMANDS.items():
                self._everything.command(name)(_function(*where))
            for name, group in GROUPS.items():
                self._everything.add_typer(group.typer(), name=name)
        return self._everything

    # typer reads these when it builds the click command: the complete app's (Typer.__init__ sets them)
    @property  # type: ignore[override]
    def registered_commands(self) -> list[Any]:
        return self._all().registered_commands

    @registered_commands.setter
    def registered_commands(self, value: list[Any]) -> None:
        pass

    @property  # type: ignore[override]
    def registered_groups(self) -> list[Any]:
        return self._all().registered_groups

    @registered_groups.setter
    def registered_groups(self, value: list[Any]) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        name = named_command(sys.argv[1:]) if not args and "args" not in kwargs else None
        if name in COMMANDS or name in GROUPS:
            with imports_uncollected():  # the command's own imports
                only = _typer()
                if name in COMMANDS:
                    only.command(name)(_function(*COMMANDS[str(name)]))
                else:
                    only.add_typer(GROUPS[str(name)].typer(), name=name)
            return only(*args, **kwargs)
        return super().__call__(*args, **kwargs)


app = CommandLine()


StoreOption = Annotated[str | None, typer.Option(help="MODELBUS_STORE_URL for this run: shared or s3://bucket/prefix")]


def _use_store(url: str | None) -> None:
    """``--store``: the same setting as MODELBUS_STORE_URL, for this process and the workers it starts."""
    if url is not None:
        from modelbus.services.store import parse_store_url
        os.environ["MODELBUS_STORE_URL"] = parse_store_url(url).url  # a bad URL: StoreConfigError, exit 2


def up(workers: Annotated[str, typer.Option(help="worker processes, ';'-separated queue lists")] =
       "install;download;hash;gpu",
       api: Annotated[bool, typer.Option(help="serve the HTTP API")] = True,
       store: StoreOption = None) -> None:
    """Start the whole stack in the foreground: Redis (embedded unless MODELBUS_REDIS_URL), workers, API."""
    from modelbus.events.errors import EventStoreError
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
