"""LoRAs of the 2025-2026 transformers (FLUX.2, Qwen-Image, Wan, Chroma, Z-Image, Lumina 2) in the names of the diffusers model
the load service builds for their base.

The trainers these families' users train with write other names (kohya, musubi-tuner: ``lora_unet_blocks_0_
self_attn_q.lora_down.weight``; ai-toolkit, diffusion-pipe, ComfyUI: the original release's names under
``diffusion_model.``; BFL's fused ``qkv``). diffusers' own LoRA loaders know each family's conversions
(``<Family>LoraLoaderMixin.lora_state_dict``, offline for a dict); the result is PEFT's layout,
``transformer.<module>.lora_A.weight`` / ``lora_B.weight``, kohya's alphas folded into the weights, which
``transformer.load_lora_adapter(state, prefix="transformer")`` applies. Other bases' LoRAs stay as their
files hold them (the patcher's input).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import diffusers
import torch

from modelbus.services.load.errors import InvalidModelException
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
}


_TRAINER_NAME = re.compile(r"^(?:lycoris_|lora_|diffusion_model\.|base_model\.|[^.]+_\d+_)")


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
    out = {k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in converted.items()
           if not k.startswith(("text_encoder", "te."))}
    if not out:
        raise InvalidModelException(f"{where}: a {family.value} LoRA with no transformer layers")
    # diffusers passes through what no conversion of the family knows (a LyCORIS LoKr of Wan, say): each
    # key must now name a module of the transformer, not a trainer's flattened name
    unplaced = [k for k in out if _TRAINER_NAME.match(k.removeprefix("transformer."))]
    if unplaced:
        raise InvalidModelException(f"{where}: a {family.value} LoRA in a layout diffusers does not convert for "
                                    f"this family ({len(unplaced)} tensors, e.g. {unplaced[0]})")
    return out
