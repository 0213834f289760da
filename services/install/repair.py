"""Repairing an installed model from the source it was installed from.

A repair is an install job (``options["repair"]`` names the model) that downloads the source again into
its staging folder like any install; its last step, instead of adding a record, checks that the download
is the recorded content (same content hash) and moves only the model's missing or changed files into
place. A source that now serves other content repairs nothing, naming both hashes. Only remote sources
(URL, Hugging Face, Civitai) and models inside the models directory are repaired: a local source, or a
model registered in place in the user's own folders, is the user's to restore.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from modelbus.events.errors import Conflict
from modelbus.events.logs import get_logger
from modelbus.services.config import AppConfig
from modelbus.services.install.errors import ExpectedHashError, InstallError
from modelbus.services.install.jobs import load_job
from modelbus.services.install.manifest import hash_and_manifest, recorded_manifest, resolve_manifest
from modelbus.services.install.placement import is_inside
from modelbus.services.install.sources import looks_like_path
from modelbus.services.install.verify import verify_model
from modelbus.services.records import ModelConfigBase, ModelRecordServiceBase

log = get_logger(__name__)


class NotRepairableError(InstallError, Conflict):
    """Nothing to re-download from (a local source), or the model is not in the models directory."""


def repair_source(config: AppConfig, store: Any, records: ModelRecordServiceBase,
                  record: ModelConfigBase) -> tuple[str, dict[str, Any]]:
    """(source, install options) of the install that added ``record``; NotRepairableError when there is none."""
    if not is_inside(config.model_path(record.path), config.models_path):
        raise NotRepairableError(f"{record.key} is registered in place at {record.path}: not repaired (your folder)")
    added = [s.event for s in records.history(record.key) if s.event.type == "ModelAdded"]
    job_id = added[-1].correlation_id if added else None
    try:
        job = load_job(store, job_id) if job_id else None
    except KeyError:
        job = None
    if job is None or looks_like_path(job.source):
        raise NotRepairableError(f"{record.key} was not installed from a URL, Hugging Face or Civitai "
                                 "source: nothing to download it again from")
    options = {k: job.options[k] for k in ("revision", "variant", "sha256") if job.options.get(k)}
    return job.source, options


def repair_files(config: AppConfig, records: ModelRecordServiceBase, key: str, staged: Path,
                 threads: int | None = None) -> list[str]:
    """Move the model's missing or changed files from the downloaded copy at ``staged`` into place; returns
    the manifest paths replaced."""
    record = records.get_model(key)
    digest, _ = hash_and_manifest(staged, threads)
    if digest != record.hash:
        raise ExpectedHashError(f"the source of {key} now serves other content ({digest}; the record has "
                                f"{record.hash}): not repaired")
    files = recorded_manifest(records.history(key))
    check = verify_model(config, record, files)
    broken = set(check.missing) | set(check.changed)
    target = config.model_path(record.path)
    replaced = []
    if staged.is_file():
        if broken:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, target)
            replaced.append(target.name)
        return replaced
    for entry, dest in zip(files, resolve_manifest(target, files), strict=True):
        if entry.path in broken:
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged.joinpath(*entry.path.split("/")), dest)
            replaced.append(entry.path)
    log.info("model_repaired", key=key, replaced=replaced)
    return replaced
