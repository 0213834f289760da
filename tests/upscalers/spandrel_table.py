"""Spandrel's own detection rules, read from its registry: ``python -m tests.upscalers.spandrel_table``
prints the table that ``services/probe/spandrel_archs.py`` ships (run it in .venv-vision after a Spandrel
upgrade; tests/upscalers/test_identify.py fails while the two differ)."""

from __future__ import annotations

from typing import Any


def condition(cond: Any) -> tuple[Any, ...] | None:
    """A KeyCondition as nested tuples, ("all" | "any", key or condition...); None for any other detector."""
    from spandrel.util import KeyCondition

    if not isinstance(cond, KeyCondition):
        return None
    items = tuple(k if isinstance(k, str) else condition(k) for k in cond._keys)
    if any(i is None for i in items):
        return None
    return (cond._kind, *items)


def live_table() -> tuple[tuple[str, str, tuple[Any, ...] | None], ...]:
    """(architecture id, name, condition) in the order Spandrel tries them."""
    from spandrel import MAIN_REGISTRY

    rows = []
    for support in MAIN_REGISTRY.architectures("detection"):
        arch = support.architecture
        rows.append((str(arch.id), arch.name, condition(getattr(arch, "_detect", None))))
    return tuple(rows)


if __name__ == "__main__":
    import pprint

    import spandrel

    print(f"# generated from spandrel {spandrel.__version__} by tests/upscalers/spandrel_table.py")
    print("SPANDREL_ARCHS: tuple[Arch, ...] = " + pprint.pformat(live_table(), width=110, compact=True))
