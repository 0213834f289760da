"""Loaders by (model type, model format). Each takes a :class:`LoadRequest` and returns ``Loaded``.

Nothing here reaches a hub: diffusers/transformers classes are built from the configs in the
model's own folder (``local_files_only``) or, for single-file checkpoints, from the configs that
ship in ``services/configs`` (:mod:`services.load.checkpoints`).
"""

from __future__ import annotations

import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers

from modelbus.events.logs import get_logger
from modelbus.services.load import bnb, loras
from modelbus.services.load.errors import InvalidModelException
from modelbus.services.load.fp8 import keep_fp8
from modelbus.services.load.kit import (
    CONFIGS_DIR,
    Loaded,
    LoadRequest,
    block_count,
    clip_config,
    fit_keys,
    kept_scales,
    live_buffer,
    read_json,
    read_kept,
    read_single_file,
    resolve_class,
    shape_of,
)
from modelbus.services.load.safetensors_fast import assign_weights, empty_model, needs_cast, start_flat
from modelbus.services.load.skeleton import gc_paused, skeleton_model
from modelbus.services.load.weights import StateDict, read_state_dict, weight_files
from modelbus.services.records.enums import SubModelType

log = get_logger(__name__)

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
    SubModelType.TextEncoder3: ("transformers", "T5EncoderModel"),
    SubModelType.Tokenizer3: ("transformers", "T5TokenizerFast"),
}


_TOKENIZERS = (SubModelType.Tokenizer, SubModelType.Tokenizer2, SubModelType.Tokenizer3)


def _folder_of(submodel: SubModelType) -> str:
    return "vae" if submodel in (SubModelType.VaeDecoder, SubModelType.VaeEncoder) else submodel.value


def load_module_folder(cls: type, folder: Path, device: torch.device, dtype: torch.dtype) -> Loaded:
    """A diffusers ``ModelMixin`` or transformers ``PreTrainedModel`` from its folder, weights on ``device``."""
    files = weight_files(folder, dtype)
    if not files:
        raise InvalidModelException(f"{folder}: no weight files (.safetensors, .bin, .ckpt)")
    if bnb.folder_quantization(folder) is not None:  # saved quantized by bitsandbytes: kept quantized
        loaded = bnb.load_bnb_folder(lambda: _empty_from_folder(cls, folder, reuse=False), files, folder, device, dtype)
        keep_in_fp32(loaded.model, dtype)  # (what bnb did not quantize: T5's wo stays fp32 in fp16, as in from_pretrained)
        return loaded
    if all(f.suffix == ".safetensors" for f in files) and (device.type == "cpu" or not needs_cast(files, dtype)):
        # the weights stream in (threads, GIL released; on the CPU cast as they arrive) while this
        # thread builds the meta model and assigns it the buffer's views, whose bytes are still
        # arriving: all of the build hides behind the copy
        pending = start_flat(files, device, dtype=dtype if device.type == "cpu" else None)
        try:
            with gc_paused():  # (the assignment makes a Parameter per weight)
                model = _empty_from_folder(cls, folder)
                assign_weights(model, fit_keys(model, pending.flat.tensors), device, str(folder))
        finally:
            flat = pending.wait()
        state = StateDict(flat.tensors, flat.buffer)
    else:
        with ThreadPoolExecutor(1, thread_name_prefix="modelbus-read") as reader:
            future = reader.submit(read_state_dict, files, device, dtype)
            try:
                model = _empty_from_folder(cls, folder)
            finally:
                state = future.result()
        assign_weights(model, fit_keys(model, state.tensors), device, str(folder))
    if keep_in_fp32(model, dtype):  # (only then are parts of the buffer dead: checking costs ms per load)
        return Loaded(model, live_buffer(model, state.buffer))
    return Loaded(model, state.buffer)


