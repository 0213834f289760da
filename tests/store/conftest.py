"""Store fixtures: one moto S3 server for the run, a fresh bucket per test, and every blob-store test
run against both implementations (a directory and S3)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelbus.services.store import BlobStore, FileBlobStore, parse_store_url
from modelbus.services.store.s3 import S3BlobStore
from tests.servers.s3_server import CREDENTIALS, S3Server

PART = 5 << 20  # S3's smallest multipart part: a 12 MiB blob goes up (and comes down) in three parts


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    with S3Server() as server:
        yield server


@pytest.fixture()
def aws_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Credentials the standard way (the environment), and none of the shell's AWS settings."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_CONFIG_FILE",
                 "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    return dict(CREDENTIALS)


@pytest.fixture()
def bucket(s3_server: S3Server, aws_env: dict[str, str]) -> str:
    name = f"modelbus-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=name)
    return name


@pytest.fixture()
def s3_url(bucket: str) -> str:
    return f"s3://{bucket}/fleet"


@pytest.fixture()
def s3_store(s3_url: str, s3_server: S3Server) -> S3BlobStore:
    return S3BlobStore(parse_store_url(s3_url), endpoint_url=s3_server.url, part_size=PART)


@pytest.fixture(params=["file", "s3"])
def blob_store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    if request.param == "file":
        store = FileBlobStore(tmp_path / "store")
        store.part_size = PART
        return store
    return request.getfixturevalue("s3_store")
