"""Errors of the download queue, one family under :class:`DownloadError`.

    DownloadError
    ├── InvalidSourceError        a source string that is no URL, HF repo id or Civitai reference
    ├── UnsafeURLError            a URL (or redirect hop) to a private/loopback address, or a bad scheme
    ├── UnsafePathError           a file name or part path that is absolute or climbs out with ``..``
    ├── DestinationExistsError    the final file/folder exists and differs from what is downloaded
    ├── InsufficientSpaceError    not enough free disk space for the download
    ├── RemoteError               the server answered with an unexpected status (4xx/5xx)
    │   └── TokenRequiredError    401/403, or an HTML/JSON page where a model file was expected
    ├── RetriesExhaustedError     connection errors, stalls or 5xx more often than allowed
    ├── IntegrityError            the sha256 of the downloaded file is not the published one
    ├── PartialBusyError          (Unavailable) another download holds the partial file's lock too long
    ├── MetadataError             a Hugging Face / Civitai API answer we cannot use
    └── DownloadCancelled         the job was cancelled or paused while running (internal signal)

httpx errors are translated where they come in (fetch.py), so callers see this family only.
"""

from __future__ import annotations

from events.errors import Unavailable


class DownloadError(Exception):
    """Base of every error raised by :mod:`services.download`."""


class InvalidSourceError(DownloadError, ValueError):
    pass


class UnsafeURLError(DownloadError):
    pass


class UnsafePathError(DownloadError, ValueError):
    pass


class DestinationExistsError(DownloadError):
    pass


class InsufficientSpaceError(DownloadError):
    pass


class RemoteError(DownloadError):
    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class TokenRequiredError(RemoteError):
    pass


class RetriesExhaustedError(DownloadError):
    pass


class PartialBusyError(DownloadError, Unavailable):
    """Another writer held the partial file's lock for longer than the wait: worth another try later."""


class IntegrityError(DownloadError):
    pass


class MetadataError(DownloadError):
    pass


class DownloadCancelled(DownloadError):
    """Raised inside a running job when it is cancelled or paused; never reaches a caller."""
