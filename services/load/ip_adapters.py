"""IP-Adapters for SD-1/SD-2/SDXL UNets, in h94's layout (``image_proj.*`` and ``ip_adapter.*``):
one file (safetensors, or a torch pickle holding ``{"image_proj": ..., "ip_adapter": ...}``), or
InvokeAI's folder (``ip_adapter.bin`` or ``.safetensors``, and ``image_encoder.txt`` naming the
CLIP image encoder it was trained with).

What loads is an :class:`IPAdapter`, an ``nn.Module`` (so the cache moves it and counts its bytes
like any model) whose tensors are the file's, not copies:

- ``image_proj``: the image projection as diffusers converts it
  (``UNet2DConditionLoadersMixin._convert_ip_adapter_image_proj_to_diffusers``): ``ImageProjection``
  (IP-Adapter), ``IPAdapterPlusImageProjection`` (Plus: a resampler), ``IPAdapterFullImageProjection``
  (full face), ``IPAdapterFaceIDImageProjection`` and ``IPAdapterFaceIDPlusImageProjection`` (FaceID);
- ``attn``: one diffusers ``IPAdapterAttnProcessor2_0`` per cross-attention layer, keyed by the
  file's layer index (1, 3, 5...: the place of that layer's processor among a UNet's attention
  processors, self- and cross-attention alternating); :meth:`IPAdapter.attn_processors` hands them
  to ``unet.set_attn_processor``, and the UNet takes ``image_proj`` as its ``encoder_hid_proj`` (in a
  ``MultiIPAdapterImageProjection``) as diffusers' ``_load_ip_adapter_weights`` sets it up;
- ``lora``: FaceID's LoRA on every attention layer (empty for the others), by layer index;
  :meth:`IPAdapter.lora_state_dict` names it for diffusers' LoRA loading.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers.loaders.unet import UNet2DConditionLoadersMixin
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import IPAdapterFullImageProjection, IPAdapterPlusImageProjection

from modelbus.services.load.errors import InvalidModelException
from modelbus.services.load.kit import Loaded, LoadRequest, live_buffer
from modelbus.services.load.safetensors_fast import assign_weights, empty_model
from modelbus.services.load.weights import read_state_dict

IMAGE_PROJ, LAYERS = "image_proj.", "ip_adapter."
_FOLDER_FILES = ("ip_adapter.safetensors", "ip_adapter.bin")
_IP_WEIGHT = re.compile(r"(\d+)\.(to_k_ip|to_v_ip)\.weight")
_LORA_WEIGHT = re.compile(r"(\d+)\.(to_q_lora|to_k_lora|to_v_lora|to_out_lora)\.(down|up)\.weight")
_KINDS = {"ImageProjection": "ip_adapter", "IPAdapterPlusImageProjection": "ip_adapter_plus",
          "IPAdapterFullImageProjection": "ip_adapter_full", "IPAdapterFaceIDImageProjection": "faceid",
          "IPAdapterFaceIDPlusImageProjection": "faceid_plus"}
# the image tokens of a full-face adapter: every patch of CLIP ViT-H's 16x16 grid and its class token
# (the encoder's, not in the adapter's weights; diffusers' count too)
_FULL_FACE_TOKENS = 257


class IPAdapter(torch.nn.Module):
    """An IP-Adapter's image projection and per-layer attention weights (see the module's docstring)."""

    def __init__(self, image_proj: torch.nn.Module, attn: dict[str, torch.nn.Module],
                 lora: dict[str, dict[str, torch.Tensor]], image_encoder: str | None = None) -> None:
        super().__init__()
        self.image_proj = image_proj
        self.attn = torch.nn.ModuleDict(attn)
        self.lora = torch.nn.ModuleDict({
            index: torch.nn.ParameterDict({name: torch.nn.Parameter(t, requires_grad=False)
                                           for name, t in weights.items()})
            for index, weights in lora.items()})
        #: InvokeAI folders name the CLIP image encoder the adapter was trained with
        self.image_encoder = image_encoder

    @property
    def kind(self) -> str:
        """``ip_adapter``, ``ip_adapter_plus``, ``ip_adapter_full``, ``faceid`` or ``faceid_plus``."""
        return _KINDS[type(self.image_proj).__name__]

    @property
    def num_tokens(self) -> int:
        """How many image tokens the projection adds to the text's."""
        return image_tokens(self.image_proj)

    def attn_processors(self, unet: Any) -> dict[str, Any]:
        """The attention processors of ``unet`` with this adapter's on its cross-attention layers,
        for ``unet.set_attn_processor``. The n-th cross-attention processor takes layer ``2n + 1``,
        as diffusers' ``_convert_ip_adapter_attn_to_diffusers`` numbers them; self-attention keeps its own."""
        current: dict[str, Any] = unet.attn_processors
        processors: dict[str, Any] = {}
        index = 1
        for name, processor in current.items():
            if name.endswith("attn1.processor") or "motion_modules" in name:
                processors[name] = processor
                continue
            ip: Any = self.attn[str(index)] if str(index) in self.attn else None  # noqa: SIM401 - no ModuleDict.get
            attention: Any = unet.get_submodule(name.removesuffix(".processor"))
            if ip is None or ip.to_k_ip[0].weight.shape != attention.to_k.weight.shape:
                raise InvalidModelException(
                    f"IP-Adapter with {len(self.attn)} cross-attention layers does not fit this UNet: its "
                    f"{name} takes keys of shape {tuple(attention.to_k.weight.shape)}, the adapter's layer "
                    f"{index} {'is missing' if ip is None else tuple(ip.to_k_ip[0].weight.shape)}")
            processors[name] = ip
            index += 2
        if len(self.attn) != (index - 1) // 2:
            raise InvalidModelException(f"IP-Adapter with {len(self.attn)} cross-attention layers does not fit "
                                        f"this UNet, which has {(index - 1) // 2}")
        return processors

    def lora_state_dict(self, unet: Any) -> dict[str, torch.Tensor]:
        """FaceID's LoRA under the names of ``unet``'s attention layers (``unet.<processor>.to_k_lora.down.weight``),
        as diffusers' ``_load_ip_adapter_loras`` names it for ``load_lora_weights``; empty for other kinds."""
        if not self.lora:
            return {}
        layers: dict[str, Any] = dict(self.lora.items())
        original = {f"{index}.{name.rsplit('_', 1)[0]}.{name.rsplit('_', 1)[1]}.weight": p
                    for index, weights in layers.items() for name, p in weights.items()}
        named: dict[int, dict[str, torch.Tensor]] = unet._load_ip_adapter_loras([{"ip_adapter": original}])
        return named.get(0, {})


