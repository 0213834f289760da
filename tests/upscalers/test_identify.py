"""Identification reads Spandrel's rules without Spandrel: the shipped table is Spandrel's registry, and
for every network built here (Spandrel's own classes, tiny, random weights) the probe names the
architecture and scale that Spandrel itself reads from the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelbus.services.probe import probe
from modelbus.services.probe.spandrel_archs import SPANDREL_ARCHS
from tests.upscalers import builders, require_spandrel
from tests.upscalers.spandrel_table import live_table

spandrel = require_spandrel()

# every kind in both formats people download (LaMa: its safetensors conversion only, 100 MB in fp16)
CASES = [(kind, suffix) for kind in builders.KINDS for suffix in (".safetensors", ".pth")
         if not ((kind == "lama" or kind in builders.MORE_KINDS) and suffix == ".pth")]


def test_the_shipped_table_is_spandrels_registry() -> None:
    assert SPANDREL_ARCHS == live_table(), (
        f"services/probe/spandrel_archs.py is not spandrel {spandrel.__version__}'s registry: "
        "regenerate it with .venv-vision/bin/python -m tests.upscalers.spandrel_table")
    assert len(SPANDREL_ARCHS) >= 40 and all(cond is not None for _, _, cond in SPANDREL_ARCHS)


@pytest.mark.parametrize(("kind", "suffix"), CASES)
def test_probe_agrees_with_spandrel(tmp_path: Path, kind: str, suffix: str) -> None:
    path = tmp_path / f"{kind}{suffix}"
    builders.write(kind, path)
    reference = spandrel.ModelLoader().load_from_file(path)
    result = probe(path)
    assert (result.model_type, result.model_format, result.base_model) == ("spandrel_image_to_image", "checkpoint", "any")
    assert (result.architecture, result.scale) == (reference.architecture.id, reference.scale)
    assert result.notes is not None and result.notes.startswith(reference.architecture.name)
