"""Helpers shared by the benchmarks: a private Redis, timing, and the ratio line every bench prints."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def bench_redis() -> Iterator[str]:
    """MODELBUS_BENCH_REDIS_URL, or a private embedded Redis for the run."""
    url = os.environ.get("MODELBUS_BENCH_REDIS_URL")
    if url:
        yield url
        return
    from modelbus.events.embedded import EmbeddedRedis
    server = EmbeddedRedis.ensure(Path(tempfile.mkdtemp(prefix="modelbus-bench-")))
    try:
        yield server.url
    finally:
        server.stop()


def rate(n: int, fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def paired_rates(counts: tuple[int, int], ours: Callable[[int], None], baseline: Callable[[int], None],
                 rounds: int = 5) -> tuple[float, float]:
    """Median rates of ``ours`` and ``baseline`` timed in alternating rounds (round ``i`` of each does
    ``counts`` items): on a shared machine the load drifts over seconds, and alternation lets both
    sides meet the same drift instead of one side getting a quiet minute and the other a busy one."""
    mine, theirs = [], []
    for i in range(rounds):
        mine.append(rate(counts[0], lambda i=i: ours(i)))  # type: ignore[misc]
        theirs.append(rate(counts[1], lambda i=i: baseline(i)))  # type: ignore[misc]
    return statistics.median(mine), statistics.median(theirs)


def ratio_line(name: str, ours: float, baseline: float, unit: str, goal: str = "", higher_is_better: bool = True) -> str:
    r = ours / baseline if higher_is_better else baseline / ours
    line = f"{name:<48} ours {ours:>12.1f} {unit:<8} baseline {baseline:>12.1f} {unit:<8} ratio {r:5.2f}x"
    if goal:
        line += f"  (goal {goal})"
    print(line, flush=True)
    return line


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return statistics.median(ordered), p99


def scale(default: int) -> int:
    """MODELBUS_BENCH_SCALE multiplies every count (e.g. 10 for a long run)."""
    return max(1, int(default * float(os.environ.get("MODELBUS_BENCH_SCALE", "1"))))


def held_bytes(model: Any) -> int:
    """Bytes of the distinct memory a torch module's parameters and buffers lie in (a shared buffer once)."""
    from itertools import chain

    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in chain(model.parameters(), model.buffers())}
    return sum(storages.values())


def emit(res: dict[str, Any], out: Path | None) -> None:
    """The RESULT line on stdout, and appended to ``out`` when given."""
    import json

    print("RESULT " + json.dumps(res), flush=True)
    if out:
        with open(out, "a") as fh:
            fh.write(json.dumps(res) + "\n")


def sync(device: Any) -> None:
    """Wait for a CUDA device's queued work (timings of GPU code); nothing elsewhere."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def median_forward(model: Any, feed: dict[str, Any], device: Any, repeat: int) -> float:
    """Median seconds of ``model(**feed)`` over ``repeat`` runs after one warm-up (kernels, allocator)."""
    import torch

    times = []
    with torch.no_grad():
        model(**feed)
        sync(device)
        for _ in range(repeat):
            start = time.perf_counter()
            model(**feed)
            sync(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times)
