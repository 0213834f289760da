"""Errors of model identification.

::

    ProbeError
    ├── ModelPathError          (NotFound) the path is missing or not a file/folder
    ├── UnrecognizedFilesError  (InvalidInput) nothing recognisable: says what was seen
    ├── UnsafeModelError        (InvalidInput) a pickle imports something that could run code
    ├── CorruptModelError       (InvalidInput) truncated or malformed file (safetensors, pickle, JSON config)
    │   └── UnsafeArchiveError  (InvalidInput) a zip two readers could read differently
    ├── PickleTooLargeError     (TooLarge) a pickle over a limit no real checkpoint needs
    └── InvalidOverrideError    (InvalidInput) a user-given type/base/format/... is not a valid value

``UnknownModelError`` is the old name of ``UnrecognizedFilesError`` (it looked like the record service's
``UnknownModelException``, which means "no such key"); it stays as an alias while branches that use it land.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from modelbus.events.errors import InvalidInput, ModelbusError, NotFound, TooLarge


class ProbeError(ModelbusError):
    """Base of every error raised by :mod:`services.probe`."""


class ModelPathError(ProbeError, NotFound):
    """The path to identify does not exist or is neither a file nor a folder."""


class UnrecognizedFilesError(ProbeError, InvalidInput):
    """The files were read but match no known model family.

    The message says what was seen (suffix, number of tensors, a few key prefixes) so the user
    can tell a wrong file from an unsupported one, and pass type, base and format explicitly.
    ``partial`` holds what was identified before it stopped (e.g. type and format of a LoRA
    whose base is unclear), so that the user need only supply the rest.
    """

    def __init__(self, message: str, partial: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.partial: dict[str, Any] = dict(partial or {})


class UnsafeModelError(ProbeError, InvalidInput):
    """A pickle file imports a global that could execute code; it is never loaded."""

    def __init__(self, path: Path, findings: Sequence[str]) -> None:
        self.path = path
        self.findings = list(findings)
        super().__init__(f"{path}: refused, unsafe pickle imports: {', '.join(self.findings)}")


class CorruptModelError(ProbeError, InvalidInput):
    """The file is truncated or malformed; the message names the inconsistency."""


class InvalidOverrideError(ProbeError, InvalidInput):
    """An override (model_type, base_model, ...) is not a valid value."""


class UnsafeArchiveError(CorruptModelError):
    """A zip whose layout lets two readers see different files: duplicate member names, a member outside
    the torch checkpoint layout, a local header that disagrees with the central directory, overlapping
    members, or bytes before the first member. The scanner and ``torch.load`` must read the same pickle,
    so such a file is refused before anything in it is read."""


class PickleTooLargeError(ProbeError, TooLarge):
    """A pickle stream over :mod:`services.probe.defaults`' limits (inflated bytes, opcodes); the message
    names the limit."""


UnknownModelError = UnrecognizedFilesError
