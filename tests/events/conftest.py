"""Event-layer tests call the log ``store``: the parametrised ``log_store`` of tests/conftest.py."""

from __future__ import annotations

import pytest

from modelbus.events.store import EventStore


@pytest.fixture()
def store(log_store: EventStore) -> EventStore:
    return log_store
