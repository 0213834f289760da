"""Placing a staged model (services.install.placement.place): a file is linked under the first free name
and its staged name removed; a folder is renamed onto a claimed one; a retry can find where it went."""

from __future__ import annotations

import os
from pathlib import Path

from modelbus.services.install.placement import place


def test_a_file_takes_the_first_free_name_and_leaves_one_link(tmp_path: Path) -> None:
    folder = tmp_path / "models" / "sd-1" / "lora"
    folder.mkdir(parents=True)
    (folder / "style.safetensors").write_bytes(b"someone else's model")
    staged = tmp_path / "staging" / "style.safetensors"
    staged.parent.mkdir()
    staged.write_bytes(b"ours")
    heard: list[Path] = []
    target = place(staged, folder, "style.safetensors", heard.append)
    assert target == folder / "style_1.safetensors" and target.read_bytes() == b"ours"
    assert not staged.exists() and os.stat(target).st_nlink == 1
    assert heard[-1] == target  # the last destination heard is where the model went
    assert (folder / "style.safetensors").read_bytes() == b"someone else's model"


def test_a_folder_is_renamed_onto_a_claimed_name(tmp_path: Path) -> None:
    folder = tmp_path / "models"
    (folder / "repo").mkdir(parents=True)
    staged = tmp_path / "staging" / "repo"
    staged.mkdir(parents=True)
    (staged / "model.safetensors").write_bytes(b"weights")
    target = place(staged, folder, "repo")
    assert target == folder / "repo_1" and (target / "model.safetensors").read_bytes() == b"weights"
    assert not staged.exists()
