"""Builders of the transformer-era files (FLUX, SD-3, their ControlNets), T2I-Adapters and Olive folders.

Where diffusers has the class, the file is the state dict of a tiny real model, so every key name
is the real one and the widths a rule reads (input channels, hint channels) are set through the
model's config. Formats diffusers cannot build (XLabs, SAI, TencentARC originals, LoRAs) are
written with their real key names and small shapes, except the widths a rule reads, which are real.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, cast

import torch

from tests.fixtures.model_files import write_safetensors, write_torch
from tests.fixtures.model_folders import make_onnx_pipeline

StateDict = dict[str, torch.Tensor]


def _seed() -> None:
    torch.manual_seed(0)


def _state_of(model: object) -> StateDict:
    # diffusers models are torch modules, though mypy cannot see it through diffusers' lazy imports
    return dict(cast(torch.nn.Module, model).state_dict())


def write_state(path: Path, state: Mapping[str, torch.Tensor], prefix: str = "") -> Path:
    """A state dict as ``.safetensors`` or (any other suffix) a torch pickle, keys under ``prefix``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {prefix + k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}
    if path.suffix == ".safetensors":
        save_file(tensors, str(path))
        return path
    return write_torch(path, tensors)


# ------------------------------------------------------------------- diffusers transformers


def flux_transformer_state(guidance: bool = True, in_channels: int = 64, single_layers: int = 1) -> StateDict:
    """``FluxTransformer2DModel``: dev embeds guidance, schnell not; Fill takes 384 input features."""
    from diffusers import FluxTransformer2DModel

    _seed()
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=in_channels, out_channels=64, num_layers=1, num_single_layers=single_layers,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        guidance_embeds=guidance, axes_dims_rope=(4, 4, 8),
    )  # fmt: skip
    return _state_of(model)


def sd3_transformer_state(dual_attention: bool = False) -> StateDict:
    """``SD3Transformer2DModel``; ``dual_attention`` gives SD-3.5 medium's MMDiT-X blocks (attn2, qk norm)."""
    from diffusers import SD3Transformer2DModel

    _seed()
    extra: dict[str, object] = {"dual_attention_layers": (0,), "qk_norm": "rms_norm"} if dual_attention else {}
    model = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32, out_channels=16, **extra,
    )  # fmt: skip
    return _state_of(model)


def chroma_transformer_state() -> StateDict:
    """``ChromaTransformer2DModel``: a FLUX-schnell derivative without the pooled-CLIP embedder."""
    from diffusers import ChromaTransformer2DModel

    _seed()
    model = ChromaTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 4, 8), approximator_num_channels=8, approximator_hidden_dim=16,
        approximator_layers=1,
    )  # fmt: skip
    return _state_of(model)


def make_flux_diffusers_file(path: Path, flavour: str = "dev", fill: bool = False, prefix: str = "") -> Path:
    state = flux_transformer_state(guidance=flavour == "dev", in_channels=384 if fill else 64)
    return write_state(path, state, prefix)


def make_sd3_diffusers_file(path: Path, dual_attention: bool = False, prefix: str = "") -> Path:
    return write_state(path, sd3_transformer_state(dual_attention), prefix)


# -------------------------------------------------------------------------------- ControlNets


def flux_controlnet_state(single_layers: int = 1) -> StateDict:
    """``FluxControlNetModel`` (InstantX / Shakker-Labs files); some have no single blocks."""
    from diffusers import FluxControlNetModel

    _seed()
    model = FluxControlNetModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=single_layers, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    )  # fmt: skip
    return _state_of(model)


def sd3_controlnet_state(sd35_large: bool = False) -> StateDict:
    """``SD3ControlNetModel``: SD-3 (with pos_embed and context_embedder) or the SD-3.5 large
    layout, which keeps only the control latent's ``pos_embed_input`` and single attention blocks."""
    from diffusers import SD3ControlNetModel

    _seed()
    extra: dict[str, object] = {"joint_attention_dim": 32}
    if sd35_large:
        extra = {"joint_attention_dim": None, "pos_embed_type": None, "use_pos_embed": False,
                 "force_zeros_for_pooled_projection": False}  # fmt: skip
    model = SD3ControlNetModel(
        sample_size=32, patch_size=2, in_channels=16, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        caption_projection_dim=16, pooled_projection_dim=32, out_channels=16, **extra,
    )  # fmt: skip
    return _state_of(model)


def unet_controlnet_state(context: int = 768) -> StateDict:
    """diffusers ``ControlNetModel`` (``controlnet_cond_embedding``, ``controlnet_down_blocks``)."""
    from diffusers import ControlNetModel

    _seed()
    model = ControlNetModel(
        in_channels=4, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=context,
        conditioning_embedding_out_channels=(16, 32),
    )  # fmt: skip
    return _state_of(model)


def xlabs_flux_controlnet_shapes() -> dict[str, tuple[int, ...]]:
    """XLabs-AI ``flux-controlnet-*-v3``: FLUX's BFL blocks plus a hint encoder and per-block outputs."""
    w = 8
    return {
        "img_in.weight": (w, 64), "time_in.in_layer.weight": (w, 256), "vector_in.in_layer.weight": (w, 768),
        "guidance_in.in_layer.weight": (w, 256), "txt_in.weight": (w, 4096),
        "double_blocks.0.img_attn.norm.key_norm.scale": (4,), "double_blocks.0.img_attn.qkv.weight": (3 * w, w),
        "double_blocks.0.txt_mod.lin.weight": (6 * w, w),
        "controlnet_blocks.0.weight": (w, w), "controlnet_blocks.0.bias": (w,),
        "input_hint_block.0.weight": (16, 3, 3, 3), "input_hint_block.14.weight": (16, 16, 3, 3),
        "pos_embed_input.weight": (w, 64), "pos_embed_input.bias": (w,),
    }  # fmt: skip


