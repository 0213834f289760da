"""Errors of the record service (each leaf is also one kind of ``events.errors``).

    RecordServiceError
    ├── UnknownModelException        (NotFound) no model has this key (or path, or name/base/type)
    ├── DuplicateModelException      (Conflict) the key, or the model's path, is taken; or a lookup is ambiguous
    ├── InvalidModelConfigException  (InvalidInput) a config failed validation; ``errors`` names each field
    ├── RecordConflictError          (Conflict) concurrent writers kept moving the model's version under us
    ├── EventLogError                (Unavailable) the event log could not be read or written (Redis down...)
    ├── RecordStoreFormatError       (InvalidInput) a projection file is of the wrong kind or schema (an
    │                                AssertionError, as the spec asks of ``from_db_file``)
    └── LegacyImportError            (InvalidInput) a legacy models.yaml cannot be read (``records.legacy``)

Event-store errors (``events.errors``) are translated into these where they come in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from modelbus.events.errors import Conflict, InvalidInput, ModelbusError, NotFound, Unavailable


class RecordServiceError(ModelbusError):
    """Base of every error raised by ``services.records``."""


class UnknownModelException(RecordServiceError, NotFound, KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "unknown model"


class DuplicateModelException(RecordServiceError, Conflict):
    pass


@dataclass(frozen=True)
class FieldError:
    """One validation failure: the dotted field name, the offending value and why."""

    field: str
    value: Any
    message: str

    def __str__(self) -> str:
        shown = "<missing>" if self.value is _MISSING else repr(self.value)
        return f"{self.field}={shown}: {self.message}"


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Any = _Missing()
MISSING = _MISSING


class InvalidModelConfigException(RecordServiceError, InvalidInput, ValueError):
    def __init__(self, errors: list[FieldError], context: str = "invalid model config") -> None:
        self.errors = errors
        super().__init__(f"{context}: " + "; ".join(str(e) for e in errors))


class RecordConflictError(RecordServiceError, Conflict):
    pass


class EventLogError(RecordServiceError, Unavailable):
    """An ``events.errors.EventStoreError`` met by the record service; ``__cause__`` keeps the original."""


class RecordStoreFormatError(RecordServiceError, InvalidInput, AssertionError):
    pass