def keep_in_fp32(model: torch.nn.Module, dtype: torch.dtype) -> bool:
    """In fp16, the layers a transformers model names in ``_keep_in_fp32_modules`` stay fp32, as
    ``from_pretrained`` keeps them (T5's feed-forward outputs overflow fp16). Whether any was cast."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    if dtype != torch.float16 or not keep:
        return False
    cast = False
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in keep:
            for pname, param in list(module.named_parameters(recurse=False)):
                module._parameters[pname] = torch.nn.Parameter(param.float(), requires_grad=False)
                cast = True
    return cast


def _empty_from_folder(cls: type, folder: Path, reuse: bool = True) -> torch.nn.Module:
    """``cls`` built from the folder's config on the meta device; ``reuse``: a clone of a kept skeleton."""
    if issubclass(cls, diffusers.ModelMixin):
        config = cls.load_config(folder, local_files_only=True)  # type: ignore[attr-defined]
        fresh = lambda: empty_model(lambda: cls.from_config(config))  # type: ignore[attr-defined]
        return skeleton_model(cls, config, fresh) if reuse else fresh()
    if issubclass(cls, transformers.PreTrainedModel):
        config = cls.config_class.from_pretrained(folder, local_files_only=True)  # type: ignore[attr-defined,union-attr]

        def build() -> torch.nn.Module:
            model = empty_model(lambda: cls(config))
            model.tie_weights()  # type: ignore[operator]  # the meta build unties them; files store tied weights once
            return model

        return skeleton_model(cls, config, build) if reuse else build()  # clones keep the ties
    raise InvalidModelException(f"{folder}: {cls.__name__} is not a model class")


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
    if library is None and req.submodel == SubModelType.Transformer and (folder / "config.json").is_file():
        # FLUX and SD-3 transformers share the folder name: diffusers' saved config names the class
        library, name = "diffusers", read_json(folder / "config.json").get("_class_name")
    if library is None or not name:
        raise InvalidModelException(f"{req.location}: cannot tell which class {req.submodel.value} is")
    cls = resolve_class(library, str(name))
    if req.submodel in _TOKENIZERS:
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


def load_diffusers_t2i_adapter(req: LoadRequest) -> Loaded:
    return load_module_folder(_config_class(req.location, "T2IAdapter"), req.location, req.device, req.dtype)


def load_transformers_folder(req: LoadRequest) -> Loaded:
    """A transformers model saved with ``save_pretrained`` (CLIP image and text encoders, T5 encoders): its
    ``config.json`` names the class. A T5 encoder folder in InvokeAI's and FLUX's layout keeps it in
    ``text_encoder_2/`` (beside ``tokenizer_2/``), a CLIP text encoder folder in ``text_encoder/``."""
    location = req.location
    if not (location / "config.json").is_file():
        location = next((location / sub for sub in ("text_encoder_2", "text_encoder")
                         if (location / sub / "config.json").is_file()), location)
    architectures = read_json(location / "config.json").get("architectures") or [""]
    return load_module_folder(resolve_class("transformers", str(architectures[0])), location, req.device,
                              req.dtype)


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
    base = getattr(req.record, "base_model", None)
    if loras.converts(base):  # the new transformers' LoRAs: in the names of the model we load for them
        return Loaded(loras.to_diffusers_names(base, state.tensors, path))
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


# T2I-Adapters: diffusers' layout (``adapter.body.N.resnets.M``); TencentARC's original one has no
# ``resnets`` level (``body.N.block1``, light adapters ``body.N.body.M.block1``)
_T2I_DIFFUSERS = re.compile(r"^(?:adapter\.)?body\.\d+\.resnets\.\d+\.block1\.weight$")


_T2I_TENCENTARC = re.compile(r"^body\.\d+\.(?:body\.\d+\.)?block1\.weight$")


# the hint image (1 or 3 channels) is pixel-unshuffled to the UNet's first feature map: by 8 for
# SD-1's latents, by 16 for SDXL adapters -> (hint channels, unshuffle factor)
_T2I_HINTS = {64: (1, 8), 192: (3, 8), 256: (1, 16), 768: (3, 16)}


