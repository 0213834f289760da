"""Upscalers load through the load service (``with service.get_model(key) as model``) as Spandrel builds
them, from files read by our own readers (pickles scanned first): the module upscales a tiny image
exactly as Spandrel's own load of the same file does. Bad files are refused with one clear line."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

from modelbus.services.load import InvalidModelException, ModelLoadService, UnsafeModelException
from modelbus.services.probe import probe
from modelbus.services.probe.errors import CorruptModelError, UnrecognizedFilesError, UnsafeModelError
from tests.upscalers import builders, require_spandrel

spandrel = require_spandrel()


def _record(config: Any, add: Any, kind: str, suffix: str) -> tuple[str, Path, torch.nn.Module]:
    path = config.models_path / f"{kind}{suffix}"
    model = builders.write(kind, path, seed=3)
    found = probe(path)
    key = add(path.name, "spandrel_image_to_image", "checkpoint", base="any", architecture=found.architecture,
              scale=found.scale)
    return key, path, model


@pytest.mark.parametrize(("kind", "suffix"), [("esrgan_x4", ".pth"), ("realesrgan_x4plus", ".pth"),
                                              ("realesrgan_x2plus", ".safetensors"), ("compact_x4", ".safetensors"),
                                              ("swinir_x2", ".safetensors"), ("hat_x2", ".pth"),
                                              ("dat_x4", ".safetensors")])
def test_upscaler_loads_and_upscales(service: ModelLoadService, config: Any, add: Any, store: Any,
                                     kind: str, suffix: str) -> None:
    key, path, _ = _record(config, add, kind, suffix)
    reference = spandrel.ModelLoader().load_from_file(path)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with service.get_model(key) as model, torch.no_grad():
        assert isinstance(model, torch.nn.Module) and not model.training
        out = model(image)
        expected = reference.model.eval()(image)
    scale = store.get_model(key).scale
    assert scale == reference.scale and out.shape == (1, 3, 16 * scale, 16 * scale)
    assert torch.equal(out, expected), f"{kind}: the service's module differs from Spandrel's own load"


def test_lama_inpaints_only_the_masked_region(service: ModelLoadService, config: Any, add: Any) -> None:
    key, _, reference = _record(config, add, "lama", ".safetensors")
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:40, 16:40] = 1
    with service.get_model(key) as model, torch.no_grad():
        out = model(image, mask)
        expected = reference(image, mask)
    assert out.shape == image.shape and torch.equal(out, expected)
    assert torch.equal(out * (1 - mask), image * (1 - mask)), "LaMa changed pixels outside its mask"
    assert not torch.equal(out * mask, image * mask)


def test_a_state_dict_spandrel_does_not_know_is_refused(service: ModelLoadService, config: Any, add: Any) -> None:
    path = config.models_path / "classifier.pth"
    torch.save({"fc.weight": torch.zeros(10, 8), "conv1.weight": torch.zeros(8, 3, 3, 3)}, path)
    with pytest.raises(UnrecognizedFilesError, match="not a model this version recognises"):
        probe(path)
    key = add(path.name, "spandrel_image_to_image", "checkpoint", base="any")
    with pytest.raises(InvalidModelException, match="not an architecture Spandrel knows"):
        service.get_model(key)
    assert key not in service.cache


def test_an_incomplete_network_is_refused(service: ModelLoadService, config: Any, add: Any) -> None:
    full = builders.write("esrgan_x4", config.models_path / "full.pth")
    state = {k: v for k, v in full.state_dict().items() if k != "model.10.bias"}
    torch.save(state, config.models_path / "cut.pth")
    key = add("cut.pth", "spandrel_image_to_image", "checkpoint", base="any", architecture="ESRGAN")
    with pytest.raises(InvalidModelException, match=r"cut\.pth: not a complete ESRGAN"):
        service.get_model(key)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_truncated_file_is_refused(service: ModelLoadService, config: Any, add: Any, suffix: str) -> None:
    path = config.models_path / f"esrgan{suffix}"
    builders.write("esrgan_x4", path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises((CorruptModelError, UnrecognizedFilesError)) as caught:
        probe(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    key = add(path.name, "spandrel_image_to_image", "checkpoint", base="any", architecture="ESRGAN")
    with pytest.raises(InvalidModelException) as refused:
        service.get_model(key)
    assert str(path) in str(refused.value)


class _Payload:
    """A pickle that runs a command when unpickled (it must never be)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        import os
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_the_scanner_refuses_is_never_unpickled(service: ModelLoadService, config: Any, add: Any,
                                                         tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    state = dict(builders.write("compact_x4", config.models_path / "ok.pth").state_dict())
    path = config.models_path / "compact_evil.pth"
    torch.save({**state, "extra": _Payload(marker)}, path, pickle_module=pickle)
    with pytest.raises(UnsafeModelError, match="unsafe pickle imports"):
        probe(path)
    key = add(path.name, "spandrel_image_to_image", "checkpoint", base="any", architecture="Compact")
    with pytest.raises(UnsafeModelException, match="refusing to unpickle"):
        service.get_model(key)
    assert not marker.exists()
