"""What the console script's start-up pays for its imports."""

import gc
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def started_as_the_cli() -> bool:
    """Whether this process is the CLI: its console script, or ``python -m modelbus.services.cli`` (whose
    package Python imports with ``sys.argv[0] == "-m"``), not a program that imports it (a test, typer's
    runner), whose objects are not ours to freeze."""
    return Path(sys.argv[0]).name == "modelbus" or sys.argv[0] == "-m"


@contextmanager
def imports_uncollected(freeze: bool = True) -> Iterator[None]:
    """Imports with the cyclic gc off, then (``freeze``) what they made frozen (``gc.freeze``: never
    scanned again, by a later collection or the one at exit), and the gc back on if it was. Imports make
    objects that live as long as the process (modules, classes, pydantic's field records), so the
    collections they would trigger, and the collection at exit, find nothing to free: a reading
    command's start-up takes ~0.03 s less CPU with it on the 2-core VM (`tests/bench/bench_cli.py`)."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if freeze:
            gc.freeze()
        if was_on:
            gc.enable()
