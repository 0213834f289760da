"""The blob store on S3-compatible object storage, through boto3 and s3transfer.

boto3 was chosen over obstore by ``tests/bench/bench_store.py`` (equal throughput against the test
server, where the server is the bottleneck) and because botocore's credential chain is the standard
one: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and the
shared config files, SSO, web identity and instance roles. Multipart uploads (parallel, retried) are
s3transfer's; nothing here signs a request or splits a multipart upload by hand.

A blob is uploaded through a reader that hashes the bytes as s3transfer reads them, in order; if they
do not hash to the blob's name the read raises before the last part, s3transfer aborts the multipart
upload, and nothing appears under the name. After the upload a HEAD checks the stored size and the
``blake3`` metadata. An upload killed half-way leaves an incomplete multipart upload, which S3 never
shows as an object (OPERATIONS.md: a lifecycle rule aborts them); the next attempt starts over.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blake3
import boto3
import botocore.config
import botocore.exceptions
from boto3.s3.transfer import TransferConfig

from modelbus.events.logs import get_logger
from modelbus.services.store import defaults
from modelbus.services.store.blobs import BlobInfo, BlobStore, check_digest
from modelbus.services.store.errors import BlobCorruptError, BlobMissingError, BlobStoreUnavailableError
from modelbus.services.store.location import StoreLocation

log = get_logger(__name__)

_MISSING = {"404", "NoSuchKey", "NotFound"}
_CONNECTION_ERRORS = (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectionClosedError,
                      botocore.exceptions.ReadTimeoutError, botocore.exceptions.ConnectTimeoutError,
                      botocore.exceptions.NoCredentialsError, botocore.exceptions.PartialCredentialsError,
                      botocore.exceptions.ProfileNotFound, botocore.exceptions.ResponseStreamingError)


class _HashingReader(io.RawIOBase):
    """A file read once, in order, hashing as it goes; refuses to hand out the last byte of a file whose
    content does not hash to ``digest`` (so a multipart upload of it never completes)."""

    def __init__(self, path: Path, digest: str, size: int) -> None:
        self._fh = path.open("rb")
        self._hasher = blake3.blake3()
        self._digest, self._size, self._read = digest, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False  # s3transfer then reads it sequentially, part after part, in one thread

    def readinto(self, buffer: Any) -> int:
        n = self._fh.readinto(buffer)
        view = memoryview(buffer)[:n]
        self._hasher.update(view)
        self._read += n
        if self._read > self._size or (n == 0 and self._read < self._size):
            raise BlobCorruptError(f"{self._fh.name} changed size while it was uploaded")
        if self._read == self._size and self._hasher.hexdigest() != self._digest:
            raise BlobCorruptError(f"{self._fh.name} does not hash to {self._digest}: upload aborted")
        return n

    def close(self) -> None:
        self._fh.close()
        super().close()


class S3BlobStore(BlobStore):
    def __init__(self, location: StoreLocation, endpoint_url: str | None = None,
                 retries: int = defaults.RETRIES, part_size: int = defaults.PART_SIZE) -> None:
        self.bucket = location.bucket
        self.prefix = f"{location.prefix}/" if location.prefix else ""
        self.url = location.url
        self.endpoint_url = endpoint_url
        self._config = botocore.config.Config(
            retries={"max_attempts": retries, "mode": "standard"}, connect_timeout=defaults.CONNECT_TIMEOUT,
            read_timeout=defaults.READ_TIMEOUT, max_pool_connections=2 * defaults.TRANSFER_THREADS + 8)
        self._client: Any = None
        self.part_size = part_size
        self._transfer = TransferConfig(multipart_threshold=part_size, multipart_chunksize=part_size,
                                        max_concurrency=defaults.TRANSFER_THREADS, use_threads=True)

    @property
    def client(self) -> Any:
        """One client for every thread (a boto3 client is thread safe; making one costs ~0.1 s)."""
        if self._client is None:
            with _SESSION_LOCK:
                if self._client is None:
                    self._client = boto3.session.Session().client("s3", endpoint_url=self.endpoint_url,
                                                                  config=self._config)
        return self._client

    def key(self, digest: str) -> str:
        return f"{self.prefix}{defaults.BLOB_PREFIX}{check_digest(digest)}"

    def _unavailable(self, exc: Exception, what: str) -> BlobStoreUnavailableError:
        where = self.url + (f" at {self.endpoint_url}" if self.endpoint_url else "")
        if isinstance(exc, botocore.exceptions.ClientError):
            error = exc.response.get("Error", {})
            reason = f"{error.get('Code', '?')}: {error.get('Message') or 'refused'}"
        else:
            reason = str(exc)
        return BlobStoreUnavailableError(f"model store {where}: {what} failed: {reason}")

    def check(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (botocore.exceptions.ClientError, *_CONNECTION_ERRORS) as exc:
            raise self._unavailable(exc, "opening the bucket") from exc

    def stat(self, digest: str) -> BlobInfo | None:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.key(digest))
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in _MISSING:
                return None
            raise self._unavailable(exc, f"looking up blob {digest}") from exc
        except _CONNECTION_ERRORS as exc:
            raise self._unavailable(exc, f"looking up blob {digest}") from exc
        return BlobInfo(digest, int(head["ContentLength"]), head["LastModified"].timestamp())

    def touch(self, digest: str) -> None:
        """A server-side copy onto itself (s3transfer's, multipart past 5 GB): its LastModified is now."""
        key = self.key(digest)
        try:
            self.client.copy({"Bucket": self.bucket, "Key": key}, self.bucket, key, Config=self._transfer,
                             ExtraArgs={"Metadata": {"blake3": digest}, "MetadataDirective": "REPLACE"})
        except (botocore.exceptions.ClientError, *_CONNECTION_ERRORS) as exc:
            raise self._unavailable(exc, f"refreshing blob {digest}") from exc

    def put(self, digest: str, path: Path) -> None:
        size = path.stat().st_size
        key = self.key(digest)
        extra = {"Metadata": {"blake3": digest}}
        try:
            if size < self.part_size:
                body = path.read_bytes()
                if blake3.blake3(body).hexdigest() != digest:
                    raise BlobCorruptError(f"{path} does not hash to {digest}: not uploaded")
                self.client.put_object(Bucket=self.bucket, Key=key, Body=body, **extra)
            else:
                with _HashingReader(path, digest, size) as reader:
                    self.client.upload_fileobj(reader, self.bucket, key, ExtraArgs=extra, Config=self._transfer)
            head = self.client.head_object(Bucket=self.bucket, Key=key)
        except (botocore.exceptions.ClientError, *_CONNECTION_ERRORS) as exc:
            raise self._unavailable(exc, f"uploading blob {digest}") from exc
        stored = (int(head["ContentLength"]), head.get("Metadata", {}).get("blake3"))
        if stored != (size, digest):
            raise BlobCorruptError(f"blob {digest} in {self.url} reads back as {stored}, not ({size}, {digest})")
        log.debug("blob_uploaded", digest=digest, size=size)

    def read_range(self, digest: str, start: int, end: int) -> Iterator[bytes]:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.key(digest), Range=f"bytes={start}-{end - 1}")
            yield from response["Body"].iter_chunks(defaults.STREAM_CHUNK)
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in _MISSING:
                raise BlobMissingError(f"blob {digest} is not in the model store {self.url}") from exc
            raise self._unavailable(exc, f"reading blob {digest}") from exc
        except _CONNECTION_ERRORS as exc:
            raise self._unavailable(exc, f"reading blob {digest}") from exc

    def delete(self, digest: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key(digest))
        except (botocore.exceptions.ClientError, *_CONNECTION_ERRORS) as exc:
            raise self._unavailable(exc, f"deleting blob {digest}") from exc

    def digests(self) -> Iterator[BlobInfo]:
        base = f"{self.prefix}{defaults.BLOB_PREFIX}"
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
                for item in page.get("Contents", []):
                    yield BlobInfo(item["Key"][len(base):], int(item["Size"]), item["LastModified"].timestamp())
        except (botocore.exceptions.ClientError, *_CONNECTION_ERRORS) as exc:
            raise self._unavailable(exc, "listing blobs") from exc


_SESSION_LOCK = threading.Lock()
