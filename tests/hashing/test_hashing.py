"""model_key / content_hash / sha256_file on real files and folders."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import blake3
import imohash
import pytest

from modelbus.services.hashing import HashingError, content_hash, model_key, sha256_file
from tests.fixtures import make_sparse_safetensors

MIB = 1 << 20


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _folder(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        _write(root / rel, data)
    return root


def test_key_of_a_file_is_the_32_char_imohash(tmp_path: Path) -> None:
    f = _write(tmp_path / "m.safetensors", os.urandom(MIB))
    key = model_key(f)
    assert len(key) == 32 and int(key, 16) >= 0
    assert key == imohash.hashfile(str(f), hexdigest=True)


def test_key_stays_while_hash_changes_outside_the_sampled_regions(tmp_path: Path) -> None:
    data = bytearray(os.urandom(4 * MIB))
    f = _write(tmp_path / "m.bin", bytes(data))
    key, digest = model_key(f), content_hash(f)
    data[MIB] ^= 0xFF  # imohash samples 16 KiB at the start, the middle and the end only
    f.write_bytes(bytes(data))
    assert model_key(f) == key
    assert content_hash(f) != digest


def test_key_changes_with_size_and_sampled_content(tmp_path: Path) -> None:
    data = os.urandom(MIB)
    f = _write(tmp_path / "a", data)
    key = model_key(f)
    assert model_key(_write(tmp_path / "b", data + b"x")) != key
    assert model_key(_write(tmp_path / "c", bytes([data[0] ^ 0xFF]) + data[1:])) != key  # (a fixed byte is data[0] once in 256)
    assert model_key(_write(tmp_path / "d", data)) == key


def test_key_of_a_large_sparse_file(tmp_path: Path) -> None:
    f = make_sparse_safetensors(tmp_path / "big.safetensors", 3 << 30, shapes={})
    assert f.stat().st_size > 3 << 29
    assert len(model_key(f)) == 32


def test_blake3_and_sha256_match_independent_digests(tmp_path: Path) -> None:
    data = os.urandom(3 * MIB + 17)
    f = _write(tmp_path / "m.safetensors", data)
    expected = blake3.blake3(data).hexdigest()
    assert content_hash(f) == f"blake3:{expected}"
    assert content_hash(f, threads=1) == f"blake3:{expected}"
    assert content_hash(f, threads=4) == f"blake3:{expected}"
    assert content_hash(f, "sha256") == f"sha256:{hashlib.sha256(data).hexdigest()}"
    assert sha256_file(f) == hashlib.sha256(data).hexdigest()


def test_empty_file(tmp_path: Path) -> None:
    f = _write(tmp_path / "empty", b"")
    assert content_hash(f) == f"blake3:{blake3.blake3(b'').hexdigest()}"
    assert len(model_key(f)) == 32


FILES = {"model_index.json": b"{}", "unet/config.json": b'{"a": 1}', "unet/model.safetensors": b"w" * 5000}


def test_folder_hashes_are_independent_of_creation_order(tmp_path: Path) -> None:
    a = _folder(tmp_path / "a", FILES)
    b = _folder(tmp_path / "b", dict(reversed(list(FILES.items()))))
    assert model_key(a) == model_key(b)
    assert content_hash(a) == content_hash(b)
    assert content_hash(a, "sha256") == content_hash(b, "sha256")
    assert len(model_key(a)) == 32
    assert content_hash(a) != content_hash(a, "sha256").replace("sha256", "blake3")


def test_folder_hash_changes_with_content_names_and_files(tmp_path: Path) -> None:
    base = _folder(tmp_path / "base", FILES)
    key, digest = model_key(base), content_hash(base)

    changed = _folder(tmp_path / "changed", FILES | {"unet/model.safetensors": b"w" * 4999 + b"v"})
    assert content_hash(changed) != digest

    renamed = _folder(tmp_path / "renamed", {k.replace("unet/", "unet2/"): v for k, v in FILES.items()})
    assert model_key(renamed) != key and content_hash(renamed) != digest

    extra = _folder(tmp_path / "extra", FILES | {"vae/config.json": b"{}"})
    assert model_key(extra) != key and content_hash(extra) != digest


def test_folder_hash_skips_hidden_bookkeeping(tmp_path: Path) -> None:
    plain = _folder(tmp_path / "plain", FILES)
    cached = _folder(tmp_path / "cached", FILES | {".cache/huggingface/x.lock": b"1", ".gitattributes": b"*"})
    assert model_key(plain) == model_key(cached)
    assert content_hash(plain) == content_hash(cached)


def test_folder_digest_differs_from_its_single_file(tmp_path: Path) -> None:
    f = _write(tmp_path / "one" / "m.bin", b"abc")
    assert content_hash(f) != content_hash(f.parent)


@pytest.mark.parametrize("call", [model_key, content_hash, sha256_file])
def test_missing_path_is_named(tmp_path: Path, call: object) -> None:
    with pytest.raises(HashingError, match="no such file"):
        call(tmp_path / "nope")  # type: ignore[operator]


def test_bad_arguments(tmp_path: Path) -> None:
    f = _write(tmp_path / "m", b"x")
    with pytest.raises(HashingError, match="unknown hash algorithm"):
        content_hash(f, "md5")  # type: ignore[arg-type]
    with pytest.raises(HashingError, match="threads"):
        content_hash(f, threads=0)
    with pytest.raises(HashingError, match="needs a file"):
        sha256_file(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(HashingError, match="no files"):
        model_key(empty)
    shutil.rmtree(empty)
