"""The ``modelbus`` command line; the console script is ``services.cli:app``."""

from services.cli.app import app

__all__ = ["app"]
