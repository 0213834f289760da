"""The load tests' fixtures (a real record store over the test Redis, a load service on the CPU)."""

from tests.load.conftest import add, config, events, service, store  # noqa: F401
