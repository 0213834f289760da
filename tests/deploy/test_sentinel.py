"""Sentinel URLs and a real failover: a primary, replicas and a sentinel (real ``redis-server``
processes on loopback), the primary SIGKILLed under a steady stream of appends made with
``replicas=1`` (each append followed by WAIT), and the client carrying on against the new primary."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from modelbus.events.errors import EventStoreError
from modelbus.events.schema import ModelAdded
from modelbus.events.sentinel import (
    DEFAULT_SENTINEL_PORT,
    SentinelURLError,
    connect_sentinel,
    is_sentinel_url,
    parse_sentinel_url,
    primary_address,
    redact,
)
from modelbus.events.store import RedisEventStore
from tests.deploy.redis_ha import RedisHA, redis_server_binary
from tests.record_configs import record_config
from tests.waiting import wait_until

needs_redis = pytest.mark.skipif(redis_server_binary() is None, reason="redis-server is not on PATH")


# --- parsing -------------------------------------------------------------------------------------

def test_parses_hosts_credentials_service_and_db() -> None:
    parsed = parse_sentinel_url("redis+sentinel://app:p%40ss@10.0.0.1:26380,sentinel-b,[::1]:5000/mymaster/2")
    assert parsed.sentinels == (("10.0.0.1", 26380), ("sentinel-b", DEFAULT_SENTINEL_PORT), ("::1", 5000))
    assert (parsed.service_name, parsed.db) == ("mymaster", 2)
    assert (parsed.username, parsed.password) == ("app", "p@ss")
    assert parsed.ssl is False and parsed.sentinel_password is None


def test_tls_scheme_and_query_options() -> None:
    parsed = parse_sentinel_url("rediss+sentinel://:secret@s1:26379/svc?sentinel_password=sp"
                                "&ssl_ca_certs=/etc/ca.pem&ssl_cert_reqs=required")
    assert parsed.ssl is True
    assert (parsed.username, parsed.password, parsed.db) == (None, "secret", 0)
    assert parsed.sentinel_password == "sp"
    assert parsed.tls == {"ssl_ca_certs": "/etc/ca.pem", "ssl_cert_reqs": "required"}


def test_only_sentinel_schemes_are_claimed() -> None:
    assert is_sentinel_url("redis+sentinel://h/m") and is_sentinel_url("REDISS+SENTINEL://h/m")
    assert not is_sentinel_url("redis://h:6379/0") and not is_sentinel_url("rediss://h")


@pytest.mark.parametrize(("url", "names"), [
    ("redis+sentinel://h1:26379", "no service name"),
    ("redis+sentinel://h1:26379/", "no service name"),
    ("redis+sentinel://h1:notaport/m", "bad port"),
    ("redis+sentinel://h1:70000/m", "bad port"),
    ("redis+sentinel://h1,,h2/m", "empty sentinel address"),
    ("redis+sentinel://:1/m", "has no host"),
    ("redis+sentinel://h1/m/zero", "is not a number"),
    ("redis+sentinel://h1/m/0/extra", "too many path parts"),
    ("redis+sentinel://h1/m?sentinel_pasword=x", "unknown option 'sentinel_pasword'"),
    ("redis://h1/m", "not a Sentinel URL"),
])
def test_bad_urls_are_refused_naming_the_problem(url: str, names: str) -> None:
    with pytest.raises(SentinelURLError, match=names):
        parse_sentinel_url(url)


def test_errors_belong_to_the_event_layer_and_never_show_passwords() -> None:
    with pytest.raises(EventStoreError) as caught:
        parse_sentinel_url("redis+sentinel://user:hunter2@h1/m?sentinel_password=s3cret&bogus=1")
    assert "hunter2" not in str(caught.value) and "s3cret" not in str(caught.value)
    assert redact("redis+sentinel://user:hunter2@h1/m?sentinel_password=s3cret") == \
        "redis+sentinel://user:***@h1/m?sentinel_password=***"


# --- a real primary, replicas and sentinel ---------------------------------------------------------

@pytest.fixture()
def ha(tmp_path: Path) -> Iterator[RedisHA]:
    # two replicas: after the failover one replica is left to acknowledge WAIT 1, as in a real
    # "replicated" deployment (with one replica, WAIT could never again be satisfied)
    cluster = RedisHA(tmp_path / "ha", replicas=2, password="data-secret", sentinel_password="sentinel-secret")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@needs_redis
@pytest.mark.timeout(120)
def test_failover_loses_no_acknowledged_event_and_appends_carry_on(ha: RedisHA) -> None:
    client = connect_sentinel(ha.url, socket_timeout=2, socket_connect_timeout=1)
    assert primary_address(client)[1] == ha.primary.port  # type: ignore[union-attr]
    store = RedisEventStore(client, f"ha-{uuid.uuid4().hex[:8]}", replicas=1, retry_deadline=45)
    aggregate = "ha-log"
    acknowledged: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer() -> None:
        # one aggregate, each append at the expected version: a lost acknowledged event would show up
        # as a version conflict, a doubled one as a version too high
        try:
            n = 0
            while not stop.is_set():
                result = store.append([ModelAdded(aggregate_id=aggregate, config=record_config(aggregate, f"n{n}"))], expected_version=n)
                assert result.version == n + 1, f"append {n} landed at version {result.version}"
                acknowledged.append(n)
                n += 1
        except Exception as exc:  # noqa: BLE001 - whatever it is, the test thread reports it (AssertionError too)
            errors.append(exc)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(acknowledged) >= 40 or bool(errors), 30, "40 appends before the kill")
        assert not errors, errors
        old = ha.kill_primary()
        killed_at, acked_at_kill = time.monotonic(), len(acknowledged)
        new = ha.wait_for_promotion(timeout=30)
        promoted_after = time.monotonic() - killed_at
        wait_until(lambda: len(acknowledged) >= acked_at_kill + 15 or bool(errors), 45,
                  "15 appends after the failover")
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not errors, f"{errors!r}\n{ha.logs()}"
    assert not thread.is_alive()

    # the client follows the sentinel: it now talks to the promoted replica, not the dead primary
    assert primary_address(client) == ("127.0.0.1", new.port) and new.port != old.port
    assert client.execute_command("ROLE")[0] in (b"master", "master")
    assert client.info("server")["tcp_port"] == new.port
    assert ha.live_primaries() == [new.port]  # one primary: the other replica follows it

    history = store.history(aggregate)
    numbers = [int(s.event.config["name"][1:]) for s in history]  # type: ignore[attr-defined]
    versions = [s.event.aggregate_version for s in history]
    in_log = [int(s.event.config["name"][1:]) for s in store.read_all() if s.event.aggregate_id == aggregate]  # type: ignore[attr-defined]
    lost = sorted(set(acknowledged) - set(in_log))
    doubled = len(in_log) - len(set(in_log))
    print(f"\nsentinel failover: {acked_at_kill} appends acknowledged (WAIT 1) before SIGKILL of the primary "
          f"(port {old.port}); replica on port {new.port} promoted after {promoted_after:.1f} s; "
          f"{len(acknowledged) - acked_at_kill} appends after; {len(in_log)} events in the log; "
          f"lost {len(lost)}, doubled {doubled}")
    assert lost == [] and doubled == 0
    assert numbers == in_log == list(range(len(in_log)))
    assert versions == list(range(1, len(in_log) + 1))
    assert len(in_log) >= len(acknowledged)  # at most one in-flight append landed unacknowledged
    assert store.version(aggregate) == len(in_log)


@needs_redis
def test_wrong_data_password_is_refused(tmp_path: Path) -> None:
    cluster = RedisHA(tmp_path / "auth", replicas=0, password="right")
    try:
        cluster.start()
        good = connect_sentinel(cluster.url, socket_timeout=2)
        assert good.ping()
        bad = connect_sentinel(cluster.url.replace(":right@", ":wrong@"), socket_timeout=2)
        with pytest.raises(redis.AuthenticationError):
            bad.ping()
    finally:
        cluster.stop()


