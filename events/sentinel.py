"""Redis Sentinel URLs: clients that find the primary through Sentinel and follow a failover.

    redis+sentinel://[user:pass@]host[:port][,host[:port]...]/service_name[/db][?options]
    rediss+sentinel://...   the same over TLS (to the sentinels and to the data nodes)

The user and password in the URL are those of the data nodes (primary and replicas), as in a plain
``redis://`` URL. Sentinels that require their own credentials take them from the query:
``sentinel_username``, ``sentinel_password``. TLS options ``ssl_ca_certs``, ``ssl_certfile``,
``ssl_keyfile`` and ``ssl_cert_reqs`` apply to both. A sentinel without a port listens on 26379.

The client is redis-py's ``Sentinel(...).master_for(...)``: each new connection asks a sentinel where
the primary is, and a connection to a primary that was demoted fails with a connection error, so the
store's retry loop reconnects to whoever is primary now.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote

import redis
from redis.sentinel import Sentinel

from modelbus.events.errors import EventStoreError, InvalidInput

SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}  # scheme -> TLS
DEFAULT_SENTINEL_PORT = 26379
_SENTINEL_OPTIONS = ("sentinel_username", "sentinel_password")
_TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")
# options of the data-node connections that also make sense for the short sentinel queries
_SHARED_WITH_SENTINELS = ("socket_timeout", "socket_connect_timeout")


class SentinelURLError(EventStoreError, InvalidInput, ValueError):
    """A ``redis+sentinel://`` URL that cannot be used; the message names the part that is wrong."""


@dataclass(frozen=True)
class SentinelURL:
    sentinels: tuple[tuple[str, int], ...]
    service_name: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ssl: bool = False
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    tls: dict[str, str] = field(default_factory=dict)


def is_sentinel_url(url: str) -> bool:
    return url.partition("://")[0].lower() in SCHEMES


