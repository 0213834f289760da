"""Fault tests: real processes killed, real servers stopped. Tests marked ``slow`` run only with
MODELBUS_SLOW=1, so that the default run stays short on a two-core machine."""

from __future__ import annotations

import os

import pytest

# the install buses (module-scoped: a namespace, a root, the HTTP servers, worker processes)
from tests.install.conftest import bus, idle_bus  # noqa: F401


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("MODELBUS_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow fault test: run with MODELBUS_SLOW=1")
    here = os.path.dirname(__file__)
    for item in items:
        if "slow" in item.keywords and str(item.fspath).startswith(here):
            item.add_marker(skip)
