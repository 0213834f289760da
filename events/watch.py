"""Log watches: knowing, without a round trip, that the domain log has not grown since we last read it.

A reader that must see every write acknowledged before its read began (the record service's promise)
would otherwise ask Redis for the log's head on every read: one network round trip, many times the
cost of the lookup itself. A :class:`RedisLogWatch` keeps one extra connection with Redis's
client-side tracking in broadcast mode on the log's key (``CLIENT TRACKING ON BCAST PREFIX``), so
Redis pushes a message on that connection whenever the log changes. A read then only polls the
socket: no pending message means no append since the last catch-up.

Why that is as strong as the round trip: Redis queues broadcast invalidations before it writes the
replies of the commands that caused them, so on one host the message is in our socket before the
writer holds its acknowledgement; across hosts it holds as long as the network does not deliver the
later packet first. A watch that cannot tell (connection lost, Redis restarted, tracking refused) says
so and readers go back to the round trip until it is re-established; ``WATCH_MAX_QUIET`` bounds how
long a reader trusts silence before one round trip anyway. Sentinel closes normal clients' connections
when it reconfigures a server, so a failover breaks the watch rather than leaving it on a demoted one.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from abc import ABC, abstractmethod
from typing import Any

import redis

from modelbus.events import defaults
from modelbus.events.logs import get_logger

log = get_logger(__name__)

WATCH_CLIENT_NAME = "modelbus-log-watch"  # what CLIENT LIST shows for a watch's connection

_OPEN: weakref.WeakSet[RedisLogWatch] = weakref.WeakSet()


def close_all() -> None:
    """Close every watch of this process (before stopping a Redis on purpose: no "lost" warnings)."""
    for watch in list(_OPEN):
        watch.close()


def _restart_in_child() -> None:
    # a forked child (an RQ work horse) must not read its parent's sockets: it would take the pushes the
    # parent waits for; each open watch starts afresh there, with its own connection and thread
    for watch in list(_OPEN):
        watch._start()


os.register_at_fork(after_in_child=_restart_in_child)


class LogWatch(ABC):
    """``quiet()`` is true only when nothing can have been appended since the last ``arm()``.

    Callers serialise ``quiet``/``arm`` and the catch-up that follows ``arm`` under one lock, so no
    reader trusts the silence while another is still applying what broke it."""

    @abstractmethod
    def quiet(self) -> bool: ...

    @abstractmethod
    def arm(self) -> None:
        """Forget what was signalled so far: called just before a catch-up reads the log."""

    def close(self) -> None:
        """Release the watch's connection and thread."""


class RedisLogWatch(LogWatch):
    """Client-side tracking on one dedicated RESP3 connection (see the module docstring).

    A thread pings on that connection every ``WATCH_HEARTBEAT`` seconds: the answer proves the
    connection still delivers (a dead peer can be silent), and reading it drains the pushes that an
    idle reader would otherwise leave piling up in Redis's output buffer. Silence is trusted only while
    the last answer is younger than ``max_quiet``."""

    def __init__(self, client: redis.Redis[bytes], prefix: str, *, max_quiet: float = defaults.WATCH_MAX_QUIET,
                 heartbeat: float = defaults.WATCH_HEARTBEAT, retry_every: float = defaults.WATCH_RETRY_EVERY
                 ) -> None:
        self._client = client
        self._prefix = prefix
        self._max_quiet = max_quiet
        self._heartbeat = heartbeat
        self._retry_every = retry_every
        self._closed = threading.Event()
        self._disabled = False
        self._start()
        _OPEN.add(self)

    def _start(self) -> None:
        self._lock = threading.Lock()
        self._conn: Any = None
        self._signalled = True  # nothing is known until the first arm() after connecting
        self._confirmed_at = 0.0
        self._failed_at = -self._retry_every
        if not self._closed.is_set():
            threading.Thread(target=self._ping_while_open, name="log-watch", daemon=True).start()

    # --- the connection (every method below runs under self._lock) ------------------------------

    def _connect(self) -> None:
        pool = self._client.connection_pool
        kwargs = dict(pool.connection_kwargs)
        kwargs["protocol"] = 3  # pushes arrive on the connection itself (RESP2 would need a second one)
        kwargs["client_name"] = WATCH_CLIENT_NAME
        conn = pool.connection_class(**kwargs)
        try:
            conn.connect()
            conn.send_command("CLIENT", "TRACKING", "ON", "BCAST", "PREFIX", self._prefix)
            reply = conn.read_response()
            if reply not in (b"OK", "OK"):
                raise redis.ResponseError(f"CLIENT TRACKING answered {reply!r}")
        except Exception:
            conn.disconnect()
            raise
        self._conn = conn
        self._signalled = True
        self._confirmed_at = time.monotonic()

    def _drop(self, reason: str) -> None:
        if self._conn is not None:
            log.warning("log_watch_lost", reason=reason)
            with contextlib.suppress(Exception):  # already broken: closing is best effort
                self._conn.disconnect()
        self._conn = None
        self._signalled = True
        self._failed_at = time.monotonic()

    def _ensure(self) -> bool:
        if self._conn is not None:
            return True
        if self._disabled or self._closed.is_set() or time.monotonic() - self._failed_at < self._retry_every:
            return False
        try:
            self._connect()
        except redis.ResponseError as exc:
            # the server (or a proxy before it) refuses tracking: every read makes the round trip
            log.warning("log_watch_unavailable", reason=str(exc))
            self._disabled = True
            return False
        except (redis.RedisError, OSError) as exc:
            self._drop(f"cannot connect: {exc}")
            return False
        return True

    def _take(self, reply: Any) -> bool:
        """Note one message read from the connection; whether it was the answer to our PING."""
        if reply in (b"PONG", "PONG"):
            self._confirmed_at = time.monotonic()
            return True
        self._signalled = True  # an invalidation push: the log changed
        return False

    def _drain(self) -> bool:
        """Read what is pending without waiting; False when the connection is gone (then dropped)."""
        try:
            while self._conn.can_read(timeout=0):
                self._take(self._conn.read_response(push_request=True))
        except (redis.RedisError, OSError) as exc:
            self._drop(str(exc))
            return False
        return True

    def _ping(self) -> None:
        try:
            self._conn.send_command("PING")
            timeout = min(defaults.WATCH_PING_TIMEOUT, self._max_quiet)
            while not self._take(self._conn.read_response(push_request=True, timeout=timeout)):
                pass
        except (redis.RedisError, OSError) as exc:
            self._drop(f"heartbeat: {exc}")

    # --- LogWatch -------------------------------------------------------------------------------

    def quiet(self) -> bool:
        with self._lock:
            if not self._ensure() or not self._drain():
                return False
            return not self._signalled and time.monotonic() - self._confirmed_at < self._max_quiet

    def arm(self) -> None:
        with self._lock:
            if self._ensure() and self._drain():
                self._signalled = False

    def _ping_while_open(self) -> None:
        while not self._closed.wait(self._heartbeat):
            with self._lock:
                if self._ensure():
                    self._ping()

    def close(self) -> None:
        self._closed.set()
        _OPEN.discard(self)
        with self._lock:
            if self._conn is not None:
                self._conn.disconnect()
                self._conn = None
            self._signalled = True


class CounterLogWatch(LogWatch):
    """For a store in this process: quiet while its append counter has not moved."""

    def __init__(self, counter: Any) -> None:
        self._counter = counter  # a callable returning how many appends the store has taken
        self._armed = -1

    def quiet(self) -> bool:
        return bool(self._counter() == self._armed)

    def arm(self) -> None:
        self._armed = self._counter()
