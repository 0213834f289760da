"""The download queue: a multithreaded, resumable, verified downloader for URLs, Hugging Face repo
folders and Civitai models (the spec's DownloadQueueServiceBase)."""

from .errors import (
    DestinationExistsError,
    DownloadCancelled,
    DownloadError,
    InsufficientSpaceError,
    IntegrityError,
    MetadataError,
    RemoteError,
    RetriesExhaustedError,
    SourceSyntaxError,
    TokenRequiredError,
    UnresolvableHostError,
    UnsafePathError,
    UnsafeURLError,
)
from .job import DownloadJob, DownloadJobStatus, FileProgress, RemoteFile
from .metadata import ModelMetadata
from .options import FetchOptions
from .queue import DownloadQueueService
from .sources import CivitaiSource, HFSource, Source, URLSource, parse_source

DownloadQueueServiceBase = DownloadQueueService  # the spec's name

__all__ = [
    "CivitaiSource",
    "DestinationExistsError",
    "DownloadCancelled",
    "DownloadError",
    "DownloadJob",
    "DownloadJobStatus",
    "DownloadQueueService",
    "DownloadQueueServiceBase",
    "FetchOptions",
    "FileProgress",
    "HFSource",
    "InsufficientSpaceError",
    "IntegrityError",
    "MetadataError",
    "ModelMetadata",
    "RemoteError",
    "RemoteFile",
    "RetriesExhaustedError",
    "Source",
    "SourceSyntaxError",
    "TokenRequiredError",
    "URLSource",
    "UnresolvableHostError",
    "UnsafePathError",
    "UnsafeURLError",
    "parse_source",
]
