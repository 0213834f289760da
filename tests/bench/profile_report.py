"""Sum the profiles written under ``MODELBUS_BENCH_PROFILE`` (tests/bench/profile_hook) and print where
the job processes' time went: ``python tests/bench/profile_report.py DIR [kind] [lines]``."""

from __future__ import annotations

import io
import pstats
import sys
from pathlib import Path


def report(folder: Path, kind: str = "horse", lines: int = 30) -> str:
    out = io.StringIO()
    stats: pstats.Stats | None = None
    files = 0
    for f in sorted(folder.glob(f"{kind}-*.prof")):
        try:
            one = pstats.Stats(str(f), stream=out)
        except (TypeError, EOFError, ValueError):
            continue  # a process that ran nothing under the profiler (or died writing it)
        files += 1
        if stats is None:
            stats = one
        else:
            stats.add(one)
    if stats is None:
        return f"no {kind} profiles under {folder}"
    stats.files = []  # (no header line per profile file)
    stats.strip_dirs()
    print(f"{files} {kind} processes, {stats.total_tt:.2f} s in all (wall clock, summed)", file=out)
    stats.sort_stats("cumulative").print_stats(lines)
    stats.sort_stats("tottime").print_stats(lines)
    return out.getvalue()


if __name__ == "__main__":
    args = sys.argv[1:]
    print(report(Path(args[0]), *(args[1:2] or ["horse"]), *([int(args[2])] if len(args) > 2 else [])))
