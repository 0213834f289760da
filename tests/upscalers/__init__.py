"""Tests that need Spandrel, which needs torchvision: they run in .venv-vision (``make test-upscalers``)
and skip, saying why, where Spandrel does not import (the main .venv's CPU torch 2.13.0)."""

from __future__ import annotations

from typing import Any

import pytest


def require_spandrel() -> Any:
    """Spandrel, or a module-level skip naming why it does not import and how to get it."""
    try:
        import spandrel
    except (ImportError, RuntimeError, OSError) as exc:  # torchvision: RuntimeError beside a torch not its own
        first = str(exc).splitlines()[0] if str(exc) else ""
        pytest.skip(f"Spandrel does not import here ({type(exc).__name__}: {first}): run `make test-upscalers`",
                    allow_module_level=True)
    return spandrel
