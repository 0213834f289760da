"""A folder model's identity (key and content hash) covers the files that make the model -- weights,
configs, tokenizers, scheduler files -- and nothing else: a README added to it changes neither, while
the manifest still lists every file the model owns."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelbus.services.hashing import (
    HashingError,
    content_hash,
    content_hash_and_files,
    is_model_file,
    model_key,
)

MODEL = {
    "model_index.json": b'{"_class_name": "StableDiffusionPipeline"}',
    "unet/config.json": b'{"sample_size": 8}',
    "unet/diffusion_pytorch_model.safetensors": b"w" * 5000,
    "scheduler/scheduler_config.json": b'{"beta_start": 0.00085}',
    "tokenizer/merges.txt": b"#version: 0.2\na b\n",
    "tokenizer/vocab.json": b'{"a": 0}',
    "text_encoder_3/spiece.model": b"sentencepiece",
    "vae/config.yaml": b"a: 1\n",
}
NOT_MODEL = {"README.md": b"# my model", "LICENSE": b"MIT", "samples/cat.png": b"\x89PNG",
             "notes.txt": b"trained on cats", "unet/README.md": b"the unet"}


def _folder(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def test_files_that_are_not_the_model_do_not_change_its_identity(tmp_path: Path) -> None:
    plain = _folder(tmp_path / "plain", MODEL)
    documented = _folder(tmp_path / "documented", MODEL | NOT_MODEL)
    assert model_key(documented) == model_key(plain)
    assert content_hash(documented) == content_hash(plain)
    assert content_hash(documented, "sha256") == content_hash(plain, "sha256")
    digest, manifest = content_hash_and_files(documented)
    assert digest == content_hash(plain)
    assert {e.path for e in manifest} == set(MODEL) | set(NOT_MODEL)  # owned, just not identity


@pytest.mark.parametrize("changed", sorted(MODEL))
def test_every_model_file_is_part_of_the_identity(tmp_path: Path, changed: str) -> None:
    plain = _folder(tmp_path / "plain", MODEL)
    other = _folder(tmp_path / "other", MODEL | {changed: MODEL[changed] + b" "})
    assert content_hash(other) != content_hash(plain)
    assert model_key(other) != model_key(plain)


def test_a_folder_without_model_files_is_refused_by_name(tmp_path: Path) -> None:
    docs = _folder(tmp_path / "docs", NOT_MODEL)
    for call in (model_key, content_hash, content_hash_and_files):
        with pytest.raises(HashingError, match="no files of a model"):
            call(docs)  # type: ignore[operator]


@pytest.mark.parametrize(("name", "expected"), [
    ("model.safetensors", True), ("weights.pb", True), ("model.onnx", True), ("model.onnx.data", True),
    ("spiece.model", True), ("merges.txt", True), ("Vocab.TXT", True), ("config.json", True),
    ("README.md", False), ("LICENSE", False), ("notes.txt", False), ("cat.png", False),
])
def test_which_files_make_a_model(name: str, expected: bool) -> None:
    assert is_model_file(name) is expected
