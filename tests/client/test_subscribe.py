"""Subscriptions: both streams merged in order, type filters, resume tokens, and surviving a Redis restart."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from modelbus.events.embedded import find_redis_server, free_port
from modelbus.events.schema import InstallRequested
from modelbus.events.store import RedisEventStore
from modelbus.services.client import (
    AsyncModelBusClient,
    Cursor,
    InvalidRequestError,
    ModelBusClient,
    UnavailableError,
)
from modelbus.services.client.aio import ASYNC_METHODS
from modelbus.services.config import AppConfig
from tests.fixtures.activity import download_payload, load_payload
from tests.waiting import wait_until


def _request(store: RedisEventStore, n: int) -> str:
    return store.append([InstallRequested(aggregate_id=f"job-{n}", source=f"/m/{n}")]).positions[0]


def test_history_merges_both_streams_in_order(client: ModelBusClient) -> None:
    store = client.store
    _request(store, 1)
    store.publish_activity("download_progress", download_payload(bytes=1))
    _request(store, 2)
    store.publish_activity("model_load_started", load_payload("m2"))
    seen = client.events(since="0")
    assert [d.type for d in seen] == ["InstallRequested", "download_progress", "InstallRequested",
                                      "model_load_started"]
    assert [d.stream for d in seen] == ["events", "activity", "events", "activity"]
    only = client.events(types=["model_load_started", "InstallRequested"], since="0")
    assert [d.type for d in only] == ["InstallRequested", "InstallRequested", "model_load_started"]
    # the token of the second delivery resumes right after it
    after = client.events(since=str(seen[1].cursor))
    assert [d.position for d in after] == [d.position for d in seen[2:]]


def test_live_subscription_filters_and_resumes(client: ModelBusClient) -> None:
    store = client.store
    _request(store, 0)  # before the subscription: "$" must not deliver it
    got: list[str] = []
    stop = threading.Event()
    sub = client.subscribe(types=["model_load_completed"], stop=stop.is_set, block_ms=100)
    first = next_in_thread(sub, lambda: (store.publish_activity("download_progress", download_payload()),
                                         store.publish_activity("model_load_completed", load_payload("a"))))
    got.append(first.event.payload["model_key"])  # type: ignore[attr-defined]
    token = str(first.cursor)
    store.publish_activity("model_load_completed", load_payload("b"))
    resumed = client.subscribe(types=["model_load_completed"], since=token, block_ms=100)
    assert next(resumed).event.payload.model_key == "b"  # type: ignore[attr-defined]
    stop.set()


def next_in_thread(sub, action):  # type: ignore[no-untyped-def]
    """Start waiting on ``sub``, then run ``action``: the event must arrive after the wait began."""
    box: list = []
    t = threading.Thread(target=lambda: box.append(next(sub)))
    t.start()
    time.sleep(0.3)
    action()
    t.join(10)
    assert box, "no event delivered"
    return box[0]


def test_bad_position_is_rejected(client: ModelBusClient) -> None:
    with pytest.raises(InvalidRequestError, match="not an event position"):
        client.events(since="yesterday")
    assert Cursor.parse("5") == Cursor("5-0", "5-0")


class _Server:
    """A redis-server of our own, so the test can stop and restart it (same port, same AOF)."""

    def __init__(self, data: Path) -> None:
        self.data, self.port, self.proc = data, free_port(), None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen([find_redis_server(), "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--dir", str(self.data), "--appendonly", "yes", "--save", ""],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis
        for _ in range(200):
            try:
                redis.Redis.from_url(self.url).ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)


def test_subscription_survives_a_redis_restart(tmp_path: Path) -> None:
    server = _Server(tmp_path)
    server.start()
    try:
        config = AppConfig.load(root=tmp_path, redis_url=server.url, namespace="restart")
        client = ModelBusClient(config)
        store = client.store
        delivered: list[str] = []
        stop = threading.Event()

        def consume() -> None:
            for d in client.subscribe(types=["InstallRequested"], since="0", stop=stop.is_set, block_ms=100):
                delivered.append(d.event.aggregate_id)

        thread = threading.Thread(target=consume, daemon=True)
        thread.start()
        for n in range(3):
            _request(store, n)
        wait_until(lambda: len(delivered) == 3, 20, "3 events delivered")
        server.stop()
        time.sleep(0.5)  # the subscriber is now retrying against a dead server
        server.start()
        for n in range(3, 6):
            _request(store, n)
        wait_until(lambda: len(delivered) == 6, 20, "6 events delivered")
        stop.set()
        thread.join(5)
        assert delivered == [f"job-{n}" for n in range(6)]  # every event once, in order
    finally:
        server.stop()


def test_subscription_gives_up_after_its_reconnect_timeout(tmp_path: Path) -> None:
    server = _Server(tmp_path)
    server.start()
    client = ModelBusClient(AppConfig.load(root=tmp_path, redis_url=server.url, namespace="gone"))
    sub = client.subscribe(since="0", block_ms=100, reconnect_timeout=0.5)
    _ = client.store  # opened while the server is up
    server.stop()
    with pytest.raises(UnavailableError, match="unreachable"):
        next(sub)


def test_async_client_subscribes_and_calls(client: ModelBusClient) -> None:
    aclient = AsyncModelBusClient(client=client)

    async def scenario() -> tuple[str, list[str]]:
        stream = aclient.subscribe(types=["model_load_started"], block_ms=100)
        task = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0.3)
        await asyncio.to_thread(client.store.publish_activity, "model_load_started", load_payload("x"))
        first = await asyncio.wait_for(task, 10)
        await stream.aclose()
        past = await aclient.events(since="0")
        return first.event.payload["model_key"], [d.type for d in past]  # type: ignore[attr-defined]

    key, past = asyncio.run(scenario())
    assert key == "x" and past == ["model_load_started"]




def test_every_call_of_the_sync_client_is_on_the_async_one(client: ModelBusClient) -> None:
    """Both clients have the same methods: each public call of ModelBusClient is a coroutine of
    AsyncModelBusClient (subscribe an async iterator), so a call added to one cannot be missing from the other;
    one of them answers as the sync call does."""
    import inspect

    public = {n for n, v in inspect.getmembers(ModelBusClient) if not n.startswith("_") and callable(v)
              and not isinstance(inspect.getattr_static(ModelBusClient, n), property)}
    assert public - {"subscribe"} == set(ASYNC_METHODS) - {"subscribe"}
    for name in public - {"subscribe"}:
        assert inspect.iscoroutinefunction(getattr(AsyncModelBusClient, name)), name
    assert inspect.isasyncgenfunction(AsyncModelBusClient.subscribe)
    aclient = AsyncModelBusClient(client=client)
    assert asyncio.run(aclient.quarantine_count()) == client.quarantine_count()  # type: ignore[attr-defined]
    assert asyncio.run(aclient.quarantined()) == client.quarantined()  # type: ignore[attr-defined]
