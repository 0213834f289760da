"""Tiny real models for the load tests: a diffusers pipeline folder, single-file SD-1, SD-2 and SDXL
checkpoints and ControlNets with the original (LDM) key names, a LoRA, a VAE, an embedding. Shapes
are small, files are real."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
import yaml
from diffusers import AutoencoderKL, ControlNetModel, PNDMScheduler, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

L = 2  # layers per UNet block, as in SD-1
UNET_CFG = {"block_out_channels": (32, 64), "layers_per_block": L, "sample_size": 8, "in_channels": 4,
            "out_channels": 4, "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": 64,
            "attention_head_dim": 8}
VAE_CFG = {"block_out_channels": (32, 64), "layers_per_block": 1, "in_channels": 3, "out_channels": 3,
           "latent_channels": 4, "down_block_types": ("DownEncoderBlock2D",) * 2,
           "up_block_types": ("UpDecoderBlock2D",) * 2, "sample_size": 16}
CLIP_CFG = {"vocab_size": 16, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 1, "max_position_embeddings": 8, "hidden_act": "quick_gelu", "projection_dim": 64,
            "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
SCHED_CFG = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "skip_prk_steps": True,
             "steps_offset": 1}


def tiny_models(seed: int = 0) -> dict[str, torch.nn.Module]:
    torch.manual_seed(seed)
    return {"unet": UNet2DConditionModel(**UNET_CFG).eval(), "vae": AutoencoderKL(**VAE_CFG).eval(),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_CFG)).eval()}


def write_tokenizer(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    words = ["a", "cat", "dog", "photo", "of", "the"]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1} | {f"{w}</w>": i + 2 for i, w in enumerate(words)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=8).save_pretrained(folder)


def write_pipeline(root: Path, seed: int = 0) -> dict[str, torch.nn.Module]:
    """A diffusers SD-1-style pipeline folder; returns the models it holds (fp32)."""
    models = tiny_models(seed)
    for name, model in models.items():
        model.save_pretrained(root / name)
    write_tokenizer(root / "tokenizer")
    PNDMScheduler(**SCHED_CFG).save_pretrained(root / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "PNDMScheduler"]}
    (root / "model_index.json").write_text(json.dumps(index))
    return models


# ---- diffusers -> original (LDM) key names, the inverse of diffusers' single-file conversion ----
def _unet_to_ldm(sd: dict[str, torch.Tensor], n_blocks: int,
                 prefix: str = "model.diffusion_model.") -> dict[str, torch.Tensor]:
    direct = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    # an LDM output block numbers its upsampler after its attention, when it has one
    up_attention = {i for i in range(n_blocks) if any(k.startswith(f"up_blocks.{i}.attentions.") for k in sd)}
    resnet = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
              ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
    layer: list[tuple[str, str]] = []
    for i in range(n_blocks):
        for j in range(L):
            layer.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{(L + 1) * i + j + 1}.0."))
            layer.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{(L + 1) * i + j + 1}.1."))
        for j in range(L + 1):
            layer.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{(L + 1) * i + j}.0."))
            layer.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{(L + 1) * i + j}.1."))
        if i < n_blocks - 1:
            layer.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(L + 1) * (i + 1)}.0.op."))
            layer.append((f"up_blocks.{i}.upsamplers.0.",
                          f"output_blocks.{(L + 1) * i + L}.{2 if i in up_attention else 1}."))
    layer.append(("mid_block.attentions.0.", "middle_block.1."))
    layer += [(f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.") for j in range(2)]
    out = {}
    for key, value in sd.items():
        new = key
        for hf, ldm in direct.items():
            if key.startswith(hf + "."):
                new = ldm + key[len(hf):]
        if "resnets" in key:
            for hf, ldm in resnet:
                new = new.replace(hf, ldm)
        for hf, ldm in layer:
            new = new.replace(hf, ldm)
        out[prefix + new] = value
    return out


def _vae_to_ldm(sd: dict[str, torch.Tensor], n_blocks: int, layers: int) -> dict[str, torch.Tensor]:
    maps = [("conv_shortcut", "nin_shortcut"), ("conv_norm_out", "norm_out"), ("mid_block.attentions.0.", "mid.attn_1.")]
    for i in range(n_blocks):
        maps += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.") for j in range(layers)]
        maps += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{n_blocks - 1 - i}.block.{j}.")
                 for j in range(layers + 1)]
        if i < n_blocks - 1:
            maps.append((f"down_blocks.{i}.downsamplers.0.", f"down.{i}.downsample."))
            maps.append((f"up_blocks.{i}.upsamplers.0.", f"up.{n_blocks - 1 - i}.upsample."))
    maps += [(f"mid_block.resnets.{i}.", f"mid.block_{i + 1}.") for i in range(2)]
    attn = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")]
    out = {}
    for key, value in sd.items():
        new = key
        for hf, ldm in maps:
            new = new.replace(hf, ldm)
        if "attentions" in key or "attn_1" in new:
            for hf, ldm in attn:
                new = new.replace(hf, ldm)
            if value.ndim == 2:  # LDM attention projections are 1x1 convolutions
                value = value[:, :, None, None]
        out["first_stage_model." + new] = value.contiguous()
    return out


_TINY_FIRST_STAGE = {"params": {"embed_dim": 4, "ddconfig": {
    "double_z": True, "z_channels": 4, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32,
    "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}}


def write_original_yaml(path: Path) -> Path:
    """The tiny model's original-format inference YAML (same schema as v1-inference.yaml)."""
    config = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "image_size": 8, "channels": 4,
        "scale_factor": 0.18215,
        "unet_config": {"params": {"image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32,
                                   "attention_resolutions": [1], "num_res_blocks": L, "channel_mult": [1, 2],
                                   "num_heads": 8, "use_spatial_transformer": True, "transformer_depth": 1,
                                   "context_dim": 64, "legacy": False}},
        "first_stage_config": _TINY_FIRST_STAGE,
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}}}}
    path.write_text(yaml.safe_dump(config))
    return path


