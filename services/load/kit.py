"""What every loader shares: the request (:class:`LoadRequest`), what a loader returns (:class:`Loaded`),
and the helpers the loader modules build on (reading a checkpoint's tensors, shapes and block counts,
building a model on the meta device and assigning its weights, the configs and tokenizers shipped with
the project). Loaders import this module, never the cache; the cache imports ``Loaded`` from here.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from transformers import CLIPTextConfig, CLIPTokenizer

from modelbus.events.logs import get_logger
from modelbus.services.load.errors import InvalidModelException
from modelbus.services.load.fp8 import FP8_DTYPES, fold_fp8_scales, keep_fp8, scales_after, split_fp8
from modelbus.services.load.safetensors_fast import assign_weights, empty_model, read_header
from modelbus.services.load.skeleton import skeleton_model, state_keys
from modelbus.services.load.tensors import plan_layout, tensor_slots
from modelbus.services.load.weights import StateDict, read_state_dict
from modelbus.services.records.enums import SubModelType


@dataclass
class Loaded:
    """What a loader returns: the object and, when its tensors are views of one buffer, that buffer."""

    model: Any
    buffer: torch.Tensor | None = None


@dataclass(frozen=True)
class LoadRequest:
    record: Any                      # the record service's config object
    location: Path                   # the record's path, resolved against the models directory
    submodel: SubModelType | None
    device: torch.device
    dtype: torch.dtype
    fp8_storage: bool = False        # keep a file's fp8 weights in fp8 (services.load.fp8), where the loader can
    gguf_dequantize: bool = False    # dequantize a GGUF file's weights as they load (services.load.gguf)


Loader = Callable[[LoadRequest], Loaded]

log = get_logger(__name__)


_LIBRARIES = {"diffusers": diffusers, "transformers": transformers}


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


# classes whose files keep the names transformers 4 gave them (and transformers 5 still writes): Qwen2.5-VL's
# language model and vision tower moved under ``model.``, and Mistral3's likewise (transformers 4.5x's
# _checkpoint_conversion_mapping); LLaVA's (transformers' conversion mapping for llava, llava_next,
# llava_onevision) likewise
_LLAVA_NAMES = ((re.compile(r"^language_model\.lm_head\."), "lm_head."),
                (re.compile(r"^language_model\.model\."), "model.language_model."),
                (re.compile(r"^(vision_tower|multi_modal_projector|image_newline)\b"), r"model.\1"))
_SAVED_NAMES: dict[str, tuple[tuple[re.Pattern[str], str], ...]] = {
    "Qwen2_5_VLForConditionalGeneration": ((re.compile(r"^visual\."), "model.visual."),
                                           (re.compile(r"^model\.(?!language_model\.|visual\.)"), "model.language_model.")),
    # Mistral3: transformers 4 kept the language model whole (``language_model.model.``, its head beside it)
    "Mistral3ForConditionalGeneration": ((re.compile(r"^language_model\.model\."), "model.language_model."),
                                         (re.compile(r"^language_model\.lm_head\."), "lm_head."),
                                         (re.compile(r"^(vision_tower|multi_modal_projector)\."), r"model.\1.")),
    "LlavaForConditionalGeneration": _LLAVA_NAMES,
    "LlavaNextForConditionalGeneration": _LLAVA_NAMES,
    "LlavaOnevisionForConditionalGeneration": _LLAVA_NAMES,
}


def _renamed(key: str, renames: tuple[tuple[re.Pattern[str], str], ...]) -> str:
    for pattern, replacement in renames:
        key = pattern.sub(replacement, key, count=1)
    return key


def fit_keys(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Align checkpoint keys to the model's when they differ by a known prefix.

    Transformers 5 dropped the ``text_model.`` level of CLIP text encoders that older files
    (and every original SD checkpoint) carry; some files also carry or lack the base model prefix.
    """
    wanted = state_keys(model) or set(model.state_dict().keys())
    if wanted <= tensors.keys():
        return tensors  # the usual case: the file's names are the model's
    prefixes = {"text_model."} | ({f"{model.base_model_prefix}."} if getattr(model, "base_model_prefix", "") else set())
    candidates = [tensors]
    renames = _SAVED_NAMES.get(type(model).__name__)
    if renames:
        candidates.append({_renamed(k, renames): v for k, v in tensors.items()})
    for prefix in prefixes:
        candidates.append({k.removeprefix(prefix): v for k, v in tensors.items()})
        candidates.append({f"{prefix}{k}": v for k, v in tensors.items()})
    return max(candidates, key=lambda c: len(wanted & c.keys()))


