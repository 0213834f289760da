"""Import roots: the only folders a local install through the API or the queue may read.

A worker may run as another user (root, a service account) than the caller, so a local path in a
command is checked against the roots before any byte of it is read: the path is resolved (symlinks of
the path itself, ``..``) and must lie inside one of them. The roots are always the models directory and
the import area (``$MODELBUS_ROOT/import``, where the CLI and the client hand a user's own file over),
plus the folders ``MODELBUS_IMPORT_ROOTS`` lists (separated by ``:``).
"""

from __future__ import annotations

import os
from pathlib import Path

from modelbus.services.config import AppConfig
from modelbus.services.install.defaults import IMPORT_DIR
from modelbus.services.install.errors import InvalidSourceError, SourceForbiddenError


def import_area(config: AppConfig) -> Path:
    return config.root / IMPORT_DIR


def import_roots(config: AppConfig) -> list[Path]:
    extra = [config.resolve(p.strip()) for p in (config.import_roots or "").split(os.pathsep) if p.strip()]
    return [config.models_path, import_area(config), *extra]


def within_roots(path: Path | str, roots: list[Path]) -> bool:
    """Whether the real location of ``path`` (every symlink resolved) lies inside a root."""
    target = Path(os.path.realpath(path))
    return any(target.is_relative_to(os.path.realpath(root)) for root in roots)


def refuse_nul(text: str | Path) -> None:
    """No file name holds a NUL character (the system calls would refuse it with a bare ValueError)."""
    if "\x00" in str(text):
        raise InvalidSourceError(f"{str(text)!r}: a path cannot hold a NUL character")


def check_local_source(text: str | Path, config: AppConfig) -> Path:
    """The real path of a local source inside the import roots; SourceForbiddenError otherwise.

    Nothing is opened: only the path's own symlinks are read, so a refused path reveals nothing of
    what it names (not even whether it exists).
    """
    refuse_nul(text)
    path = Path(os.path.expanduser(str(text)))
    if not path.is_absolute():
        raise InvalidSourceError(f"{text}: a local source must be an absolute path")
    roots = import_roots(config)
    if not within_roots(path, roots):
        listed = ", ".join(str(r) for r in roots)
        raise SourceForbiddenError(
            f"{text} is outside the import roots ({listed}): the API and the queues read local files only "
            "there; install it with the modelbus CLI or the Python client, which hand it over, or add its "
            "folder to MODELBUS_IMPORT_ROOTS")
    return Path(os.path.realpath(path))
