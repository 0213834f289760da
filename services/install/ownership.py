"""A model owns its own files and nothing else: who may point where, and what a delete may remove.

- No record's path is inside another record's path or holds it (a folder model is one model, and the
  models directory, its staging and the import area are nobody's). :func:`check_path_free` refuses such a path naming
  the other model; installs, in-place registrations and path updates all pass through it.
- A delete removes exactly the files of the model's manifest and the folders that leaves empty, up to
  the model's own folder: never the folder holding a single file, never a folder that is (or holds)
  another record's path, never a file of another record.
- Models in the models directory are ours: their manifest files go. A model registered in place
  elsewhere lives in the user's folders: its files go only when they still are what was recorded
  (size and BLAKE3) and lie in an import root; anything else there is the user's and stays.
- A record written before manifests existed (empty manifest) falls back to removing its path, only
  inside the models directory, and only when no other record's path is inside it or holds it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from modelbus.events.logs import get_logger
from modelbus.services.config import AppConfig
from modelbus.services.install.errors import InvalidModelPathError, ModelPathConflictError, UnsafeDeleteError
from modelbus.services.install.manifest import Manifest, hash_and_manifest, manifest_base, resolve_manifest
from modelbus.services.install.placement import is_inside, remove_tree, staging_root
from modelbus.services.install.roots import import_area, import_roots, within_roots
from modelbus.services.records import ModelConfigBase

log = get_logger(__name__)


def real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _nests(a: Path, b: Path) -> bool:
    """Whether one of two real paths is the other or lies inside it."""
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def other_paths(config: AppConfig, records: Iterable[ModelConfigBase], key: str | None) -> list[tuple[str, Path]]:
    return [(r.key, real(config.model_path(r.path))) for r in records if r.key != key]


def check_path_free(config: AppConfig, records: Iterable[ModelConfigBase], path: Path, key: str | None,
                    *, same_ok: bool = False) -> None:
    """Refuse a path that is, holds or lies inside another record's path, or that is nobody's own.

    ``same_ok``: another record at exactly this path is left to the duplicate check and the store's path
    claim (a retried install finds its own record there)."""
    target = real(path)
    models = real(config.models_path)
    if target == models or is_inside(target, staging_root(config)) or is_inside(target, import_area(config)):
        raise InvalidModelPathError(f"{path} is the models directory, its staging or the import area (emptied "
                                    "as installs end), not a place for one model's own files")
    for other, other_path in other_paths(config, records, key):
        if same_ok and target == other_path:
            continue
        if _nests(target, other_path):
            how = "is already used by" if target == other_path else \
                "holds the path of" if other_path.is_relative_to(target) else "is inside the path of"
            raise ModelPathConflictError(f"{path} {how} model {other!r} ({other_path})", other)


@dataclass
class DeleteReport:
    removed: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)  # path -> why it stayed


def delete_model_files(config: AppConfig, record: ModelConfigBase, files: Manifest,
                       others: list[tuple[str, Path]], threads: int | None = None) -> DeleteReport:
    """Remove what the record owns (see the module's rules); ``others``: every other record's real path.

    Call it after the record is removed, with ``others`` read before; :func:`plan_delete` first checks
    that nothing would be refused, so a refusal changes nothing.
    """
    path = config.model_path(record.path)
    report = DeleteReport()
    if not files:  # recorded before manifests: plan_delete has checked that the path is this model's alone
        if is_inside(path, config.models_path):
            remove_tree(path)
            report.removed.append(str(path))
        return report
    ours = is_inside(path, config.models_path)
    base = manifest_base(path, files)
    for entry, target in zip(files, resolve_manifest(path, files)):
        why = _keep_reason(config, entry_size=entry.size, entry_hash=entry.blake3, target=target, ours=ours,
                           others=others, threads=threads)
        if why:
            report.kept[str(target)] = why
            continue
        target.unlink(missing_ok=True)
        report.removed.append(str(target))
        _prune_empty(target.parent, base if base == path else None, others)
    return report


def plan_delete(config: AppConfig, record: ModelConfigBase, files: Manifest,
                others: list[tuple[str, Path]]) -> None:
    """Refuse (UnsafeDeleteError, naming the other model) a delete whose files cannot be told apart."""
    path = config.model_path(record.path)
    if files:
        resolve_manifest(path, files)  # a forged entry is refused before anything goes
        return
    if not is_inside(path, config.models_path):
        return  # nothing will be deleted: the files of an old in-place record stay where they are
    target = real(path)
    models = real(config.models_path)
    if target == models or is_inside(target, staging_root(config)):
        raise UnsafeDeleteError(f"model {record.key!r} points at {path}, which is not a model's own file or folder")
    for other, other_path in others:
        if _nests(target, other_path):
            raise ModelPathConflictError(f"model {record.key!r} points at {path}, which is shared with model "
                                         f"{other!r} ({other_path}): nothing was deleted", other)


def _keep_reason(config: AppConfig, *, entry_size: int, entry_hash: str, target: Path, ours: bool,
                 others: list[tuple[str, Path]], threads: int | None) -> str | None:
    if not os.path.isfile(target) or os.path.islink(target):
        return "not a regular file (gone, or replaced)"
    real_target = real(target)
    for other, other_path in others:
        if real_target == other_path or real_target.is_relative_to(other_path):
            return f"belongs to model {other!r} too"
    if ours:
        return None
    if not within_roots(target, import_roots(config)):
        return "outside the import roots"
    if target.stat().st_size != entry_size or hash_and_manifest(target, threads)[1][0].blake3 != entry_hash:
        return "changed since it was recorded (the user's file now)"
    return None


def _prune_empty(folder: Path, top: Path | None, others: list[tuple[str, Path]]) -> None:
    """Remove ``folder`` and its parents while empty, up to ``top`` (None: none at all)."""
    if top is None:
        return
    top_real = real(top)
    current = folder
    while True:
        current_real = real(current)
        if not current_real.is_relative_to(top_real):
            return
        if any(other == current_real or other.is_relative_to(current_real) for _, other in others):
            return
        try:
            current.rmdir()
        except OSError:
            return  # not empty (or gone): the folders above are not empty either
        if current_real == top_real:
            return
        current = current.parent
