"""Fixtures of the per-model data tests: the record tests' backends (SQL, YAML, memory) on both event
stores, and the API of tests/api (in process, and a real uvicorn on 127.0.0.1)."""

from tests.api.conftest import app, http, live_api  # noqa: F401 - fixtures
from tests.cli.test_cli import cli  # noqa: F401 - the CLI in process, asserting exit codes
from tests.install.conftest import bus  # noqa: F401 - a real worker on the install, download, hash queues
from tests.records.conftest import backend, config, make_service, root, service  # noqa: F401 - fixtures
