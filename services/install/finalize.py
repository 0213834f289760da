"""The last step of every install, shared by the hash worker and the in-process ``register_path`` /
``install_path``: identify, refuse duplicates, place into the models directory, add the record.

A failure after the model was placed takes the placed files away again: either the record exists
and points at the files, or neither does.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelbus.events.logs import get_logger
from modelbus.services import hfcache
from modelbus.services.config import AppConfig
from modelbus.services.covers.fetch import first_cover
from modelbus.services.install.errors import ExpectedHashError
from modelbus.services.install.manifest import Manifest
from modelbus.services.install.ownership import check_path_free
from modelbus.services.install.placement import destination_dir, is_inside, place, remove_tree, source_files
from modelbus.services.install.recording import (
    add_record,
    added_by,
    build_config,
    check_duplicate,
    check_key_free,
    forced_key,
    given_key,
    identify,
)
from modelbus.services.records import ModelConfigBase, ModelRecordServiceBase
from modelbus.services.store import open_store
from modelbus.services.store.publish import publish_model, renamed
from modelbus.services.store.release import claimed

log = get_logger(__name__)


@dataclass
class FinalizeRequest:
    path: Path
    inplace: bool                       # register where it is; else move (a staged copy) into place
    job_id: str | None = None
    user: Mapping[str, Any] = field(default_factory=dict)  # the caller's config: overrides and fields
    metadata: Mapping[str, Any] = field(default_factory=dict)
    source: str | None = None
    force: bool = False
    threads: int | None = None
    on_claim: Callable[[Path], None] | None = None  # hears the destination before the rename
    before_place: Callable[[], None] | None = None  # a last check (e.g. cancelled?) before moving
    expected_blake3: str | None = None  # the caller's BLAKE3 of the one file (``--blake3``): else refused


def record_path(config: AppConfig, path: Path) -> str:
    """Relative under the models dir (the spec's convention), absolute elsewhere."""
    models = config.models_path
    if is_inside(path, models):
        return path.resolve().relative_to(models.resolve()).as_posix()
    return str(path.resolve())


def model_name(path: Path, user: Mapping[str, Any], metadata: Mapping[str, Any]) -> str:
    given = user.get("name") or metadata.get("name")
    if given:
        return str(given)
    repo = hfcache.snapshot_repo(path)  # a Hugging Face cache snapshot is named by its repo, not its commit
    if repo is not None:
        return repo
    return path.stem if path.is_file() else path.name


def check_expected_blake3(files: Manifest, expected: str) -> None:
    got = [f.blake3 for f in files]
    if got != [expected.lower()]:
        shown = got[0] if len(got) == 1 else f"{len(got)} files"
        raise ExpectedHashError(f"BLAKE3 mismatch: expected {expected.lower()}, the download has {shown}")


def finalize(config: AppConfig, records: ModelRecordServiceBase, req: FinalizeRequest) -> ModelConfigBase:
    chosen = given_key(req.user)  # a bad key is refused before any work
    source_files(req.path)  # no symlink out of the model: what it owns is inside it
    if req.inplace:
        check_path_free(config, records.all_models(), req.path, None, same_ok=True)
    found = identify(req.path, req.user, req.threads)
    if req.expected_blake3:
        check_expected_blake3(found.files, req.expected_blake3)
    key = found.key
    if req.force and records.exists(key) and not (req.job_id and added_by(records, key, req.job_id)):
        key = forced_key(key, req.job_id or uuid.uuid4().hex)
    else:
        check_duplicate(records, key, req.job_id)
    if chosen is not None:
        check_key_free(records, chosen, req.job_id)
        key = chosen
    name = model_name(req.path, req.user, req.metadata)
    # the blobs are claimed from before the upload until the record names them: a delete of another model
    # sharing one keeps it (services.store.release)
    with claimed(getattr(records, "event_store", None), open_store(config), found.files):
        publish_model(config, req.path, found.files)  # before the record, which never names a blob the store lacks
        target = req.path
        placed = False
        if not req.inplace:
            if req.before_place is not None:
                req.before_place()
            folder = destination_dir(config, found.result.base_model, found.result.model_type)
            target = place(req.path, folder, req.path.name, req.on_claim)
            placed = True
        try:
            fields = build_config(found, key=key, record_path=record_path(config, target), name=name,
                                  metadata=req.metadata, source=req.source, user=req.user)
            record = add_record(records, key, fields, req.job_id, renamed(found.files, req.path, target))
        except BaseException:
            if placed:
                remove_tree(target)
            raise
    log.info("model_installed", key=key, name=record.name, path=record.path, job=req.job_id)
    first_cover(config, records, record)
    return record
