"""Tiny real models for the load tests: a diffusers pipeline folder, a single-file SD-1 checkpoint
with the original (LDM) key names, a LoRA, a VAE, an embedding. Shapes are small, files are real."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

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
def _unet_to_ldm(sd: dict[str, torch.Tensor], n_blocks: int) -> dict[str, torch.Tensor]:
    direct = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    resnet = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
              ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
    layer: list[tuple[str, str]] = []
    for i in range(n_blocks):
        for j in range(L):
            layer.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{(L + 1) * i + j + 1}.0."))
            if i < n_blocks - 1:
                layer.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{(L + 1) * i + j + 1}.1."))
        for j in range(L + 1):
            layer.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{(L + 1) * i + j}.0."))
            if i > 0:
                layer.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{(L + 1) * i + j}.1."))
        if i < n_blocks - 1:
            layer.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(L + 1) * (i + 1)}.0.op."))
            layer.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{(L + 1) * i + L}.{1 if i == 0 else 2}."))
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
        out["model.diffusion_model." + new] = value
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


def write_original_yaml(path: Path) -> Path:
    """The tiny model's original-format inference YAML (same schema as v1-inference.yaml)."""
    config = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "image_size": 8, "channels": 4,
        "scale_factor": 0.18215,
        "unet_config": {"params": {"image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32,
                                   "attention_resolutions": [1], "num_res_blocks": L, "channel_mult": [1, 2],
                                   "num_heads": 8, "use_spatial_transformer": True, "transformer_depth": 1,
                                   "context_dim": 64, "legacy": False}},
        "first_stage_config": {"params": {"embed_dim": 4, "ddconfig": {
            "double_z": True, "z_channels": 4, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32,
            "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}},
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
