from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import pytest

from modelbus.services.config import AppConfig, ConfigError, _environment, parse_size


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


#: values of every kind an environment variable may hold: text, numbers, JSON of each shape, nothing
ENV_VALUES = ("x", "12", "1.5", "true", "", " spaced ", "a,b", '{"https://h/.*": "t"}', '["a", "b"]', "null",
              '{"a": {"b": 1}}')


def _reference_source() -> Any:
    """pydantic-settings' own reader of the environment, over AppConfig's fields as the class declared
    them to pydantic-settings before (api_allowed_hosts: NoDecode): what ``_environment`` must match."""
    from pydantic import create_model
    from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, SettingsConfigDict

    class Base(BaseSettings):
        model_config = SettingsConfigDict(env_prefix="MODELBUS_", extra="ignore")

    fields: dict[str, Any] = {name: (Annotated[tuple[str, ...], NoDecode] if name == "api_allowed_hosts"
                                     else field.annotation, None) for name, field in AppConfig.model_fields.items()}
    return EnvSettingsSource(create_model("Reference", __base__=Base, **fields))


@pytest.mark.parametrize("value", ENV_VALUES)
def test_the_environment_is_read_as_pydantic_settings_reads_it(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic_settings import SettingsError
    for i, name in enumerate(AppConfig.model_fields):
        # every setting at once, in either case: the same names found, the same values (JSON decoded or not)
        monkeypatch.setenv(f"MODELBUS_{name.upper()}" if i % 2 else f"modelbus_{name}", value)
    try:
        expected = _reference_source()()
    except SettingsError:  # a dict setting's value that is not JSON: here a ConfigError naming the variable
        with pytest.raises(ConfigError, match="MODELBUS_REMOTE_API_TOKENS: not valid JSON"):
            _environment(AppConfig.model_fields)
        return
    assert _environment(AppConfig.model_fields) == expected
    assert set(expected) >= set(AppConfig.model_fields) - {"remote_api_tokens"}  # (the check can fail)


def test_arguments_over_the_environment_over_the_file_and_dicts_merged(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELBUS_ROOT", str(tmp_path))
    (tmp_path / "modelbus.yaml").write_text("namespace: fromfile\napi_port: 1234\nnot_a_setting: 1\n"
                                            "remote_api_tokens: {'a.example': file, 'b.example': file}\n")
    monkeypatch.setenv("MODELBUS_API_PORT", "4321")
    monkeypatch.setenv("MODELBUS_REMOTE_API_TOKENS", '{"b.example": "env"}')
    monkeypatch.setenv("MODELBUS_API_ALLOWED_HOSTS", "One.example, two.example")
    config = AppConfig.load(namespace="given")
    assert (config.namespace, config.api_port, config.api_allowed_hosts) == ("given", 4321, ("one.example", "two.example"))
    assert config.remote_api_tokens == {"a.example": "file", "b.example": "env"}
    assert AppConfig.load(redis_url=None).redis_url is None and config.root == tmp_path
    monkeypatch.setenv("MODELBUS_REMOTE_API_TOKENS", "{not json: s3cret")
    with pytest.raises(ConfigError) as info:
        AppConfig.load()
    assert "MODELBUS_REMOTE_API_TOKENS" in str(info.value) and "s3cret" not in str(info.value)
