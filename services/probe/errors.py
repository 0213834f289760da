"""Errors of model identification.

::

    ProbeError
     +-- ModelPathError        the path is missing or not a file/folder
     +-- UnknownModelError     nothing recognisable: says what was seen
     +-- UnsafeModelError      a pickle imports something that could run code
     +-- CorruptModelError     truncated or malformed file (safetensors, pickle, JSON config)
     |    +-- UnsafeArchiveError  a zip two readers could read differently (InvalidInput)
     +-- PickleTooLargeError   a pickle over a limit no real checkpoint needs (TooLarge)
     +-- InvalidOverrideError  a user-given type/base/format/... is not a valid value
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from events.errors import InvalidInput, TooLarge


class ProbeError(Exception):
    """Base of every error raised by :mod:`services.probe`."""


class ModelPathError(ProbeError):
    """The path to identify does not exist or is neither a file nor a folder."""


class UnknownModelError(ProbeError):
    """The files were read but match no known model family.

    The message says what was seen (suffix, number of tensors, a few key prefixes) so the user
    can tell a wrong file from an unsupported one, and pass type, base and format explicitly.
    ``partial`` holds what was identified before it stopped (e.g. type and format of a LoRA
    whose base is unclear), so that the user need only supply the rest.
    """

    def __init__(self, message: str, partial: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.partial: dict[str, Any] = dict(partial or {})


class UnsafeModelError(ProbeError):
    """A pickle file imports a global that could execute code; it is never loaded."""

    def __init__(self, path: Path, findings: Sequence[str]) -> None:
        self.path = path
        self.findings = list(findings)
        super().__init__(f"{path}: refused, unsafe pickle imports: {', '.join(self.findings)}")


class CorruptModelError(ProbeError):
    """The file is truncated or malformed; the message names the inconsistency."""


class InvalidOverrideError(ProbeError):
    """An override (model_type, base_model, ...) is not a valid value."""


class UnsafeArchiveError(CorruptModelError, InvalidInput):
    """A zip whose layout lets two readers see different files: duplicate member names, a member outside
    the torch checkpoint layout, a local header that disagrees with the central directory, overlapping
    members, or bytes before the first member. The scanner and ``torch.load`` must read the same pickle,
    so such a file is refused before anything in it is read."""


class PickleTooLargeError(ProbeError, TooLarge):
    """A pickle stream over :mod:`services.probe.defaults`' limits (inflated bytes, opcodes); the message
    names the limit."""
