"""``probe()``: identify a model file or folder, then apply what the user said about it.

User overrides win over detection. When detection cannot tell (``UnrecognizedFilesError``), overrides
that give at least the type, base and format are accepted as the whole answer. Unsafe and corrupt
files are never rescued by overrides: saying what a file is does not make it loadable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from modelbus.events.logs import get_logger
from modelbus.services.probe.errors import InvalidOverrideError, ModelPathError, UnrecognizedFilesError
from modelbus.services.probe.families import identify_file
from modelbus.services.probe.folders import identify_folder
from modelbus.services.probe.gguf_file import identify_gguf
from modelbus.services.probe.result import (
    ProbeResult,
    compatible_bases,
    controlnet_config_path,
    legacy_config_path,
    upcast_for,
)
from modelbus.services.probe.tensors import GGUF_SUFFIXES, read_tensor_index
from modelbus.services.records.enums import ModelFormat, ModelType

log = get_logger(__name__)

# accepted override names -> ProbeResult field (record field names, plus short spellings)
_OVERRIDE_FIELDS = {
    "model_type": "model_type", "type": "model_type",
    "model_format": "model_format", "format": "model_format",
    "base_model": "base_model", "base": "base_model",
    "variant": "variant",
    "prediction_type": "prediction_type",
    "upcast_attention": "upcast_attention",
    "config": "config_path", "config_path": "config_path",
    "compatible_bases": "compatible_bases",
    "name": "name",
    "quantization": "quantization", "precision": "precision", "notes": "notes",
}  # fmt: skip
_REQUIRED_WITHOUT_DETECTION = ("model_type", "base_model", "model_format")


def probe(path: Path, overrides: dict[str, Any] | None = None) -> ProbeResult:
    """Identify the model at ``path`` (a file or a folder); ``overrides`` win over detection.

    When detection stops short (an unknown base width, say), the overrides complete it: the
    result needs a type, a base and a format, from detection or from the user.

    Raises :class:`UnrecognizedFilesError` (with what was seen), :class:`UnsafeModelError`,
    :class:`CorruptModelError`, :class:`ModelPathError` or :class:`InvalidOverrideError`.
    """
    path = Path(path)
    given = _normalise(overrides or {})
    if not path.exists():
        raise ModelPathError(f"no such file or folder: {path}")
    try:
        detected = _detect(path)
    except UnrecognizedFilesError as exc:
        # what detection established (say, "a LoRA") plus what the user said may be enough
        given = {**exc.partial, **given}
        if not all(field in given for field in _REQUIRED_WITHOUT_DETECTION):
            raise
        log.info("probe_completed_by_overrides", path=str(path), reason=str(exc))
        detected = None
    result = _merge(path, detected, given)
    log.debug("probed", path=str(path), **result.model_dump(mode="json"))
    return result


def _detect(path: Path) -> ProbeResult:
    if path.is_dir():
        return identify_folder(path)
    if path.is_file() and path.suffix.lower() in GGUF_SUFFIXES:
        return identify_gguf(path, identify_file)
    if path.is_file():
        return identify_file(read_tensor_index(path))
    raise ModelPathError(f"not a regular file or folder: {path}")


def _normalise(overrides: dict[str, Any]) -> dict[str, Any]:
    """Keep the overrides that concern identification (records pass whole configs), renamed."""
    given: dict[str, Any] = {}
    for key, value in overrides.items():
        field = _OVERRIDE_FIELDS.get(key)
        if field is not None and value is not None:
            given[field] = value
    return given


def _merge(path: Path, detected: ProbeResult | None, given: dict[str, Any]) -> ProbeResult:
    fields: dict[str, Any] = detected.model_dump() if detected else {}
    if not fields.get("name"):
        fields["name"] = _suggested_name(path)
    fields.update(given)
    try:
        merged = ProbeResult.model_validate(fields)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}={e.get('input')!r}: {e['msg']}" for e in exc.errors())
        raise InvalidOverrideError(f"{path}: invalid override: {problems}") from exc
    return _rederive(merged, detected, given)


def _rederive(result: ProbeResult, detected: ProbeResult | None, given: dict[str, Any]) -> ProbeResult:
    """Facts that follow from type/base/variant are recomputed when the user changed those."""
    changed = detected is None or any(
        getattr(result, f) != getattr(detected, f) for f in ("model_type", "base_model", "variant", "prediction_type")
    )
    if not changed:
        return result
    update: dict[str, Any] = {}
    if "compatible_bases" not in given:
        update["compatible_bases"] = compatible_bases(result.model_type, result.base_model)
    if "config_path" not in given and result.model_format is ModelFormat.Checkpoint:
        if result.model_type is ModelType.Main:
            update["config_path"] = legacy_config_path(result.base_model, result.variant, result.prediction_type)
        elif result.model_type is ModelType.ControlNet:
            update["config_path"] = controlnet_config_path(result.base_model)
    if "upcast_attention" not in given and result.prediction_type is not None:
        update["upcast_attention"] = upcast_for(result.base_model, result.prediction_type)
    return result.model_copy(update=update) if update else result


def _suggested_name(path: Path) -> str:
    return path.name if path.is_dir() else path.stem
