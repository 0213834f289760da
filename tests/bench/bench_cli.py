"""Start-up time of the ``modelbus`` commands, against interpreters measured in the same run.

    modelbus list / show / jobs / workers / events (goal <= 0.4 s each)
        vs ``python -c pass`` (the floor) and ``python -c "import torch"`` (what a command paid before),
        and the libraries every command needs, imported alone (redis, structlog, pydantic-settings, typer,
        rich): the floor of any CLI built on them

Each command runs as a fresh process against a private Redis holding a few models, so the figure is
everything a user waits for: interpreter, imports, the Redis connection, the projection's catch-up and
the printing. Rounds alternate the order of the commands; the medians are printed.
``.venv/bin/python tests/bench/bench_cli.py``; MODELBUS_BENCH_SCALE multiplies the rounds.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from modelbus.events.logs import configure_logging
from modelbus.events.schema import ModelAdded
from modelbus.events.store import RedisEventStore
from modelbus.services.config import AppConfig
from tests.bench.common import bench_redis, ratio_line, scale

REPO = Path(__file__).resolve().parents[2]
MODELS = 20
GOAL_SECONDS = 0.4
LIBRARIES = "import redis, structlog, pydantic_settings, typer, rich.table, orjson"


def _seed(url: str, namespace: str, root: Path) -> str:
    config = AppConfig.load(root=root, redis_url=url, namespace=namespace, log_level="WARNING")
    store = RedisEventStore.from_config(config)
    for i in range(MODELS):
        key = f"{i:032x}"
        store.append([ModelAdded(aggregate_id=key, config={
            "key": key, "hash": key, "name": f"model-{i:02d}", "model_type": "lora", "model_format": "lycoris",
            "base_model": "sd-1", "path": f"loras/m{i}.safetensors"})], expected_version=0)
    return f"{0:032x}"


def _seconds(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, timeout=120, check=False)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.decode()[-400:]}")
    return elapsed


def main() -> int:
    configure_logging("console", "WARNING")
    rounds = scale(5)
    with bench_redis() as url:
        root = Path(tempfile.mkdtemp(prefix="modelbus-bench-cli-"))
        (root / "models").mkdir()
        namespace = f"bench-{uuid.uuid4().hex[:8]}"
        key = _seed(url, namespace, root)
        env = {**os.environ, "MODELBUS_REDIS_URL": url, "MODELBUS_NAMESPACE": namespace, "MODELBUS_ROOT": str(root),
               "PYTHONPATH": str(REPO)}
        cli = [sys.executable, "-m", "modelbus.services.cli"]
        runs: dict[str, list[str]] = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "python -c 'import torch'": [sys.executable, "-c", "import torch"],
            "libraries": [sys.executable, "-c", LIBRARIES],
            "modelbus list": [*cli, "list"], "modelbus show": [*cli, "show", key], "modelbus jobs": [*cli, "jobs"],
            "modelbus workers": [*cli, "workers"], "modelbus events": [*cli, "events", "--count", "5"],
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        for i in range(rounds):
            names = list(runs) if i % 2 == 0 else list(reversed(runs))
            for name in names:
                times[name].append(_seconds(runs[name], env))
    medians = {name: statistics.median(t) for name, t in times.items()}
    floor, torch = medians.pop("python -c pass"), medians.pop("python -c 'import torch'")
    libraries = medians.pop("libraries")
    print(f"  (medians of {rounds} runs: python -c pass {floor:.3f} s, import torch {torch:.3f} s, "
          f"the libraries alone ({LIBRARIES[7:]}) {libraries:.3f} s)", flush=True)
    for name, seconds in medians.items():
        ratio_line(f"{name} start-up (vs import torch)", seconds, torch, "s", higher_is_better=False)
        print(f"  {name}: {seconds:.3f} s = {seconds / libraries:.2f}x the libraries alone, "
              f"{seconds - libraries:+.3f} s of our own (goal <= {GOAL_SECONDS} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
