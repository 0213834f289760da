"""Bringing in a legacy InvokeAI ``models.yaml``: each ``base/type/name`` entry becomes a ModelAdded event.

    __metadata__: {version: 3.0.0}
    sd-1/main/stable-diffusion-1-5:
      path: sd-1/main/stable-diffusion-1-5
      description: Stable Diffusion version 1.5
      format: diffusers
      variant: normal
      vae: ...
      config: configs/stable-diffusion/v1-inference.yaml

Each entry is its own add, so one bad entry never blocks the others: it is reported with the reason
and skipped. Importing the same file twice adds nothing the second time (same key, or same path).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from modelbus.events.errors import InvalidInput
from modelbus.events.logs import get_logger
from modelbus.services.records.enums import BaseModelType, ModelFormat, ModelType
from modelbus.services.records.errors import DuplicateModelException, RecordServiceError
from modelbus.services.records.fold import resolve_path
from modelbus.services.records.models import CLASSES_BY_TAG, tag_of
from modelbus.services.records.service import ModelRecordServiceBase

log = get_logger(__name__)

# legacy fields we carry over; anything else is noted and dropped
_CARRIED = ("path", "description", "variant", "vae", "config", "prediction_type", "upcast_attention")
_WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


class LegacyImportError(RecordServiceError, InvalidInput):
    """The file as a whole cannot be read (missing, not YAML, not a mapping)."""


@dataclass
class ImportReport:
    source: Path
    imported: list[tuple[str, str]] = field(default_factory=list)   # (entry, key)
    skipped: list[tuple[str, str]] = field(default_factory=list)    # (entry, reason)
    notes: list[tuple[str, str]] = field(default_factory=list)      # (entry, remark) for imported ones

    @property
    def ok(self) -> bool:
        return not self.skipped


def _key_for(path: str, models_dir: Path | None) -> str:
    """The model's imohash key when its files are there; a random key otherwise."""
    try:
        from modelbus.services.hashing import model_key
    except ImportError:  # hashing is optional here: records stay importable without it
        return uuid.uuid4().hex
    location = Path(resolve_path(path, models_dir))
    try:
        return model_key(location) if location.exists() else uuid.uuid4().hex
    except Exception as exc:  # noqa: BLE001 - an unreadable file still deserves a record
        log.warning("legacy_key_fallback", path=str(location), error=str(exc))
        return uuid.uuid4().hex


def _guess_format(model_type: str, path: str) -> str:
    is_file = path.lower().endswith(_WEIGHT_SUFFIXES)
    if model_type == ModelType.TextualInversion.value:
        return ModelFormat.EmbeddingFile.value if is_file else ModelFormat.EmbeddingFolder.value
    if model_type == ModelType.Lora.value:
        return ModelFormat.Lycoris.value if is_file else ModelFormat.Diffusers.value
    if model_type == ModelType.IPAdapter.value:
        return ModelFormat.Checkpoint.value if is_file else ModelFormat.InvokeAI.value
    return ModelFormat.Checkpoint.value if is_file else ModelFormat.Diffusers.value


def legacy_config(entry: str, body: Any) -> tuple[dict[str, Any], list[str]]:
    """The record dict of one legacy entry (without key) and remarks; ValueError says why not."""
    parts = entry.split(",")[0].strip().split("/")
    if len(parts) != 3 or not all(parts):
        raise ValueError("entry name is not of the form base/type/name")
    base, model_type, name = parts
    if base not in {b.value for b in BaseModelType}:
        raise ValueError(f"unknown base model {base!r}")
    if model_type not in {t.value for t in ModelType}:
        raise ValueError(f"unknown model type {model_type!r}")
    if not isinstance(body, dict):
        raise ValueError(f"expected a mapping of fields, got {type(body).__name__}")  # noqa: TRY004 - a bad entry
    if not isinstance(body.get("path"), str) or not body["path"].strip():
        raise ValueError("no path")
    fmt = body.get("format") or _guess_format(model_type, body["path"])
    cls = CLASSES_BY_TAG.get(tag_of(model_type, str(fmt)))
    if cls is None:
        raise ValueError(f"format {fmt!r} is not a format of model type {model_type!r}")
    data: dict[str, Any] = {"name": name, "base_model": base, "model_type": model_type, "model_format": fmt}
    remarks = []
    for legacy_field, value in body.items():
        if legacy_field == "format" or value is None:
            continue
        if legacy_field in _CARRIED and legacy_field in cls.model_fields:
            data[legacy_field] = value
        else:
            remarks.append(f"field {legacy_field}={value!r} dropped (not kept by {cls.__name__})")
    return data, remarks


def read_legacy_yaml(path: Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LegacyImportError(f"{path}: cannot read: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise LegacyImportError(f"{path}: malformed YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LegacyImportError(f"{path}: expected a mapping of model entries, got {type(data).__name__}")
    return data


def import_legacy_yaml(path: Path | str, store: ModelRecordServiceBase) -> ImportReport:
    """Add every readable entry of a legacy ``models.yaml`` to ``store``; report the others."""
    path = Path(path)
    report = ImportReport(source=path)
    entries = read_legacy_yaml(path)
    models_dir = store.projection.models_dir
    for entry, body in entries.items():
        entry = str(entry)
        if entry == "__metadata__":
            continue
        try:
            data, remarks = legacy_config(entry, body)
            key = _key_for(data["path"], models_dir)
            store.add_model(key, data)
        except ValueError as exc:  # InvalidModelConfigException is a ValueError too
            report.skipped.append((entry, str(exc)))
            continue
        except DuplicateModelException as exc:
            report.skipped.append((entry, f"already recorded: {exc}"))
            continue
        report.imported.append((entry, key))
        report.notes += [(entry, r) for r in remarks]
    log.info("legacy_import", source=str(path), imported=len(report.imported), skipped=len(report.skipped))
    return report
