"""What the console script's start-up pays for its imports."""

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def imports_uncollected() -> Iterator[None]:
    """Imports with the cyclic gc off, and what they made frozen after them (``gc.freeze``: never scanned
    again, by a later collection or the one at exit), then the gc back on if it was. Imports make objects
    that live as long as the process (modules, classes, pydantic's field records), so the collections
    they would trigger, and the collection at exit, find nothing to free: a reading command's start-up
    takes ~0.1 s less CPU with it on the 2-core VM (`tests/bench/bench_cli.py`)."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_on:
            gc.enable()
