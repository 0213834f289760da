"""Errors of the install service, one family under :class:`InstallError`.

    InstallError
    ├── InvalidSourceError       (InvalidInput) a source that is no existing path, URL, HF repo id or Civitai ref
    ├── InvalidCommandError      (InvalidInput) a command id that cannot name a job (letters, digits, '_', '-')
    ├── CommandIdTakenError      (Conflict) the command id names an RQ job of another namespace on this Redis
    ├── ModelIdentificationError (InvalidInput) the files are not a model we can identify (unknown, unsafe...)
    ├── DuplicateInstallError    (Conflict) the same content is already installed; ``existing_key`` names it
    │   └── AlreadyInstalledError  the content itself is that record's (not a chosen key taken by another)
    ├── UnknownJobError          (NotFound) no install job has this id
    ├── InstallTimeoutError      (TimedOut) wait_for_job / wait_for_installs ran out of time
    ├── UnsafeDeleteError        (InvalidInput) refusing to delete files outside the models directory
    ├── SourceForbiddenError     (Forbidden) a local source outside the import roots, or a symlink out of it
    ├── ModelPathConflictError   (Conflict) a path inside, or holding, another model's path; names the other
    ├── InvalidModelPathError    (InvalidInput) a record path that does not exist or cannot be a model's
    ├── UnsafeManifestError      (InvalidInput) a manifest entry that leaves the model's folder
    ├── InvalidStagingNameError  (InvalidInput) a staging folder name that is not one plain path component
    ├── JobStateError            (Conflict) a pause, resume or restart the job's state does not allow
    └── JobStoppedError          (Conflict) the job was cancelled or failed elsewhere while a step ran (internal)

Errors of the parts the service drives (probe, hashing, downloads, records) are translated where they
come in, so every job that fails records one of these names (or the download error's own) as
``error_type`` with a message naming the cause.
"""

from __future__ import annotations

from modelbus.events.errors import Conflict, Forbidden, InvalidInput, ModelbusError, NotFound, TimedOut


class InstallError(ModelbusError):
    """Base of every error raised by :mod:`services.install`."""


class InvalidSourceError(InstallError, InvalidInput, ValueError):
    pass


class InvalidCommandError(InstallError, InvalidInput, ValueError):
    pass


class ModelIdentificationError(InstallError, InvalidInput):
    pass


class CommandIdTakenError(InstallError, Conflict):
    """RQ's job keys are global (``rq:job:<id>``): an id another namespace's job holds is refused, so that
    namespaces sharing a Redis never run or read each other's jobs."""


class DuplicateInstallError(InstallError, Conflict):
    def __init__(self, message: str, existing_key: str) -> None:
        super().__init__(message)
        self.existing_key = existing_key


class AlreadyInstalledError(DuplicateInstallError):
    """The same content is a record already: a queued install completes with that record's key."""


class ExpectedHashError(InstallError, InvalidInput):
    """The downloaded file's hash is not the one the caller gave (``--sha256``/``--blake3``)."""


class UnknownJobError(InstallError, NotFound, KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "unknown install job"


class InstallTimeoutError(InstallError, TimedOut, TimeoutError):
    pass


class UnsafeDeleteError(InstallError, InvalidInput):
    pass


class InvalidStagingNameError(InstallError, InvalidInput, ValueError):
    """A job id (or convert key) that would name a staging folder outside ``.staging`` or a hidden one."""


class JobStateError(InstallError, Conflict):
    pass


class JobStoppedError(InstallError, Conflict):
    """Raised inside a worker step when the job's log says it already ended (cancelled, failed)."""


class SourceForbiddenError(InstallError, Forbidden):
    """A local source this caller may not read: outside the import roots, or a symlink leading out of it."""


class ModelPathConflictError(InstallError, Conflict):
    def __init__(self, message: str, other_key: str) -> None:
        super().__init__(message)
        self.other_key = other_key


class InvalidModelPathError(InstallError, InvalidInput):
    pass


class UnsafeManifestError(InstallError, InvalidInput):
    pass
