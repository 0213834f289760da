"""Every benchmark script imports, and so does every import inside its functions (they run only under
``make bench``, so a moved helper would otherwise go unnoticed until someone measures)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent / "bench"

# as `make bench` runs them: the repository as the working directory, the script's folder on the path;
# each import of our own code anywhere in a script (a function's own imports too) is resolved; the
# optional baselines (fastsafetensors, hf_transfer...) may be missing, the scripts say so themselves
PROBE = """
import ast, importlib, sys, traceback
sys.path[:0] = [sys.argv[1], "."]
ours = lambda module: module.split(".")[0] in ("modelbus", "tests")
for name in sys.argv[2:]:
    try:
        importlib.import_module(name)
        tree = ast.parse(open(f"{sys.argv[1]}/{name}.py").read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if ours(alias.name):
                        importlib.import_module(alias.name)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level and ours(node.module):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    if not hasattr(module, alias.name):
                        importlib.import_module(f"{node.module}.{alias.name}")
    except BaseException:
        print(f"{name}: {traceback.format_exc(limit=3)}")
"""


def test_every_benchmark_imports() -> None:
    scripts = sorted(p.stem for p in BENCH.glob("bench_*.py"))
    assert len(scripts) >= 10
    done = subprocess.run([sys.executable, "-c", PROBE, str(BENCH), *scripts], cwd=BENCH.parent.parent,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout[-4000:] + done.stderr[-2000:]
