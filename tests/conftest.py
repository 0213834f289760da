"""Shared fixtures: a private Redis for the whole run (or MODELBUS_TEST_REDIS_URL), a fresh namespace
and root per test, and the environment every modelbus entry point reads."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

#: the test run's own knobs, kept from the shell (everything else of modelbus's and Hugging Face's is dropped)
KEPT_FROM_SHELL = ("MODELBUS_TEST_", "MODELBUS_BENCH_", "MODELBUS_SLOW")
DROPPED_FROM_SHELL = ("MODELBUS_", "HF_", "HUGGINGFACE_", "CIVITAI_")


def scrub_environment(environ: dict[str, str] | os._Environ[str] = os.environ) -> None:
    """Tests pass whatever the shell exports: its MODELBUS_*, HF_* and CIVITAI_* variables are dropped (before
    any library reads them at its import, as huggingface_hub does HF_HUB_OFFLINE), and HF_HOME is a folder of
    the run's own, so no test reads the user's Hugging Face cache or the token `hf auth login` saved. Every
    process a test starts inherits this environment."""
    for name in [n for n in environ if n.startswith(DROPPED_FROM_SHELL) and not n.startswith(KEPT_FROM_SHELL)]:
        del environ[name]
    home = tempfile.mkdtemp(prefix="modelbus-test-hf-home-")
    environ["HF_HOME"] = home
    atexit.register(shutil.rmtree, home, True)


scrub_environment()

import pytest  # (after the scrub: nothing imported has read the shell's variables)
import redis

import modelbus.services.records  # noqa: F401 - as in every modelbus process: the record config check is registered
from modelbus.events.embedded import EmbeddedRedis
from modelbus.events.logs import reset_logging
from modelbus.events.store import EventStore, InMemoryEventStore, RedisEventStore


@pytest.fixture(autouse=True)
def _fresh_logging() -> Iterator[None]:
    """A test that runs the CLI, a worker or the API in-process configures logging; the next one starts clean."""
    yield
    reset_logging()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis | None]:
    """A private redis-server for the run, unless MODELBUS_TEST_REDIS_URL names one."""
    if os.environ.get("MODELBUS_TEST_REDIS_URL"):
        yield None
        return
    data = Path(tempfile.mkdtemp(prefix="modelbus-test-redis-"))
    server = EmbeddedRedis.ensure(data)
    yield server
    from modelbus.events.watch import close_all
    close_all()  # services the tests left open: their watches would report the server's stop as a loss
    server.stop()
    shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_url(redis_server: EmbeddedRedis | None) -> str:
    return os.environ.get("MODELBUS_TEST_REDIS_URL") or (redis_server.url if redis_server else "")


@pytest.fixture()
def namespace(redis_url: str) -> Iterator[str]:
    ns = f"test-{uuid.uuid4().hex[:12]}"
    yield ns
    client = redis.Redis.from_url(redis_url)
    try:
        for pattern in (f"*{{{ns}}}*",):
            keys = list(client.scan_iter(match=pattern, count=1000))
            for i in range(0, len(keys), 500):
                client.delete(*keys[i:i + 500])
    except redis.RedisError:
        pass  # a test may have stopped the server on purpose


@pytest.fixture()
def modelbus_env(redis_url: str, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The environment of one test: its Redis, namespace and root (also seen by subprocesses)."""
    root = tmp_path / "root"
    root.mkdir()
    env = {
        "MODELBUS_REDIS_URL": redis_url,
        "MODELBUS_NAMESPACE": namespace,
        "MODELBUS_ROOT": str(root),
        "MODELBUS_ALLOW_PRIVATE_DOWNLOADS": "1",
        "MODELBUS_LOG_FORMAT": "json",
        "HF_HUB_OFFLINE": "1",
        "MODELBUS_STORE_URL": "shared",
        "MODELBUS_DOWNLOAD_CONCURRENCY": "1",  # one job per worker process unless a test asks for more
        "MODELBUS_API_WORKERS": "1",  # one API process in `modelbus up` unless a test asks for more
        "MODELBUS_IMPORT_ROOTS": "",  # the defaults (models dir, import area), whatever the shell exports
        "MODELBUS_FP8_STORAGE": "auto",  # loads upcast fp8 on the CPU unless a test asks to keep it
        "MODELBUS_API_ALLOWED_HOSTS": "testserver",  # Starlette's TestClient's Host (the defaults still hold)
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture()
def app_config(modelbus_env: dict[str, str]):  # type: ignore[no-untyped-def]
    from modelbus.services.config import AppConfig
    return AppConfig.load()


@pytest.fixture()
def event_store(redis_url: str, namespace: str) -> RedisEventStore:
    return RedisEventStore.from_url(redis_url, namespace)


@pytest.fixture(params=["redis", "memory"])
def log_store(request: pytest.FixtureRequest) -> EventStore:
    """The event log of one test, once per implementation: every test that takes it runs on both."""
    if request.param == "memory":
        return InMemoryEventStore()
    store: RedisEventStore = request.getfixturevalue("event_store")
    return store
