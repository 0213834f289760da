"""Turning what callers pass (dicts, configs) into validated configs, with errors naming each bad field.

The (model_type, model_format) pair is checked first, so an unknown type or an unsupported pair is
reported as such instead of as a wall of union-member errors.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from modelbus.services.records.enums import ModelFormat, ModelType
from modelbus.services.records.errors import MISSING, FieldError, InvalidModelConfigException
from modelbus.services.records.models import CLASSES_BY_TAG, ModelConfigBase, tag_of

# fields a sparse update may not change: the key is the record's identity
_IMMUTABLE = ("key",)
#: what a new record's key may hold: what the API accepts in a URL path (imohash keys are 32 hex digits)
KEY_PATTERN = re.compile(r"[A-Za-z0-9_.:\-]{1,256}")


_VALUES: dict[type, frozenset[str]] = {enum: frozenset(m.value for m in enum) for enum in (ModelType, ModelFormat)}


def _enum_value(data: Mapping[str, Any], field: str, enum: type[ModelType | ModelFormat],
                errors: list[FieldError]) -> str | None:
    raw = data.get(field)
    if raw is None:
        errors.append(FieldError(field, MISSING, "field required"))
        return None
    value = getattr(raw, "value", raw)
    if value not in _VALUES[enum]:
        errors.append(FieldError(field, raw, "must be one of " + ", ".join(m.value for m in enum)))
        return None
    return str(value)


def check_key(key: Any) -> str:
    """A key a new record may take, or InvalidModelConfigException naming what is wrong with it."""
    if not isinstance(key, str) or KEY_PATTERN.fullmatch(key) is None:
        raise InvalidModelConfigException([FieldError(
            "key", key, "may hold only letters, digits, '_', '.', ':' and '-' (1 to 256 characters)")])
    return key


def config_class(data: Mapping[str, Any]) -> type[ModelConfigBase]:
    """The concrete class for a dict's (model_type, model_format), or InvalidModelConfigException."""
    errors: list[FieldError] = []
    type_ = _enum_value(data, "model_type", ModelType, errors)
    fmt = _enum_value(data, "model_format", ModelFormat, errors)
    if errors or type_ is None or fmt is None:
        raise InvalidModelConfigException(errors)
    cls = CLASSES_BY_TAG.get(tag_of(type_, fmt))
    if cls is None:
        formats = sorted(t.split("/", 1)[1] for t in CLASSES_BY_TAG if t.startswith(type_ + "/"))
        raise InvalidModelConfigException([FieldError(
            "model_format", data["model_format"],
            f"not a format of model_type {type_!r} (use one of {', '.join(formats)})")])
    return cls


def describe(exc: ValidationError, data: Mapping[str, Any]) -> list[FieldError]:
    """Pydantic's errors as FieldErrors: dotted field name, the value given, the reason."""
    out = []
    for err in exc.errors(include_url=False):
        loc = [str(x) for x in err["loc"]]
        name = ".".join(loc) or "config"
        value: Any = err.get("input", MISSING)
        if err["type"] == "missing":
            value = MISSING
        elif loc and loc[0] in data and len(loc) == 1:
            value = data[loc[0]]
        message = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        out.append(FieldError(name, value, message))
    return out


def parse_config(config: ModelConfigBase | Mapping[str, Any], *, key: str | None = None) -> ModelConfigBase:
    """Validate a config (instance or dict) into its concrete class, with ``key`` filled in.

    A ``key`` in the config that differs from the one given is an error, not silently overwritten:
    it means the caller is confused about which record it is writing.
    """
    if isinstance(config, ModelConfigBase):
        data: dict[str, Any] = config.model_dump()
    elif isinstance(config, Mapping):
        data = dict(config)
    else:
        raise InvalidModelConfigException(
            [FieldError("config", config, "expected a dict or a ModelConfigBase")])
    if key is not None:
        given = data.get("key")
        if given not in (None, key):
            raise InvalidModelConfigException([FieldError("key", given, f"does not match the record key {key!r}")])
        data["key"] = key
    cls = config_class(data)
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise InvalidModelConfigException(describe(exc, data)) from None


#: record fields that change only by their own events (services.records.extras), and the CLI command for each
OWN_COMMANDS = {"default_settings": "modelbus settings", "trigger_phrases": "modelbus settings --trigger",
                "links": "modelbus link", "cover": "modelbus cover"}


def merge_update(current: ModelConfigBase, changes: ModelConfigBase | Mapping[str, Any]) -> tuple[
        ModelConfigBase, dict[str, Any]]:
    """Apply an update: a sparse dict of changed fields, or a whole config replacing the old one.

    Returns the new config and the changes actually made (JSON values), which go into ModelUpdated.
    """
    old = current.model_dump(mode="json")
    if isinstance(changes, ModelConfigBase):
        new_data = changes.model_dump(mode="json")
    elif isinstance(changes, Mapping):
        new_data = {**old, **dict(changes)}
        cls = config_class(new_data)
        if cls is not type(current):
            # a change of type/format: the old class's own fields (vae, variant...) do not carry over
            new_data = {k: v for k, v in new_data.items() if k in cls.model_fields or k in changes}
    else:
        raise InvalidModelConfigException(
            [FieldError("config", changes, "expected a dict of changes or a ModelConfigBase")])
    for field in _IMMUTABLE:
        if new_data.get(field, old[field]) != old[field]:
            raise InvalidModelConfigException(
                [FieldError(field, new_data[field], "cannot be changed by an update")])
    for field, command in OWN_COMMANDS.items():
        if new_data.get(field, old.get(field)) != old.get(field):
            raise InvalidModelConfigException(
                [FieldError(field, new_data[field], f"changes only by its own command ({command})")])
    if isinstance(changes, Mapping) and "hash" not in changes:
        new_data["hash"] = old["hash"]
    updated = parse_config(new_data, key=current.key)
    dumped = updated.model_dump(mode="json")
    diff = {k: v for k, v in dumped.items() if old.get(k, MISSING) != v}
    return updated, diff
