"""Default settings, trigger phrases and links as events folded by every record backend."""

from __future__ import annotations

from typing import Any

import pytest

from modelbus.events.errors import InvalidInput, NotFound
from modelbus.services.records import ModelRecordServiceBase
from tests.modeldata.concurrency import run_at_once
from tests.records.conftest import ServiceFactory, main_config, vae_config

KEY, VAE, LORA, XL = "main-1", "vae-1", "lora-1", "main-xl"


def lora_config(**extra: Any) -> dict[str, Any]:
    return {"name": "lora", "model_type": "lora", "model_format": "lycoris", "base_model": "sd-1",
            "path": "sd-1/lora/l.safetensors", **extra}


@pytest.fixture()
def filled(service: ModelRecordServiceBase) -> ModelRecordServiceBase:
    service.add_model(KEY, main_config())
    service.add_model(VAE, vae_config())
    service.add_model(LORA, lora_config())
    service.add_model(XL, main_config("xl", "sdxl/main/xl.safetensors", base_model="sdxl"))
    return service


def _versions(service: ModelRecordServiceBase) -> list[int]:
    return [service.event_store.version(k) for k in (KEY, VAE, LORA, XL)]


def test_settings_are_merged_validated_and_part_of_the_record(filled: ModelRecordServiceBase) -> None:
    got = filled.set_settings(KEY, {"steps": 30, "cfg_scale": 7.5, "scheduler": "euler_a", "vae": VAE})
    assert got.default_settings is not None and got.default_settings.steps == 30
    got = filled.set_settings(KEY, {"width": 768, "steps": None})  # sparse: None clears one field
    assert got.default_settings is not None
    assert got.default_settings.model_dump(exclude_none=True) == {
        "cfg_scale": 7.5, "scheduler": "euler_a", "vae": VAE, "width": 768}
    assert filled.get_model(KEY).default_settings == got.default_settings
    version = filled.event_store.version(KEY)
    assert filled.set_settings(KEY, {"width": 768}).default_settings == got.default_settings
    assert filled.event_store.version(KEY) == version  # no change, no event
    history = [s.event.type for s in filled.history(KEY)]
    assert history == ["ModelAdded", "ModelSettingsChanged", "ModelSettingsChanged"]


@pytest.mark.parametrize(("settings", "words"), [
    ({"steps": 0}, "steps=0"), ({"steps": "many"}, "steps='many'"), ({"cfg_scale": 0.5}, "cfg_scale=0.5"),
    ({"width": 500}, "multiple of 8"), ({"scheduler": "fastest"}, "scheduler='fastest'"),
    ({"clip_skip": 40}, "clip_skip=40"), ({"sampler": "x"}, "not a default setting"),
    ({"vae": "nope"}, "vae='nope': no model has this key"), ({"vae": LORA}, "lora model, not a vae"),
])
def test_bad_settings_are_refused_naming_the_field_and_change_nothing(
        filled: ModelRecordServiceBase, settings: dict[str, Any], words: str) -> None:
    before = _versions(filled)
    with pytest.raises(InvalidInput, match="invalid default settings") as caught:
        filled.set_settings(KEY, settings)
    assert words in str(caught.value)
    assert _versions(filled) == before and filled.get_model(KEY).default_settings is None


def test_a_vae_of_another_base_and_settings_on_a_lora_are_refused(filled: ModelRecordServiceBase) -> None:
    with pytest.raises(InvalidInput, match="sd-1 VAE; this model is sdxl"):
        filled.set_settings(XL, {"vae": VAE})
    with pytest.raises(InvalidInput, match="a lora model has no default settings"):
        filled.set_settings(LORA, {"steps": 20})
    with pytest.raises(InvalidInput, match="a vae model has no trigger phrases"):
        filled.set_settings(VAE, trigger_phrases=["x"])
    with pytest.raises(InvalidInput, match="changes only by its own command"):
        filled.update_model(KEY, {"default_settings": {"steps": 3}})


def test_trigger_phrases_are_cleaned_and_bad_ones_refused(filled: ModelRecordServiceBase) -> None:
    got = filled.set_settings(LORA, trigger_phrases=["  pixel   art ", "pixel art", "", "8bit"])
    assert got.trigger_phrases == ["pixel art", "8bit"]
    before = _versions(filled)
    for bad in (["x" * 300], [3], "one string"):
        with pytest.raises(InvalidInput, match="invalid trigger phrases"):
            filled.set_settings(LORA, trigger_phrases=bad)  # type: ignore[arg-type]
    assert _versions(filled) == before and filled.get_model(LORA).trigger_phrases == ["pixel art", "8bit"]


def test_links_show_on_both_sides_and_go_with_a_deleted_model(filled: ModelRecordServiceBase) -> None:
    got = filled.link(LORA, KEY)
    assert [(link.key, link.relation) for link in got.links] == [(KEY, "for")]
    filled.link(KEY, VAE)
    assert filled.get_model(KEY).links[0].relation == "uses"
    assert filled.linked_from(KEY) == [(LORA, "for")] and filled.linked_from(VAE) == [(KEY, "uses")]
    version = filled.event_store.version(LORA)
    filled.link(LORA, KEY)  # again: nothing new
    assert filled.event_store.version(LORA) == version
    filled.del_model(KEY)
    assert filled.get_model(LORA).links == [] and filled.linked_from(KEY) == []
    assert [s.event.type for s in filled.history(LORA)][-1] == "ModelUnlinked"


def test_bad_links_are_refused_and_change_nothing(filled: ModelRecordServiceBase) -> None:
    before = _versions(filled)
    with pytest.raises(NotFound, match="no model has this key"):
        filled.link(LORA, "missing-key")
    with pytest.raises(InvalidInput, match="linked to itself"):
        filled.link(LORA, LORA)
    with pytest.raises(InvalidInput, match="cannot be linked as 'uses'"):
        filled.link(LORA, KEY, "uses")
    with pytest.raises(InvalidInput, match="relation='sibling'"):
        filled.link(LORA, KEY, "sibling")
    with pytest.raises(NotFound, match="is not linked"):
        filled.unlink(LORA, KEY)
    assert _versions(filled) == before


def test_every_backend_rebuilds_the_same_per_model_data(
        filled: ModelRecordServiceBase, make_service: ServiceFactory, backend: str) -> None:
    filled.set_settings(KEY, {"steps": 12}, ["a phrase"])
    filled.link(LORA, KEY)
    filled.link(KEY, VAE)
    filled.unlink(KEY, VAE)
    expected = {k: filled.get_model(k).model_dump() for k in (KEY, LORA)}
    for other in ("sql", "file", "memory"):
        fresh = make_service(other, filled.event_store, name=f"rebuilt-{other}")
        fresh.rebuild()
        assert {k: fresh.get_model(k).model_dump() for k in (KEY, LORA)} == expected


def test_concurrent_writers_each_land_once_in_sequence(filled: ModelRecordServiceBase) -> None:
    """Eight threads change one model's settings and links at once: every change is one event, in an
    unbroken version sequence, and the record is the fold of them (optimistic appends retried)."""
    before = filled.event_store.version(KEY)
    assert run_at_once(lambda n: filled.set_settings(KEY, {"steps": 10 + n} if n % 2 else {"width": 64 + 8 * n}),
                       8) == []
    events = [s.event for s in filled.history(KEY)][1:]
    assert [e.aggregate_version for e in events] == list(range(before + 1, before + 9))
    settings = filled.get_model(KEY).default_settings
    assert settings is not None and settings.steps in {11, 13, 15, 17} and settings.width in {64, 80, 96, 112}