def write_checkpoint(path: Path, seed: int = 1, dtype: torch.dtype = torch.float16) -> dict[str, torch.nn.Module]:
    """A single-file SD-1 checkpoint with the original key names; returns the diffusers models it encodes."""
    models = tiny_models(seed)
    sd = _unet_to_ldm(models["unet"].state_dict(), 2)
    sd |= _vae_to_ldm(models["vae"].state_dict(), 2, 1)
    sd |= {"cond_stage_model.transformer.text_model." + k: v for k, v in models["text_encoder"].state_dict().items()}
    sd = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    save_file(sd, str(path))
    return models


def write_lora(path: Path, seed: int = 2) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    sd = {}
    for block in ("lora_unet_down_blocks_0_attentions_0_proj_in", "lora_te_text_model_encoder_layers_0_mlp_fc1"):
        sd[f"{block}.lora_down.weight"] = torch.randn(4, 32)
        sd[f"{block}.lora_up.weight"] = torch.randn(32, 4)
        sd[f"{block}.alpha"] = torch.tensor(4.0)
    save_file(sd, str(path))
    return sd


def write_embedding(path: Path, seed: int = 3) -> torch.Tensor:
    torch.manual_seed(seed)
    emb = torch.randn(2, 64)
    save_file({"emb_params": emb}, str(path))
    return emb


# ---- SD-2 and SDXL single files: OpenCLIP text encoders, linear-projection UNets, SDXL's text_time embedding ----
# OpenCLIP encoders use exact GELU; eos 2 is what the shipped configs say (pooling by argmax of the ids)
OPEN_CLIP_CFG: dict[str, Any] = CLIP_CFG | {"hidden_act": "gelu", "eos_token_id": 2, "projection_dim": 32}
SD2_UNET_CFG = UNET_CFG | {"attention_head_dim": (4, 8), "use_linear_projection": True}  # 8 channels per head
SDXL_TIME_DIM = 256  # SDXL's size-and-crop embedding width: fixed by the architecture, not stored in the file
SDXL_UNET_CFG: dict[str, Any] = {"block_out_channels": (32, 64), "layers_per_block": L, "sample_size": 8, "in_channels": 4,
                 "out_channels": 4, "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
                 "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "cross_attention_dim": 128,
                 "attention_head_dim": (4, 8), "use_linear_projection": True, "transformer_layers_per_block": (1, 2),
                 "addition_embed_type": "text_time", "addition_time_embed_dim": SDXL_TIME_DIM,
                 "projection_class_embeddings_input_dim": OPEN_CLIP_CFG["projection_dim"] + 6 * SDXL_TIME_DIM}
# the refiner conditions on OpenCLIP alone, and on 5 time ids (an aesthetic score instead of the target size)
SDXL_REFINER_UNET_CFG = SDXL_UNET_CFG | {
    "cross_attention_dim": OPEN_CLIP_CFG["hidden_size"],
    "projection_class_embeddings_input_dim": OPEN_CLIP_CFG["projection_dim"] + 5 * SDXL_TIME_DIM}


