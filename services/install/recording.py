"""From identified files to a model record: the config's fields, metadata, and the one ModelAdded.

The duplicate check is the record service's: ``add_model`` appends at the version it saw for the
key, so of two installs of the same content racing, exactly one lands and the other is refused
naming the key that won. A retried job that already added its model (the ``ModelAdded`` carries
the job id as correlation id) recognises it as its own instead of as a duplicate.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3

from modelbus.services.hashing import HashingError, model_key
from modelbus.services.install.errors import (
    AlreadyInstalledError,
    DuplicateInstallError,
    ModelIdentificationError,
)
from modelbus.services.install.manifest import Manifest, hash_and_manifest
from modelbus.services.probe import ProbeError, ProbeResult, probe
from modelbus.services.records import DuplicateModelException, ModelConfigBase, ModelRecordServiceBase
from modelbus.services.records.parsing import check_key, config_class

# record fields a source's metadata fills in (metadata name -> record field)
_METADATA_FIELDS = {
    "description": "description", "author": "author", "license": "license", "thumbnail_url": "thumbnail_url",
    "tags": "tags", "trained_words": "trained_words",
}
# what a caller's config does not set here: the hash and path are computed; a key the caller chose
# reaches the record through finalize (given_key: checked, and refused when taken), never unchecked
_COMPUTED = ("key", "hash", "path")


@dataclass(frozen=True)
class Identified:
    path: Path
    key: str
    hash: str
    result: ProbeResult
    files: Manifest = ()  # what the model owns (services.install.manifest), from the same read as ``hash``


def probe_model(path: Path, overrides: Mapping[str, Any] | None = None) -> ProbeResult:
    try:
        return probe(path, dict(overrides or {}))
    except ProbeError as exc:
        raise ModelIdentificationError(f"{path.name}: {exc}") from exc


def hash_model(path: Path, threads: int | None = None) -> tuple[str, str, Manifest]:
    """(key, content hash, manifest) of a file or folder; every byte is read once."""
    try:
        key = model_key(path)
    except HashingError as exc:
        raise ModelIdentificationError(str(exc)) from exc
    digest, files = hash_and_manifest(path, threads)
    return key, digest, files


def record_class(result: ProbeResult) -> type[ModelConfigBase]:
    """The record class of an identification; InvalidModelConfigException when an override made a
    type and a format that do not go together (a "lora" that is an embedding file)."""
    return config_class({"model_type": result.model_type, "model_format": result.model_format})


def identify(path: Path, overrides: Mapping[str, Any] | None = None, threads: int | None = None) -> Identified:
    """Probe first (headers only: a wrong file fails fast), then hash every byte."""
    result = probe_model(path, overrides)
    record_class(result)  # before hashing: an impossible type/format pair is refused at once
    key, digest, files = hash_model(path, threads)
    return Identified(path, key, digest, result, files)


def forced_key(key: str, job_id: str) -> str:
    """A distinct key for a forced second copy of the same content (same length as an imohash)."""
    return blake3.blake3(f"{key}:{job_id}".encode()).hexdigest(length=16)


def build_config(found: Identified, *, key: str, record_path: str, name: str,
                 metadata: Mapping[str, Any] | None = None, source: str | None = None,
                 user: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The record's fields: identification, then the source's metadata, then what the caller said."""
    fields: dict[str, Any] = dict(found.result.as_config_fields())
    for meta_name, field in _METADATA_FIELDS.items():
        value = (metadata or {}).get(meta_name)
        if value:
            fields[field] = value
    fields["source"] = (metadata or {}).get("source_url") or source
    fields.update({k: v for k, v in (user or {}).items() if k not in _COMPUTED and v is not None})
    fields.update(key=key, hash=found.hash, path=record_path, name=fields.get("name") or name)
    allowed = record_class(found.result).model_fields
    return {k: v for k, v in fields.items() if k in allowed}


def given_key(user: Mapping[str, Any]) -> str | None:
    """The key the caller asked for (``config={"key": ...}``), checked like any new key; None if none."""
    key = user.get("key")
    return None if key is None else check_key(key)


def check_key_free(records: ModelRecordServiceBase, key: str, job_id: str | None) -> None:
    """A key the caller chose must not be taken (by another model, or an earlier run of another job)."""
    if not records.exists(key) or (job_id is not None and added_by(records, key, job_id)):
        return
    existing = records.get_model(key)
    raise DuplicateInstallError(
        f"key {key!r} is already used by model {existing.name!r} at {existing.path}; choose another key", key)


def added_by(records: ModelRecordServiceBase, key: str, job_id: str) -> bool:
    """Whether the record under ``key`` was added by this job (a retry finding its own work)."""
    try:
        history = records.history(key)
    except KeyError:
        return False
    return any(s.event.type == "ModelAdded" and s.event.correlation_id == job_id for s in history)


def check_duplicate(records: ModelRecordServiceBase, key: str, job_id: str | None) -> None:
    if not records.exists(key) or (job_id is not None and added_by(records, key, job_id)):
        return
    existing = records.get_model(key)
    raise AlreadyInstalledError(
        f"this model is already installed as key {key!r} ({existing.name!r} at {existing.path}); "
        "pass force=True to install a second copy", key)


def add_record(records: ModelRecordServiceBase, key: str, config: dict[str, Any],
               job_id: str | None, files: Manifest = ()) -> ModelConfigBase:
    if job_id is not None and added_by(records, key, job_id):
        return records.get_model(key)
    try:
        return records.add_model(key, config, correlation_id=job_id, files=files,
                                 idempotency_key=f"install:{job_id}:add" if job_id else None)
    except DuplicateModelException as exc:
        same = records.exists(key) and records.get_model(key).hash == config.get("hash")
        # the same content, added by a racing install a moment ago, or another model under a chosen key
        error = AlreadyInstalledError if same else DuplicateInstallError
        raise error(f"refused as a duplicate: {exc}", key) from exc
