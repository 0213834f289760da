"""Loaders by (model type, model format). Each takes a :class:`LoadRequest` and returns ``Loaded``.

Nothing here reaches a hub: diffusers/transformers classes are built from the configs in the
model's own folder (``local_files_only``) or, for single-file checkpoints, from the configs that
ship in ``services/configs`` (:mod:`services.load.checkpoints`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers

from services.load.cache import Loaded
from services.load.errors import InvalidModelException
from services.load.safetensors_fast import assign_weights, empty_model
from services.load.weights import read_state_dict, weight_files
from services.records.enums import SubModelType


@dataclass(frozen=True)
class LoadRequest:
    record: Any                      # the record service's config object
    location: Path                   # the record's path, resolved against the models directory
    submodel: SubModelType | None
    device: torch.device
    dtype: torch.dtype


Loader = Callable[[LoadRequest], Loaded]

# submodel -> the class used when a diffusers folder has no model_index.json
_DEFAULT_CLASSES: dict[SubModelType, tuple[str, str]] = {
    SubModelType.UNet: ("diffusers", "UNet2DConditionModel"),
    SubModelType.Vae: ("diffusers", "AutoencoderKL"),
    SubModelType.VaeDecoder: ("diffusers", "AutoencoderKL"),
    SubModelType.VaeEncoder: ("diffusers", "AutoencoderKL"),
    SubModelType.TextEncoder: ("transformers", "CLIPTextModel"),
    SubModelType.TextEncoder2: ("transformers", "CLIPTextModelWithProjection"),
    SubModelType.Tokenizer: ("transformers", "CLIPTokenizer"),
    SubModelType.Tokenizer2: ("transformers", "CLIPTokenizer"),
}
_LIBRARIES = {"diffusers": diffusers, "transformers": transformers}


def _folder_of(submodel: SubModelType) -> str:
    return "vae" if submodel in (SubModelType.VaeDecoder, SubModelType.VaeEncoder) else submodel.value


def resolve_class(library: str, name: str) -> type:
    """A class named by a config; only diffusers and transformers classes (configs are data, not code)."""
    module = _LIBRARIES.get(library)
    cls = getattr(module, name, None) if module is not None else None
    if not isinstance(cls, type):
        raise InvalidModelException(f"unknown class {library}.{name} (only diffusers/transformers classes load)")
    return cls


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidModelException(f"{path}: unreadable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidModelException(f"{path}: expected a JSON object")
    return data


def load_module_folder(cls: type, folder: Path, device: torch.device, dtype: torch.dtype) -> Loaded:
    """A diffusers ``ModelMixin`` or transformers ``PreTrainedModel`` from its folder, weights on ``device``."""
    files = weight_files(folder, dtype)
    if not files:
        raise InvalidModelException(f"{folder}: no weight files (.safetensors, .bin, .ckpt)")
    # the weights stream in (threads, GIL released) while this thread builds the meta model
    with ThreadPoolExecutor(1, thread_name_prefix="modelbus-read") as reader:
        pending = reader.submit(read_state_dict, files, device, dtype)
        try:
            model = _empty_from_folder(cls, folder)
        finally:
            state = pending.result()
    tensors = fit_keys(model, state.tensors)
    assign_weights(model, tensors, device, str(folder))
    return Loaded(model, state.buffer)


def _empty_from_folder(cls: type, folder: Path) -> torch.nn.Module:
    if issubclass(cls, diffusers.ModelMixin):
        config = cls.load_config(folder, local_files_only=True)  # type: ignore[attr-defined]
        return empty_model(lambda: cls.from_config(config))  # type: ignore[attr-defined]
    if issubclass(cls, transformers.PreTrainedModel):
        config = cls.config_class.from_pretrained(folder, local_files_only=True)  # type: ignore[attr-defined,union-attr]
        return empty_model(lambda: cls(config))
    raise InvalidModelException(f"{folder}: {cls.__name__} is not a model class")


def fit_keys(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Align checkpoint keys to the model's when they differ by a known prefix.

    Transformers 5 dropped the ``text_model.`` level of CLIP text encoders that older files
    (and every original SD checkpoint) carry; some files also carry or lack the base model prefix.
    """
    wanted = set(model.state_dict().keys())
    prefixes = {"text_model."} | ({f"{model.base_model_prefix}."} if getattr(model, "base_model_prefix", "") else set())
    candidates = [tensors]
    for prefix in prefixes:
        candidates.append({k.removeprefix(prefix): v for k, v in tensors.items()})
        candidates.append({f"{prefix}{k}": v for k, v in tensors.items()})
    return max(candidates, key=lambda c: len(wanted & c.keys()))


