"""Where Spandrel does not import (the main .venv: PyPI's torchvision does not import beside the CPU build
of torch 2.13.0), an upscaler is still identified and recorded, and its load is refused in one line that
names the fix; nothing is cached. (Loads themselves: tests/upscalers, in .venv-vision.)"""

from __future__ import annotations

from typing import Any

import pytest

from modelbus.services.load import InvalidModelException, ModelLoadService
from modelbus.services.probe import probe
from tests.fixtures.dit_files import write_sparse


def _spandrel_imports() -> bool:
    try:
        import spandrel  # noqa: F401
    except (ImportError, RuntimeError, OSError):
        return False
    return True


@pytest.mark.skipif(_spandrel_imports(), reason="Spandrel imports here: tests/upscalers load upscalers")
def test_load_names_the_missing_extra(service: ModelLoadService, config: Any, add: Any) -> None:
    path = write_sparse(config.models_path / "4x-Compact.safetensors", {
        "body.0.weight": (64, 3, 3, 3), "body.1.weight": (64,), "body.2.weight": (48, 64, 3, 3),
        "body.2.bias": (48,)})
    found = probe(path)
    assert (found.model_type, found.architecture, found.scale) == ("spandrel_image_to_image", "Compact", 4)
    key = add(path.name, "spandrel_image_to_image", "checkpoint", base="any", architecture="Compact", scale=4)
    with pytest.raises(InvalidModelException, match=r"load through Spandrel, which does not import here .*"
                                                    r"make install-upscalers") as refused:
        service.get_model(key)
    assert "\n" not in str(refused.value) and key not in service.cache
