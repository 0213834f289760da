"""Model identity: the constant-time ``key`` and the full-content ``hash``.

- :func:`model_key` samples each file with imohash (three 16 KiB samples plus the size), so it
  costs the same for a 2 GiB checkpoint as for a 2 KiB one. It is the record's permanent key.
- :func:`content_hash` reads every byte: BLAKE3 over a memory map (multithreaded: fast on SSDs;
  pass ``threads=1`` for spinning disks, where parallel reads seek), or sha256 on request.

A folder is hashed as the sorted list of ``(relative path, per-file digest)`` pairs, so the
result does not depend on directory listing order, and renaming a file inside it changes it.
Only the files that make the model count (:func:`is_model_file`: weights, configs, tokenizer and
scheduler files): a ``README.md``, a licence or sample images added to a model folder change neither
its key nor its hash. Hidden entries (``.cache/``, ``.DS_Store``, ``.gitattributes``...) are skipped
too: tools such as ``huggingface_hub`` drop bookkeeping there that says nothing about the model.
The manifest (:func:`content_hash_and_files`) still lists every non-hidden file: the model owns
them all (they are copied and deleted with it), they just are not its identity.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import blake3
import imohash

from modelbus.events.errors import InvalidInput
from modelbus.events.schema import FileEntry
from modelbus.services.stopping import checkpoint

HashAlgorithm = Literal["blake3", "sha256"]
ALGORITHMS: tuple[str, ...] = ("blake3", "sha256")
KEY_LENGTH = 32  # hex characters, as the spec says
_SHA256_CHUNK = 8 << 20
_BLAKE3_CHUNK = 256 << 20  # bytes hashed between two stop checks (a fraction of a second)
# Domain separation: a folder digest can never equal a single file's digest.
_FOLDER_CONTEXT = b"modelbus folder v1\x00"


#: suffixes of the files that make a model: weights (safetensors, torch, ONNX and its external data,
#: Flax, Keras, GGUF), configs, tokenizer vocabularies (sentencepiece ``.model``, ``vocab.json``...)
MODEL_FILE_SUFFIXES = frozenset({
    ".safetensors", ".sft", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".onnx", ".onnx_data", ".data",
    ".pb", ".msgpack", ".h5", ".gguf", ".npz", ".json", ".yaml", ".yml", ".model", ".tiktoken",
})
#: files without such a suffix that still belong to a model (tokenizers' plain-text vocabularies)
MODEL_FILE_NAMES = frozenset({"merges.txt", "vocab.txt"})


def is_model_file(name: str) -> bool:
    """Whether a file of this name is part of what a folder model is (see the module docstring)."""
    lowered = name.lower()
    return lowered in MODEL_FILE_NAMES or os.path.splitext(lowered)[1] in MODEL_FILE_SUFFIXES


class HashingError(InvalidInput):
    """A path could not be hashed (missing, empty folder, unreadable); the message says which."""


def model_key(path: Path) -> str:
    """The 32-character imohash key of a file, or of a folder's files combined."""
    path = _existing(path)
    if path.is_file():
        return _imohash_file(path)
    files = _folder_files(path, identity=True)
    combined = blake3.blake3(_FOLDER_CONTEXT + b"key\x00")
    for rel, file in files:
        _feed_entry(combined, rel, bytes.fromhex(_imohash_file(file)))
    # 16 bytes = 32 hex characters, the same length as a single file's imohash
    return combined.hexdigest(length=KEY_LENGTH // 2)


def content_hash(path: Path, algorithm: HashAlgorithm = "blake3", threads: int | None = None) -> str:
    """The content hash of a file or folder, written ``"<algorithm>:<hex>"``.

    ``threads`` bounds BLAKE3's worker threads (``None``: as many as it likes); sha256 is serial.
    """
    if algorithm not in ALGORITHMS:
        raise HashingError(f"unknown hash algorithm {algorithm!r}; use one of {', '.join(ALGORITHMS)}")
    if threads is not None and threads < 1:
        raise HashingError(f"threads must be at least 1, got {threads}")
    if algorithm == "blake3":
        return content_hash_and_files(path, threads)[0]
    path = _existing(path)
    digest_file = _file_digester(algorithm, threads)
    if path.is_file():
        hexdigest = digest_file(path).hex()
    else:
        combined = blake3.blake3(_FOLDER_CONTEXT + algorithm.encode() + b"\x00")
        for rel, file in _folder_files(path, identity=True):
            _feed_entry(combined, rel, digest_file(file))
        hexdigest = combined.hexdigest()
    return f"{algorithm}:{hexdigest}"


def content_hash_and_files(path: Path, threads: int | None = None) -> tuple[str, tuple[FileEntry, ...]]:
    """The BLAKE3 content hash (as :func:`content_hash` writes it) and, from the same single read, each
    file's entry of the model's manifest: its path relative to the model's base (a folder model: the
    folder; a single file: the folder holding it, so the entry is its name), its size and BLAKE3."""
    path = _existing(path)
    digest_file = _file_digester("blake3", threads)
    if path.is_file():
        digest = digest_file(path)
        return f"blake3:{digest.hex()}", (FileEntry(path=path.name, size=path.stat().st_size, blake3=digest.hex()),)
    combined = blake3.blake3(_FOLDER_CONTEXT + b"blake3\x00")
    entries = []
    files = _folder_files(path)
    if not any(is_model_file(file.name) for _, file in files):
        _folder_files(path, identity=True)  # raises, naming what is missing
    for rel, file in files:
        digest = digest_file(file)
        if is_model_file(file.name):
            _feed_entry(combined, rel, digest)
        entries.append(FileEntry(path=rel, size=file.stat().st_size, blake3=digest.hex()))
    return f"blake3:{combined.hexdigest()}", tuple(entries)


def sha256_file(path: Path) -> str:
    """Hex sha256 of one file (what Hugging Face LFS and Civitai publish)."""
    path = _existing(path)
    if not path.is_file():
        raise HashingError(f"sha256_file needs a file, got a folder: {path}")
    return _sha256_bytes(path).hex()


def _file_digester(algorithm: HashAlgorithm, threads: int | None) -> Callable[[Path], bytes]:
    if algorithm == "sha256":
        return _sha256_bytes
    max_threads = blake3.blake3.AUTO if threads is None else threads

    def digest(path: Path) -> bytes:
        hasher = blake3.blake3(max_threads=max_threads)
        try:
            # mmap of an empty file fails on some platforms; an empty file is the empty input
            if path.stat().st_size:
                with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                    view = memoryview(mapped)
                    try:
                        # in chunks, so that a cancelled job stops between two (services.stopping)
                        for start in range(0, len(view), _BLAKE3_CHUNK):
                            checkpoint()
                            hasher.update(view[start:start + _BLAKE3_CHUNK])
                    finally:
                        view.release()
        except OSError as exc:
            raise HashingError(f"cannot read {path}: {exc}") from exc
        return hasher.digest()

    return digest


def _sha256_bytes(path: Path) -> bytes:
    try:
        with path.open("rb") as fh:
            return hashlib.file_digest(fh, "sha256").digest()
    except OSError as exc:
        raise HashingError(f"cannot read {path}: {exc}") from exc


def _imohash_file(path: Path) -> str:
    try:
        return str(imohash.hashfile(str(path), hexdigest=True))
    except (OSError, EOFError) as exc:
        raise HashingError(f"cannot read {path}: {exc}") from exc


def _feed_entry(hasher: blake3.blake3, rel: str, digest: bytes) -> None:
    # length prefixes keep ("ab", x) and ("a", "b"+x) apart
    name = rel.encode("utf-8")
    hasher.update(len(name).to_bytes(4, "big") + name + len(digest).to_bytes(2, "big") + digest)


def _existing(path: Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise HashingError(f"no such file or folder: {path}")
    if not (path.is_file() or path.is_dir()):
        raise HashingError(f"not a regular file or folder: {path}")
    return path


def _folder_files(root: Path, identity: bool = False) -> list[tuple[str, Path]]:
    """``(posix relative path, path)`` of every non-hidden file under ``root`` (``identity``: only the
    model's own files, :func:`is_model_file`), sorted."""
    files = sorted(_walk(root), key=lambda item: item[0])
    if identity:
        files = [(rel, file) for rel, file in files if is_model_file(file.name)]
    if not files:
        what = "no files of a model (weights, configs, tokenizers)" if identity else "no files"
        raise HashingError(f"folder holds {what} to hash: {root}")
    return files


def _walk(root: Path) -> Iterator[tuple[str, Path]]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue
            file = Path(dirpath, name)
            if file.is_file():
                yield file.relative_to(root).as_posix(), file
