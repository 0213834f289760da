"""MODELBUS_STORE_URL and its settings: what they name, and a clear error for what they cannot."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelbus.services.config import AppConfig, ConfigError
from modelbus.services.store import (
    BlobStoreUnavailableError,
    FileBlobStore,
    StoreConfigError,
    open_store,
    parse_store_url,
)
from modelbus.services.store.s3 import S3BlobStore
from tests.servers.s3_server import S3Server, free_port


def test_unset_or_shared_means_the_models_directory(modelbus_env: dict[str, str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MODELBUS_STORE_URL", raising=False)
    assert open_store(AppConfig.load()) is None
    monkeypatch.setenv("MODELBUS_STORE_URL", "shared")
    assert open_store(AppConfig.load()) is None


def test_s3_and_file_urls(modelbus_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MODELBUS_STORE_URL", "s3://fleet-models/prod/v1/")
    monkeypatch.setenv("MODELBUS_S3_ENDPOINT_URL", "http://127.0.0.1:9000/")
    config = AppConfig.load()
    store = open_store(config)
    assert isinstance(store, S3BlobStore)
    assert (store.bucket, store.prefix, store.endpoint_url) == ("fleet-models", "prod/v1/", "http://127.0.0.1:9000")
    assert store.key("a" * 64) == "prod/v1/blobs/blake3/" + "a" * 64
    monkeypatch.setenv("MODELBUS_STORE_URL", f"file://{tmp_path}")
    assert isinstance(open_store(AppConfig.load()), FileBlobStore)


@pytest.mark.parametrize("url", ["s3://", "s3://UPPER/x", "s3://ok-bucket/../up", "s3://ok-bucket/a?b=1",
                                 "gs://bucket/x", "file://relative/path", "http://example.com"])
def test_a_url_that_names_no_store_is_refused(url: str, modelbus_env: dict[str, str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(StoreConfigError, match="MODELBUS_STORE_URL"):
        parse_store_url(url)
    monkeypatch.setenv("MODELBUS_STORE_URL", url)
    with pytest.raises(ConfigError, match="MODELBUS_STORE_URL"):
        AppConfig.load()


def test_a_cache_size_and_endpoint_are_checked(modelbus_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELBUS_CACHE_SIZE", "500G")
    assert AppConfig.load().cache_size == 500 << 30
    monkeypatch.setenv("MODELBUS_S3_ENDPOINT_URL", "minio:9000")
    with pytest.raises(ConfigError, match="MODELBUS_S3_ENDPOINT_URL"):
        AppConfig.load()


def test_an_unreachable_store_is_one_error_naming_the_url(aws_env: dict[str, str]) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    store = S3BlobStore(parse_store_url("s3://fleet-models/x"), endpoint_url=endpoint, retries=1)
    with pytest.raises(BlobStoreUnavailableError, match=r"s3://fleet-models/x at http://127\.0\.0\.1:\d+"):
        store.check()
    with pytest.raises(BlobStoreUnavailableError, match="looking up blob"):
        store.size_of("a" * 64)


def test_a_missing_bucket_is_named(s3_server: S3Server, aws_env: dict[str, str]) -> None:
    store = S3BlobStore(parse_store_url("s3://no-such-bucket-here/x"), endpoint_url=s3_server.url, retries=1)
    with pytest.raises(BlobStoreUnavailableError, match="no-such-bucket-here.*opening the bucket failed: 404"):
        store.check()


def test_a_file_store_that_cannot_be_written_is_named(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(BlobStoreUnavailableError, match=f"file://{blocker}"):
        FileBlobStore(blocker).check()


def test_doctor_checks_the_store(modelbus_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, s3_server: S3Server,
                                 bucket: str) -> None:
    from modelbus.services.cli.doctor import check_store
    monkeypatch.setenv("MODELBUS_S3_ENDPOINT_URL", s3_server.url)
    monkeypatch.setenv("MODELBUS_STORE_RETRIES", "1")
    monkeypatch.setenv("MODELBUS_STORE_URL", f"s3://{bucket}/fleet")
    [ok] = check_store(AppConfig.load())
    assert ok.status == "ok" and f"s3://{bucket}/fleet reachable" in ok.detail
    monkeypatch.setenv("MODELBUS_STORE_URL", "s3://no-such-bucket-here/fleet")
    [fail] = check_store(AppConfig.load())
    assert fail.status == "fail" and "s3://no-such-bucket-here/fleet" in fail.detail and "404" in fail.detail
    monkeypatch.setenv("MODELBUS_STORE_URL", "shared")
    [shared] = check_store(AppConfig.load())
    assert shared.status == "ok" and "shared models directory" in shared.detail
