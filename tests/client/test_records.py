"""Record operations through the client: list with filters, get, update, rename, delete (with files)."""

from __future__ import annotations

import pytest

from modelbus.services.client import ModelBusClient
from modelbus.services.records import (
    DuplicateModelException,
    InvalidModelConfigException,
    UnknownModelException,
)
from tests.client.conftest import model_config, put_file


def test_list_filters_and_crud(client: ModelBusClient) -> None:
    put_file(client.config, "a.safetensors")
    put_file(client.config, "b.safetensors")
    client.add_model("k1", model_config("alpha", "a.safetensors", tags=["sfw", "style"]))
    client.add_model("k2", model_config("beta", "b.safetensors", base_model="sdxl", tags=["sfw"]))
    assert [m.key for m in client.list_models()] == ["k1", "k2"]
    assert [m.key for m in client.list_models(base="sdxl")] == ["k2"]
    assert [m.key for m in client.list_models(tag=["sfw", "style"])] == ["k1"]
    assert [m.key for m in client.list_models(name="beta", tag="sfw")] == ["k2"]
    assert client.update_model("k1", {"description": "first"}).description == "first"
    assert client.rename_model("k1", "gamma").name == "gamma"
    assert client.get_model("k1").name == "gamma"
    assert [e.event.type for e in client.history("k1")] == ["ModelAdded", "ModelUpdated", "ModelRenamed"]
    with pytest.raises(DuplicateModelException):
        client.add_model("k1", model_config("again", "c.safetensors"))
    with pytest.raises(InvalidModelConfigException):
        client.update_model("k1", {"base_model": "sd-9"})
    with pytest.raises(InvalidModelConfigException):
        client.list_models(type="spaceship")


def test_delete_keeps_or_removes_files(client: ModelBusClient) -> None:
    kept = put_file(client.config, "keep.safetensors")
    gone = put_file(client.config, "sub/gone.safetensors")
    client.add_model("k1", model_config("keep", "keep.safetensors"))
    client.add_model("k2", model_config("gone", "sub/gone.safetensors"))
    client.delete_model("k1")
    client.delete_model("k2", delete_files=True)
    assert kept.exists() and not gone.exists()
    with pytest.raises(UnknownModelException):
        client.get_model("k1")
    with pytest.raises(UnknownModelException):
        client.delete_model("k1")


def test_files_outside_the_models_dir_are_kept(client: ModelBusClient, tmp_path) -> None:  # type: ignore[no-untyped-def]
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"x")
    client.add_model("k1", model_config("out", str(outside)))
    client.delete_model("k1", delete_files=True)
    assert outside.exists()  # the user's own file, not ours to delete
    with pytest.raises(UnknownModelException):
        client.get_model("k1")
