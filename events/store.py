"""The event store: one interface, a Redis-streams implementation and an in-memory one.

Positions are stream ids (``"<ms>-<seq>"``); ``"0-0"`` is before the first event. The domain log is
never trimmed; the activity stream is capped by length.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, Protocol, TypeVar

import orjson
import redis
from pydantic import ValidationError
from redis.sentinel import SentinelConnectionPool

from modelbus.events import defaults
from modelbus.events.codec import EventBody, decode, decode_body, encode, encode_body
from modelbus.events.errors import (
    ConcurrencyError,
    EventDecodeError,
    EventStoreError,
    InvalidEventError,
    ReplicationError,
    StoreUnavailableError,
    UniqueConstraintError,
)
from modelbus.events.keys import Keys
from modelbus.events.logs import get_logger
from modelbus.events.schema import Event, activity
from modelbus.events.scripts import APPEND, PER_EVENT, QUARANTINE
from modelbus.events.validation import Refusal, Refuse, SequenceGate, body_problem
from modelbus.events.watch import CounterLogWatch, LogWatch, RedisLogWatch

log = get_logger(__name__)

Stream = Literal["events", "activity"]
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class StoredEvent:
    position: str
    event: Event


@dataclass(frozen=True, slots=True)
class AppendResult:
    positions: list[str]
    version: int
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class BodyBatch:
    """What :meth:`EventStore.read_bodies` read: the entries of the wanted types, and where the read
    ended (the last entry, whatever its type: the checkpoint after applying the batch)."""

    entries: list[EventBody]
    position: str
    event_id: str | None  # of the entry at ``position`` (None when that entry is unreadable)


def as_body_batch(events: Sequence[StoredEvent], types: Container[str], after: str = "0-0") -> BodyBatch:
    """Decoded events in the form :meth:`EventStore.read_bodies` gives (``after``: where an empty read began)."""
    # a model keeps its fields in __dict__: the body, without a copy
    entries = [EventBody(s.position, s.event.type, s.event.aggregate_id, s.event.aggregate_version,
                         s.event.event_id, s.event.__dict__) for s in events if s.event.type in types]
    if not events:
        return BodyBatch(entries, after, None)
    return BodyBatch(entries, events[-1].position, events[-1].event.event_id)


@dataclass(frozen=True, slots=True)
class QuarantineEntry:
    """A refused entry as the quarantine stream keeps it: the refusal, when, and its id in that stream."""

    id: str
    position: str
    type: str
    aggregate_id: str
    aggregate_version: int
    reason: str
    time: str


def position_key(position: str) -> tuple[int, int]:
    ms, _, seq = position.partition("-")
    return int(ms), int(seq or 0)


class RedisSettings(Protocol):
    redis_url: str | None
    namespace: str


class EventStore(ABC):
    """What every store offers. See the module docstring for positions."""

    namespace: str
    _refused: set[str]  # positions this store quarantined or saw quarantined: asked of Redis once each

    @abstractmethod
    def append(self, events: Sequence[Event], *, expected_version: int | None = None,
               idempotency_key: str | None = None, claims: Mapping[str, str] | None = None,
               releases: Sequence[str] = (), announce: Sequence[Event] = ()) -> AppendResult:
        """Append events of one aggregate atomically (see events.scripts for the checks); ``announce``:
        operational events published on the activity stream once the append has landed (not for a
        duplicate), in the same step."""

    @abstractmethod
    def version(self, aggregate_id: str) -> int: ...

    @abstractmethod
    def head(self, stream: Stream = "events") -> str:
        """The last position of a stream, ``"0-0"`` when empty."""

    @abstractmethod
    def read(self, after: str = "0-0", count: int = defaults.READ_BATCH, stream: Stream = "events") -> list[StoredEvent]:
        """Events strictly after ``after``, in log order; undecodable entries are reported and skipped."""

    def read_bodies(self, after: str, count: int, types: Container[str]) -> BodyBatch:
        """Domain entries strictly after ``after``: those of ``types`` as envelopes and bodies,
        without building events (for replays that need a few fields; see codec.EventBody)."""
        return as_body_batch(self.read(after, count), types, after)

    @abstractmethod
    def watch(self) -> LogWatch | None:
        """A watch telling a reader when the domain log may have grown (None: this store has none)."""

    @abstractmethod
    def history(self, aggregate_id: str) -> list[StoredEvent]: ...

    @abstractmethod
    def claim_owner(self, field: str) -> str | None: ...

    @abstractmethod
    def publish(self, event: Event) -> str:
        """Append an operational event to the capped activity stream; returns its position."""

    @abstractmethod
    def poll(self, after: str, stream: Stream, block_ms: int) -> tuple[list[StoredEvent], str]:
        """Block up to ``block_ms`` for entries after ``after``: the decoded events and the position of
        the last entry seen, undecodable ones included (so a reader moves past them)."""

    def wait(self, after: str, stream: Stream, block_ms: int) -> list[StoredEvent]:
        """Block up to ``block_ms`` for events after ``after``."""
        return self.poll(after, stream, block_ms)[0]

    def read_all(self, after: str = "0-0", stream: Stream = "events") -> Iterator[StoredEvent]:
        while True:
            batch = self.read(after, stream=stream)
            if not batch:
                return
            yield from batch
            after = batch[-1].position

    def subscribe(self, since: str = "$", stream: Stream = "events", types: Iterable[str] | None = None,
                  block_ms: int = defaults.SUBSCRIBE_BLOCK_MS, stop: Callable[[], bool] | None = None,
                  ) -> Iterator[StoredEvent]:
        """Yield events after ``since`` (``"$"``: only new ones) forever, or until ``stop()`` is true.

        The last delivered position is kept, so a dropped connection resumes exactly where it was.
        ``types`` filters by event type, or by ``kind`` for activity events.
        """
        wanted = set(types) if types else None
        last = self.head(stream) if since == "$" else since
        gate = self.gate() if stream == "events" else None
        while not (stop and stop()):
            batch, cursor = self.poll(last, stream, block_ms)
            for stored in (batch if gate is None else gate.admit(batch)):
                last = stored.position
                if wanted is None or _type_of(stored.event) in wanted:
                    yield stored
            last = cursor

    # --- quarantine: refused entries of the domain log (events.validation), recorded once each ----

    @abstractmethod
    def quarantine(self, refusal: Refusal) -> bool:
        """Record a refused entry (once per position, whoever calls); True when this call recorded it."""

    @abstractmethod
    def quarantined(self, after: str = "0-0", count: int = defaults.READ_BATCH) -> list[QuarantineEntry]:
        """The quarantine in the order entries were refused, after the quarantine id ``after``."""

    @abstractmethod
    def quarantine_count(self) -> int: ...

    @abstractmethod
    def quarantined_among(self, positions: Sequence[str]) -> set[str]:
        """Which of these log positions are quarantined (by any reader)."""

    @abstractmethod
    def version_before(self, aggregate_id: str, position: str) -> int:
        """How many of the aggregate's appended events lie before ``position``: the version a reader
        starting there expects the aggregate to be at (the append script keeps this index)."""

    def quarantine_all(self, refusals: Sequence[Refusal]) -> list[bool]:
        """:meth:`quarantine` for each (a store may do it in one round trip)."""
        return [self.quarantine(r) for r in refusals]

    def refuse(self, *refusals: Refusal) -> None:
        """Report refused entries, and quarantine those this store has not seen refused before."""
        new = list({r.position: r for r in refusals if r.position not in self._refused}.values())
        recorded = dict(zip((r.position for r in new), self.quarantine_all(new), strict=True)) if new else {}
        for r in refusals:
            self._refused.add(r.position)
            # a warning when it is news; a reader passing an entry quarantined before says so at debug level
            report = log.warning if recorded.get(r.position) else log.debug
            report("event_skipped", position=r.position, reason=r.reason, quarantined=recorded.get(r.position, False),
                   type=r.type, aggregate=r.aggregate_id, version=r.aggregate_version)

    def gate(self) -> SequenceGate:
        """The version check for a reader following this store's domain log from anywhere."""
        return SequenceGate(self.version_before, self.quarantined_among, self.refuse)

    def publish_activity(self, kind: str, payload: Mapping[str, Any], source: str = "modelbus",
                         correlation_id: str | None = None) -> str:
        """Publish an activity event of ``kind`` from a plain payload (its typed class when the kind is known);
        a payload that does not fit raises InvalidEventError and publishes nothing."""
        try:
            event = activity(kind, payload, source=source, correlation_id=correlation_id)
        except ValidationError as exc:
            fields = ", ".join(".".join(str(p) for p in e["loc"]) for e in exc.errors())
            raise InvalidEventError(kind, source, f"the payload does not fit its schema: {fields}") from exc
        return self.publish(event)


