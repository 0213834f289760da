"""The event layer: schema, the Redis-streams event store, projections, embedded Redis."""

from modelbus.events.errors import (
    ConcurrencyError,
    EmbeddedRedisError,
    EventDecodeError,
    EventStoreError,
    StoreUnavailableError,
    UniqueConstraintError,
)
from modelbus.events.keys import Keys
from modelbus.events.projection import Projection, ProjectionRunner
from modelbus.events.store import AppendResult, EventStore, InMemoryEventStore, RedisEventStore, StoredEvent

__all__ = [
    "AppendResult", "ConcurrencyError", "EmbeddedRedisError", "EventDecodeError", "EventStore", "EventStoreError",
    "InMemoryEventStore", "Keys", "Projection", "ProjectionRunner", "RedisEventStore", "StoreUnavailableError",
    "StoredEvent", "UniqueConstraintError",
]