# ---- single files of one model each, their configs read from their tensors' names and shapes ----
def read_single_file(req: LoadRequest, select: Callable[[str], bool] | None = None) -> StateDict:
    if not req.location.is_file():
        what = getattr(req.record.model_type, "value", req.record.model_type)
        raise InvalidModelException(f"{req.location}: a {what} checkpoint must be a single file")
    return read_state_dict([req.location], req.device, req.dtype, select)


def block_count(keys: Iterable[str], pattern: str) -> int:
    """One more than the largest block index that ``pattern`` (one group) finds in ``keys``; 0 if none."""
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def shape_of(tensors: dict[str, torch.Tensor], key: str, where: Path, what: str) -> tuple[int, ...]:
    tensor = tensors.get(key)
    if tensor is None:
        raise InvalidModelException(f"{where}: not a complete {what}: no tensor {key}")
    return tuple(tensor.shape)


def live_buffer(model: torch.nn.Module, buffer: torch.Tensor | None) -> torch.Tensor | None:
    """The file's buffer to hand the cache with ``model``, or None when most of it is dead.

    A conversion that made new tensors (a split, a cast) leaves the old ones dead in the buffer,
    which the tensors still in it keep alive whole. Past the cache's own repacking threshold those
    are copied out, so the buffer is freed and the cache counts what is really held (it packs the
    model into one buffer again on its first move). Copying only them keeps the peak lower than
    packing everything anew: the conversion has already doubled what it converted."""
    if buffer is None or plan_layout(tensor_slots(model), buffer).copy_whole:
        return buffer
    storage = buffer.untyped_storage().data_ptr()
    for slot in tensor_slots(model):
        if slot.tensor.untyped_storage().data_ptr() == storage:
            alone = slot.tensor.clone()
            for set_ in slot.setters:
                set_(alone)
    return None


CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


UNET_PREFIX = "model.diffusion_model."


VAE_PREFIXES = ("first_stage_model.", "vae.")


# ---- FLUX and SD-3: transformers, and the ControlNets that copy their blocks ----
# what an all-in-one FLUX or SD-3 file holds beside its transformer (ComfyUI's and Stability's
# bundles): not read for the transformer
NOT_FLUX_TRANSFORMER = ("vae.", "first_stage_model.", "text_encoders.", "cond_stage_model.", "conditioner.")


# the submodels a FLUX or SD-3 file's transformer is served as: "unet" stays an alias of
# "transformer", as it was served before SubModelType had a transformer
DENOISER_SUBMODELS = (SubModelType.Transformer.value, SubModelType.UNet.value)


def base_of(record: Any) -> str:
    value = getattr(record.base_model, "value", record.base_model)
    return "sd-1" if value == "any" else str(value)


