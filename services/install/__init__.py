"""The install service: models from paths, URLs, Hugging Face and Civitai into the models directory and
the record store, through the install, download and hash queues (the spec's ModelInstallService)."""

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
from modelbus.services.install.service import ModelInstallService, SyncReport

ModelInstallServiceBase = ModelInstallService  # the spec's name

__all__ = [
    "DuplicateInstallError", "InstallError", "InstallJob", "InstallStatus", "InstallTimeoutError",
    "InvalidCommandError", "InvalidSourceError", "JobStoppedError", "ModelIdentificationError", "ModelInstallService",
    "ModelInstallServiceBase", "SyncReport", "UnknownJobError", "UnsafeDeleteError",
]
