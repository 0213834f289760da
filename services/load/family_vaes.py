"""Single-file VAEs of the 2025-2026 families: Wan 2.1's (also Wan 2.2 A14B's), Qwen-Image's, Wan 2.2's
48-channel one and FLUX.2's, loaded offline.

The architecture is a config, never the network: the record's ``config`` (a diffusers ``config.json``, or
a folder holding one, absolute or under the models directory) when set, else the published VAE of the
record's base, which is the diffusers class's defaults (Wan 2.2's: the TI2V 5B VAE's published sizes).
Wan-AI's names (``decoder.conv1``, ``decoder.middle.0.residual.0.gamma``, as ComfyUI repackages them) are
turned into diffusers' by diffusers' own conversion (``convert_wan_vae_to_diffusers``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

from modelbus.services.load.errors import InvalidModelException
from modelbus.services.load.kit import (
    Loaded,
    LoadRequest,
    base_of,
    build_from,
    read_checkpoint,
    read_json,
    resolve_class,
)
from modelbus.services.load.safetensors_fast import empty_model

_WAN22 = {"base_dim": 160, "decoder_base_dim": 256, "z_dim": 48, "is_residual": True, "in_channels": 12,
          "out_channels": 12, "patch_size": 2, "scale_factor_spatial": 16}  # fmt: skip
#: base -> (class, the published VAE's config beside the class defaults)
PUBLISHED: dict[str, tuple[str, dict[str, Any]]] = {
    "wan-2.1": ("AutoencoderKLWan", {}), "wan-2.2": ("AutoencoderKLWan", _WAN22),
    "qwen-image": ("AutoencoderKLQwenImage", {}), "flux2": ("AutoencoderKLFlux2", {}),
}  # fmt: skip


def _config(req: LoadRequest) -> tuple[str, dict[str, Any]]:
    given = getattr(req.record, "config", None)
    if not given:
        return PUBLISHED[base_of(req.record)]
    path = Path(str(given)) if Path(str(given)).is_absolute() else req.location.parent / str(given)
    for candidate in (path, path / "config.json", path / "vae" / "config.json"):
        if candidate.is_file() and candidate.suffix == ".json":
            config = read_json(candidate)
            return str(config.get("_class_name")), {k: v for k, v in config.items() if not k.startswith("_")}
    raise InvalidModelException(f"{req.location}: VAE config {given!r} is no diffusers config file or folder")


def load_family_vae(req: LoadRequest) -> Loaded:
    cls_name, config = _config(req)
    cls = resolve_class("diffusers", cls_name)

    def make() -> torch.nn.Module:
        return cls(**config)  # type: ignore[no-any-return]

    expected = {k: tuple(v.shape) for k, v in empty_model(make).state_dict().items()}
    tensors, buffer = read_checkpoint(req, lambda k: True)
    if "decoder.middle.0.residual.0.gamma" in tensors:  # Wan-AI's names
        tensors = convert_wan_vae_to_diffusers(tensors)
    missing = sorted(expected.keys() - tensors.keys())
    if missing:
        raise InvalidModelException(f"{req.location}: not a {cls_name} of this config: {len(missing)} tensors "
                                    f"missing, e.g. {missing[:3]}")  # fmt: skip
    wrong = [k for k, shape in expected.items() if tuple(tensors[k].shape) != shape]
    if wrong:
        first = wrong[0]
        raise InvalidModelException(
            f"{req.location}: not the {cls_name} of {'the record' if getattr(req.record, 'config', None) else 'the published'}"
            f" config: {len(wrong)} tensors of another shape, e.g. {first} {tuple(tensors[first].shape)} where the "
            f"config has {expected[first]}")  # fmt: skip
    return build_from(make, {k: tensors[k] for k in expected}, req, buffer, f"{base_of(req.record)} VAE")