def quiet(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():  # diffusers warns that image_size is deprecated: we pass it on purpose
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def read_checkpoint(req: LoadRequest, select: Callable[[str], bool]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    if not req.location.is_file():
        raise InvalidModelException(f"{req.location}: a checkpoint must be a single file")
    state = read_state_dict([req.location], req.device, req.dtype, select)
    return fold_fp8_scales(state.tensors, req.location), state.buffer


def read_kept(req: LoadRequest, select: Callable[[str], bool]
              ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, bool] | None:
    """For a load that keeps fp8 weights (``req.fp8_storage``): the file's selected tensors with the fp8
    ones as stored and the others in ``req.dtype``, and whether it is scaled (its fp8 tensors then carry
    their scales through a conversion: :func:`kept_scales`). None when the file has no fp8 tensor to
    keep: read it the usual way."""
    if not req.fp8_storage or req.dtype in FP8_DTYPES or req.location.suffix != ".safetensors" \
            or not req.location.is_file():
        return None
    if not any(e.dtype in FP8_DTYPES for e in read_header(req.location).entries.values() if select(e.name)):
        return None
    state = read_state_dict([req.location], req.device, None, select)
    tensors, scaled = split_fp8(state.tensors, req.dtype, req.location)
    return tensors, state.buffer, scaled


def kept_scales(kept: tuple[Any, Any, bool] | None, converted: dict[str, torch.Tensor]
                ) -> dict[str, torch.Tensor] | None:
    """The scales of a kept load's converted tensors by name ({} for a load that keeps nothing or an
    unscaled file); None when they cannot be told, and the load should be made again upcast."""
    if kept is None or not kept[2]:
        return {}
    return scales_after(converted)


def build_from(cls: Callable[[], torch.nn.Module], tensors: dict[str, torch.Tensor], req: LoadRequest,
           buffer: torch.Tensor | None, what: str) -> Loaded:
    model = empty_model(cls)
    assign_weights(model, tensors, req.device, f"{req.location} ({what})")
    return Loaded(model, buffer)


def clip_config(shipped: Path, hidden: int, vocab: int, positions: int, layers: int, inter: int,
                 projection: int | None = None) -> CLIPTextConfig:
    base = read_json(shipped / "config.json") if (shipped / "config.json").is_file() else {}
    base.update(hidden_size=hidden, vocab_size=vocab, max_position_embeddings=positions, num_hidden_layers=layers,
                intermediate_size=inter, num_attention_heads=max(1, hidden // 64))
    if projection is not None:
        base["projection_dim"] = projection
    return CLIPTextConfig(**{k: v for k, v in base.items() if k not in ("architectures", "transformers_version")})


def prefix_of(tensors: dict[str, torch.Tensor], leaf: str) -> str | None:
    found = [k[: -len(leaf)] for k in tensors if k == leaf or k.endswith("." + leaf)]
    return min(found, key=len) if found else None


def load_transformer(req: LoadRequest, to_diffusers: Callable[[dict[str, torch.Tensor], Path], dict[str, torch.Tensor]],
                      configure: Callable[[dict[str, torch.Tensor], Path], dict[str, Any]], cls: Any, what: str
                      ) -> Loaded:
    """A transformer denoiser from one file: its tensors (bundled parts unread), converted to diffusers'
    names, a config derived from their shapes, the weights assigned in place."""
    def select(key: str) -> bool:
        return not key.startswith(NOT_FLUX_TRANSFORMER)

    kept = read_kept(req, select)
    tensors, buffer = (kept[0], kept[1]) if kept is not None else read_checkpoint(req, select)
    converted = to_diffusers(tensors, req.location)
    scales = kept_scales(kept, converted)
    if scales is None:
        log.info("fp8_kept_fallback", path=str(req.location), reason="the conversion leaves a scale untold")
        return load_transformer(replace(req, fp8_storage=False), to_diffusers, configure, cls, what)
    config = configure(converted, req.location)
    model = skeleton_model(cls, config, lambda: empty_model(lambda: cls.from_config(config)))
    assign_weights(model, converted, req.device, f"{req.location} ({what})")
    if kept is not None:
        keep_fp8(model, scales, req.dtype)
    return Loaded(model, live_buffer(model, buffer))


def load_tokenizer(req: LoadRequest) -> Loaded:
    """CLIP's BPE tokenizer, shipped with the project (single files carry none). OpenAI CLIP (SD-1,
    SDXL's first encoder) pads with the end token; the OpenCLIP encoders (SD-2, SDXL's second) with '!'."""
    folder = CONFIGS_DIR / "tokenizers" / "clip-vit-large-patch14"
    if not (folder / "vocab.json").is_file():
        raise InvalidModelException(f"{req.location}: the CLIP tokenizer files are missing from {folder}")
    open_clip = req.submodel == SubModelType.Tokenizer2 or base_of(req.record) == "sd-2"
    if open_clip:
        return Loaded(CLIPTokenizer.from_pretrained(folder, local_files_only=True, pad_token="!"))
    return Loaded(CLIPTokenizer.from_pretrained(folder, local_files_only=True))
