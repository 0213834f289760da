"""Errors of the event layer.

    EventStoreError
    ├── ConcurrencyError        the aggregate is not at the expected version
    ├── UniqueConstraintError   a unique field (e.g. a model's path) is held by another aggregate
    ├── EventDecodeError        a stream entry cannot be read as an event (unknown type, newer schema, bad JSON)
    ├── StoreUnavailableError   Redis did not answer within the retry deadline
    ├── ReplicationError        an append was not confirmed by the required replicas (durability=replicated)
    └── EmbeddedRedisError      the embedded Redis could not be started, or a given Redis is unfit
"""

from __future__ import annotations


class EventStoreError(Exception):
    """Base of every error raised by the event layer."""


class ConcurrencyError(EventStoreError):
    def __init__(self, aggregate_id: str, expected: int, actual: int) -> None:
        super().__init__(f"aggregate {aggregate_id!r} is at version {actual}, expected {expected}")
        self.aggregate_id, self.expected, self.actual = aggregate_id, expected, actual


class UniqueConstraintError(EventStoreError):
    def __init__(self, field: str, owner: str) -> None:
        super().__init__(f"{field!r} is already held by {owner!r}")
        self.field, self.owner = field, owner


class EventDecodeError(EventStoreError):
    def __init__(self, position: str, reason: str) -> None:
        super().__init__(f"stream entry {position}: {reason}")
        self.position, self.reason = position, reason


class StoreUnavailableError(EventStoreError):
    """Redis could not be reached (after retrying); the message carries the URL and the cause."""


class EmbeddedRedisError(EventStoreError):
    """A Redis server could not be started or is configured in a way that would lose events."""


class ReplicationError(EventStoreError):
    """The append landed on the primary but fewer replicas than required confirmed it in time."""
