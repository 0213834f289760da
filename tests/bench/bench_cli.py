"""Start-up time of the ``modelbus`` commands, against interpreters measured in the same run.

    modelbus list / show / jobs / workers / events (goal <= 0.4 s each)
        vs ``python -c pass`` (the floor) and ``python -c "import torch"`` (what a command paid before),
        and the libraries every reading command needs, imported alone (redis, pydantic's models, typer,
        rich, orjson; structlog comes with the first log line, which these commands do not write): the floor
        of any CLI built on them; and those with pydantic-settings, which the configuration used before

Each command runs as a fresh process against a private Redis holding a few models, so the figure is
everything a user waits for: interpreter, imports, the Redis connection, the projection's catch-up and
the printing. Each is timed twice: wall time, and the CPU time (user + system) of the process, which a
busy machine (the 2-core dev VM, shared) inflates far less. An untimed round runs first and writes
the bytecode of every module (into a private PYTHONPYCACHEPREFIX, even where the shell exports
PYTHONDONTWRITEBYTECODE): a timed run reads .pyc files, as an installed modelbus does, and compiles
no source. Rounds alternate the order of the commands; the medians are printed.

``MODELBUS_BENCH_CLI_BEFORE=<git rev>`` also times the same commands of that revision's code (exported
with ``git archive``) in the same rounds, and prints each command's ratio against it.
``.venv/bin/python tests/bench/bench_cli.py``; MODELBUS_BENCH_SCALE multiplies the rounds.
"""

from __future__ import annotations

import os
import resource
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
#: (pydantic's models, not its package alone: ``import pydantic`` imports its model machinery on first use)
LIBRARIES = "import redis, typer, rich.table, orjson; from pydantic import BaseModel, Field, TypeAdapter"
WITH_SETTINGS = LIBRARIES + "; import pydantic_settings"


def _seed(url: str, namespace: str, root: Path) -> str:
    config = AppConfig.load(root=root, redis_url=url, namespace=namespace, log_level="WARNING")
    store = RedisEventStore.from_config(config)
    for i in range(MODELS):
        key = f"{i:032x}"
        store.append([ModelAdded(aggregate_id=key, config={
            "key": key, "hash": key, "name": f"model-{i:02d}", "model_type": "lora", "model_format": "lycoris",
            "base_model": "sd-1", "path": f"loras/m{i}.safetensors"})], expected_version=0)
    return f"{0:032x}"


def _seconds(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """The wall and CPU seconds (user + system) of one run of ``argv``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, timeout=120, check=False)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.decode()[-400:]}")
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _checkout(rev: str, into: Path) -> Path:
    """``rev``'s code under ``into``, importable as ``modelbus`` by putting the returned folder first on
    PYTHONPATH (a package whose path is the checkout: it comes before the editable install's finder)."""
    tree = into / "tree"
    tree.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "events", "services", "workers"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    shim = into / "shim" / "modelbus"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text(f"__path__ = [{str(tree)!r}]\n")
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree)], check=True)
    return shim.parent


def main() -> int:
    configure_logging("console", "WARNING")
    rounds = scale(5)
    before = os.environ.get("MODELBUS_BENCH_CLI_BEFORE")
    with bench_redis() as url:
        root = Path(tempfile.mkdtemp(prefix="modelbus-bench-cli-"))
        (root / "models").mkdir()
        namespace = f"bench-{uuid.uuid4().hex[:8]}"
        key = _seed(url, namespace, root)
        env = {**os.environ, "MODELBUS_REDIS_URL": url, "MODELBUS_NAMESPACE": namespace, "MODELBUS_ROOT": str(root),
               "PYTHONPATH": str(REPO), "PYTHONPYCACHEPREFIX": str(root / "pycache")}
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        cli = [sys.executable, "-m", "modelbus.services.cli"]
        commands = {"list": ["list"], "show": ["show", key], "jobs": ["jobs"], "workers": ["workers"],
                    "events": ["events", "--count", "5"]}
        runs: dict[str, tuple[list[str], dict[str, str]]] = {
            "python -c pass": ([sys.executable, "-c", "pass"], env),
            "python -c 'import torch'": ([sys.executable, "-c", "import torch"], env),
            "libraries": ([sys.executable, "-c", LIBRARIES], env),
            "libraries + pydantic_settings": ([sys.executable, "-c", WITH_SETTINGS], env),
            **{f"modelbus {name}": ([*cli, *args], env) for name, args in commands.items()},
        }
        if before:
            old_env = {**env, "PYTHONPATH": f"{_checkout(before, root / 'before')}{os.pathsep}{REPO}"}
            runs.update({f"before: modelbus {name}": ([*cli, *args], old_env) for name, args in commands.items()})
        for argv, run_env in runs.values():  # untimed: .pyc files, the page cache
            _seconds(argv, run_env)
        walls: dict[str, list[float]] = {name: [] for name in runs}
        cpus: dict[str, list[float]] = {name: [] for name in runs}
        for i in range(rounds):
            names = list(runs) if i % 2 == 0 else list(reversed(runs))
            for name in names:
                wall, cpu = _seconds(*runs[name])
                walls[name].append(wall)
                cpus[name].append(cpu)
    wall = {name: statistics.median(t) for name, t in walls.items()}
    cpu = {name: statistics.median(t) for name, t in cpus.items()}
    floor, torch_name = "python -c pass", "python -c 'import torch'"
    print(f"  (medians of {rounds} runs, CPU (wall): {floor} {cpu[floor]:.3f} s ({wall[floor]:.3f}), "
          f"import torch {cpu[torch_name]:.3f} s ({wall[torch_name]:.3f}), the libraries alone "
          f"(redis, typer, rich, orjson, pydantic's models) {cpu['libraries']:.3f} s ({wall['libraries']:.3f}), with pydantic_settings "
          f"{cpu['libraries + pydantic_settings']:.3f} s ({wall['libraries + pydantic_settings']:.3f}))", flush=True)
    torch, libraries = wall[torch_name], cpu["libraries"]
    for name in commands:
        ours = f"modelbus {name}"
        ratio_line(f"{ours} start-up (vs import torch)", wall[ours], torch, "s", higher_is_better=False)
        line = (f"  {ours}: CPU {cpu[ours]:.3f} s (wall {wall[ours]:.3f} s) = {cpu[ours] / libraries:.2f}x the "
                f"libraries' CPU alone, {cpu[ours] - libraries:+.3f} s of our own (goal <= {GOAL_SECONDS} s)")
        if before:
            old = f"before: {ours}"
            line += (f"; {before}: CPU {cpu[old]:.3f} s (wall {wall[old]:.3f} s), "
                     f"{cpu[old] / cpu[ours]:.2f}x CPU, {wall[old] / wall[ours]:.2f}x wall")
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