def open_clip_keys(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model's weights under OpenCLIP's names (fused q/k/v, ``resblocks``)."""
    names = [("embeddings.token_embedding.weight", "token_embedding.weight"),
             ("embeddings.position_embedding.weight", "positional_embedding"), ("final_layer_norm.", "ln_final."),
             ("encoder.layers.", "transformer.resblocks."), ("self_attn.out_proj.", "attn.out_proj."),
             ("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."), ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj.")]
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    out = {}
    for key, value in sd.items():
        if key == "text_projection.weight":  # OpenCLIP multiplies by a bare matrix: x @ P
            out[prefix + "text_projection"] = value.T.contiguous()
        elif ".self_attn." not in key or ".out_proj." in key:
            new = key
            for hf, oc in names:
                new = new.replace(hf, oc)
            out[prefix + new] = value
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}
    for n in sorted(layers):
        attn = f"encoder.layers.{n}.self_attn."
        for kind in ("weight", "bias"):
            fused = torch.cat([sd[f"{attn}{p}_proj.{kind}"] for p in "qkv"])
            out[f"{prefix}transformer.resblocks.{n}.attn.in_proj_{kind}"] = fused
    out[prefix + "logit_scale"] = torch.tensor(4.6052)  # in every OpenCLIP file, unused by a text encoder
    return out


def _save(path: Path, sd: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    save_file({k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}, str(path))


def write_sd2_checkpoint(path: Path, seed: int = 1, dtype: torch.dtype = torch.float32) -> dict[str, torch.nn.Module]:
    """A single-file SD-2 checkpoint (OpenCLIP under ``cond_stage_model.model.``); returns the diffusers models.

    SD-2 conditions on OpenCLIP's penultimate layer, so the file holds one more resblock than the
    diffusers text encoder it becomes (as the real 24-layer file becomes a 23-layer encoder)."""
    torch.manual_seed(seed)
    unet, vae = UNet2DConditionModel(**SD2_UNET_CFG).eval(), AutoencoderKL(**VAE_CFG).eval()
    layers = OPEN_CLIP_CFG["num_hidden_layers"]
    full = CLIPTextModel(CLIPTextConfig(**OPEN_CLIP_CFG | {"num_hidden_layers": layers + 1}))
    text_encoder = CLIPTextModel(CLIPTextConfig(**OPEN_CLIP_CFG)).eval()
    text_encoder.load_state_dict({k: v for k, v in full.state_dict().items()
                                  if not k.startswith(f"encoder.layers.{layers}.")})
    hidden = OPEN_CLIP_CFG["hidden_size"]
    sd = _unet_to_ldm(unet.state_dict(), 2) | _vae_to_ldm(vae.state_dict(), 2, 1)
    sd |= open_clip_keys(full.state_dict(), "cond_stage_model.model.")
    sd["cond_stage_model.model.text_projection"] = torch.randn(hidden, hidden)
    _save(path, sd, dtype)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder}


def write_sdxl_checkpoint(path: Path, seed: int = 1, dtype: torch.dtype = torch.float32,
                          refiner: bool = False) -> dict[str, torch.nn.Module]:
    """A single-file SDXL checkpoint: CLIP-L under ``conditioner.embedders.0.transformer.``, OpenCLIP
    bigG (with its projection) under ``conditioner.embedders.1.model.``; the refiner has only
    the latter, as ``conditioner.embedders.0.model.``."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**(SDXL_REFINER_UNET_CFG if refiner else SDXL_UNET_CFG)).eval()
    vae = AutoencoderKL(**VAE_CFG).eval()
    text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_CFG | {"eos_token_id": 2})).eval()
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**OPEN_CLIP_CFG)).eval()
    sd = _unet_to_ldm(unet.state_dict(), 2) | _vae_to_ldm(vae.state_dict(), 2, 1)
    models: dict[str, torch.nn.Module] = {"unet": unet, "vae": vae, "text_encoder_2": text_encoder_2}
    if not refiner:
        sd |= {"conditioner.embedders.0.transformer.text_model." + k: v for k, v in text_encoder.state_dict().items()}
        models["text_encoder"] = text_encoder
    sd |= open_clip_keys(text_encoder_2.state_dict(), f"conditioner.embedders.{0 if refiner else 1}.model.")
    _save(path, sd, dtype)
    return models


def _write_yaml(path: Path, network: str, unet: dict[str, Any], **params: Any) -> Path:
    config = {"model": {"params": {"scale_factor": 0.18215, **params, network: {"params": unet},
                                   "first_stage_config": _TINY_FIRST_STAGE}}}
    path.write_text(yaml.safe_dump(config))
    return path


_TINY_LINEAR_UNET = {"in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": L,
                     "channel_mult": [1, 2], "num_head_channels": 8, "use_spatial_transformer": True,
                     "use_linear_in_transformer": True, "legacy": False}