def image_tokens(image_proj: torch.nn.Module) -> int:
    """How many tokens a converted image projection makes (the attention processors' ``num_tokens``)."""
    if isinstance(image_proj, IPAdapterFullImageProjection):
        return _FULL_FACE_TOKENS
    if isinstance(image_proj, IPAdapterPlusImageProjection):
        return int(image_proj.latents.shape[1])
    tokens: Any = getattr(image_proj, "num_image_text_embeds", None) or getattr(image_proj, "num_tokens", 4)
    return int(tokens)


@dataclass(frozen=True)
class _Target:
    """What diffusers' conversion, a UNet method, reads of its UNet: where the weights go. With it the
    projection is built on the meta device and takes the file's tensors as they are (no copy, no
    random initialisation)."""

    device: torch.device
    dtype: torch.dtype


def convert_image_proj(tensors: dict[str, torch.Tensor], req: LoadRequest, where: Path) -> torch.nn.Module:
    """diffusers' image projection module of an adapter's ``image_proj`` weights (their prefix removed)."""
    convert: Any = UNet2DConditionLoadersMixin._convert_ip_adapter_image_proj_to_diffusers
    try:
        module: torch.nn.Module = convert(_Target(req.device, req.dtype), tensors, low_cpu_mem_usage=True)
    except (KeyError, IndexError, ValueError, RuntimeError) as exc:
        raise InvalidModelException(
            f"{where}: IP-Adapter image projection that diffusers {diffusers.__version__} cannot convert "
            f"(it knows IP-Adapter, Plus, full-face, FaceID and FaceID Plus): {type(exc).__name__}: {exc}") from exc
    empty = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if empty:
        raise InvalidModelException(f"{where}: incomplete IP-Adapter image projection ({type(module).__name__}): "
                                    f"{len(empty)} weights missing, e.g. {empty[:3]}")
    for sub in module.modules():  # non-persistent buffers were built on the CPU
        for name, buf in list(sub._buffers.items()):
            if buf is not None and buf.device != req.device:
                sub._buffers[name] = buf.to(req.device)
    return module.requires_grad_(False).eval()


