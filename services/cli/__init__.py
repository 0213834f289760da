"""The ``modelbus`` command line; the console script is ``services.cli:app``."""

from modelbus.services.cli.app import app

__all__ = ["app"]