def _type_of(event: Event) -> str:
    return getattr(event, "kind", None) or event.type


def _pack(command: str, args: tuple[Any, ...], conn: Any) -> Any:
    """The command in Redis's protocol: hiredis's packer on the arguments as they are (str, bytes and
    int, all an append sends) skips redis-py's per-argument encoding; without hiredis, redis-py's own."""
    if _pack_command is not None:
        return [_pack_command((command, *args))]
    return conn.pack_command(command, *args)


_pack_command: Callable[..., Any] | None
try:
    import hiredis
    _pack_command = hiredis.pack_command
except ImportError:  # redis-py's pure-Python packer
    _pack_command = None


def _check_batch(events: Sequence[Event], expected_version: int | None = None) -> str:
    """The batch's aggregate, once every event passed what every reader checks (events.validation): its
    schema, its domain checks, and a version the append will give it (events carry 0: the script assigns)."""
    if not events:
        raise EventStoreError("append needs at least one event")
    aggregate = events[0].aggregate_id
    if any(e.aggregate_id != aggregate for e in events):
        raise EventStoreError("all events of one append must share one aggregate id")
    if expected_version is not None and (not isinstance(expected_version, int) or isinstance(expected_version, bool)):
        raise InvalidEventError(events[0].type, aggregate, f"expected_version {expected_version!r} is not an integer")
    for n, e in enumerate(events):
        try:  # a model built with model_construct, or changed after, may no longer fit its schema
            type(e).__pydantic_validator__.validate_python(e.__dict__)
        except ValueError as exc:
            raise InvalidEventError(e.type, aggregate, " ".join(str(exc).split())) from None
        reason = body_problem(e.type, aggregate, e.__dict__)
        if reason is not None:
            raise InvalidEventError(e.type, aggregate, reason)
        slot = None if expected_version is None else expected_version + n + 1
        if e.aggregate_version and e.aggregate_version != slot:
            raise InvalidEventError(e.type, aggregate, f"carries aggregate version {e.aggregate_version}, but the "
                                    f"append assigns {slot if slot is not None else 'the next one'}")
    return aggregate


