"""The event store under real faults: racing processes, dropped connections, killed consumers and a
killed Redis."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import orjson
import pytest
import redis

from modelbus.events.embedded import EmbeddedRedis
from modelbus.events.errors import EmbeddedRedisError, StoreUnavailableError
from modelbus.events.schema import ModelAdded
from modelbus.events.store import RedisEventStore
from tests.record_configs import record_config

RACER = textwrap.dedent("""
    import sys, time
    from modelbus.events.store import RedisEventStore
    from modelbus.events.schema import ModelAdded
    from modelbus.events.errors import ConcurrencyError
    from tests.record_configs import record_config
    store = RedisEventStore.from_url(sys.argv[1], sys.argv[2])
    while time.time() < float(sys.argv[3]):
        time.sleep(0.001)
    try:
        store.append([ModelAdded(aggregate_id="contested", config=record_config("contested", sys.argv[4]))],
                     expected_version=0)
        print("won")
    except ConcurrencyError:
        print("lost")
""")


def test_expected_version_race_between_processes_has_one_winner(redis_url: str, namespace: str) -> None:
    start_at = str(time.time() + 3)
    procs = [subprocess.Popen([sys.executable, "-c", RACER, redis_url, namespace, start_at, str(i)],
                              stdout=subprocess.PIPE, text=True) for i in range(6)]
    results = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert sorted(results) == ["lost"] * 5 + ["won"]
    store = RedisEventStore.from_url(redis_url, namespace)
    assert len(store.history("contested")) == 1 and store.version("contested") == 1


def test_subscriber_resumes_after_its_connection_is_killed(event_store: RedisEventStore) -> None:
    got: list[int] = []
    done = threading.Event()

    def consume() -> None:
        for stored in event_store.subscribe(since="0-0", block_ms=200, stop=done.is_set):
            got.append(int(stored.event.config["name"][1:]))  # type: ignore[attr-defined]
            if len(got) == 60:
                done.set()

    thread = threading.Thread(target=consume)
    thread.start()
    admin = redis.Redis.from_url(event_store.url or "")
    for n in range(60):
        event_store.append([ModelAdded(aggregate_id=f"m{n}", config=record_config(f"m{n}"))])
        if n in (15, 35):
            admin.client_kill_filter(_type="normal", skipme=True)  # drops every client connection, ours too
        time.sleep(0.01)
    thread.join(timeout=30)
    assert got == list(range(60)), "events lost or repeated across the reconnect"


CONSUMER = textwrap.dedent("""
    import sys, time
    from modelbus.events.store import RedisEventStore
    store = RedisEventStore.from_url(sys.argv[1], sys.argv[2])
    got = store.read_group("g", "doomed", count=5, block_ms=2000)
    print(len(got), flush=True)
    time.sleep(600)
