"""Errors: one hierarchy for all of modelbus, rooted here on the ground floor.

Every error modelbus raises is a :class:`ModelbusError` and also exactly one *kind*. The kind, not the
leaf class and never the message, decides the HTTP status, the CLI's exit code and whether a job retries
(each in one table: ``services/api/errors.py``, ``services/cli/errors.py``, ``services/install/steps.py``)::

    ModelbusError                   kind            HTTP  exit  retry
    ├── NotFound                    not_found        404    3    no
    ├── Conflict                    conflict         409    4    no
    ├── InvalidInput                invalid_input    422    2    no
    │   └── TooLarge                too_large        413    2    no
    ├── Forbidden                   forbidden        403    2    no
    ├── Unavailable                 unavailable      503    5    yes
    ├── TimedOut                    timed_out        504    6    yes
    └── Failed                      failed           502    1    no   (a worker ran it and it failed)

Leaf errors of each package (``UnknownModelException``, ``DuplicateModelException``...) subclass their
package's base *and* one kind; each package's errors module draws its own leaves::

    ModelbusError
    ├── EventStoreError         events (below; SentinelURLError in events.sentinel)
    ├── RecordServiceError      services.records.errors
    ├── ProbeError              services.probe.errors
    ├── LoadError               services.load.errors
    ├── InstallError            services.install.errors
    ├── DownloadError           services.download.errors
    ├── RoutingError            services.routing
    ├── ClientError             services.client.errors
    ├── CliError                services.cli.errors
    ├── HashingError            (InvalidInput) services.hashing
    └── ConfigError             (InvalidInput, ValueError) services.config

Errors of redis-py, httpx and RQ are translated where they come in (``events.connection``,
``services.download.fetch``, ``services.routing``). ``tests/events/test_error_kinds.py`` walks every module
and holds each error to one kind. The event layer's own leaves:

    EventStoreError
    ├── ConcurrencyError        (Conflict) the aggregate is not at the expected version
    ├── UniqueConstraintError   (Conflict) a unique field (e.g. a model's path) is held by another aggregate
    ├── EventDecodeError        (InvalidInput) a stream entry cannot be read as an event
    ├── InvalidEventError       (InvalidInput) an event to append or publish breaks its schema or a domain check
    ├── StoreUnavailableError   (Unavailable) Redis did not answer within the retry deadline
    ├── ReplicationError        (Unavailable) an append was not confirmed by the required replicas
    ├── EmbeddedRedisError      (Unavailable) the embedded Redis could not be started, or a given Redis is unfit
    └── SentinelURLError        (InvalidInput) a redis+sentinel:// URL that cannot be used
"""

from __future__ import annotations

from enum import StrEnum


class Kind(StrEnum):
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    INVALID_INPUT = "invalid_input"
    TOO_LARGE = "too_large"
    FORBIDDEN = "forbidden"
    UNAVAILABLE = "unavailable"
    TIMED_OUT = "timed_out"
    FAILED = "failed"


class ModelbusError(Exception):
    """The root of every error modelbus raises. ``kind`` says what sort of failure it is."""

    kind: Kind = Kind.FAILED


class NotFound(ModelbusError):
    """Something named (a model key, a job, a worker, a file) does not exist."""

    kind = Kind.NOT_FOUND


class Conflict(ModelbusError):
    """The request collides with the current state (a duplicate, a stale version, a held claim)."""

    kind = Kind.CONFLICT


class InvalidInput(ModelbusError):
    """The input itself is wrong: retrying the same request cannot succeed."""

    kind = Kind.INVALID_INPUT


class TooLarge(InvalidInput):
    """The input is over a configured limit (a body, a decompressed archive, a count)."""

    kind = Kind.TOO_LARGE


class Forbidden(ModelbusError):
    """The caller may not do this (a path outside the import roots, a host not allowed)."""

    kind = Kind.FORBIDDEN


class Unavailable(ModelbusError):
    """A part that is needed (Redis, a worker) does not answer now; the same request may succeed later."""

    kind = Kind.UNAVAILABLE


class TimedOut(ModelbusError):
    """Waiting took longer than allowed; the work may still go on."""

    kind = Kind.TIMED_OUT


class Failed(ModelbusError):
    """Work that was accepted ran and failed (a worker's job)."""

    kind = Kind.FAILED


#: the kind classes, one per Kind
KIND_CLASSES: tuple[type[ModelbusError], ...] = (NotFound, Conflict, InvalidInput, TooLarge, Forbidden, Unavailable,
                                                 TimedOut, Failed)


def kind_of(exc: BaseException) -> Kind | None:
    """The kind of a modelbus error, or None for anything else (a bug, or a library's error not translated)."""
    return exc.kind if isinstance(exc, ModelbusError) else None


class EventStoreError(ModelbusError):
    """Base of every error raised by the event layer."""


class ConcurrencyError(EventStoreError, Conflict):
    def __init__(self, aggregate_id: str, expected: int, actual: int) -> None:
        super().__init__(f"aggregate {aggregate_id!r} is at version {actual}, expected {expected}")
        self.aggregate_id, self.expected, self.actual = aggregate_id, expected, actual


class UniqueConstraintError(EventStoreError, Conflict):
    def __init__(self, field: str, owner: str) -> None:
        super().__init__(f"{field!r} is already held by {owner!r}")
        self.field, self.owner = field, owner


class EventDecodeError(EventStoreError, InvalidInput):
    def __init__(self, position: str, reason: str) -> None:
        super().__init__(f"stream entry {position}: {reason}")
        self.position, self.reason = position, reason


class StoreUnavailableError(EventStoreError, Unavailable):
    """Redis could not be reached (after retrying); the message carries the URL and the cause."""


class EmbeddedRedisError(EventStoreError, Unavailable):
    """A Redis server could not be started or is configured in a way that would lose events."""


class ReplicationError(EventStoreError, Unavailable):
    """The append landed on the primary but fewer replicas than required confirmed it in time."""


class InvalidEventError(EventStoreError, InvalidInput):
    """An append or publish refused before it ran: an event that breaks its schema (every reader would
    quarantine it) or an activity payload that does not fit its kind's schema."""

    def __init__(self, type_name: str, aggregate_id: str, reason: str) -> None:
        super().__init__(f"refused to append {type_name} for {aggregate_id!r}: {reason}")
        self.type_name, self.aggregate_id, self.reason = type_name, aggregate_id, reason
