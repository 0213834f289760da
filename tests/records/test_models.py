"""Config classes: the (model_type, model_format) union, validation errors, compatible bases."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter

from modelbus.services import records
from modelbus.services.records import (
    AnyModelConfig,
    BaseModelType,
    InvalidModelConfigException,
    LoRALycorisConfig,
    MainCheckpointConfig,
    MainDiffusersConfig,
    ModelConfigBase,
    ModelFormat,
    ModelType,
    ONNXSD2Config,
    SchedulerPredictionType,
    T5EncoderConfig,
    TextualInversionFolderConfig,
    VaeCheckpointConfig,
)
from modelbus.services.records.models import CLASSES_BY_TAG
from modelbus.services.records.parsing import merge_update, parse_config

from .conftest import main_config

DESIGN_NAMES = {
    "ModelRecordServiceBase", "ModelRecordServiceSQL", "ModelRecordServiceFile",
    "ModelType", "ModelFormat", "BaseModelType", "ModelVariantType", "SchedulerPredictionType", "SubModelType",
    "ModelConfigBase", "AnyModelConfig",
    "UnknownModelException", "DuplicateModelException", "InvalidModelConfigException",
}


def test_public_names_cover_the_design_and_all_resolve() -> None:
    assert DESIGN_NAMES <= set(records.__all__)
    assert "ModelRecordServiceMemory" in records.__all__
    for name in records.__all__:
        assert getattr(records, name) is not None
    extra = set(records.__all__) - DESIGN_NAMES - {"ModelRecordServiceMemory"}
    # the rest are the config classes, nothing else leaks out
    assert all(issubclass(getattr(records, n), ModelConfigBase) for n in extra)


@pytest.mark.parametrize(("model_type", "model_format", "cls"), [
    ("main", "checkpoint", MainCheckpointConfig),
    ("main", "diffusers", MainDiffusersConfig),
    ("onnx", "olive", ONNXSD2Config),
    ("vae", "checkpoint", VaeCheckpointConfig),
    ("lora", "lycoris", LoRALycorisConfig),
    ("embedding", "embedding_folder", TextualInversionFolderConfig),
    ("t5_encoder", "t5_encoder", T5EncoderConfig),
])
def test_pair_picks_the_concrete_class(model_type: str, model_format: str, cls: type) -> None:
    data = {"name": "m", "model_type": model_type, "model_format": model_format, "base_model": "sd-1", "path": "p"}
    assert type(parse_config(data, key="k")) is cls
    assert type(TypeAdapter(AnyModelConfig).validate_python({**data, "key": "k"})) is cls


def test_every_issue_type_has_a_class() -> None:
    types = {tag.split("/")[0] for tag in CLASSES_BY_TAG}
    assert types == {t.value for t in ModelType}
    assert {("lora", "lycoris"), ("lora", "diffusers"), ("embedding", "embedding_file")} <= {
        tuple(t.split("/")) for t in CLASSES_BY_TAG}


def test_fields_and_defaults() -> None:
    cfg = parse_config(main_config(tags=["b", "a", "b"]), key="abc")
    assert cfg.hash == "abc"  # the spec: hash starts out as the key
    assert cfg.tags == ["b", "a"]
    assert cfg.variant.value == "normal" and cfg.vae is None
    assert cfg.config == "configs/stable-diffusion/v1-inference.yaml"
    onnx = parse_config({"name": "o", "model_type": "onnx", "model_format": "onnx", "base_model": "sd-2",
                         "path": "p", "prediction_type": "v_prediction", "upcast_attention": True}, key="k")
    assert isinstance(onnx, ONNXSD2Config)
    assert onnx.prediction_type == SchedulerPredictionType.VPrediction and onnx.upcast_attention


def test_compatible_bases_drop_the_primary_and_repeats() -> None:
    cfg = parse_config(main_config(base_model="sd-1", compatible_bases=["sd-2", "sd-1", "sd-2", "any"]), key="k")
    assert cfg.compatible_bases == [BaseModelType.Any, BaseModelType.StableDiffusion2]
    assert cfg.serves(BaseModelType.StableDiffusion2) and not cfg.serves(BaseModelType.StableDiffusionXL)


def test_errors_name_each_bad_field_and_value() -> None:
    bad = {"name": "", "model_type": "main", "model_format": "checkpoint", "base_model": "sd-9",
           "tags": "notalist", "colour": "red"}
    with pytest.raises(InvalidModelConfigException) as info:
        parse_config(bad, key="k")
    fields = {e.field: e for e in info.value.errors}
    assert set(fields) == {"name", "base_model", "path", "tags", "colour"}
    message = str(info.value)
    for text in ("base_model='sd-9'", "path=<missing>", "colour='red'", "unknown field", "tags='notalist'"):
        assert text in message


def test_unknown_type_and_wrong_format_are_named() -> None:
    with pytest.raises(InvalidModelConfigException, match="model_type='mian'"):
        parse_config({"name": "n", "model_type": "mian", "model_format": "checkpoint", "base_model": "sd-1",
                      "path": "p"}, key="k")
    with pytest.raises(InvalidModelConfigException, match="model_format='lycoris'.*checkpoint, diffusers"):
        parse_config(main_config(model_format="lycoris"), key="k")
    with pytest.raises(InvalidModelConfigException, match="model_format=<missing>"):
        parse_config({"name": "n", "model_type": "main"}, key="k")


def test_key_mismatch_and_non_mapping_are_refused() -> None:
    with pytest.raises(InvalidModelConfigException, match="key='other'"):
        parse_config({**main_config(), "key": "other"}, key="k")
    with pytest.raises(InvalidModelConfigException, match="expected a dict"):
        parse_config(["not", "a", "dict"], key="k")  # type: ignore[arg-type]


def test_sparse_update_reports_only_changes_and_may_change_class() -> None:
    cfg = parse_config(main_config(vae="v.safetensors"), key="k")
    updated, changes = merge_update(cfg, {"description": "x", "name": "sd15"})
    assert changes == {"description": "x"} and updated.description == "x"
    lora, changes = merge_update(cfg, {"model_type": "lora", "model_format": "lycoris"})
    assert isinstance(lora, LoRALycorisConfig) and lora.hash == "k"
    assert changes == {"model_type": "lora", "model_format": "lycoris"}
    with pytest.raises(InvalidModelConfigException, match="key='zz': cannot be changed"):
        merge_update(cfg, {"key": "zz"})
    with pytest.raises(InvalidModelConfigException, match="variant='huge'"):
        merge_update(cfg, {"variant": "huge"})


def test_json_round_trip_keeps_the_class() -> None:
    cfg = parse_config(main_config(compatible_bases=["sd-2"], tags=["t"]), key="k")
    again = type(cfg).model_validate_json(cfg.model_dump_json())
    assert again == cfg and again.model_format == ModelFormat.Checkpoint


def test_the_union_lists_exactly_the_class_table() -> None:
    from typing import get_args

    from pydantic import Tag

    members = get_args(get_args(AnyModelConfig)[0])
    tags = {m.__metadata__[0].tag: get_args(m)[0] for m in members if isinstance(m.__metadata__[0], Tag)}
    assert tags == CLASSES_BY_TAG
