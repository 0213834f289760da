"""Errors of the download queue, one family under :class:`DownloadError`.

    DownloadError
    ├── SourceSyntaxError         (InvalidInput) a source string that is no URL, HF repo id or Civitai reference
    ├── UnsafeURLError            (Forbidden) a URL (or redirect hop) to a private/loopback address, a bad scheme
    │   └── HFOfflineError        a request to Hugging Face while HF_HUB_OFFLINE / MODELBUS_HF_OFFLINE forbids it
    ├── UnresolvableHostError     (InvalidInput) a URL's host name does not resolve
    ├── UnsafePathError           (Forbidden) a file name or part path that is absolute or climbs out with ``..``
    ├── DestinationExistsError    (Conflict) the final file/folder exists and differs from what is downloaded
    ├── InsufficientSpaceError    (TooLarge) not enough free disk space for the download
    ├── RemoteError               (Failed) the server answered with an unexpected status (4xx/5xx)
    │   └── TokenRequiredError    (Forbidden) 401/403, or an HTML/JSON page where a model file was expected
    ├── RetriesExhaustedError     (Failed) connection errors, stalls or 5xx more often than allowed
    ├── IntegrityError            (InvalidInput) the sha256 of the downloaded file is not the published one
    ├── PartialBusyError          (Unavailable) another download holds the partial file's lock too long
    ├── MetadataError             (Failed) a Hugging Face / Civitai API answer we cannot use
    ├── ProxyUnavailableError     (InvalidInput) MODELBUS_DOWNLOAD_PROXY cannot be used (SOCKS without socksio)
    ├── DownloadCancelled         (Conflict) the job was cancelled or paused while running (internal signal)
    ├── Retry                     (Unavailable) this attempt failed, another may not (internal, ``responses``)
    └── Restart                   (Conflict) the resource changed: start over (internal, ``responses``)

httpx errors are translated where they come in (fetch.py), so callers see this family only.
``InvalidSourceError`` is the old name of ``SourceSyntaxError`` (the install service has its own
``InvalidSourceError``); it stays as an alias while branches that use it land.
"""

from __future__ import annotations

from modelbus.events.errors import (
    Conflict,
    Failed,
    Forbidden,
    InvalidInput,
    Kind,
    ModelbusError,
    TooLarge,
    Unavailable,
)


class DownloadError(ModelbusError):
    """Base of every error raised by :mod:`services.download`."""


class SourceSyntaxError(DownloadError, InvalidInput, ValueError):
    pass


class UnsafeURLError(DownloadError, Forbidden):
    pass


class HFOfflineError(UnsafeURLError):
    """No request reaches Hugging Face while it is offline (the message names the variable and the URL)."""


class UnresolvableHostError(DownloadError, InvalidInput):
    pass


class UnsafePathError(DownloadError, Forbidden, ValueError):
    pass


class DestinationExistsError(DownloadError, Conflict):
    pass


class InsufficientSpaceError(DownloadError, TooLarge):
    pass


class RemoteError(DownloadError, Failed):
    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class TokenRequiredError(RemoteError, Forbidden):
    """A remote error whose kind is forbidden: a login is missing, the server is not broken."""

    kind = Kind.FORBIDDEN  # its own kind wins over the one it inherits from RemoteError


class RetriesExhaustedError(DownloadError, Failed):
    pass


class IntegrityError(DownloadError, InvalidInput):
    pass


class PartialBusyError(DownloadError, Unavailable):
    """Another writer held the partial file's lock for longer than the wait: worth another try later."""


class MetadataError(DownloadError, Failed):
    pass


class DownloadCancelled(DownloadError, Conflict):
    """Raised inside a running job when it is cancelled or paused; never reaches a caller."""


class Retry(DownloadError, Unavailable):
    """This attempt failed in a way another attempt may not (a 5xx, a dropped connection); never reaches a
    caller: the fetch loop retries or gives up with RetriesExhaustedError."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class Restart(DownloadError, Conflict):
    """The resource changed under us: throw away the partial file and start over (internal)."""


class ProxyUnavailableError(DownloadError, InvalidInput):
    """The configured proxy cannot be used by this installation (a SOCKS proxy needs ``socksio``)."""


InvalidSourceError = SourceSyntaxError