def _last_id(entries: Sequence[tuple[Any, Any]], default: str) -> str:
    if not entries:
        return default
    raw = entries[-1][0]
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _field(fields: Mapping[Any, Any], name: str) -> str:
    raw = fields.get(name.encode(), fields.get(name))
    return raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw or "")


def refusal_of(position: str, fields: Mapping[Any, Any], reason: str) -> Refusal:
    """A refusal for a raw entry, with what it claims to be as far as it can be read."""
    version = _field(fields, "ver")
    return Refusal(position, _field(fields, "type")[:100], _field(fields, "agg")[:200],
                   int(version) if version.isdigit() and len(version) < 19 else 0, reason)


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else "" if raw is None else str(raw)


def _decode_entries(entries: Iterable[tuple[Any, Any]], refuse: Refuse | None = None) -> list[StoredEvent]:
    """Decoded events; the others are reported, and with ``refuse`` (entries of the domain log) refused:
    those that do not decode, and those whose body a domain check refuses."""
    out: list[StoredEvent] = []
    refused: list[Refusal] = []
    for raw_id, fields in entries:
        position = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
        try:
            event = decode(position, fields)
        except EventDecodeError as exc:
            if refuse is None:
                log.warning("event_skipped", position=exc.position, reason=exc.reason)
            else:
                refused.append(refusal_of(position, fields, exc.reason))
            continue
        if refuse is not None:
            reason = body_problem(event.type, event.aggregate_id, event.__dict__)
            if reason is not None:
                refused.append(Refusal(position, event.type, event.aggregate_id, event.aggregate_version, reason))
                continue
        out.append(StoredEvent(position, event))
    if refused and refuse is not None:
        refuse(*refused)
    return out


def _body_batch(entries: Sequence[tuple[Any, Any]], after: str, types: Container[str],
                refuse: Refuse) -> BodyBatch:
    out: list[EventBody] = []
    refused: list[Refusal] = []
    position, event_id = after, None
    for raw_id, fields in entries:
        position = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
        raw_event_id = fields.get(b"id", fields.get("id"))
        event_id = raw_event_id.decode(errors="replace") if isinstance(raw_event_id, bytes) else raw_event_id
        try:
            body = decode_body(position, fields, types)
        except EventDecodeError as exc:
            refused.append(refusal_of(position, fields, exc.reason))
            continue
        if body is not None:
            out.append(body)
    if refused:
        refuse(*refused)
    return BodyBatch(out, position, event_id)