""")


def test_entries_of_a_killed_consumer_are_reclaimed(event_store: RedisEventStore, redis_url: str) -> None:
    for n in range(8):
        event_store.append([ModelAdded(aggregate_id=f"m{n}", config=record_config(f"m{n}"))])
    event_store.ensure_group("g", start="0")
    proc = subprocess.Popen([sys.executable, "-c", CONSUMER, redis_url, event_store.namespace],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "5"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rest = event_store.read_group("g", "survivor", count=100)
    assert len(rest) == 3 and event_store.pending("g") == 8
    event_store.ack("g", [e.position for e in rest])
    time.sleep(0.3)
    reclaimed = event_store.reclaim("g", "survivor", min_idle_ms=200)
    assert sorted(int(e.event.config["name"][1:]) for e in reclaimed) == [0, 1, 2, 3, 4]  # type: ignore[attr-defined]
    event_store.ack("g", [e.position for e in reclaimed])
    assert event_store.pending("g") == 0


def test_killed_embedded_redis_keeps_every_acknowledged_append(tmp_path: Path) -> None:
    server = EmbeddedRedis.ensure(tmp_path, appendfsync="always")
    assert server.process is not None
    store = RedisEventStore.from_url(server.url, "durable", retry_deadline=2)
    acknowledged = [store.append([ModelAdded(aggregate_id=f"m{n}", config=record_config(f"m{n}"))]).positions[0]
                    for n in range(200)]
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait()
    with pytest.raises(StoreUnavailableError):
        store.append([ModelAdded(aggregate_id="lost", config=record_config("lost"))])
    restarted = EmbeddedRedis._start(server.data_dir, appendfsync="always")
    try:
        survivors = [e.position for e in RedisEventStore.from_url(restarted.url, "durable").read_all()]
        assert survivors == acknowledged
    finally:
        restarted.stop()


REUSER = "from events.embedded import EmbeddedRedis; import sys; print(EmbeddedRedis.ensure(sys.argv[1]).url)"


def test_second_process_reuses_the_running_embedded_redis(tmp_path: Path) -> None:
    server = EmbeddedRedis.ensure(tmp_path)
    try:
        out = subprocess.run([sys.executable, "-c", REUSER, str(tmp_path)], capture_output=True, text=True,
                             timeout=60, check=True)
        assert out.stdout.strip() == server.url
        assert server.process is not None and server.process.poll() is None
    finally:
        server.stop()


def test_a_redis_that_could_evict_is_refused(tmp_path: Path) -> None:
    server = EmbeddedRedis.ensure(tmp_path)
    try:
        redis.Redis.from_url(server.url).config_set("maxmemory-policy", "allkeys-lru")
        from modelbus.events.connection import resolve_redis_url

        class Cfg:
            redis_url = server.url
            namespace = "x"
            root = tmp_path

        with pytest.raises(EmbeddedRedisError, match="allkeys-lru"):
            resolve_redis_url(Cfg())
    finally:
        server.stop()


def test_a_configured_redis_that_does_not_answer_is_named(tmp_path: Path) -> None:
    from modelbus.events.connection import resolve_redis_url
    from modelbus.events.embedded import free_port

    class Cfg:
        redis_url = f"redis://user:secret@127.0.0.1:{free_port()}/0"
        namespace = "x"
        root = tmp_path

    with pytest.raises(StoreUnavailableError) as info:
        resolve_redis_url(Cfg())
    assert "127.0.0.1" in str(info.value) and "secret" not in str(info.value)
    assert not (tmp_path / "redis").exists(), "nothing may be started for a configured URL"


def _record(data_dir: Path, **fields: object) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "server.json").write_bytes(orjson.dumps(fields))


def test_an_embedded_redis_of_another_host_is_never_doubled(tmp_path: Path) -> None:
    """A root shared with another host (NFS, a volume) whose embedded Redis we cannot reach: refused, since a
    second server on the same data directory would write one AOF from two servers."""
    from modelbus.events.embedded import free_port

    data_dir = tmp_path / "redis"
    _record(data_dir, url=f"redis://127.0.0.1:{free_port()}/0", pid=1, host="some-other-host", boot="x")
    with pytest.raises(EmbeddedRedisError, match="some-other-host.*MODELBUS_REDIS_URL"):
        EmbeddedRedis.ensure(tmp_path)
    assert not (data_dir / "redis.log").exists(), "no second server may start"


def test_a_running_but_unreachable_embedded_redis_is_not_doubled(tmp_path: Path) -> None:
    """Same host, the recorded server alive but not answering at its URL (another network namespace)."""
    from modelbus.events.embedded import _boot_id, free_port

    server = EmbeddedRedis.ensure(tmp_path / "first")
    try:
        assert server.process is not None
        data_dir = tmp_path / "second" / "redis"
        _record(data_dir, url=f"redis://127.0.0.1:{free_port()}/0", pid=server.process.pid,
                host=socket.gethostname(), boot=_boot_id())
        with pytest.raises(EmbeddedRedisError, match=f"pid {server.process.pid} still running"):
            EmbeddedRedis.ensure(tmp_path / "second")
    finally:
        server.stop()


def test_a_stale_record_of_a_dead_server_is_replaced(tmp_path: Path) -> None:
    from modelbus.events.embedded import _boot_id, free_port

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _record(tmp_path / "redis", url=f"redis://127.0.0.1:{free_port()}/0", pid=dead.pid,
            host=socket.gethostname(), boot=_boot_id())
    server = EmbeddedRedis.ensure(tmp_path)
    try:
        assert server.process is not None and redis.Redis.from_url(server.url).ping()
    finally:
        server.stop()
