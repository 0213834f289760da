"""An install sees a model folder's identity as its model files: the same model with a README added is
refused as a duplicate (naming the key), and a copied install still owns the README."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from modelbus.services.install import DuplicateInstallError, ModelInstallService
from tests.fixtures.model_files import make_lora_diffusers


def test_a_readme_does_not_make_a_new_model(local_service: ModelInstallService, tmp_path: Path) -> None:
    plain = make_lora_diffusers(tmp_path / "plain" / "style-lora", folder=True)
    documented = tmp_path / "documented" / "style-lora"
    shutil.copytree(plain, documented)
    (documented / "README.md").write_text("# style lora\ntrained on watercolours\n")
    key = local_service.install_path(documented)
    record = local_service.record_store.get_model(key)
    assert (local_service.config.model_path(record.path) / "README.md").is_file()  # copied: the model owns it
    with pytest.raises(DuplicateInstallError, match=key):
        local_service.install_path(plain)
    [only] = local_service.record_store.all_models()
    assert only.key == key
