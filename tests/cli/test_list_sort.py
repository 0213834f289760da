"""``modelbus list --sort FIELD [--desc]``."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from modelbus.events.schema import FileEntry
from modelbus.events.store import position_key
from modelbus.services.cli import app
from modelbus.services.client import ModelBusClient
from modelbus.services.config import AppConfig
from tests.client.conftest import model_config, put_file


def _list(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(app, ["list", *args])
    assert result.exit_code == code, (args, result.exit_code, result.stdout, result.stderr)
    return result.stdout if code == 0 else result.stderr


def test_list_sorts_by_a_field_either_way(app_config: AppConfig) -> None:
    client = ModelBusClient(app_config)
    for key, name, base in (("k0", "b", "sdxl"), ("k1", "a", "sd-2"), ("k2", "c", "sd-1")):
        put_file(app_config, f"{key}.safetensors")
        client.add_model(key, model_config(name, f"{key}.safetensors", base_model=base))
    assert [m["key"] for m in json.loads(_list("--json"))] == ["k1", "k0", "k2"]
    assert [m["key"] for m in json.loads(_list("--sort", "base", "--json"))] == ["k2", "k1", "k0"]
    assert [m["key"] for m in json.loads(_list("--sort", "base", "--desc", "--json"))] == ["k0", "k1", "k2"]
    assert "order_by='weight'" in _list("--sort", "weight", code=2)  # refused by name, with a usage exit code


def test_list_sorts_by_size_and_date(app_config: AppConfig) -> None:
    client = ModelBusClient(app_config)
    for key, name, size in (("k0", "b", 30), ("k1", "a", 10), ("k2", "c", 20)):
        put_file(app_config, f"{key}.safetensors")
        client.records.add_model(key, model_config(name, f"{key}.safetensors"),
                                 files=[FileEntry(path=f"{key}.safetensors", size=size, blake3="0" * 64)])
    assert [m["key"] for m in json.loads(_list("--sort", "size", "--json"))] == ["k1", "k2", "k0"]
    assert [m["key"] for m in json.loads(_list("--sort", "size", "--desc", "--json"))] == ["k0", "k2", "k1"]
    history = {k: client.history(k)[0].position for k in ("k0", "k1", "k2")}
    by_added = sorted(history, key=lambda k: (position_key(history[k])[0], client.get_model(k).name, k))
    assert [m["key"] for m in json.loads(_list("--sort", "added", "--json"))] == by_added
    shown = CliRunner().invoke(app, ["list", "--sort", "size"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.stderr
    rows = {key: line for line in shown.stdout.splitlines() for key in ("k0", "k1", "k2") if key in line}
    assert "30 B" in rows["k0"] and "10 B" in rows["k1"] and "20 B" in rows["k2"], shown.stdout  # a size column
    lines = shown.stdout.splitlines()
    assert lines.index(rows["k1"]) < lines.index(rows["k2"]) < lines.index(rows["k0"])