def t2i_adapter_config(tensors: dict[str, torch.Tensor], where: Path) -> dict[str, Any]:
    """The ``T2IAdapter`` config of diffusers-layout weights (keys under ``adapter.``). A full
    adapter and an SDXL one have the same weights; only their unshuffle factor tells them apart."""
    keys = list(tensors)
    light = "adapter.body.0.out_conv.weight" in tensors  # light blocks narrow, then widen back
    first = shape_of(tensors, "adapter.body.0.in_conv.weight" if light else "adapter.conv_in.weight", where,
                     "T2I-Adapter")
    hint = _T2I_HINTS.get(first[1]) if len(first) == 4 else None
    if hint is None:
        raise InvalidModelException(f"{where}: T2I-Adapter whose first convolution takes {first} (expected "
                                    "64/192 pixel-unshuffled hint channels for SD-1, 256/768 for SDXL)")
    blocks = block_count(keys, r"adapter\.body\.(\d+)\.")
    if light:  # its last block keeps the width of the one before
        channels = [shape_of(tensors, f"adapter.body.{i}.out_conv.weight", where, "T2I-Adapter")[0]
                    for i in range(blocks - 1)]
    else:
        channels = [shape_of(tensors, f"adapter.body.{i}.resnets.0.block1.weight", where, "T2I-Adapter")[0]
                    for i in range(blocks)]
    kind = "light_adapter" if light else "full_adapter_xl" if hint[1] == 16 else "full_adapter"
    return {"in_channels": hint[0], "channels": channels, "downscale_factor": hint[1], "adapter_type": kind,
            "num_res_blocks": block_count(keys, r"adapter\.body\.0\.resnets\.(\d+)\.")}


def load_t2i_adapter_checkpoint(req: LoadRequest) -> Loaded:
    """A T2I-Adapter saved as one file in diffusers' layout (with or without the ``adapter.`` level)."""
    state = read_single_file(req)
    if not any(_T2I_DIFFUSERS.match(k) for k in state.tensors):
        if any(_T2I_TENCENTARC.match(k) for k in state.tensors):
            raise InvalidModelException(
                f"{req.location}: T2I-Adapter in TencentARC's original layout (body.N.block1...): diffusers "
                f"{diffusers.__version__} has no conversion of it in the library (only its repository script "
                "convert_original_t2i_adapter.py); convert the file to the diffusers layout to load it")
        raise InvalidModelException(f"{req.location}: no T2I-Adapter weights (adapter.body.N.resnets.M.*)")
    tensors = {k if k.startswith("adapter.") else f"adapter.{k}": v for k, v in state.tensors.items()}
    config = t2i_adapter_config(tensors, req.location)
    model = empty_model(lambda: diffusers.T2IAdapter.from_config(config))
    assign_weights(model, tensors, req.device, f"{req.location} (T2I-Adapter)")
    return Loaded(model, state.buffer)


def t5_encoder_config(tensors: dict[str, torch.Tensor], where: Path) -> transformers.T5Config:
    """A T5 encoder's config from its weights: the relative-position table gives the heads; gated
    feed-forwards (``wi_0``/``wi_1``) are T5 v1.1's gated GELU (FLUX's and SD-3's T5-XXL), else v1.0's ReLU."""
    what = "T5 encoder"
    embedding = "shared.weight" if "shared.weight" in tensors else "encoder.embed_tokens.weight"
    vocab, d_model = shape_of(tensors, embedding, where, what)
    attention = "encoder.block.0.layer.0.SelfAttention."
    inner = shape_of(tensors, attention + "q.weight", where, what)[0]
    buckets, heads = shape_of(tensors, attention + "relative_attention_bias.weight", where, what)
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in tensors
    d_ff = shape_of(tensors, f"encoder.block.0.layer.1.DenseReluDense.{'wi_0' if gated else 'wi'}.weight",
                    where, what)[0]
    if inner % heads:
        raise InvalidModelException(f"{where}: T5 attention width {inner} is not a multiple of its {heads} heads")
    return transformers.T5Config(
        vocab_size=vocab, d_model=d_model, d_kv=inner // heads, d_ff=d_ff, num_heads=heads,
        num_layers=block_count(tensors, r"encoder\.block\.(\d+)\."), relative_attention_num_buckets=buckets,
        feed_forward_proj="gated-gelu" if gated else "relu", is_encoder_decoder=False, use_cache=False)


# Wan-AI's own UMT5 (wan/modules/t5.py, ``models_t5_umt5-xxl-enc-bf16.pth``): block name -> transformers'
_WAN_T5_BLOCK = {"norm1.weight": "layer.0.layer_norm.weight", "attn.q.weight": "layer.0.SelfAttention.q.weight",
                 "attn.k.weight": "layer.0.SelfAttention.k.weight", "attn.v.weight": "layer.0.SelfAttention.v.weight",
                 "attn.o.weight": "layer.0.SelfAttention.o.weight",
                 "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
                 "norm2.weight": "layer.1.layer_norm.weight",
                 "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # the GELU-gated half
                 "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight", "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight"}