def parse_sentinel_url(url: str) -> SentinelURL:
    """Split a Sentinel URL into its parts; raise :class:`SentinelURLError` naming what is wrong."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SCHEMES:
        raise SentinelURLError(f"not a Sentinel URL (expected redis+sentinel:// or rediss+sentinel://): "
                               f"{_redacted(url)}")
    rest, _, query = rest.partition("?")
    rest = rest.split("#", 1)[0]
    netloc, _, path = rest.partition("/")
    creds, _, hosts = netloc.rpartition("@")
    username, password = _credentials(creds)
    sentinels = tuple(_host_port(part, url) for part in hosts.split(","))
    service_name, db = _service_and_db(path, url)
    options = _options(query, url)
    return SentinelURL(
        sentinels=sentinels, service_name=service_name, db=db, username=username, password=password,
        ssl=SCHEMES[scheme.lower()], sentinel_username=options.pop("sentinel_username", None),
        sentinel_password=options.pop("sentinel_password", None), tls=options)


def _credentials(creds: str) -> tuple[str | None, str | None]:
    if not creds:
        return None, None
    user, sep, password = creds.partition(":")
    if not sep:  # "secret@host": a bare password, as redis-py reads redis://secret@host
        return None, unquote(user) or None
    return unquote(user) or None, unquote(password) or None


def _host_port(part: str, url: str) -> tuple[str, int]:
    part = part.strip()
    if not part:
        raise SentinelURLError(f"empty sentinel address in {_redacted(url)}")
    if part.startswith("["):  # [::1]:26379
        host, sep, tail = part[1:].partition("]")
        if not sep or (tail and not tail.startswith(":")):
            raise SentinelURLError(f"bad IPv6 sentinel address {part!r} in {_redacted(url)}")
        port_text = tail[1:]
    else:
        host, _, port_text = part.partition(":")
    if not host:
        raise SentinelURLError(f"sentinel address {part!r} has no host in {_redacted(url)}")
    if not port_text:
        return host, DEFAULT_SENTINEL_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise SentinelURLError(f"sentinel address {part!r} has a bad port in {_redacted(url)}")
    return host, int(port_text)


def _service_and_db(path: str, url: str) -> tuple[str, int]:
    parts = [p for p in path.split("/") if p]
    if not parts:
        raise SentinelURLError(f"no service name (the Sentinel master name) in {_redacted(url)}: "
                               "use redis+sentinel://host:26379/<service_name>[/<db>]")
    if len(parts) > 2:
        raise SentinelURLError(f"too many path parts in {_redacted(url)}: expected /<service_name>[/<db>]")
    db = 0
    if len(parts) == 2:
        if not parts[1].isdigit():
            raise SentinelURLError(f"database {parts[1]!r} is not a number in {_redacted(url)}")
        db = int(parts[1])
    return unquote(parts[0]), db


def _options(query: str, url: str) -> dict[str, str]:
    options: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name not in _SENTINEL_OPTIONS + _TLS_OPTIONS:
            raise SentinelURLError(f"unknown option {name!r} in {_redacted(url)}; known: "
                                   f"{', '.join(_SENTINEL_OPTIONS + _TLS_OPTIONS)}")
        options[name] = value
    return options


def _redacted(url: str) -> str:
    """The URL without secrets: the password before '@' and any sentinel_password option."""
    head, sep, query = url.partition("?")
    scheme, _, rest = head.partition("://")
    if "@" in rest:
        creds, _, hosts = rest.rpartition("@")
        user = creds.split(":", 1)[0] if ":" in creds else ""
        head = f"{scheme}://{user}:***@{hosts}" if user else f"{scheme}://***@{hosts}"
    if sep:
        query = "&".join(f"{k}=***" if k == "sentinel_password" else f"{k}={v}"
                         for k, v in parse_qsl(query, keep_blank_values=True))
    return head + (f"?{query}" if sep else "")


redact = _redacted


def sentinel_for(parsed: SentinelURL, **connection_kwargs: Any) -> Sentinel:
    """A ``Sentinel`` manager for the parsed URL; ``connection_kwargs`` go to the data-node connections."""
    data_kwargs: dict[str, Any] = dict(connection_kwargs)
    sentinel_kwargs: dict[str, Any] = {k: data_kwargs[k] for k in _SHARED_WITH_SENTINELS if k in data_kwargs}
    if parsed.sentinel_username:
        sentinel_kwargs["username"] = parsed.sentinel_username
    if parsed.sentinel_password:
        sentinel_kwargs["password"] = parsed.sentinel_password
    if parsed.ssl:
        data_kwargs["ssl"] = True
        sentinel_kwargs["ssl"] = True
        data_kwargs.update(parsed.tls)
        sentinel_kwargs.update(parsed.tls)
    if parsed.username:
        data_kwargs["username"] = parsed.username
    if parsed.password:
        data_kwargs["password"] = parsed.password
    data_kwargs["db"] = parsed.db
    return Sentinel(list(parsed.sentinels), sentinel_kwargs=sentinel_kwargs, **data_kwargs)


def connect_sentinel(url: str, **kwargs: Any) -> redis.Redis[bytes]:
    """A client for the current primary of the URL's service that follows failovers.

    ``kwargs`` are the usual client options (socket timeouts, ``retry``, ``retry_on_error``...): the
    ones :func:`events.connection.connect` passes to ``redis.Redis.from_url``.
    """
    parsed = parse_sentinel_url(url)
    manager = sentinel_for(parsed, **kwargs)
    # check_connection: a new connection first PINGs, so an address that no longer answers is
    # dropped and the next sentinel answer is tried instead of handing out a dead socket
    return manager.master_for(parsed.service_name, redis_class=redis.Redis, check_connection=True)


def primary_address(client: redis.Redis[bytes]) -> tuple[str, int]:
    """Where a client from :func:`connect_sentinel` currently sends its commands (asks the sentinels)."""
    pool = client.connection_pool
    get = getattr(pool, "get_master_address", None)
    if get is None:
        raise SentinelURLError("not a Sentinel-managed client")
    host, port = get()
    return str(host), int(port)
