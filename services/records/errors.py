"""Errors of the record service.

    RecordServiceError
    ├── UnknownModelException        no model has this key (or path, or name/base/type)
    ├── DuplicateModelException      the key, or the model's path, is taken; or a lookup is ambiguous
    ├── InvalidModelConfigException  a config failed validation; ``errors`` names each field and value
    ├── RecordConflictError          concurrent writers kept moving the model's version under us
    ├── EventLogError                the event log could not be read or written (Redis down...)
    └── RecordStoreFormatError       a projection file is of the wrong kind or schema (an AssertionError,
                                     as the spec asks of ``from_db_file``)

Event-store errors (``events.errors``) are translated into these where they come in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class RecordServiceError(Exception):
    """Base of every error raised by ``services.records``."""


class UnknownModelException(RecordServiceError, KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "unknown model"


class DuplicateModelException(RecordServiceError):
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


class InvalidModelConfigException(RecordServiceError, ValueError):
    def __init__(self, errors: list[FieldError], context: str = "invalid model config") -> None:
        self.errors = errors
        super().__init__(f"{context}: " + "; ".join(str(e) for e in errors))


class RecordConflictError(RecordServiceError):
    pass


class EventLogError(RecordServiceError):
    """An ``events.errors.EventStoreError`` met by the record service; ``__cause__`` keeps the original."""


class RecordStoreFormatError(RecordServiceError, AssertionError):
    pass