_WAN_T5_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def from_wan_t5(tensors: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    """Wan-AI's UMT5 names as transformers' (``blocks.N.attn.q`` -> ``encoder.block.N.layer.0.SelfAttention.q``,
    ``token_embedding`` -> ``shared``); a name of neither is refused."""
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        m = _WAN_T5_BLOCK_KEY.match(key)
        if key == "token_embedding.weight":
            out["shared.weight"] = value
        elif key == "norm.weight":
            out["encoder.final_layer_norm.weight"] = value
        elif m and m.group(2) in _WAN_T5_BLOCK:
            out[f"encoder.block.{m.group(1)}.{_WAN_T5_BLOCK[m.group(2)]}"] = value
        else:
            raise InvalidModelException(f"{where}: {key} is no tensor of Wan-AI's UMT5 encoder")
    return out


def load_t5_encoder_checkpoint(req: LoadRequest) -> Loaded:
    """A ``T5EncoderModel`` from one file (a whole T5's decoder, when there, is not read); Wan-AI's own UMT5
    file in its names. An fp8 file's weights stay fp8 where the worker keeps them (``req.fp8_storage``,
    :mod:`services.load.fp8`), except in fp16, where T5 keeps its ``wo`` layers fp32: there it is upcast."""
    def select(key: str) -> bool:
        return not key.startswith(("decoder.", "lm_head."))

    kept = read_kept(req, select) if req.dtype != torch.float16 else None
    if kept is not None:
        tensors, buffer = kept[0], kept[1]
    else:
        state = read_single_file(req, select)
        tensors, buffer = state.tensors, state.buffer
    if "token_embedding.weight" in tensors and "blocks.0.attn.q.weight" in tensors:
        tensors = from_wan_t5(tensors, req.location)
    if not any(k.startswith("encoder.block.") for k in tensors):
        raise InvalidModelException(f"{req.location}: no T5 encoder weights (encoder.block.N.*, or Wan-AI's "
                                    "blocks.N.attn.*)")
    return build_t5_encoder(req, tensors, buffer, kept=kept)


def build_t5_encoder(req: LoadRequest, tensors: dict[str, torch.Tensor], buffer: torch.Tensor | None,
                     what: str = "T5 encoder", kept: tuple[Any, Any, bool] | None = None) -> Loaded:
    """A ``T5EncoderModel`` from its weights (HF names, no prefix), its config read from their shapes;
    also the T5-XXL that SD-3's all-in-one files bundle. ``kept``: :func:`read_kept`'s answer, when the
    fp8 weights stay fp8."""
    config = t5_encoder_config(tensors, req.location)
    if "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" in tensors:
        # UMT5 (Wan's encoder): a relative position bias in every layer, not the first alone
        umt5 = transformers.UMT5Config(**config.to_diff_dict())
        model = empty_model(lambda: transformers.UMT5EncoderModel(umt5))
    else:
        model = empty_model(lambda: transformers.T5EncoderModel(config))
    model.tie_weights()  # type: ignore[operator]  # the meta build unties it from ``shared``: files store it once
    fitted = fit_keys(model, tensors)
    scales = kept_scales(kept, fitted)
    if scales is None:
        log.info("fp8_kept_fallback", path=str(req.location), reason="the names leave a scale untold")
        return load_t5_encoder_checkpoint(replace(req, fp8_storage=False))
    assign_weights(model, fitted, req.device, f"{req.location} ({what})")
    if kept is not None:  # T5 casts its feed-forward to ``wo``'s dtype: ``wo`` is upcast
        fp32 = set(getattr(model, "_keep_in_fp32_modules", None) or ())
        keep_fp8(model, scales, req.dtype, upcast=lambda name: name.rsplit(".", 1)[-1] in fp32)
    keep_in_fp32(model, req.dtype)
    return Loaded(model, live_buffer(model, buffer))


# a CLIP image tower's attention heads leave no trace in its weights: OpenAI's towers (B, L) have
# 64-wide heads and quick-GELU; LAION's (H, g, bigG: IP-Adapter's image encoders) 16 heads and GELU
_LAION_CLIP_VISION_HEADS = {1280: 16, 1408: 16, 1664: 16}


_CLIP_VISION = ("vision_model.", "visual_projection.")


def clip_vision_config(tensors: dict[str, torch.Tensor], where: Path) -> transformers.CLIPVisionConfig:
    what = "CLIP image encoder"
    hidden, channels, patch, _ = shape_of(tensors, "vision_model.embeddings.patch_embedding.weight", where, what)
    positions = shape_of(tensors, "vision_model.embeddings.position_embedding.weight", where, what)[0]
    side = math.isqrt(max(positions - 1, 0))  # a class token, then a square grid of patches
    if side * side != positions - 1:
        raise InvalidModelException(f"{where}: {positions} position embeddings are no class token plus a square grid")
    inter = shape_of(tensors, "vision_model.encoder.layers.0.mlp.fc1.weight", where, what)[0]
    projection = tensors.get("visual_projection.weight")
    return transformers.CLIPVisionConfig(
        hidden_size=hidden, intermediate_size=inter, num_channels=channels, patch_size=patch, image_size=side * patch,
        num_hidden_layers=block_count(tensors, r"vision_model\.encoder\.layers\.(\d+)\."),
        num_attention_heads=_LAION_CLIP_VISION_HEADS.get(hidden, max(1, hidden // 64)),
        hidden_act="gelu" if hidden in _LAION_CLIP_VISION_HEADS else "quick_gelu",
        projection_dim=int(projection.shape[0]) if projection is not None else 512)


def load_clip_vision_checkpoint(req: LoadRequest) -> Loaded:
    """A CLIP image encoder from one file (a whole CLIP model's text tower is not read):
    ``CLIPVisionModelWithProjection``, or ``CLIPVisionModel`` when the file has no projection."""
    state = read_single_file(req, lambda k: k.startswith(_CLIP_VISION))
    if not any(k.startswith("vision_model.encoder.") for k in state.tensors):
        raise InvalidModelException(f"{req.location}: no CLIP image encoder weights (vision_model.encoder.*)")
    config = clip_vision_config(state.tensors, req.location)
    tensors = state.tensors
    if "visual_projection.weight" in tensors:
        model = empty_model(lambda: transformers.CLIPVisionModelWithProjection(config))
    else:  # transformers 5's CLIPVisionModel has no ``vision_model.`` level
        model = empty_model(lambda: transformers.CLIPVisionModel(config))
        wanted = model.state_dict().keys()
        stripped = {k.removeprefix("vision_model."): v for k, v in tensors.items()}
        tensors = max((tensors, stripped), key=lambda c: len(wanted & c.keys()))
    assign_weights(model, tensors, req.device, f"{req.location} (CLIP image encoder)")
    return Loaded(model, state.buffer)


#: the shipped config a CLIP text encoder file's dimensions are laid over (OpenAI's ViT-L/14 text model)
_CLIP_TEXT_CONFIG = CONFIGS_DIR / "diffusers" / "sd-1" / "text_encoder"


def load_clip_embed_checkpoint(req: LoadRequest) -> Loaded:
    """A CLIP text encoder from one file (``text_model.*``, or SD's ``transformer.text_model.*``): a
    ``CLIPTextModel``, or ``CLIPTextModelWithProjection`` when the file has its projection (SD-3's CLIP-L);
    the shipped CLIP-L config with the dimensions the file's tensors give."""
    state = read_single_file(req, lambda k: k.removeprefix("transformer.").startswith(("text_model.",
                                                                                         "text_projection.")))
    tensors = {k.removeprefix("transformer."): v for k, v in state.tensors.items()}
    what = "CLIP text encoder"
    vocab, hidden = shape_of(tensors, "text_model.embeddings.token_embedding.weight", req.location, what)
    positions = shape_of(tensors, "text_model.embeddings.position_embedding.weight", req.location, what)[0]
    inter = shape_of(tensors, "text_model.encoder.layers.0.mlp.fc1.weight", req.location, what)[0]
    layers = block_count(tensors, r"text_model\.encoder\.layers\.(\d+)\.")
    projection = tensors.get("text_projection.weight")
    config = clip_config(_CLIP_TEXT_CONFIG, hidden, vocab, positions, layers, inter,
                         int(projection.shape[0]) if projection is not None else None)
    cls = transformers.CLIPTextModel if projection is None else transformers.CLIPTextModelWithProjection
    model = empty_model(lambda: cls(config))
    assign_weights(model, fit_keys(model, tensors), req.device, f"{req.location} ({what})")
    return Loaded(model, live_buffer(model, state.buffer))
