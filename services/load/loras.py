"""LoRAs of the 2025-2026 transformers (FLUX.2, Qwen-Image, Wan, Chroma, Z-Image, Lumina 2, LTX-Video, LTX-2,
HiDream, Sana) in the names of the diffusers model the load service builds for their base.

The trainers these families' users train with write other names (kohya, musubi-tuner: ``lora_unet_blocks_0_
self_attn_q.lora_down.weight``; ai-toolkit, diffusion-pipe, ComfyUI: the original release's names under
``diffusion_model.``; BFL's fused ``qkv``). diffusers' own LoRA loaders know each family's conversions
(``<Family>LoraLoaderMixin.lora_state_dict``, offline for a dict); the result is PEFT's layout,
``transformer.<module>.lora_A.weight`` / ``lora_B.weight``, kohya's alphas folded into the weights, which
``transformer.load_lora_adapter(state, prefix="transformer")`` applies. Other bases' LoRAs stay as their
files hold them (the patcher's input).
"""

from __future__ import annotations

import functools
import re
import warnings
from pathlib import Path

import diffusers
import torch

from modelbus.services.load.errors import InvalidModelException
from modelbus.services.load.kit import CONFIGS_DIR, read_json, resolve_class
from modelbus.services.records.enums import BaseModelType as Base

_MIXINS = {
    Base.Flux2: "Flux2LoraLoaderMixin",
    Base.QwenImage: "QwenImageLoraLoaderMixin",
    Base.QwenImage21: "QwenImageLoraLoaderMixin",
    Base.Wan21: "WanLoraLoaderMixin",
    Base.Wan22: "WanLoraLoaderMixin",
    Base.Chroma: "FluxLoraLoaderMixin",
    Base.ZImage: "ZImageLoraLoaderMixin",
    Base.Lumina2: "Lumina2LoraLoaderMixin",
    Base.LTXVideo: "LTXVideoLoraLoaderMixin",
    Base.LTXVideo2: "LTX2LoraLoaderMixin",
    Base.HiDream: "HiDreamImageLoraLoaderMixin",
    Base.Sana: "SanaLoraLoaderMixin",
}


# the family's shipped transformer config whose module names a converted LoRA must use
_SHIPPED = {
    Base.Flux2: "flux2-klein-4b", Base.QwenImage: "qwen-image", Base.QwenImage21: "qwen-image-2.1",
    Base.Wan21: "wan-2.1-i2v-14b", Base.Wan22: "wan-2.2-ti2v-5b", Base.Chroma: "chroma", Base.ZImage: "z-image-turbo",
    Base.Lumina2: "lumina-2", Base.LTXVideo: "ltx-video-2b", Base.LTXVideo2: "ltx-2", Base.HiDream: "hidream-i1",
    Base.Sana: "sana-600m",
}  # fmt: skip
_SUFFIX = re.compile(r"\.(?:lora_[AB](?:\.default)?\.weight|lora_(?:down|up)\.weight|lokr_w[12](?:_[ab])?|"
                     r"hada_w[12]_[ab]|alpha|diff(?:_b)?|dora_scale|lora_magnitude_vector)$")  # fmt: skip
_INDEX = re.compile(r"\.\d+(?=\.|$)")


# module names diffusers' kohya conversions split at an underscore they should keep (its Qwen-Image
# conversion turns every ``_`` of a kohya name into ``.`` but for the names it knows; 2.1's ``gate_layer``
# is not one of them)
_SPLIT_NAMES = ((".img_mlp.gate.layer.", ".img_mlp.gate_layer."),)


def _repaired(key: str) -> str:
    for wrong, right in _SPLIT_NAMES:
        key = key.replace(wrong, right)
    return key


def converts(base: object) -> bool:
    return _base(base) in _MIXINS


def _base(base: object) -> Base | None:
    try:
        return Base(getattr(base, "value", base))
    except ValueError:
        return None


def to_diffusers_names(base: object, tensors: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    """``tensors`` (a LoRA of ``base``) under PEFT's names of the base's diffusers transformer."""
    family = _base(base)
    if family is None or family not in _MIXINS:
        raise InvalidModelException(f"{where}: no LoRA conversion for base {base}")
    mixin = getattr(diffusers.loaders, _MIXINS[family])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            converted = mixin.lora_state_dict(dict(tensors))
    except (ValueError, KeyError, IndexError, RuntimeError) as exc:
        # diffusers says what it could not place: one line naming the file and the family
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InvalidModelException(f"{where}: a {family.value} LoRA whose layers diffusers cannot place: "
                                    f"{first[:300]}") from exc
    if isinstance(converted, tuple):  # FLUX's loader may answer (state, alphas)
        converted = converted[0]
    out = {_repaired(k if k.startswith("transformer.") else f"transformer.{k}"): v for k, v in converted.items()
           if not k.startswith(("text_encoder", "te."))}
    if not out:
        raise InvalidModelException(f"{where}: a {family.value} LoRA with no transformer layers")
    # diffusers passes through what no conversion of the family knows (a LyCORIS LoKr of Wan, say): each
    # key must now name a module of the family's transformer (the shipped config's, built on the meta device)
    modules = _module_names(_SHIPPED[family])
    unplaced = [k for k in out if _general(_module_of(k)) not in modules]
    if unplaced:
        raise InvalidModelException(f"{where}: a {family.value} LoRA in a layout diffusers does not convert for "
                                    f"this family ({len(unplaced)} tensors name no module of its transformer, e.g. "
                                    f"{unplaced[0]})")
    return out


def _module_of(key: str) -> str:
    return _SUFFIX.sub("", key.removeprefix("transformer."))


def _general(name: str) -> str:
    return _INDEX.sub(".N", name)


@functools.cache
def _module_names(config_name: str) -> frozenset[str]:
    """Every module of the transformer a shipped config describes, block indices as ``N``."""
    config = read_json(CONFIGS_DIR / "diffusers" / config_name / "transformer" / "config.json")
    cls = resolve_class("diffusers", str(config.get("_class_name")))
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model = cls(**{k: v for k, v in config.items() if not k.startswith("_")})
    return frozenset(_general(name) for name, _ in model.named_modules())