def load_diffusers_main(req: LoadRequest) -> Loaded:
    if req.submodel is None:
        raise InvalidModelException("a submodel type is required for a main model")
    folder = req.location / _folder_of(req.submodel)
    if not folder.is_dir():
        raise InvalidModelException(f"{req.location} has no {folder.name!r} folder for submodel {req.submodel.value}")
    index_file = req.location / "model_index.json"
    spec = read_json(index_file).get(folder.name) if index_file.is_file() else None
    if req.submodel == SubModelType.Scheduler:
        return Loaded(_scheduler_from(folder))
    library, name = (spec if isinstance(spec, list) and len(spec) == 2 and all(spec)
                     else _DEFAULT_CLASSES.get(req.submodel, (None, None)))
    if library is None or name is None:
        raise InvalidModelException(f"{req.location}: cannot tell which class {req.submodel.value} is")
    cls = resolve_class(library, name)
    if req.submodel in (SubModelType.Tokenizer, SubModelType.Tokenizer2):
        return Loaded(cls.from_pretrained(folder, local_files_only=True))  # type: ignore[attr-defined]
    return load_module_folder(cls, folder, req.device, req.dtype)


def _scheduler_from(folder: Path) -> Any:
    config = read_json(folder / "scheduler_config.json")
    cls = resolve_class("diffusers", str(config.get("_class_name", "")))
    return cls.from_config(config)  # type: ignore[attr-defined]


def _config_class(folder: Path, default: str) -> type:
    name = read_json(folder / "config.json").get("_class_name") if (folder / "config.json").is_file() else None
    return resolve_class("diffusers", str(name or default))


def load_diffusers_vae(req: LoadRequest) -> Loaded:
    return load_module_folder(_config_class(req.location, "AutoencoderKL"), req.location, req.device, req.dtype)


def load_diffusers_controlnet(req: LoadRequest) -> Loaded:
    return load_module_folder(_config_class(req.location, "ControlNetModel"), req.location, req.device, req.dtype)


def _single_weight_file(location: Path, dtype: torch.dtype, preferred: tuple[str, ...] = ()) -> Path:
    if location.is_file():
        return location
    for name in preferred:
        if (location / name).is_file():
            return location / name
    files = weight_files(location, dtype)
    if not files:
        raise InvalidModelException(f"{location}: no weight file inside")
    return files[0]


def load_lora(req: LoadRequest) -> Loaded:
    """A LoRA as a plain state dict (the patcher's input), already on the device and in the dtype."""
    path = _single_weight_file(req.location, req.dtype, ("pytorch_lora_weights.safetensors",
                                                          "pytorch_lora_weights.bin"))
    state = read_state_dict([path], req.device, req.dtype)
    if not any(("lora" in k or "hada" in k or "lokr" in k or "alpha" in k) for k in state.tensors):
        raise InvalidModelException(f"{path}: no LoRA weights in it (no lora/alpha keys)")
    return Loaded(state.tensors, state.buffer)


def load_textual_inversion(req: LoadRequest) -> Loaded:
    """Embedding tensors by name: ``{token: tensor}``, ``emb_params``, or ``clip_l``/``clip_g`` for SDXL."""
    path = _single_weight_file(req.location, req.dtype, ("learned_embeds.safetensors", "learned_embeds.bin"))
    state = read_state_dict([path], req.device, req.dtype)
    tensors = state.tensors
    from_a1111 = {k: v for k, v in tensors.items() if k.startswith("string_to_param.")}
    if from_a1111:  # A1111 .pt: {"string_to_param": {"*": tensor}, "name": ...}
        return Loaded({"emb_params": next(iter(from_a1111.values()))})
    if not tensors or any(t.ndim not in (1, 2) for t in tensors.values()):
        raise InvalidModelException(f"{path}: not a textual-inversion embedding (expected 1-D or 2-D tensors)")
    return Loaded(tensors, state.buffer)
