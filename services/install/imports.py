"""Handing a user's own local file over to the workers: the CLI and the Python client do it, the API never.

A worker reads local files only inside the import roots (services.install.roots). The user at the
keyboard may install any file *they* can read: before the command is published, the caller's process
links (or, across filesystems, copies) the file or folder into a fresh folder of the import area, with
its own permissions (a symlink out of a source folder is refused, as the workers would). The command
keeps the user's path as its ``source`` (what the job and the record show) and names the hand-over
copy in ``import_path``; the job removes that copy once it has ended, whatever the outcome, and a copy
no job took is removed at once (``commands.submit_handing_over``).
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from modelbus.events.logs import get_logger
from modelbus.services.config import AppConfig
from modelbus.services.install.errors import InvalidSourceError
from modelbus.services.install.placement import is_inside, remove_tree, safe_name, source_files
from modelbus.services.install.roots import import_area, import_roots, refuse_nul, within_roots
from modelbus.services.install.sources import looks_like_path

log = get_logger(__name__)

IMPORT_PATH = "import_path"  # the install option naming the hand-over copy


def hand_over(source: str, options: dict[str, Any], config: AppConfig) -> dict[str, Any]:
    """The options of a command for ``source``, with ``import_path`` when the caller handed it over.

    Only a local path outside the import roots is handed over, and never for an in-place registration
    (which must name the files it registers: the workers refuse it outside the roots).
    """
    text = source.strip()
    refuse_nul(text)
    if options.get("inplace") or not looks_like_path(text):
        return options
    path = Path(os.path.expanduser(text)).absolute()
    if within_roots(path, import_roots(config)):
        return options
    if not os.path.exists(path):
        raise InvalidSourceError(f"no such file or folder: {path}")
    if not (os.path.isfile(path) or os.path.isdir(path)):
        raise InvalidSourceError(f"not a regular file or folder: {path}")
    folder = import_area(config) / uuid.uuid4().hex
    folder.mkdir(parents=True)
    target = folder / safe_name(path.name)
    try:
        _link_tree(Path(os.path.realpath(path)), target)
    except BaseException:
        remove_tree(folder)
        raise
    log.info("install_source_handed_over", source=str(path), copy=str(target))
    return {**options, IMPORT_PATH: str(target)}


def discard_hand_over(config: AppConfig, options: dict[str, Any]) -> None:
    """Remove a command's hand-over copy (its whole folder in the import area); anything else stays."""
    value = options.get(IMPORT_PATH)
    if not value:
        return
    folder = Path(str(value)).parent
    area = import_area(config)
    if folder.parent.resolve() == area.resolve() and is_inside(folder, area):
        remove_tree(folder)


def _link_tree(source: Path, target: Path) -> None:
    """The files of ``source`` under ``target``: the same rule as a worker's copy (source_files), so a
    folder with a symlink out of it (to the user's keys, say) is refused here too."""
    if source.is_file():
        _link_file(source, target)
        return
    for rel, file in source_files(source):
        dest = target.joinpath(*rel.split("/"))
        dest.parent.mkdir(parents=True, exist_ok=True)
        _link_file(file, dest)


def _link_file(source: Path, dest: Path) -> None:
    """A hard link when the file system allows one (no bytes copied), else a copy."""
    try:
        os.link(source, dest, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EACCES, errno.ENOTSUP):
            raise
        shutil.copyfile(source, dest)
