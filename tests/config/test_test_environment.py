"""The test run ignores what the user's shell exports: its MODELBUS_*, HF_* and CIVITAI_* variables are gone
before anything reads them, in the run and in every process a test starts (workers, the API, the CLI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

HOSTILE = {
    "MODELBUS_NAMESPACE": "the-users-own", "MODELBUS_ROOT": "/nonexistent/users-root", "MODELBUS_HF_OFFLINE": "1",
    "MODELBUS_STAGING_TTL": "1s", "MODELBUS_STORE_URL": "s3://users-bucket/x", "HF_TOKEN": "hf_users_secret",
    "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "https://mirror.invalid", "HF_HUB_CACHE": "/nonexistent/cache",
    "HUGGINGFACE_HUB_CACHE": "/nonexistent/old-cache", "CIVITAI_TOKEN": "users-civitai-secret",
    "MODELBUS_TEST_REDIS_URL": "", "MODELBUS_SLOW": "0",  # the run's own knobs stay
}
# what a worker started by a test sees: the run's environment and the test's own variables over it
PROBE = ("import json, os, sys; sys.path.insert(0, os.getcwd()); import tests.conftest; "
         "import subprocess; child = subprocess.run([sys.executable, '-c', 'import json, os; "
         "print(json.dumps(dict(os.environ)))'], env={**os.environ}, capture_output=True, text=True, check=True); "
         "print(child.stdout)")


def test_the_shells_modelbus_and_hf_variables_do_not_reach_the_tests() -> None:
    env = {**os.environ, **HOSTILE}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    leaked = {k: v for k, v in seen.items() if k in HOSTILE and not k.startswith(("MODELBUS_TEST_", "MODELBUS_SLOW"))}
    assert leaked == {}
    assert seen["MODELBUS_SLOW"] == "0" and seen["MODELBUS_TEST_REDIS_URL"] == ""
    home = seen["HF_HOME"]  # a folder of the run's own: not the user's cache, no saved login token
    assert "modelbus-test-hf-home-" in home and not home.startswith(os.path.expanduser("~/.cache"))


def test_this_run_sees_none_of_them() -> None:
    leaked = [k for k in os.environ if k.startswith(("MODELBUS_", "HF_", "HUGGINGFACE_", "CIVITAI_"))
              and not k.startswith(("MODELBUS_TEST_", "MODELBUS_BENCH_", "MODELBUS_SLOW")) and k != "HF_HOME"]
    assert leaked == []
