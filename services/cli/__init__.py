"""The ``modelbus`` command line; the console script is ``services.cli:app``."""

from modelbus.services.cli.startup import imports_uncollected

with imports_uncollected():  # the first thing the console script runs: redis-py, pydantic, the event schema
    from modelbus.services.cli.app import app

__all__ = ["app"]
