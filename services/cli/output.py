"""Printing: rich tables for people, ``--json`` for programs (one document, or one line per event)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

import orjson

if TYPE_CHECKING:
    from rich.console import Console


class _FirstUse:
    """A rich Console made when first used: ``--json`` output, which never prints through one, starts
    without importing rich (~0.02 s of a command's start-up on the 2-core VM)."""

    def __init__(self, stderr: bool) -> None:
        self._stderr = stderr
        self._console: Console | None = None

    def made(self) -> Console:
        if self._console is None:
            from rich.console import Console
            self._console = Console(stderr=self._stderr)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.made(), name)

    # (special methods are looked up on the class: rich's Live enters its console with ``with``)
    def __enter__(self) -> Console:
        return self.made().__enter__()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.made().__exit__(kind, exc, tb)


console = cast("Console", _FirstUse(stderr=False))
err_console = cast("Console", _FirstUse(stderr=True))


def _plain(value: Any) -> Any:
    """A typed view (a pydantic model: job views, outcomes) as its JSON fields; anything else as text."""
    dump = getattr(value, "model_dump", None)
    return dump(mode="json") if callable(dump) else str(value)


def print_json(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS,
                                  default=_plain).decode() + "\n")
    sys.stdout.flush()


def print_json_line(data: Any) -> None:
    # flushed per line: a pipe reader (jq, a test) sees each event as it comes
    sys.stdout.write(orjson.dumps(data, default=_plain).decode() + "\n")
    sys.stdout.flush()


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    from rich.table import Table
    t = Table(title=title, show_lines=False, header_style="bold")
    for i, column in enumerate(columns):
        # the first column is an id to copy and paste: never broken across lines
        t.add_column(column, overflow="fold", no_wrap=i == 0)
    for row in rows:
        t.add_row(*("" if v is None else str(v) for v in row))
    console.print(t)


def human_bytes(n: float | None) -> str:
    if not n:
        return "0 B"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
