from __future__ import annotations

from pathlib import Path

import pytest

from modelbus.services.config import AppConfig, ConfigError, parse_size


def test_defaults_and_relative_paths_resolve_against_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELBUS_ROOT", str(tmp_path))
    config = AppConfig.load()
    assert config.namespace == "modelbus" and config.model_config_db == "auto"
    assert config.models_path == tmp_path / "models"
    assert config.db_file == tmp_path / "databases" / "modelbus.db"
    assert config.model_path("sd-1/lora/x.safetensors") == tmp_path / "models" / "sd-1/lora/x.safetensors"
    assert config.model_path("/abs/x") == Path("/abs/x")


def test_yaml_file_is_read_and_the_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELBUS_ROOT", str(tmp_path))
    (tmp_path / "modelbus.yaml").write_text("namespace: fromfile\nram_cache_size: 2G\nmodel_config_db: null\n")
    config = AppConfig.load()
    assert config.namespace == "fromfile" and config.ram_cache_size == 2 << 30 and config.model_config_db is None
    monkeypatch.setenv("MODELBUS_NAMESPACE", "fromenv")
    assert AppConfig.load().namespace == "fromenv"


@pytest.mark.parametrize(("var", "value"), [
    ("MODELBUS_RAM_CACHE_SIZE", "lots"),
    ("MODELBUS_NAMESPACE", "bad{tag}"),
    ("MODELBUS_REDIS_URL", "http://nope"),
    ("MODELBUS_DOWNLOAD_THREADS", "0"),
    ("MODELBUS_PRECISION", "float8"),
])
def test_a_bad_value_names_the_variable_and_the_value(var: str, value: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELBUS_ROOT", str(tmp_path))
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as info:
        AppConfig.load()
    assert var in str(info.value) and value in str(info.value)


def test_malformed_yaml_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELBUS_ROOT", str(tmp_path))
    (tmp_path / "modelbus.yaml").write_text("namespace: [unclosed\n")
    with pytest.raises(ConfigError, match="modelbus.yaml"):
        AppConfig.load()


def test_sizes() -> None:
    assert parse_size("32G") == 32 << 30 and parse_size("512MiB") == 512 << 20 and parse_size(10) == 10
    assert parse_size("1.5k") == 1536
    with pytest.raises(ValueError):
        parse_size("-1")
