"""Where the fleet's canonical copy of every model lives, as ``MODELBUS_STORE_URL`` says.

- ``shared`` (or unset): the models directory, on one host or a shared disk; no blob store.
- ``s3://bucket/prefix``: an S3-compatible object store (endpoint from ``MODELBUS_S3_ENDPOINT_URL``).
- ``file:///absolute/path``: a blob store in a directory (a shared disk, or tests).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from modelbus.services.store.errors import StoreConfigError

SHARED = "shared"
# S3's own rules: 3-63 lowercase letters, digits, dots and hyphens
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_PREFIX = re.compile(r"^[A-Za-z0-9!_.*'()\-/]*$")


@dataclass(frozen=True)
class StoreLocation:
    scheme: Literal["shared", "s3", "file"]
    bucket: str = ""
    prefix: str = ""        # without leading or trailing '/'
    path: Path | None = None

    @property
    def url(self) -> str:
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        if self.scheme == "file":
            return f"file://{self.path}"
        return SHARED


def parse_store_url(value: str | None) -> StoreLocation:
    """The store a URL names; a URL that names none raises StoreConfigError saying why."""
    text = (value or "").strip()
    if text in ("", SHARED):
        return StoreLocation("shared")
    parts = urlsplit(text)
    if parts.scheme == "s3":
        bucket, prefix = parts.netloc, parts.path.strip("/")
        if not _BUCKET.match(bucket):
            raise StoreConfigError(f"MODELBUS_STORE_URL={text!r}: {bucket!r} is not an S3 bucket name")
        if not _PREFIX.match(prefix) or "//" in prefix or ".." in prefix.split("/"):
            raise StoreConfigError(f"MODELBUS_STORE_URL={text!r}: {prefix!r} is not a usable key prefix")
        if parts.query or parts.fragment:
            raise StoreConfigError(f"MODELBUS_STORE_URL={text!r}: no query or fragment allowed")
        return StoreLocation("s3", bucket=bucket, prefix=prefix)
    if parts.scheme == "file":
        if parts.netloc or not parts.path.startswith("/"):
            raise StoreConfigError(f"MODELBUS_STORE_URL={text!r}: use file:///absolute/path")
        return StoreLocation("file", path=Path(parts.path))
    raise StoreConfigError(f"MODELBUS_STORE_URL={text!r}: use 'shared', s3://bucket/prefix or file:///path")
