"""The spec's record service API, run on every backend (SQL, YAML, memory) and both event stores."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelbus.events.store import EventStore
from modelbus.services.records import (
    BaseModelType,
    DuplicateModelException,
    InvalidModelConfigException,
    MainCheckpointConfig,
    ModelRecordServiceBase,
    ModelType,
    UnknownModelException,
    VaeCheckpointConfig,
)
from modelbus.services.records.models import LoRALycorisConfig

from .conftest import main_config, vae_config


def test_add_and_get_return_the_concrete_class(service: ModelRecordServiceBase) -> None:
    added = service.add_model("k1", main_config(tags=["sfw"]))
    assert type(added) is MainCheckpointConfig and added.key == "k1" and added.hash == "k1"
    got = service.get_model("k1")
    assert got == added and type(got) is MainCheckpointConfig
    assert service.exists("k1") and not service.exists("nope")
    assert service.version() == "3.2"


def test_add_accepts_a_config_instance(service: ModelRecordServiceBase) -> None:
    cfg = VaeCheckpointConfig(key="v1", name="vae", base_model=BaseModelType.StableDiffusion1, path="/x/vae.pt")
    added = service.add_model("v1", cfg)
    assert type(added) is VaeCheckpointConfig and service.get_model("v1") == cfg


def test_unknown_key(service: ModelRecordServiceBase) -> None:
    for call in (lambda: service.get_model("missing"), lambda: service.update_model("missing", {"name": "x"}),
                 lambda: service.rename_model("missing", "x"), lambda: service.del_model("missing")):
        with pytest.raises(UnknownModelException, match="missing"):
            call()


def test_duplicate_key_and_duplicate_path_append_nothing(service: ModelRecordServiceBase, root: Path) -> None:
    service.add_model("k1", main_config())
    head = service.event_store.head()
    with pytest.raises(DuplicateModelException, match="k1"):
        service.add_model("k1", main_config(path="elsewhere.safetensors"))
    # the same file named by its absolute path is still the same model location
    absolute = str(root / "models" / "sd-1/main/sd15.safetensors")
    with pytest.raises(DuplicateModelException, match="already used by model 'k1'"):
        service.add_model("k2", main_config(path=absolute))
    assert service.event_store.head() == head
    assert [m.key for m in service.all_models()] == ["k1"]


def test_invalid_config_appends_nothing(service: ModelRecordServiceBase) -> None:
    head = service.event_store.head()
    with pytest.raises(InvalidModelConfigException, match="base_model='sd-7'"):
        service.add_model("k1", main_config(base_model="sd-7"))
    service.add_model("k1", main_config())
    head = service.event_store.head()
    with pytest.raises(InvalidModelConfigException, match="variant='tall'"):
        service.update_model("k1", {"variant": "tall"})
    with pytest.raises(InvalidModelConfigException, match="name=''"):
        service.rename_model("k1", "")
    assert service.event_store.head() == head
    assert service.get_model("k1").variant.value == "normal"


def test_update_sparse_and_whole(service: ModelRecordServiceBase) -> None:
    service.add_model("k1", main_config())
    updated = service.update_model("k1", {"description": "the classic", "tags": ["a", "b"]})
    assert type(updated) is MainCheckpointConfig and updated.description == "the classic"
    assert service.get_model("k1") == updated
    whole = updated.model_copy(update={"author": "me", "description": None})
    assert service.update_model("k1", whole) == service.get_model("k1")
    assert service.get_model("k1").author == "me" and service.get_model("k1").description is None
    # changing the pair changes the class
    lora = service.update_model("k1", {"model_type": "lora", "model_format": "lycoris"})
    assert type(lora) is LoRALycorisConfig and type(service.get_model("k1")) is LoRALycorisConfig


def test_update_without_changes_appends_nothing(service: ModelRecordServiceBase) -> None:
    service.add_model("k1", main_config())
    head = service.event_store.head()
    service.update_model("k1", {"name": "sd15"})
    assert service.event_store.head() == head


def test_moving_a_model_frees_its_old_path(service: ModelRecordServiceBase) -> None:
    service.add_model("k1", main_config(path="a.safetensors"))
    service.add_model("k2", main_config(path="b.safetensors"))
    with pytest.raises(DuplicateModelException):
        service.update_model("k2", {"path": "a.safetensors"})
    service.update_model("k1", {"path": "c.safetensors"})
    service.update_model("k2", {"path": "a.safetensors"})
    assert service.search_by_path("a.safetensors").key == "k2"


def test_rename_returns_the_concrete_class(service: ModelRecordServiceBase) -> None:
    service.add_model("k1", main_config(name="old"))
    renamed = service.rename_model("k1", "new")
    assert type(renamed) is MainCheckpointConfig and renamed.name == "new"
    assert service.get_model("k1").name == "new"
    assert service.search_by_name("old") == [] and [m.key for m in service.search_by_name("new")] == ["k1"]


def test_delete_frees_key_and_path(service: ModelRecordServiceBase) -> None:
    service.add_model("k1", main_config())
    service.del_model("k1")
    assert not service.exists("k1") and service.all_models() == []
    with pytest.raises(UnknownModelException):
        service.get_model("k1")
    # the key and the path can be used again; the history keeps both lives
    service.add_model("k1", main_config(name="again"))
    assert service.get_model("k1").name == "again"
    assert [s.event.type for s in service.history("k1")] == ["ModelAdded", "ModelRemoved", "ModelAdded"]


def test_searches(service: ModelRecordServiceBase) -> None:
    service.add_model("m1", main_config(name="dream", path="m1"))
    service.add_model("m2", main_config(name="dream", path="m2", base_model="sdxl"))
    service.add_model("v1", vae_config(name="dream", path="v1", compatible_bases=["sd-2"]))
    service.add_model("v2", vae_config(name="other", path="v2", base_model="sd-2"))
    keys = lambda found: sorted(m.key for m in found)
    assert keys(service.search_by_name()) == ["m1", "m2", "v1", "v2"] == keys(service.all_models())
    assert keys(service.search_by_name("dream")) == ["m1", "m2", "v1"]
    assert keys(service.search_by_name(base_model="sd-1")) == ["m1", "v1"]
    # a compatible base counts: the SD-1 VAE also serves SD-2
    assert keys(service.search_by_name(base_model=BaseModelType.StableDiffusion2)) == ["v1", "v2"]
    assert keys(service.search_by_name("dream", "sd-2", ModelType.Vae)) == ["v1"]
    assert keys(service.search_by_name(model_type="main")) == ["m1", "m2"]
    with pytest.raises(InvalidModelConfigException, match="base_model='sd-9'"):
        service.search_by_name(base_model="sd-9")


def test_search_page_cuts_one_page_and_counts_all(service: ModelRecordServiceBase) -> None:
    for i, name in enumerate(["beta", "Alpha", "gamma", "delta", "alpha"]):
        service.add_model(f"k{i}", main_config(name=name, path=f"p{i}", tags=["t"] if i % 2 == 0 else []))
    total, page = service.search_page(offset=1, limit=2)
    assert total == 5 and [m.name for m in page] == ["alpha", "beta"]  # by name, case-insensitive, then key
    assert [m.key for m in service.search_page(limit=100)[1]] == ["k1", "k4", "k0", "k3", "k2"]
    assert service.search_page(tags=["t"])[0] == 3 and service.search_page(offset=10)[1] == []
    page[0].tags.append("changed")  # a page holds copies: the store is not changed through them
    assert "changed" not in service.get_model(page[0].key).tags


def test_search_by_tag_needs_all_tags(service: ModelRecordServiceBase) -> None:
    service.add_model("a", main_config(path="a", tags=["sfw", "scenery"]))
    service.add_model("b", main_config(path="b", tags=["sfw"]))
    service.add_model("c", main_config(path="c", tags=["scenery", "nsfw"]))
    assert [m.key for m in service.search_by_tag(["sfw", "scenery"])] == ["a"]
    assert sorted(m.key for m in service.search_by_tag(["scenery"])) == ["a", "c"]
    assert service.search_by_tag(["sfw", "missing"]) == []
    service.update_model("b", {"tags": ["sfw", "scenery"]})
    assert sorted(m.key for m in service.search_by_tag(["sfw", "scenery"])) == ["a", "b"]


def test_search_by_path(service: ModelRecordServiceBase, root: Path) -> None:
    service.add_model("k1", main_config(path="sd-1/main/x.safetensors"))
    assert service.search_by_path("sd-1/main/x.safetensors").key == "k1"
    assert service.search_by_path(root / "models" / "sd-1/main/x.safetensors").key == "k1"
    with pytest.raises(UnknownModelException, match="no model at path"):
        service.search_by_path("nowhere.safetensors")


def test_model_info_by_name(service: ModelRecordServiceBase) -> None:
    service.add_model("a", main_config(name="twin", path="a"))
    service.add_model("v", vae_config(name="solo", path="v", compatible_bases=["sd-2"]))
    assert service.model_info_by_name("twin", "sd-1", "main").key == "a"
    assert service.model_info_by_name("solo", BaseModelType.StableDiffusion2, ModelType.Vae).key == "v"
    with pytest.raises(UnknownModelException):
        service.model_info_by_name("twin", "sdxl", "main")
    service.add_model("b", main_config(name="twin", path="b"))
    with pytest.raises(DuplicateModelException, match="2 models named 'twin'"):
        service.model_info_by_name("twin", "sd-1", "main")


def test_returned_configs_are_copies(service: ModelRecordServiceBase) -> None:
    service.add_model("k1", main_config(tags=["a"]))
    got = service.get_model("k1")
    got.tags.append("mutated")
    got.name = "mutated"
    again = service.get_model("k1")
    assert again.tags == ["a"] and again.name == "sd15"


def test_history_and_time_travel(service: ModelRecordServiceBase) -> None:
    service.add_model("k1", main_config(name="first"))
    service.update_model("k1", {"description": "second"})
    service.rename_model("k1", "third")
    service.del_model("k1")
    history = service.history("k1")
    assert [s.event.type for s in history] == ["ModelAdded", "ModelUpdated", "ModelRenamed", "ModelRemoved"]
    assert [s.event.aggregate_version for s in history] == [1, 2, 3, 4]
    assert service.get_model_at("k1", position=history[0].position).name == "first"
    at_update = service.get_model_at("k1", position=history[1].position)
    assert at_update.description == "second" and at_update.name == "first"
    assert service.get_model_at("k1", time=history[2].event.time).name == "third"
    with pytest.raises(UnknownModelException, match="did not exist"):
        service.get_model_at("k1")  # removed at the end of the log
    with pytest.raises(UnknownModelException):
        service.history("never")


def test_writes_from_another_service_are_read(make_service, backend: str, log_store: EventStore) -> None:  # type: ignore[no-untyped-def]
    reader = make_service(backend, log_store, "reader")
    writer = make_service("memory", log_store)
    writer.add_model("k1", main_config())
    assert reader.get_model("k1").name == "sd15"  # read-your-writes across services
    writer.rename_model("k1", "renamed")
    assert [m.name for m in reader.search_by_name("renamed")] == ["renamed"]
    # a stale reader writing: its expected version is refused, it catches up and applies on the new state
    writer.update_model("k1", {"description": "by writer"})
    updated = reader.update_model("k1", {"author": "by reader"})
    assert updated.description == "by writer" and updated.author == "by reader" and updated.name == "renamed"
    writer.add_model("k2", main_config(path="k2"))
    assert reader.projection.get("k2") is None  # not yet seen by the reader's projection...
    with pytest.raises(DuplicateModelException, match="k2"):
        reader.add_model("k2", main_config(path="k2-other"))  # ...but the store refuses the duplicate


def test_a_retried_command_adds_once(service: ModelRecordServiceBase) -> None:
    first = service.add_model("k1", main_config(), idempotency_key="install-job-1", correlation_id="install-job-1")
    head = service.event_store.head()
    again = service.add_model("k1", main_config(), idempotency_key="install-job-1")
    assert again == first and service.event_store.head() == head
    with pytest.raises(DuplicateModelException):
        service.add_model("k1", main_config(), idempotency_key="install-job-2")
    assert service.history("k1")[0].event.correlation_id == "install-job-1"