class RedisEventStore(EventStore):
    """The event log on Redis streams. Transient Redis errors are retried with backoff up to a
    deadline; every append carries an idempotency key, so a retried append cannot land twice."""

    def __init__(self, client: redis.Redis[bytes], namespace: str = "modelbus", *, url: str | None = None,
                 activity_maxlen: int = defaults.ACTIVITY_MAXLEN, replicas: int = 0,
                 retry_deadline: float = defaults.RECONNECT_DEADLINE) -> None:
        self.client = client
        self.namespace = namespace
        self.keys = Keys(namespace)
        self.url = url
        self.activity_maxlen = activity_maxlen
        self.replicas = replicas
        self.retry_deadline = retry_deadline
        self._append_sha = hashlib.sha1(APPEND.encode()).hexdigest()  # the name Redis gives the script
        self._append_keys = (self.keys.events, self.keys.versions, self.keys.idempotency, self.keys.unique)
        self._quarantine_sha = hashlib.sha1(QUARANTINE.encode()).hexdigest()
        self._refused = set()
        # aggregate -> (index entries read, the last one's id, its decoded events): the log only grows,
        # so a history read fetches and decodes only what was appended since (see ``history``)
        self._histories: OrderedDict[str, tuple[int, str, tuple[StoredEvent, ...]]] = OrderedDict()
        self._histories_lock = threading.Lock()
        # position -> the entry as XRANGE returns it, for entries this store appended or saw arrive (poll):
        # a history read that finds one of them in the aggregate's index decodes it from here instead of
        # fetching it (an entry of a stream never changes; the index check of ``history`` is unchanged)
        self._recent: OrderedDict[str, tuple[Any, ...]] = OrderedDict()
        # connections kept for appends (see _evalsha), idle ones here; the pid they were made in
        self._kept: list[Any] = []
        self._kept_pid = os.getpid()

    @classmethod
    def from_url(cls, url: str, namespace: str = "modelbus", **kwargs: Any) -> RedisEventStore:
        from modelbus.events.connection import connect
        return cls(connect(url), namespace, url=url, **kwargs)

    @classmethod
    def from_config(cls, config: Any) -> RedisEventStore:
        """Open the store a configuration names: its ``redis_url``, else the embedded Redis under its root."""
        from modelbus.events.connection import resolve_redis_url
        url = resolve_redis_url(config)
        replicas = config.replicas if getattr(config, "durability", "fast") == "replicated" else 0
        return cls.from_url(url, config.namespace, activity_maxlen=getattr(config, "activity_maxlen",
                            defaults.ACTIVITY_MAXLEN), replicas=replicas)

    def _call(self, fn: Callable[[], T]) -> T:
        deadline = time.monotonic() + self.retry_deadline
        delay = defaults.RECONNECT_BACKOFF_BASE
        while True:
            try:
                return fn()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if time.monotonic() + delay > deadline:
                    raise StoreUnavailableError(f"Redis at {self.url or '?'} unreachable: {exc}") from exc
                log.warning("redis_retry", error=str(exc), delay=delay)
                time.sleep(delay)
                delay = min(delay * 2, defaults.RECONNECT_BACKOFF_CAP)

    def append(self, events: Sequence[Event], *, expected_version: int | None = None,
               idempotency_key: str | None = None, claims: Mapping[str, str] | None = None,
               releases: Sequence[str] = (), announce: Sequence[Event] = ()) -> AppendResult:
        aggregate = _check_batch(events, expected_version)
        args: list[Any] = [aggregate, "" if expected_version is None else expected_version,
                           idempotency_key or events[0].event_id, len(events)]
        for e in events:  # the fields of codec.encode but the aggregate id, which the script writes once
            args += (e.type, e.schema_version, e.time.isoformat(), e.correlation_id or "", e.event_id,
                     encode_body(e))
        args.append(len(claims or ()))
        for field, owner in (claims or {}).items():
            args += (field, owner)
        args.append(len(releases))
        args += releases
        args += (len(announce), self.activity_maxlen)
        for a in announce:  # the fields of codec.encode
            args += (a.type, a.schema_version, a.aggregate_id, a.time.isoformat(), a.correlation_id or "",
                     a.event_id, encode_body(a))
        keys = [*self._append_keys, self.keys.aggregate_index(aggregate), self.keys.activity]
        def append_and_replicate() -> tuple[int, bytes]:
            # one step for the retry loop: after a failover the append is repeated (the idempotency key
            # makes that safe) so that WAIT counts replicas of the server that holds the event now
            reply = self._run_append(keys, args)
            if self.replicas:
                acked = int(self.client.wait(self.replicas, defaults.REPLICATION_TIMEOUT_MS))
                if acked < self.replicas:
                    raise ReplicationError(f"append reached {acked} of {self.replicas} replicas within "
                                           f"{defaults.REPLICATION_TIMEOUT_MS} ms")
            return int(reply[0]), reply[1]

        try:
            duplicate, raw = self._call(append_and_replicate)
        except redis.ResponseError as exc:
            raise _translate(aggregate, expected_version, str(exc)) from exc
        result = _append_result(raw, bool(duplicate))
        if not result.duplicate:  # kept as sent: made into an entry only if a history read asks for it
            first = result.version - len(events) + 1
            self._remember((p, (aggregate, first + n, args[4 + n * PER_EVENT:4 + (n + 1) * PER_EVENT]))
                           for n, p in enumerate(result.positions))
        return result

    def _remember(self, entries: Iterable[tuple[str, Any]]) -> None:
        with self._histories_lock:
            for position, kept in entries:
                self._recent[position] = kept
            while len(self._recent) > defaults.RECENT_ENTRIES:
                self._recent.popitem(last=False)

    def _run_append(self, keys: list[str], args: list[Any]) -> Any:
        return self._run_script(self._append_sha, APPEND, keys, args)

    def _evalsha(self, *args: Any) -> Any:
        """EVALSHA sent and read directly on a connection: redis-py's Script wrapper and even
        ``execute_command`` (its own retry, its metrics hooks) cost more client time per append than the
        connection does (39 us against 29 us a call on the dev VM). A plain server's appends go on
        connections this store keeps (one per concurrent append, made by the client's pool and then
        kept out of it): the pool's checkout, its health poll and its release events cost as much client
        time again. Under Sentinel they go through the pool, whose connections follow a failover to the
        new master (a kept one would go on writing to the demoted server). ``_call`` retries what fails
        here; a broken connection is closed and dropped. A client without a pool of its own (a cluster,
        a single-connection client) goes the ordinary way."""
        client = self.client
        pool: Any = getattr(client, "connection_pool", None)
        if pool is None or getattr(client, "connection", None) is not None:
            return client.execute_command("EVALSHA", *args)
        follows_failover = isinstance(pool, SentinelConnectionPool)  # (a flag: the stubs' pool is redis-py 4's)
        if follows_failover:
            conn = pool.get_connection()
            try:
                conn.send_command("EVALSHA", *args)
                return conn.read_response()
            except (redis.ConnectionError, redis.TimeoutError):
                conn.disconnect()
                raise
            finally:
                pool.release(conn)
        if self._kept_pid != os.getpid():  # a forked child: the parent's sockets are not ours to use
            self._kept, self._kept_pid = [], os.getpid()
        try:
            conn = self._kept.pop()  # (atomic: concurrent appends each get their own)
        except IndexError:
            conn = pool.make_connection()
        try:
            conn.send_packed_command(_pack("EVALSHA", args, conn))
            reply = conn.read_response()
        except redis.ResponseError:
            self._kept.append(conn)  # an error reply (NOSCRIPT, CONFLICT...): the connection is fine
            raise
        except BaseException:  # broken, timed out or interrupted half-way: never used again
            conn.disconnect()
            raise
        self._kept.append(conn)
        return reply

    def version(self, aggregate_id: str) -> int:
        raw = self._call(lambda: self.client.hget(self.keys.versions, aggregate_id))
        return int(raw or 0)

    def _stream_key(self, stream: Stream) -> str:
        return self.keys.events if stream == "events" else self.keys.activity

    def head(self, stream: Stream = "events") -> str:
        entries = self._call(lambda: self.client.xrevrange(self._stream_key(stream), count=1))
        if not entries:
            return "0-0"
        raw = entries[0][0]
        return raw.decode() if isinstance(raw, bytes) else raw

    def read(self, after: str = "0-0", count: int = defaults.READ_BATCH, stream: Stream = "events") -> list[StoredEvent]:
        key = self._stream_key(stream)
        while True:
            entries = self._call(partial(self.client.xrange, key, min=f"({after}", count=count))
            decoded = _decode_entries(entries, self._refuser(stream))
            if decoded or not entries:
                return decoded
            after = _last_id(entries, after)  # a whole batch of bad entries: read on past them

    def read_bodies(self, after: str, count: int, types: Container[str]) -> BodyBatch:
        entries = self._call(partial(self.client.xrange, self.keys.events, min=f"({after}", count=count))
        return _body_batch(entries, after, types, self.refuse)

    def watch(self) -> LogWatch | None:
        return RedisLogWatch(self.client, self.keys.events)

    def history(self, aggregate_id: str) -> list[StoredEvent]:
        """The aggregate's events, read fresh from Redis on every call (read-your-writes holds) but
        fetched and decoded only past what an earlier call of this process saw: a job's steps read
        their job's history at every transition, and decoding it whole each time cost them more than
        the rest of their bookkeeping. What was read before is trusted only while the index still holds
        its last id at the same place (a Redis that lost its data starts over). Plain commands, no
        script: a Lua XRANGE converts each entry to a table and back, three times Redis's time."""
        index = self.keys.aggregate_index(aggregate_id)
        with self._histories_lock:
            known, last, events = self._histories.get(aggregate_id, (0, "", ()))

        def tail() -> tuple[int, list[Any]]:
            # one command: the last entry read before (still in its place?) and whatever came after it
            if not known:
                return 0, self.client.lrange(index, 0, -1)
            replies = self.client.lrange(index, known - 1, -1)
            if not replies or _text(replies[0]) != last:
                return 0, self.client.lrange(index, 0, -1)
            return known, replies[1:]

        start, ids = self._call(tail)
        if start == 0:
            events = ()
        if ids:
            positions = [_text(raw) for raw in ids]
            with self._histories_lock:
                seen = [self._recent.get(p) for p in positions]
            missing = [p for p, entry in zip(positions, seen, strict=True) if entry is None]
            fetched: dict[str, list[Any]] = {}
            if missing:
                pipe = self.client.pipeline(transaction=False)
                for position in missing:
                    pipe.xrange(self.keys.events, min=position, max=position)
                fetched = dict(zip(missing, self._call(pipe.execute), strict=True))
            entries = [entry for p, kept in zip(positions, seen, strict=True)
                       for entry in ([_kept_entry(p, kept)] if kept is not None else fetched[p])]
            events += tuple(_decode_entries(entries, self.refuse))
            last = positions[-1]
        with self._histories_lock:
            self._histories[aggregate_id] = (start + len(ids), last, events)
            self._histories.move_to_end(aggregate_id)
            while len(self._histories) > defaults.HISTORY_CACHE:
                self._histories.popitem(last=False)
        return list(events)

    def _run_script(self, sha: str, source: str, keys: list[str], args: list[Any]) -> Any:
        try:
            return self._evalsha(sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:  # after a restart or SCRIPT FLUSH
            self.client.script_load(source)  # type: ignore[no-untyped-call]
            return self._evalsha(sha, len(keys), *keys, *args)

    def claim_owner(self, field: str) -> str | None:
        raw = self._call(lambda: self.client.hget(self.keys.unique, field))
        return raw.decode() if isinstance(raw, bytes) else raw

    def publish(self, event: Event) -> str:
        fields = encode(event)
        raw = self._call(lambda: self.client.xadd(self.keys.activity, fields,
                                                   maxlen=self.activity_maxlen, approximate=True))
        return raw.decode() if isinstance(raw, bytes) else raw

    def poll(self, after: str, stream: Stream, block_ms: int) -> tuple[list[StoredEvent], str]:
        key = self._stream_key(stream)
        reply = self._call(lambda: self.client.xread({key: after}, count=defaults.READ_BATCH, block=block_ms))
        entries = [entry for _, items in (reply or []) for entry in items]
        if stream == "events":  # a waiter reads its job's history next
            self._remember((_text(entry[0]), entry) for entry in entries[-defaults.RECENT_ENTRIES:])
        return _decode_entries(entries, self._refuser(stream)), _last_id(entries, after)

    # --- consumer groups: each event to one member, with ack and reclaim ------------------------

    def ensure_group(self, group: str, stream: Stream = "events", start: str = "0") -> None:
        try:
            self._call(lambda: self.client.xgroup_create(self._stream_key(stream), group, id=start, mkstream=True))
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def read_group(self, group: str, consumer: str, stream: Stream = "events", count: int = 100,
                   block_ms: int | None = None) -> list[StoredEvent]:
        key = self._stream_key(stream)
        reply = self._call(lambda: self.client.xreadgroup(group, consumer, {key: ">"}, count=count, block=block_ms))
        return [e for _, entries in (reply or []) for e in _decode_entries(entries, self._refuser(stream))]

    def ack(self, group: str, positions: Sequence[str], stream: Stream = "events") -> int:
        if not positions:
            return 0
        return int(self._call(lambda: self.client.xack(  # type: ignore[no-untyped-call]
            self._stream_key(stream), group, *positions)))

    def reclaim(self, group: str, consumer: str, min_idle_ms: int = defaults.RECLAIM_MIN_IDLE_MS,
                stream: Stream = "events", count: int = 100) -> list[StoredEvent]:
        """Take over entries whose consumer went quiet (died) for at least ``min_idle_ms``."""
        key = self._stream_key(stream)
        reply = self._call(lambda: self.client.xautoclaim(key, group, consumer, min_idle_ms, "0-0", count=count))
        return _decode_entries(reply[1], self._refuser(stream))

    def pending(self, group: str, stream: Stream = "events") -> int:
        info = self._call(lambda: self.client.xpending(  # type: ignore[no-untyped-call]
            self._stream_key(stream), group))
        return int(info["pending"])

    # --- quarantine -------------------------------------------------------------------------------

    def _refuser(self, stream: Stream) -> Refuse | None:
        return self.refuse if stream == "events" else None

    def quarantine(self, refusal: Refusal) -> bool:
        return self.quarantine_all([refusal])[0]

    def quarantine_all(self, refusals: Sequence[Refusal]) -> list[bool]:
        keys = [self.keys.quarantine, self.keys.quarantined]
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

        def run() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for r in refusals:  # one round trip for a batch of refused entries (a flood of junk is one batch)
                # (untyped in some redis versions' stubs: either way clean)
                pipe.execute_command(  # type: ignore[no-untyped-call, unused-ignore]
                    "EVALSHA", self._quarantine_sha, len(keys), *keys, r.position, r.type, r.aggregate_id,
                    r.aggregate_version, r.reason, when)
            try:
                return pipe.execute()  # type: ignore[no-any-return, unused-ignore]
            except redis.exceptions.NoScriptError:
                # after a restart or SCRIPT FLUSH
                self.client.script_load(QUARANTINE)  # type: ignore[no-untyped-call, unused-ignore]
                return run()
        return [bool(x) for x in self._call(run)]

    def quarantined(self, after: str = "0-0", count: int = defaults.READ_BATCH) -> list[QuarantineEntry]:
        entries = self._call(partial(self.client.xrange, self.keys.quarantine, min=f"({after}", count=count))
        out = []
        for raw_id, fields in entries:
            version = _field(fields, "ver")
            out.append(QuarantineEntry(raw_id.decode() if isinstance(raw_id, bytes) else raw_id,
                                       _field(fields, "position"), _field(fields, "type"), _field(fields, "agg"),
                                       int(version) if version.isdigit() else 0, _field(fields, "reason"),
                                       _field(fields, "time")))
        return out

    def quarantine_count(self) -> int:
        return int(self._call(lambda: self.client.xlen(self.keys.quarantine)))

    def quarantined_among(self, positions: Sequence[str]) -> set[str]:
        if not positions:
            return set()
        found = self._call(lambda: self.client.hmget(self.keys.quarantined, list(positions)))
        return {p for p, hit in zip(positions, found, strict=True) if hit is not None}

    def version_before(self, aggregate_id: str, position: str) -> int:
        ids = self._call(lambda: self.client.lrange(self.keys.aggregate_index(aggregate_id), 0, -1))
        floor = position_key(position)
        return sum(1 for raw in ids if position_key(raw.decode() if isinstance(raw, bytes) else raw) < floor)


def _kept_entry(position: str, kept: Any) -> tuple[Any, Any]:
    """An entry as XRANGE returns it, from what ``RedisEventStore._remember`` kept: an entry read from the
    log as it was, or (aggregate, version, the append's 6 arguments of the event) made into the fields the
    script wrote from those arguments."""
    if len(kept) == 2:
        return kept  # type: ignore[no-any-return]
    aggregate, version, (kind, schema, when, corr, event_id, body) = kept
    return position.encode(), {
        b"type": kind.encode(), b"v": str(schema).encode(), b"agg": aggregate.encode(), b"ver": str(version).encode(),
        b"time": when.encode(), b"corr": corr.encode(), b"id": event_id.encode(), b"body": bytes(body)}


def _append_result(raw: bytes | str, duplicate: bool) -> AppendResult:
    """The append script's reply: ``"<version> <id>..."``, or the JSON an earlier script recorded."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    if text.startswith("{"):
        result = orjson.loads(text)
        return AppendResult(list(result["ids"]), int(result["version"]), duplicate)
    version, *ids = text.split(" ")
    return AppendResult(ids, int(version), duplicate)


def _translate(aggregate: str, expected: int | None, message: str) -> EventStoreError:
    if "CONFLICT" in message:
        actual = int(message.split("CONFLICT", 1)[1].split()[0])
        return ConcurrencyError(aggregate, -1 if expected is None else expected, actual)
    if "UNIQUE" in message:
        owner, _, field = message.split("UNIQUE", 1)[1].strip().partition(" ")
        return UniqueConstraintError(field, owner)
    return EventStoreError(f"append failed: {message}")


class InMemoryEventStore(EventStore):
    """The same semantics in one process, for tests of pure logic and for embedding."""

    def __init__(self, namespace: str = "memory") -> None:
        self.namespace = namespace
        self._streams: dict[str, list[StoredEvent]] = {"events": [], "activity": []}
        self._versions: dict[str, int] = {}
        self._idempotency: dict[str, AppendResult] = {}
        self._unique: dict[str, str] = {}
        self._index: dict[str, list[StoredEvent]] = {}
        self._quarantine: dict[str, QuarantineEntry] = {}
        self._refused = set()
        self._last = (0, 0)
        self._cond = threading.Condition()

    def _next_position(self) -> str:
        ms = int(time.time() * 1000)
        last_ms, last_seq = self._last
        self._last = (ms, 0) if ms > last_ms else (last_ms, last_seq + 1)
        return f"{self._last[0]}-{self._last[1]}"

    def append(self, events: Sequence[Event], *, expected_version: int | None = None,
               idempotency_key: str | None = None, claims: Mapping[str, str] | None = None,
               releases: Sequence[str] = (), announce: Sequence[Event] = ()) -> AppendResult:
        aggregate = _check_batch(events, expected_version)
        key = idempotency_key or events[0].event_id
        with self._cond:
            if key in self._idempotency:
                prior = self._idempotency[key]
                return AppendResult(prior.positions, prior.version, True)
            current = self._versions.get(aggregate, 0)
            if expected_version is not None and expected_version != current:
                raise ConcurrencyError(aggregate, expected_version, current)
            for field, owner in (claims or {}).items():
                holder = self._unique.get(field)
                if holder is not None and holder != owner:
                    raise UniqueConstraintError(field, holder)
            positions = []
            for e in events:
                current += 1
                stored = StoredEvent(self._next_position(), e.model_copy(update={"aggregate_version": current}))
                self._streams["events"].append(stored)
                self._index.setdefault(aggregate, []).append(stored)
                positions.append(stored.position)
            self._versions[aggregate] = current
            self._unique.update(claims or {})
            for field in releases:
                if self._unique.get(field) == aggregate:
                    del self._unique[field]
            result = AppendResult(positions, current)
            self._idempotency[key] = result
            for a in announce:
                self.publish(a)  # (the condition is reentrant: the same step)
            self._cond.notify_all()
            return result

    def version(self, aggregate_id: str) -> int:
        with self._cond:
            return self._versions.get(aggregate_id, 0)

    def head(self, stream: Stream = "events") -> str:
        with self._cond:
            entries = self._streams[stream]
            return entries[-1].position if entries else "0-0"

    def read(self, after: str = "0-0", count: int = defaults.READ_BATCH, stream: Stream = "events") -> list[StoredEvent]:
        floor = position_key(after)
        with self._cond:
            entries = self._streams[stream]
            start = bisect.bisect_right(entries, floor, key=lambda s: position_key(s.position))
            return entries[start:start + count]

    def watch(self) -> LogWatch | None:
        return CounterLogWatch(lambda: len(self._streams["events"]))

    def history(self, aggregate_id: str) -> list[StoredEvent]:
        with self._cond:
            return list(self._index.get(aggregate_id, []))

    def claim_owner(self, field: str) -> str | None:
        with self._cond:
            return self._unique.get(field)

    def publish(self, event: Event) -> str:
        with self._cond:
            stored = StoredEvent(self._next_position(), event)
            self._streams["activity"].append(stored)
            del self._streams["activity"][:-defaults.ACTIVITY_MAXLEN]
            self._cond.notify_all()
            return stored.position

    def quarantine(self, refusal: Refusal) -> bool:
        with self._cond:
            if refusal.position in self._quarantine:
                return False
            self._quarantine[refusal.position] = QuarantineEntry(
                f"{len(self._quarantine) + 1}-0", refusal.position, refusal.type, refusal.aggregate_id,
                refusal.aggregate_version, refusal.reason, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            return True

    def quarantined(self, after: str = "0-0", count: int = defaults.READ_BATCH) -> list[QuarantineEntry]:
        with self._cond:
            floor = position_key(after)
            return [q for q in self._quarantine.values() if position_key(q.id) > floor][:count]

    def quarantine_count(self) -> int:
        with self._cond:
            return len(self._quarantine)

    def quarantined_among(self, positions: Sequence[str]) -> set[str]:
        with self._cond:
            return {p for p in positions if p in self._quarantine}

    def version_before(self, aggregate_id: str, position: str) -> int:
        floor = position_key(position)
        with self._cond:
            return sum(1 for s in self._index.get(aggregate_id, []) if position_key(s.position) < floor)

    def poll(self, after: str, stream: Stream, block_ms: int) -> tuple[list[StoredEvent], str]:
        found = self._wait(after, stream, block_ms)
        return found, (found[-1].position if found else after)

    def _wait(self, after: str, stream: Stream, block_ms: int) -> list[StoredEvent]:
        deadline = time.monotonic() + block_ms / 1000
        with self._cond:
            while True:
                found = self.read(after, stream=stream)
                remaining = deadline - time.monotonic()
                if found or remaining <= 0:
                    return found
                self._cond.wait(remaining)
