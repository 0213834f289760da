"""The install service: models from paths, URLs, Hugging Face and Civitai into the models directory and
the record store, through the install, download and hash queues (the spec's ModelInstallService)."""

from typing import TYPE_CHECKING, Any

from modelbus.services.install.errors import (
    DuplicateInstallError,
    InstallError,
    InstallTimeoutError,
    InvalidCommandError,
    InvalidSourceError,
    JobStoppedError,
    ModelIdentificationError,
    UnknownJobError,
    UnsafeDeleteError,
)
from modelbus.services.install.jobs import InstallJob, InstallStatus

if TYPE_CHECKING:
    from modelbus.services.install.service import ModelInstallService, SyncReport

    ModelInstallServiceBase = ModelInstallService  # the spec's name

_SERVICE_NAMES = {"ModelInstallService": "ModelInstallService", "ModelInstallServiceBase": "ModelInstallService",
                  "SyncReport": "SyncReport"}


def __getattr__(name: str) -> Any:
    """The service itself is imported on first use: reading jobs (``modelbus jobs``, the API's job list)
    needs only the job fold and the progress board, not the download, probe and cover stacks."""
    if name in _SERVICE_NAMES:
        from modelbus.services.install import service
        return getattr(service, _SERVICE_NAMES[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DuplicateInstallError", "InstallError", "InstallJob", "InstallStatus", "InstallTimeoutError",
    "InvalidCommandError", "InvalidSourceError", "JobStoppedError", "ModelIdentificationError", "ModelInstallService",
    "ModelInstallServiceBase", "SyncReport", "UnknownJobError", "UnsafeDeleteError",
]