def write_sd2_yaml(path: Path) -> Path:
    """The tiny SD-2 model's original inference YAML (schema of v2-inference-v.yaml: v prediction)."""
    unet = _TINY_LINEAR_UNET | {"image_size": 8, "attention_resolutions": [1], "transformer_depth": 1,
                                "context_dim": 64}
    return _write_yaml(path, "unet_config", unet, parameterization="v", image_size=8, channels=4,
                       target="ldm.models.diffusion.ddpm.LatentDiffusion",
                       cond_stage_config={"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                                          "params": {"freeze": True, "layer": "penultimate"}})


def write_sdxl_yaml(path: Path, refiner: bool = False) -> Path:
    """The tiny SDXL model's original inference YAML (schema of sd_xl_base.yaml / sd_xl_refiner.yaml)."""
    cfg = SDXL_REFINER_UNET_CFG if refiner else SDXL_UNET_CFG
    unet = _TINY_LINEAR_UNET | {"adm_in_channels": cfg["projection_class_embeddings_input_dim"],
                                "num_classes": "sequential", "attention_resolutions": [2],
                                "transformer_depth": [1, 2], "context_dim": cfg["cross_attention_dim"]}
    return _write_yaml(path, "network_config", unet, scale_factor=0.13025)


# ---- ControlNets: the diffusers layout, or the original one (``control_model.*``) ----
# the original hint encoder is 8 convolutions (16, 16, 32, 32, 96, 96, 256 channels, then the model's);
# diffusers' conversion knows only that one, so the tiny ControlNets keep the default embedding
CONTROLNET_CFG = {"block_out_channels": (32, 64), "layers_per_block": L, "cross_attention_dim": 64,
                  "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"), "attention_head_dim": 8}
SDXL_CONTROLNET_CFG = {k: SDXL_UNET_CFG[k] for k in (
    "block_out_channels", "layers_per_block", "cross_attention_dim", "down_block_types", "attention_head_dim",
    "use_linear_projection", "transformer_layers_per_block", "addition_embed_type", "addition_time_embed_dim",
    "projection_class_embeddings_input_dim")}


def controlnet_to_ldm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers ControlNetModel's weights under the original (``control_model.``) names."""
    n_hint = len({k.split(".")[2] for k in sd if k.startswith("controlnet_cond_embedding.blocks.")})
    n_blocks = len({k.split(".")[1] for k in sd if k.startswith("down_blocks.")})
    rules = [(r"controlnet_cond_embedding\.conv_in\.", lambda m: "input_hint_block.0."),
             (r"controlnet_cond_embedding\.blocks\.(\d+)\.", lambda m: f"input_hint_block.{2 * int(m[1]) + 2}."),
             (r"controlnet_cond_embedding\.conv_out\.", lambda m: f"input_hint_block.{2 * n_hint + 2}."),
             (r"controlnet_down_blocks\.(\d+)\.", lambda m: f"zero_convs.{m[1]}.0."),
             (r"controlnet_mid_block\.", lambda m: "middle_block_out.0.")]
    out, rest = {}, {}
    for key, value in sd.items():
        for pattern, repl in rules:
            if re.match(pattern, key):
                out["control_model." + re.sub(pattern, repl, key, count=1)] = value
                break
        else:
            rest[key] = value
    return out | _unet_to_ldm(rest, n_blocks, prefix="control_model.")


def write_controlnet(path: Path, config: dict[str, Any], original: bool, seed: int = 4,
                     dtype: torch.dtype = torch.float32) -> ControlNetModel:
    """A single-file ControlNet, with original or diffusers key names; returns the model it encodes."""
    torch.manual_seed(seed)
    model = ControlNetModel(**config).eval()
    sd = model.state_dict()
    _save(path, controlnet_to_ldm(sd) if original else dict(sd), dtype)
    return model


# ---- the variants of a base (inpaint: 9 UNet input channels, depth: 5) and the shipped YAMLs that describe them ----
_VARIANT_UNET_CFGS: dict[str, dict[str, Any]] = {"sd-1": UNET_CFG, "sd-2": SD2_UNET_CFG, "sdxl": SDXL_UNET_CFG}


def write_variant_checkpoint(path: Path, base: str, in_channels: int, seed: int = 1,
                             dtype: torch.dtype = torch.float32) -> dict[str, torch.nn.Module]:
    """A single-file checkpoint of ``base`` (sd-1, sd-2, sdxl) whose UNet takes ``in_channels``; returns
    the diffusers models it encodes."""
    from safetensors.torch import load_file

    writers = {"sd-1": write_checkpoint, "sd-2": write_sd2_checkpoint, "sdxl": write_sdxl_checkpoint}
    models = writers[base](path, seed=seed, dtype=dtype)
    torch.manual_seed(seed + 1000)
    unet = UNet2DConditionModel(**_VARIANT_UNET_CFGS[base] | {"in_channels": in_channels}).eval()
    rest = {k: v for k, v in load_file(str(path)).items() if not k.startswith("model.diffusion_model.")}
    _save(path, rest | _unet_to_ldm(unet.state_dict(), 2), dtype)
    return models | {"unet": unet}


def write_tiny_yaml_like(shipped: Path, path: Path, base: str) -> Path:
    """A shipped original YAML shrunk to the tiny models of ``base``: the network's sizes, the first
    stage and the latent size come from the tiny YAML of that base; everything else (parameterization,
    the UNet's input channels, the conditioning, a depth stage) stays as shipped."""
    writers = {"sd-1": write_original_yaml, "sd-2": write_sd2_yaml, "sdxl": write_sdxl_yaml}
    tiny = yaml.safe_load(writers[base](path).read_text())["model"]["params"]
    config = yaml.safe_load(shipped.read_text())
    params = config["model"]["params"]
    network = "network_config" if "network_config" in params else "unet_config"
    sizes = {k: v for k, v in tiny[network]["params"].items() if k != "in_channels"}
    params[network]["params"] |= sizes
    params["first_stage_config"]["params"] = tiny["first_stage_config"]["params"]
    if "image_size" in tiny:
        params["image_size"] = tiny["image_size"]
    path.write_text(yaml.safe_dump(config))
    return path


# ---- FLUX in BFL's layout; tiny T5 and CLIP image encoders ----
# diffusers' FLUX names -> BFL's, per double block (``transformer_blocks.N.``) and single block
_BFL_DOUBLE = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
               "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
               "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
               "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
               "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
               "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0",
               "ff_context.net.2": "txt_mlp.2", "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj"}