def sai_sd35_controlnet_shapes() -> dict[str, tuple[int, ...]]:
    """Stability's ``sd3.5_large_controlnet_*.safetensors`` (SAI naming, DiT blocks)."""
    w = 8
    return {
        "x_embedder.proj.weight": (w, 16, 2, 2), "pos_embed_input.proj.weight": (w, 16, 2, 2),
        "t_embedder.mlp.0.weight": (w, 256), "y_embedder.mlp.0.weight": (w, 2048),
        "transformer_blocks.0.adaLN_modulation.1.bias": (9 * w,), "transformer_blocks.0.attn.qkv.weight": (3 * w, w),
        "controlnet_blocks.0.weight": (w, w), "controlnet_blocks.0.bias": (w,),
    }  # fmt: skip


# ------------------------------------------------------------------------------- T2I-Adapter

T2IKind = Literal["full_adapter", "full_adapter_xl", "light_adapter"]


def t2i_adapter_state(kind: T2IKind = "full_adapter", in_channels: int = 3) -> StateDict:
    """diffusers ``T2IAdapter``: the hint is pixel-unshuffled by 8 (SD-1) or 16 (``full_adapter_xl``)."""
    from diffusers import T2IAdapter

    _seed()
    model = T2IAdapter(in_channels=in_channels, channels=[32, 64, 64, 64], num_res_blocks=2,
                       downscale_factor=16 if kind == "full_adapter_xl" else 8, adapter_type=kind)  # fmt: skip
    return _state_of(model)


def to_tencentarc_layout(state: Mapping[str, torch.Tensor], res_blocks: int = 2) -> StateDict:
    """TencentARC's original naming (the inverse of diffusers' conversion): a full adapter's
    ``adapter.body.i.resnets.j`` is ``body.{i*n+j}``; a light adapter's is ``body.i.body.j``."""
    light = any(k.endswith("out_conv.weight") for k in state)
    out: StateDict = {}
    for key, value in state.items():
        key = key.removeprefix("adapter.")
        if light:
            key = re.sub(r"^body\.(\d+)\.resnets\.(\d+)\.", r"body.\1.body.\2.", key)
        else:
            key = re.sub(r"^body\.(\d+)\.resnets\.(\d+)\.",
                         lambda m: f"body.{int(m[1]) * res_blocks + int(m[2])}.", key)  # fmt: skip
            key = re.sub(r"^body\.(\d+)\.in_conv\.", lambda m: f"body.{int(m[1]) * res_blocks}.in_conv.", key)
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------- LoRA


def lora_pairs(layers: Mapping[str, tuple[int, int]], style: Literal["peft", "kohya", "xlabs"],
               rank: int = 4) -> dict[str, tuple[int, ...]]:  # fmt: skip
    """LoRA down/up shapes for ``{layer: (in_features, out_features)}`` in one naming style."""
    names = {"peft": (".lora_A.weight", ".lora_B.weight"), "kohya": (".lora_down.weight", ".lora_up.weight"),
             "xlabs": (".down.weight", ".up.weight")}[style]  # fmt: skip
    shapes: dict[str, tuple[int, ...]] = {}
    for stem, (fan_in, fan_out) in layers.items():
        shapes[stem + names[0]] = (rank, fan_in)
        shapes[stem + names[1]] = (fan_out, rank)
        if style == "kohya":
            shapes[stem + ".alpha"] = ()
    return shapes


def make_lora(path: Path, layers: Mapping[str, tuple[int, int]], style: Literal["peft", "kohya", "xlabs"]) -> Path:
    return write_safetensors(path, lora_pairs(layers, style))


# --------------------------------------------------------------------------------------- Olive

OliveMarker = Literal["none", "weights.pb", "onnx_data", "onnx.data", "workflow", "footprints"]


def make_onnx_folder(path: Path, marker: OliveMarker = "none", cls: str = "OnnxStableDiffusionPipeline") -> Path:
    """An ONNX pipeline folder with what an exporter leaves beside the models:

    - ``weights.pb``: diffusers' exporter's external weights; ``onnx_data``: Optimum's (``model.onnx_data``);
    - ``onnx.data``: Olive's (``model.onnx.data``); ``workflow``: the Olive workflow config the
      pipeline was optimised with; ``footprints``: Olive's run record (``footprints.json``).
    """
    path = make_onnx_pipeline(Path(path))
    unet = path / "unet"
    if marker in ("weights.pb", "onnx_data", "onnx.data"):
        name = {"weights.pb": "weights.pb", "onnx_data": "model.onnx_data", "onnx.data": "model.onnx.data"}[marker]
        (unet / name).write_bytes(b"\0" * 64)
    elif marker == "workflow":
        workflow = {
            "input_model": {"type": "PyTorchModel", "config": {"model_loader": "unet_load", "model_script": "user_script.py"}},
            "passes": {"convert": {"type": "OnnxConversion", "config": {"target_opset": 14}},
                       "optimize": {"type": "OrtTransformersOptimization", "config": {"model_type": "unet"}}},
            "engine": {"execution_providers": ["DmlExecutionProvider"]},
        }  # fmt: skip
        (path / "config_unet.json").write_text(json.dumps(workflow))
    elif marker == "footprints":
        (unet / "footprints.json").write_text(json.dumps({"0_OnnxConversion": {"from_pass": "OnnxConversion"}}))
    if cls != "OnnxStableDiffusionPipeline":
        index = json.loads((path / "model_index.json").read_text())
        index["_class_name"] = cls
        (path / "model_index.json").write_text(json.dumps(index))
    return path

