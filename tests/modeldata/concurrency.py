"""Running writers at once in threads, for the race tests."""

from __future__ import annotations

import threading
from collections.abc import Callable


def run_at_once(write: Callable[[int], object], count: int) -> list[BaseException]:
    """``write(0) ... write(count - 1)``, each in its own thread; the errors they raised."""
    errors: list[BaseException] = []

    def run(n: int) -> None:
        try:
            write(n)
        except BaseException as exc:  # noqa: BLE001 - returned to the test
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors
