"""Finding models in a directory tree: a folder whose layout identifies it is one model (its files are
not looked at one by one); any other folder is searched; a file is a candidate by its suffix.

Hidden entries (``.staging``, ``.cache``...) are never models.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from modelbus.events.logs import get_logger
from modelbus.services.probe import MODEL_FILE_SUFFIXES, ProbeError, UnrecognizedFilesError, probe

log = get_logger(__name__)


def find_models(root: Path) -> Iterator[Path]:
    """Every model file or model folder under ``root`` (``root`` itself when it is one)."""
    if root.is_file():
        if root.suffix.lower() in MODEL_FILE_SUFFIXES:
            yield root
        return
    if not root.is_dir():
        return
    if _is_model_folder(root):
        yield root
        return
    for child in sorted(root.iterdir()):
        if not child.name.startswith("."):
            yield from find_models(child)


def _is_model_folder(path: Path) -> bool:
    try:
        probe(path)
    except UnrecognizedFilesError:
        return False
    except ProbeError as exc:
        # a folder with a known layout that is broken: it is a model folder, just a bad one
        log.warning("scan_bad_model_folder", path=str(path), error=str(exc))
        return True
    return True
