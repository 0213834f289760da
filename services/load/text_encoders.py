"""Single files of the language-model text encoders: Qwen2.5-VL (Qwen-Image), Qwen3 (Z-Image, FLUX.2 Klein)
and Mistral Small 3.x (FLUX.2 dev), built offline from a config.

The config is the record's ``config``: the name of one shipped in ``services/configs/transformers/<name>/``
(what identification records), or the path of a transformers ``config.json`` (or a folder holding one),
absolute or beside the file; without one, the shipped config of the file's width. Files come in
transformers 4's names (``visual.``, ``language_model.model.``) or 5's (``model.visual.``,
``model.language_model.``), mapped to the class's; a Mistral file without its vision tower (ComfyUI's) is
built as the text model alone. Files made for text encoding often leave the output head out: the model is
then its base model (``Qwen3Model``, ``Qwen2_5_VLModel``...), which returns the hidden states the pipelines
read, unless the config ties the head to the embeddings (Qwen3-4B).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import transformers

from modelbus.events.logs import get_logger
from modelbus.services.load.errors import InvalidModelException
from modelbus.services.load.fp8 import keep_fp8
from modelbus.services.load.kit import (
    CONFIGS_DIR,
    Loaded,
    LoadRequest,
    fit_keys,
    kept_scales,
    live_buffer,
    read_checkpoint,
    read_json,
    read_kept,
    resolve_class,
)
from modelbus.services.load.safetensors_fast import assign_weights, empty_model
from modelbus.services.load.skeleton import state_keys
from modelbus.services.records.enums import ModelType

SHIPPED = CONFIGS_DIR / "transformers"
#: (type, width of the token embeddings) -> the shipped config of a record that names none
_BY_WIDTH = {(ModelType.Qwen25VL, 3584): "qwen2.5-vl-7b", (ModelType.Qwen3Encoder, 2560): "qwen3-4b",
             (ModelType.Qwen3Encoder, 4096): "qwen3-8b", (ModelType.MistralEncoder, 5120): "mistral-small-3.1-24b"}
#: the classes each type may be built as (a config of another class is refused)
_CLASSES = {ModelType.Qwen25VL: ("Qwen2_5_VLForConditionalGeneration",),
            ModelType.Qwen3Encoder: ("Qwen3ForCausalLM", "Qwen3Model"),
            ModelType.MistralEncoder: ("Mistral3ForConditionalGeneration", "MistralForCausalLM", "MistralModel")}
_VISION = ("visual.", "model.visual.", "vision_tower.", "model.vision_tower.")

log = get_logger(__name__)


def _width(tensors: dict[str, torch.Tensor]) -> int | None:
    embed = next((t for k, t in tensors.items() if k.endswith("embed_tokens.weight") and t.dim() == 2), None)
    return int(embed.shape[1]) if embed is not None else None


def encoder_config(req: LoadRequest, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The transformers config (as a dict) of the record's encoder (see the module's docstring)."""
    model_type = ModelType(req.record.model_type)
    name = getattr(req.record, "config", None) or _BY_WIDTH.get((model_type, _width(tensors) or 0))
    if not name:
        raise InvalidModelException(f"{req.location}: a {model_type.value} file {_width(tensors)} wide needs a config: "
                                    f"set the record's config to a shipped one ({', '.join(sorted(_shipped()))}) "
                                    "or a transformers config path")  # fmt: skip
    given = Path(str(name)) if Path(str(name)).is_absolute() else req.location.parent / str(name)
    for candidate in (SHIPPED / str(name) / "config.json", given, given / "config.json"):
        if candidate.is_file() and candidate.suffix == ".json":
            config = read_json(candidate)
            arch = (config.get("architectures") or [""])[0]
            if arch not in _CLASSES[model_type]:
                raise InvalidModelException(f"{candidate}: config of a {arch or 'model without architectures'}, not "
                                            f"a {model_type.value} ({', '.join(_CLASSES[model_type])})")  # fmt: skip
            return config
    raise InvalidModelException(f"{req.location}: config {name!r} is neither a shipped config "
                                f"({', '.join(sorted(_shipped()))}) nor a transformers config file or folder")


def _shipped() -> list[str]:
    return [p.name for p in SHIPPED.iterdir() if (p / "config.json").is_file()]


def _build_config(config: dict[str, Any]) -> Any:
    rest = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "transformers_version")}
    return transformers.AutoConfig.for_model(str(config["model_type"]), **rest)


def _tied(config: Any) -> bool:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False))


def load_llm_checkpoint(req: LoadRequest) -> Loaded:
    """An fp8 file's weights stay fp8 where the worker keeps them (``req.fp8_storage``), but for the vision
    tower's, which reads its weights' dtype outside their layers: upcast, as the text encoding seldom runs it."""
    kept = read_kept(req, lambda k: True)
    tensors, buffer = (kept[0], kept[1]) if kept is not None else read_checkpoint(req, lambda k: True)
    raw = encoder_config(req, tensors)
    cls = resolve_class("transformers", str(raw["architectures"][0]))
    config = _build_config(raw)
    if cls is transformers.Mistral3ForConditionalGeneration and not any(k.startswith(_VISION) for k in tensors):
        cls, config = transformers.MistralForCausalLM, config.text_config  # ComfyUI's file: the language model alone
    model: Any = empty_model(lambda: cls(config))
    tied = _tied(config)
    if tied:
        model.tie_weights()  # the meta build unties the head from the embeddings: files store them once
    fitted = fit_keys(model, tensors)
    head = {k for k in state_keys(model) or set(model.state_dict()) if k.startswith("lm_head.")}
    if head and not tied and not head <= fitted.keys() and model.base_model_prefix:
        prefix = f"{model.base_model_prefix}."  # no head in the file: the base model, which encodes as well
        model = getattr(model, model.base_model_prefix)
        fitted = {k.removeprefix(prefix): v for k, v in fitted.items() if k.startswith(prefix)}
    scales = kept_scales(kept, fitted)
    if scales is None:
        log.info("fp8_kept_fallback", path=str(req.location), reason="the names leave a scale untold")
        return load_llm_checkpoint(replace(req, fp8_storage=False))
    what = f"{req.location} ({type(model).__name__})"
    assign_weights(model, fitted, req.device, what)
    if kept is not None:
        vision = tuple(p.removeprefix("model.") for p in _VISION) + _VISION
        keep_fp8(model, scales, req.dtype, upcast=lambda name: (name + ".").startswith(vision))
    return Loaded(model, live_buffer(model, buffer))