_BFL_SINGLE = {"norm.linear": "modulation.lin", "attn.norm_q.weight": "norm.query_norm.scale",
               "attn.norm_k.weight": "norm.key_norm.scale", "proj_out": "linear2"}
_BFL_TOP = {"time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
            "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
            "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
            "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
            "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
            "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
            "context_embedder": "txt_in", "x_embedder": "img_in", "proj_out": "final_layer.linear"}


def flux_to_bfl(sd: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A diffusers FluxTransformer2DModel's weights in BFL's layout (the inverse of diffusers'
    conversion): q/k/v fused per stream, a single block's q/k/v/MLP fused into ``linear1``."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if m := re.match(r"(single_)?transformer_blocks\.(\d+)\.(.+)$", key):
            single, n, rest = m.groups()
            table, stem = (_BFL_SINGLE, f"single_blocks.{n}.") if single else (_BFL_DOUBLE, f"double_blocks.{n}.")
            for hf, bfl in table.items():
                if rest == hf or rest.startswith(hf + "."):
                    out[stem + bfl + rest[len(hf):]] = value
        elif key.startswith("norm_out.linear."):  # BFL's final modulation is (shift, scale), diffusers' (scale, shift)
            scale, shift = value.chunk(2)
            out["final_layer.adaLN_modulation.1." + key.rsplit(".", 1)[1]] = torch.cat([shift, scale])
        else:
            stem, kind = key.rsplit(".", 1)
            out[f"{_BFL_TOP[stem]}.{kind}"] = value
    for kind in ("weight", "bias"):
        for n in sorted({int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")}):
            b = f"transformer_blocks.{n}.attn."
            out[f"double_blocks.{n}.img_attn.qkv.{kind}"] = torch.cat([sd[f"{b}to_{p}.{kind}"] for p in "qkv"])
            out[f"double_blocks.{n}.txt_attn.qkv.{kind}"] = torch.cat([sd[f"{b}add_{p}_proj.{kind}"] for p in "qkv"])
        for n in sorted({int(k.split(".")[1]) for k in sd if k.startswith("single_transformer_blocks.")}):
            b = f"single_transformer_blocks.{n}."
            out[f"single_blocks.{n}.linear1.{kind}"] = torch.cat(
                [sd[f"{b}attn.to_{p}.{kind}"] for p in "qkv"] + [sd[f"{b}proj_mlp.{kind}"]])
    return {prefix + k: v for k, v in out.items()}


T5_CFG: dict[str, Any] = {"vocab_size": 32, "d_model": 16, "d_kv": 4, "num_heads": 4, "d_ff": 32, "num_layers": 2,
          "relative_attention_num_buckets": 8, "feed_forward_proj": "gated-gelu", "is_encoder_decoder": False,
          "use_cache": False}
# 64 wide: one 64-wide head, as the loader reads OpenAI's CLIP towers
CLIP_VISION_CFG: dict[str, Any] = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 1,
                   "image_size": 32, "patch_size": 8, "projection_dim": 32, "hidden_act": "quick_gelu"}


def write_t5_encoder(path: Path, config: dict[str, Any] = T5_CFG, seed: int = 5,
                     embedding: str = "shared.weight") -> torch.nn.Module:
    """A T5EncoderModel as one fp16 file; its (tied) embedding stored once, under ``embedding``."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    model = T5EncoderModel(T5Config(**config)).eval()
    tied = {"shared.weight", "encoder.embed_tokens.weight"}
    sd = {k: v for k, v in model.state_dict().items() if k not in tied} | {embedding: model.shared.weight}
    _save(path, sd, torch.float16)
    return model


def write_clip_vision(path: Path, config: dict[str, Any] = CLIP_VISION_CFG, seed: int = 6,
                      projection: bool = True, extra: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """A CLIP image encoder (with its projection, or without) as one fp16 file, plus ``extra`` tensors."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    cls = CLIPVisionModelWithProjection if projection else CLIPVisionModel
    model = cls(CLIPVisionConfig(**config)).eval()
    sd = dict(model.state_dict()) if projection else {f"vision_model.{k}": v for k, v in model.state_dict().items()}
    _save(path, sd | (extra or {}), torch.float16)
    return model


# ---- IP-Adapters in h94's layout (``image_proj.*``, ``ip_adapter.*``), sized to a tiny UNet ----
IP_CLIP_EMBED = 32     # the CLIP image encoder's pooled (projected) embedding
IP_CLIP_HIDDEN = 48    # its hidden states' width (Plus and FaceID Plus read those)
IP_RESAMPLER = 64      # a resampler's width: one 64-wide head, as diffusers reads heads (width // 64)
IP_FACE_ID = 16        # the face recognition model's embedding (FaceID)
IP_LORA_RANK = 4
IPKind = str  # "ip_adapter", "ip_adapter_plus", "ip_adapter_full", "faceid", "faceid_plus"


def _ip_resampler(prefix: str, width: int, layers: int = 4) -> dict[str, tuple[int, ...]]:
    """Shapes of h94's perceiver layers (attention ``0``, feed-forward ``1``: LayerNorm, Linear, GELU, Linear)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(layers):
        p = f"{prefix}layers.{i}."
        shapes |= {p + "0.norm1.weight": (width,), p + "0.norm1.bias": (width,), p + "0.norm2.weight": (width,),
                   p + "0.norm2.bias": (width,), p + "0.to_q.weight": (64, width), p + "0.to_kv.weight": (128, width),
                   p + "0.to_out.weight": (width, 64), p + "1.0.weight": (width,), p + "1.0.bias": (width,),
                   p + "1.1.weight": (4 * width, width), p + "1.3.weight": (width, 4 * width)}
    return shapes


def ip_image_proj_shapes(kind: IPKind, context: int) -> dict[str, tuple[int, ...]]:
    """The ``image_proj`` shapes of each kind of IP-Adapter for a UNet of cross-attention width ``context``."""
    e, w, r, i = IP_CLIP_EMBED, IP_CLIP_HIDDEN, IP_RESAMPLER, IP_FACE_ID
    if kind == "ip_adapter":  # 4 tokens from the pooled embedding
        return {"proj.weight": (4 * context, e), "proj.bias": (4 * context,), "norm.weight": (context,),
                "norm.bias": (context,)}
    if kind == "ip_adapter_plus":  # 16 learnt queries resampling the hidden states
        return {"latents": (1, 16, r), "proj_in.weight": (r, w), "proj_in.bias": (r,), "proj_out.weight": (context, r),
                "proj_out.bias": (context,), "norm_out.weight": (context,), "norm_out.bias": (context,),
                **_ip_resampler("", r)}
    if kind == "ip_adapter_full":  # one token per hidden state
        return {"proj.0.weight": (e, e), "proj.0.bias": (e,), "proj.2.weight": (context, e), "proj.2.bias": (context,),
                "proj.3.weight": (context,), "proj.3.bias": (context,)}
    if kind == "faceid":  # 4 tokens from the face embedding
        return {"proj.0.weight": (2 * i, i), "proj.0.bias": (2 * i,), "proj.2.weight": (4 * context, 2 * i),
                "proj.2.bias": (4 * context,), "norm.weight": (context,), "norm.bias": (context,)}
    if kind == "faceid_plus":  # 4 face tokens resampling the CLIP hidden states
        q = "perceiver_resampler."
        return {"proj.0.weight": (2 * i, i), "proj.0.bias": (2 * i,), "proj.2.weight": (4 * r, 2 * i),
                "proj.2.bias": (4 * r,), "norm.weight": (r,), "norm.bias": (r,), q + "proj_in.weight": (r, w),
                q + "proj_in.bias": (r,), q + "proj_out.weight": (context, r), q + "proj_out.bias": (context,),
                q + "norm_out.weight": (context,), q + "norm_out.bias": (context,), **_ip_resampler(q, r)}
    raise ValueError(f"unknown IP-Adapter kind {kind!r}")


def ip_layer_shapes(unet: Any, lora: bool = False) -> dict[str, tuple[int, ...]]:
    """The ``ip_adapter`` shapes for ``unet``: image keys and values on each cross-attention layer, numbered
    by the place of its processor among all of the UNet's; FaceID's LoRA on every attention layer."""
    shapes: dict[str, tuple[int, ...]] = {}
    for index, name in enumerate(unet.attn_processors):
        attn: Any = unet.get_submodule(name.removesuffix(".processor"))
        if not name.endswith("attn1.processor"):
            shapes |= {f"{index}.to_k_ip.weight": tuple(attn.to_k.weight.shape),
                       f"{index}.to_v_ip.weight": tuple(attn.to_v.weight.shape)}
        if lora:
            for proj, layer in (("to_q", attn.to_q), ("to_k", attn.to_k), ("to_v", attn.to_v),
                                ("to_out", attn.to_out[0])):
                shapes |= {f"{index}.{proj}_lora.down.weight": (IP_LORA_RANK, layer.in_features),
                           f"{index}.{proj}_lora.up.weight": (layer.out_features, IP_LORA_RANK)}
    return shapes


def ip_adapter_state(kind: IPKind, unet: Any, seed: int = 7) -> dict[str, dict[str, torch.Tensor]]:
    """``{"image_proj": ..., "ip_adapter": ...}`` of a random IP-Adapter of ``kind`` for ``unet``."""
    torch.manual_seed(seed)
    context = int(unet.config.cross_attention_dim)
    groups = {"image_proj": ip_image_proj_shapes(kind, context),
              "ip_adapter": ip_layer_shapes(unet, lora=kind.startswith("faceid"))}
    return {group: {k: torch.randn(shape) / 4 for k, shape in shapes.items()} for group, shapes in groups.items()}


def write_ip_adapter(path: Path, state: dict[str, dict[str, torch.Tensor]], image_encoder: str = "") -> Path:
    """By suffix: ``.safetensors`` (flat, prefixed keys), another (``.bin``) a torch pickle of the nested
    dicts as h94 saves them; no suffix: InvokeAI's folder (``ip_adapter.bin`` and ``image_encoder.txt``)."""
    if not path.suffix:
        path.mkdir(parents=True, exist_ok=True)
        (path / "image_encoder.txt").write_text(image_encoder + "\n")
        torch.save(state, path / "ip_adapter.bin")
    elif path.suffix == ".safetensors":
        save_file({f"{group}.{k}": v.contiguous() for group, tensors in state.items() for k, v in tensors.items()},
                  str(path))
    else:
        torch.save(state, path)
    return path


# ---- SD-3 / SD-3.5 main files: Stability's layout (``joint_blocks``) or diffusers', alone or bundled ----
# SD-3's heads are 64 wide and leave no trace in its weights (no per-head norm): the tiny SD-3 keeps
# that width. SD-3.5 medium normalises queries per head, so its tiny twin can show narrower heads.
# The pooled text is CLIP-L's projection beside CLIP-G's, as SD-3's 2048 is 768 + 1280.
SD3_CFG: dict[str, Any] = {
    "sample_size": 32, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 2,
    "attention_head_dim": 64, "num_attention_heads": 2, "joint_attention_dim": 32, "caption_projection_dim": 128,
    "pooled_projection_dim": CLIP_CFG["projection_dim"] + OPEN_CLIP_CFG["projection_dim"], "pos_embed_max_size": 16}
# MMDiT-X: a second image-only attention in the first blocks, RMS-normalised queries and keys
SD35_MEDIUM_CFG: dict[str, Any] = SD3_CFG | {"num_layers": 3, "attention_head_dim": 16, "caption_projection_dim": 32,
                                             "dual_attention_layers": (0, 1), "qk_norm": "rms_norm"}
# SD-3's VAE: 16 latent channels and no quant convolutions
SD3_VAE_CFG: dict[str, Any] = VAE_CFG | {"latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False}
SD3_CLIP_L_CFG: dict[str, Any] = CLIP_CFG | {"eos_token_id": 2}  # as the shipped CLIP-L config: pooled at the largest id

_SAI_TOP = {"pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder",
            "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
            "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
            "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
            "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2", "proj_out": "final_layer.linear"}
_SAI_BLOCK = {"attn.norm_q.weight": "x_block.attn.ln_q.weight", "attn.norm_k.weight": "x_block.attn.ln_k.weight",
              "attn.norm_added_q.weight": "context_block.attn.ln_q.weight",
              "attn.norm_added_k.weight": "context_block.attn.ln_k.weight",
              "attn2.norm_q.weight": "x_block.attn2.ln_q.weight", "attn2.norm_k.weight": "x_block.attn2.ln_k.weight",
              "attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
              "attn2.to_out.0": "x_block.attn2.proj", "norm1.linear": "x_block.adaLN_modulation.1",
              "norm1_context.linear": "context_block.adaLN_modulation.1", "ff.net.0.proj": "x_block.mlp.fc1",
              "ff.net.2": "x_block.mlp.fc2", "ff_context.net.0.proj": "context_block.mlp.fc1",
              "ff_context.net.2": "context_block.mlp.fc2"}
# diffusers' separate projections -> Stability's fused q/k/v, per stream
_SAI_FUSED = {"x_block.attn.qkv": "attn.to_{}", "context_block.attn.qkv": "attn.add_{}_proj",
              "x_block.attn2.qkv": "attn2.to_{}"}
_SAI_SPLIT = re.compile(r"attn2?\.(to_[qkv]|add_[qkv]_proj)\.")


def _shift_scale(value: torch.Tensor) -> torch.Tensor:
    """Stability's final modulations are (shift, scale), diffusers' (scale, shift): the swap is its own inverse."""
    first, second = value.chunk(2)
    return torch.cat([second, first])


def sd3_to_sai(sd: dict[str, torch.Tensor], prefix: str = "model.diffusion_model.") -> dict[str, torch.Tensor]:
    """An SD3Transformer2DModel's weights in Stability's layout (the inverse of diffusers' conversion).
    A tensor this does not know fails here, so the file never silently lacks one."""
    last = max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key == "pos_embed.pos_embed":
            out["pos_embed"] = value
        elif key.startswith("norm_out.linear."):
            out["final_layer.adaLN_modulation.1." + key.rsplit(".", 1)[1]] = _shift_scale(value)
        elif m := re.match(r"transformer_blocks\.(\d+)\.(.+)$", key):
            n, rest = int(m[1]), m[2]
            if _SAI_SPLIT.match(rest):
                continue
            hf, sai = next((hf, sai) for hf, sai in _SAI_BLOCK.items() if rest == hf or rest.startswith(hf + "."))
            if n == last and hf == "norm1_context.linear":  # the last context block only modulates its input
                value = _shift_scale(value)
            out[f"joint_blocks.{n}.{sai}{rest[len(hf):]}"] = value
        else:
            stem, kind = key.rsplit(".", 1)
            out[f"{_SAI_TOP[stem]}.{kind}"] = value
    for n in range(last + 1):
        for sai, hf in _SAI_FUSED.items():
            for kind in ("weight", "bias"):
                parts = [sd.get(f"transformer_blocks.{n}.{hf.format(p)}.{kind}") for p in "qkv"]
                if all(p is not None for p in parts):
                    out[f"joint_blocks.{n}.{sai}.{kind}"] = torch.cat([p for p in parts if p is not None])
    return {prefix + k: v for k, v in out.items()}


def write_sd3_checkpoint(path: Path, *, medium: bool = False, layout: str = "sai", prefix: str = "",
                         bundle: bool = False, clip_l_projection: bool = True, seed: int = 8,
                         dtype: torch.dtype = torch.float16) -> dict[str, torch.nn.Module]:
    """A single-file SD-3 (``medium``: SD-3.5 medium-like) transformer, in Stability's ``layout``
    ("sai") or diffusers' under ``prefix``. A ``bundle`` adds what Stability's and ComfyUI's
    all-in-one files carry: the VAE (``first_stage_model.``), CLIP-L and CLIP-G (``text_encoders.clip_l|g.
    transformer.``, without CLIP-L's projection unless ``clip_l_projection``) and a T5 (``text_encoders.t5xxl.``).
    Returns the models the file encodes, as their weights load from it (rounded through ``dtype``)."""
    from diffusers import SD3Transformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer: Any = SD3Transformer2DModel(**(SD35_MEDIUM_CFG if medium else SD3_CFG))
    models: dict[str, torch.nn.Module] = {"transformer": transformer.eval()}
    state = transformer.state_dict()
    sd = sd3_to_sai(state, prefix) if layout == "sai" else {prefix + k: v for k, v in state.items()}
    if bundle:
        vae: Any = AutoencoderKL(**SD3_VAE_CFG)
        vae.eval()
        clip_l = CLIPTextModelWithProjection(CLIPTextConfig(**SD3_CLIP_L_CFG)).eval()
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**OPEN_CLIP_CFG)).eval()
        if not clip_l_projection:  # what the loader then gives it: SD-3's reference starts it as the identity
            clip_l.text_projection.weight.data = torch.eye(clip_l.config.hidden_size)
        t5 = T5EncoderModel(T5Config(**T5_CFG)).eval()
        models |= {"vae": vae, "text_encoder": clip_l, "text_encoder_2": clip_g}
        models["text_encoder_3"] = t5
        sd |= _vae_to_ldm(vae.state_dict(), 2, 1)
        sd |= {f"text_encoders.clip_l.transformer.{k}": v for k, v in clip_l.state_dict().items()
               if clip_l_projection or k != "text_projection.weight"}
        sd |= {f"text_encoders.clip_g.transformer.{k}": v for k, v in clip_g.state_dict().items()}
        sd |= {f"text_encoders.t5xxl.transformer.{k}": v for k, v in t5.state_dict().items()
               if k != "encoder.embed_tokens.weight"}
    _save(path, sd, dtype)
    for model in models.values():  # what the file holds: the weights rounded through its dtype
        model.load_state_dict({k: v.to(dtype).float() if v.is_floating_point() else v
                               for k, v in model.state_dict().items()})
    return models
