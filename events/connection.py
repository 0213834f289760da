"""Connecting to Redis: one place that builds clients, checks that a server is fit to hold an event
log, and decides between a given URL and the embedded server. :func:`redis_errors_translated` is the
boundary where redis-py's connection errors become ours (``StoreUnavailableError``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from modelbus.events import defaults
from modelbus.events.errors import EmbeddedRedisError, StoreUnavailableError
from modelbus.events.sentinel import connect_sentinel, is_sentinel_url
from modelbus.events.sentinel import redact as redact_sentinel

# eviction of any kind could delete the log; only noeviction is safe
SAFE_EVICTION_POLICIES = {"noeviction"}


def _driver_options() -> dict[str, Any]:
    """What a client tells the server about itself (CLIENT SETINFO), worked out once: left to redis-py,
    every connection it opens looks its own version up among the installed distributions
    (importlib.metadata), milliseconds each, and every forked job process opens new ones."""
    try:
        from redis.driver_info import DriverInfo
    except ImportError:  # redis-py before 7: the older keyword
        return {"lib_version": redis.__version__}
    return {"driver_info": DriverInfo(lib_version=redis.__version__)}


_DRIVER = _driver_options()


def connect(url: str, **kwargs: Any) -> redis.Redis[bytes]:
    """A client for ``url`` (redis://, rediss:// with TLS, unix://; user and password from the URL)."""
    options: dict[str, Any] = {
        **_DRIVER,
        "socket_timeout": defaults.SOCKET_TIMEOUT,
        "socket_connect_timeout": defaults.SOCKET_TIMEOUT,
        "health_check_interval": 30,
        "retry": Retry(ExponentialBackoff(cap=defaults.RECONNECT_BACKOFF_CAP, base=defaults.RECONNECT_BACKOFF_BASE), 3),
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
    }
    options.update(kwargs)
    if is_sentinel_url(url):
        return connect_sentinel(url, **options)
    return redis.Redis.from_url(url, **options)


@contextmanager
def redis_errors_translated(what: str = "Redis") -> Iterator[None]:
    """Run a block of direct Redis calls; a dropped or refused connection leaves it as StoreUnavailableError."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise StoreUnavailableError(f"{what} unreachable: {exc}") from exc


def check_reachable(url: str) -> redis.Redis[bytes]:
    client = connect(url, socket_connect_timeout=3, retry=Retry(ExponentialBackoff(), 1))
    try:
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise StoreUnavailableError(f"Redis at {redact(url)} does not answer: {exc}") from exc
    except redis.AuthenticationError as exc:
        raise StoreUnavailableError(f"Redis at {redact(url)} refused the credentials: {exc}") from exc
    return client


def check_fit(client: redis.Redis[bytes], url: str) -> None:
    """Refuse a server whose eviction policy could delete keys (the event log among them)."""
    try:
        policy = client.config_get("maxmemory-policy").get("maxmemory-policy")
    except redis.ResponseError:
        return  # CONFIG is disabled on managed services; the operator vouches for the policy
    if isinstance(policy, bytes):
        policy = policy.decode()
    if policy and policy not in SAFE_EVICTION_POLICIES:
        raise EmbeddedRedisError(
            f"Redis at {redact(url)} has maxmemory-policy {policy!r}, which could evict the event log; "
            "set it to 'noeviction'")


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    if is_sentinel_url(url):
        return redact_sentinel(url)
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user + ':***@' if user else '***@'}{host}"


def resolve_redis_url(config: Any) -> str:
    """The URL to use: the configured one (checked, never replaced), else the embedded server's."""
    if config.redis_url:
        client = check_reachable(config.redis_url)
        check_fit(client, config.redis_url)
        return str(config.redis_url)
    from modelbus.events.embedded import EmbeddedRedis
    fsync = "always" if getattr(config, "durability", "fast") == "fsync" else "everysec"
    return EmbeddedRedis.ensure(config.root, appendfsync=fsync).url