def _layer_weights(tensors: dict[str, torch.Tensor], where: Path) -> tuple[dict[str, dict[str, torch.Tensor]],
                                                                           dict[str, dict[str, torch.Tensor]]]:
    """``ip_adapter.*`` by layer index: the image keys and values (``to_k_ip``/``to_v_ip``), FaceID's LoRA."""
    ip: dict[str, dict[str, torch.Tensor]] = {}
    lora: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if m := _IP_WEIGHT.fullmatch(key):
            ip.setdefault(m.group(1), {})[m.group(2)] = value
        elif m := _LORA_WEIGHT.fullmatch(key):
            lora.setdefault(m.group(1), {})[f"{m.group(2)}_{m.group(3)}"] = value
        else:
            raise InvalidModelException(f"{where}: unexpected IP-Adapter weight {LAYERS}{key} (known: "
                                        "N.to_k_ip/to_v_ip.weight, FaceID's N.to_*_lora.down/up.weight)")
    if not ip:
        raise InvalidModelException(f"{where}: IP-Adapter without cross-attention weights ({LAYERS}N.to_k_ip.weight)")
    for index, pair in ip.items():
        k, v = pair.get("to_k_ip"), pair.get("to_v_ip")
        if k is None or v is None or k.ndim != 2 or k.shape != v.shape:
            raise InvalidModelException(
                f"{where}: IP-Adapter layer {index} needs to_k_ip and to_v_ip matrices of one shape, has "
                f"{ {n: tuple(t.shape) for n, t in pair.items()} }")
    return ip, lora


def _processor(k: torch.Tensor, v: torch.Tensor, tokens: int, device: torch.device, what: str) -> torch.nn.Module:
    """diffusers' IP-Adapter attention processor holding one layer's image keys and values."""
    hidden, cross = int(k.shape[0]), int(k.shape[1])
    processor = empty_model(lambda: IPAdapterAttnProcessor2_0(
        hidden_size=hidden, cross_attention_dim=cross, num_tokens=(tokens,), scale=1.0))
    return assign_weights(processor, {"to_k_ip.0.weight": k, "to_v_ip.0.weight": v}, device, what)


def _attention(ip: dict[str, dict[str, torch.Tensor]], tokens: int, req: LoadRequest,
               where: Path) -> dict[str, torch.nn.Module]:
    return {index: _processor(ip[index]["to_k_ip"], ip[index]["to_v_ip"], tokens, req.device,
                              f"{where} (IP-Adapter layer {index})")
            for index in sorted(ip, key=int)}


def _weights_file(location: Path) -> Path:
    if location.is_file():
        return location
    for name in _FOLDER_FILES:
        if (location / name).is_file():
            return location / name
    raise InvalidModelException(f"{location}: an IP-Adapter folder holds {' or '.join(_FOLDER_FILES)}; none there")


def _image_encoder(location: Path) -> str | None:
    named = location / "image_encoder.txt"
    if not location.is_dir() or not named.is_file():
        return None
    return named.read_text().strip() or None


def load_ip_adapter(req: LoadRequest) -> Loaded:
    """An :class:`IPAdapter` from one file or InvokeAI's folder; pickles go through the scan first."""
    path = _weights_file(req.location)
    state = read_state_dict([path], req.device, req.dtype)
    image_proj = {k.removeprefix(IMAGE_PROJ): v for k, v in state.tensors.items() if k.startswith(IMAGE_PROJ)}
    layers = {k.removeprefix(LAYERS): v for k, v in state.tensors.items() if k.startswith(LAYERS)}
    if not image_proj or not layers:
        raise InvalidModelException(f"{path}: no IP-Adapter weights (it needs both {IMAGE_PROJ}* and {LAYERS}*)")
    ip, lora = _layer_weights(layers, path)
    projection = convert_image_proj(image_proj, req, path)
    model = IPAdapter(projection, _attention(ip, image_tokens(projection), req, path), lora,
                      _image_encoder(req.location))
    model.requires_grad_(False).eval()
    return Loaded(model, live_buffer(model, state.buffer))
