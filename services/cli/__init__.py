"""The ``modelbus`` command line; the console script is ``services.cli:app``."""

from modelbus.services.cli.startup import imports_uncollected, started_as_the_cli

# the first thing the console script runs: redis-py, pydantic, the event schema
with imports_uncollected(freeze=started_as_the_cli()):
    from modelbus.services.cli.app import app

__all__ = ["app"]
