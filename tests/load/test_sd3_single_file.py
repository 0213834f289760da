"""SD-3 and SD-3.5 main single files (base ``sd-3``), loaded offline through the load service.

The transformer comes in Stability's layout (``joint_blocks``, fused q/k/v: diffusers' own
conversion renames it) or in diffusers', alone or bundled with the VAE and CLIP text encoders
(Stability's and ComfyUI's all-in-one files). No file carries a config: every model is compared
weight for weight with the model the file was written from, and by a forward pass against that
same model, which checks what the weights alone cannot say (heads, activations, pooling).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

from modelbus.services.load import InvalidModelException, ModelLoadService, checkpoints
from modelbus.services.load.estimate import estimate_bytes
from modelbus.services.load.kit import LoadRequest
from modelbus.services.records.enums import SubModelType
from tests.fixtures import loadable as builders
from tests.fixtures import transformer_files as probe

IDS = torch.tensor([[0, 5, 9, 3, 15, 1, 1, 1]])  # CLIP pools at the largest id (15)


def _same(model: Any, ref: Any) -> bool:
    got, want = model.state_dict(), ref.state_dict()
    return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def _is(obj: Any, cls: type) -> bool:
    """``isinstance`` that leaves ``obj`` typed Any (mypy sees diffusers' classes through lazy imports)."""
    return isinstance(obj, cls)


def _denoised(model: Any, cfg: dict[str, Any]) -> torch.Tensor:
    torch.manual_seed(0)
    inputs = {"hidden_states": torch.randn(1, cfg["in_channels"], 8, 8),
              "encoder_hidden_states": torch.randn(1, 3, cfg["joint_attention_dim"]),
              "pooled_projections": torch.randn(1, cfg["pooled_projection_dim"]), "timestep": torch.tensor([500.0])}
    with torch.no_grad():
        return model(**inputs).sample  # type: ignore[no-any-return]


def _encoded(model: Any) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        out = model(IDS)
    return out.last_hidden_state, out.text_embeds


def _sd3(config: Any, add: Any, name: str, **options: Any) -> tuple[str, dict[str, torch.nn.Module]]:
    models = builders.write_sd3_checkpoint(config.models_path / name, **options)
    return add(name, "main", "checkpoint", base="sd-3"), models


@pytest.mark.parametrize(("layout", "prefix", "medium"), [
    ("sai", "model.diffusion_model.", False), ("sai", "", False), ("sai", "model.diffusion_model.", True),
    ("diffusers", "", False), ("diffusers", "model.diffusion_model.", True)])
def test_sd3_transformer(service: ModelLoadService, config: Any, add: Any, layout: str, prefix: str,
                         medium: bool) -> None:
    key, ref = _sd3(config, add, "sd3.safetensors", medium=medium, layout=layout, prefix=prefix)
    cfg = builders.SD35_MEDIUM_CFG if medium else builders.SD3_CFG
    with service.get_model(key, SubModelType.UNet) as model:
        assert _is(model, SD3Transformer2DModel)
        # everything but the default latent side is read from the weights: SD-3's heads (64) from
        # the width alone, SD-3.5's from their norms, and its MMDiT-X blocks from their attn2
        expected = {"dual_attention_layers": (), "qk_norm": None} | {k: v for k, v in cfg.items() if k != "sample_size"}
        assert {k: model.config[k] for k in expected} == expected and model.config.sample_size == 128
        assert _same(model, ref["transformer"])
        assert torch.equal(_denoised(model, cfg), _denoised(ref["transformer"], cfg))


def test_sd3_bundle_serves_its_parts(service: ModelLoadService, config: Any, add: Any) -> None:
    key, ref = _sd3(config, add, "sd3-all.safetensors", prefix="model.diffusion_model.", bundle=True)
    for sub in (SubModelType.Transformer, SubModelType.UNet):  # unet: the alias it was served as before
        with service.get_model(key, sub) as model:
            assert _is(model, SD3Transformer2DModel) and _same(model, ref["transformer"])
            assert torch.equal(_denoised(model, builders.SD3_CFG), _denoised(ref["transformer"], builders.SD3_CFG))
    for sub in (SubModelType.Vae, SubModelType.VaeDecoder):
        with service.get_model(key, sub) as vae:
            assert _is(vae, AutoencoderKL) and _same(vae, ref["vae"])
            assert (vae.config.latent_channels, vae.config.use_quant_conv, vae.config.use_post_quant_conv) == (
                16, False, False)
            assert (vae.config.scaling_factor, vae.config.shift_factor) == (1.5305, 0.0609)
            torch.manual_seed(0)
            latents, pixels = torch.randn(1, 16, 4, 4), torch.randn(1, 3, 16, 16)
            with torch.no_grad():
                assert torch.equal(vae.decode(latents).sample, ref["vae"].decode(latents).sample)  # type: ignore[operator]
                assert torch.equal(vae.encode(pixels).latent_dist.mean,
                                   ref["vae"].encode(pixels).latent_dist.mean)  # type: ignore[operator]
    for sub, act in ((SubModelType.TextEncoder, "quick_gelu"), (SubModelType.TextEncoder2, "gelu")):
        with service.get_model(key, sub) as encoder:
            assert type(encoder) is CLIPTextModelWithProjection and encoder.config.hidden_act == act
            assert _same(encoder, ref[sub.value])
            assert all(torch.equal(a, b) for a, b in zip(_encoded(encoder), _encoded(ref[sub.value]), strict=True))
    with service.get_model(key, SubModelType.TextEncoder3) as t5:
        # every size read from the shapes: the test's T5 is nothing like T5-XXL
        assert type(t5) is T5EncoderModel and t5.config.feed_forward_proj == "gated-gelu"
        assert (t5.config.d_model, t5.config.num_heads, t5.config.num_layers) == (16, 4, 2)
        assert t5.shared.weight is t5.encoder.embed_tokens.weight and _same(t5, ref["text_encoder_3"])
        ids = torch.tensor([[3, 17, 9, 1]])
        with torch.no_grad():
            assert torch.equal(t5(ids).last_hidden_state, ref["text_encoder_3"](ids).last_hidden_state)
    with pytest.raises(InvalidModelException, match=r"sd3-all\.safetensors: an SD-3 checkpoint carries no T5 "
                                                    r"tokenizer \(tokenizer_3\)"):
        service.get_model(key, SubModelType.Tokenizer3)
    with service.get_model(key, SubModelType.Tokenizer) as tok, service.get_model(key, SubModelType.Tokenizer2) as tok2:
        assert isinstance(tok, CLIPTokenizer) and (tok.pad_token, tok2.pad_token) == ("<|endoftext|>", "!")
        assert tok("a cat")["input_ids"] == tok2("a cat")["input_ids"] == [49406, 320, 2368, 49407]
    with service.get_model(key, SubModelType.Scheduler) as scheduler:
        assert _is(scheduler, FlowMatchEulerDiscreteScheduler) and scheduler.config.shift == 3.0
    with pytest.raises(InvalidModelException, match=r"sd3-all\.safetensors: an sd-3 checkpoint has no safety_checker"):
        service.get_model(key, SubModelType.SafetyChecker)


def test_sd3_clip_l_without_its_projection_gets_the_identity(service: ModelLoadService, config: Any,
                                                             add: Any) -> None:
    key, ref = _sd3(config, add, "sd3-all.safetensors", bundle=True, clip_l_projection=False)
    with service.get_model(key, SubModelType.TextEncoder) as encoder:
        assert torch.equal(encoder.text_projection.weight, torch.eye(encoder.config.hidden_size))
        assert _same(encoder, ref["text_encoder"])
        assert all(torch.equal(a, b) for a, b in zip(_encoded(encoder), _encoded(ref["text_encoder"]), strict=True))


def _request(store: Any, key: str, path: Path, sub: SubModelType, dtype: torch.dtype) -> LoadRequest:
    return LoadRequest(store.get_model(key), path, sub, torch.device("cpu"), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["sai", "diffusers"])
def test_sd3_estimate_counts_what_the_submodel_reads(config: Any, add: Any, store: Any, layout: str,
                                                     dtype: torch.dtype) -> None:
    key, _ = _sd3(config, add, "sd3-all.safetensors", layout=layout, prefix="model.diffusion_model.", bundle=True)
    path = config.models_path / "sd3-all.safetensors"
    whole = sum(t.numel() for t in load_file(str(path)).values()) * dtype.itemsize
    counted = 0
    for sub in (SubModelType.UNet, SubModelType.Vae, SubModelType.TextEncoder, SubModelType.TextEncoder2):
        request = _request(store, key, path, sub, dtype)
        estimate = estimate_bytes(request)
        loaded = checkpoints.load_main_checkpoint(request)
        # what the model holds from the file (CLIP's position ids are built, not read)
        assert estimate == sum(t.nbytes for t in loaded.model.state_dict().values()) > 0, sub
        if layout == "diffusers":  # nothing converted, nothing copied: the buffer is what was read
            assert loaded.buffer is not None and loaded.buffer.numel() < 1.1 * estimate, sub
        counted += estimate
    request = _request(store, key, path, SubModelType.TextEncoder3, dtype)
    estimate, t5 = estimate_bytes(request), checkpoints.load_main_checkpoint(request).model
    # T5's embedding is tied (once in parameters()); its fp16-unsafe layers, kept fp32, count at dtype
    assert estimate == sum(p.numel() for p in t5.parameters()) * dtype.itemsize > 0
    assert counted + estimate == whole  # every tensor of the bundle belongs to one submodel
    for sub in (SubModelType.Tokenizer, SubModelType.Scheduler):
        assert estimate_bytes(_request(store, key, path, sub, dtype)) == 0


def test_sd3_file_without_bundled_parts(service: ModelLoadService, config: Any, add: Any) -> None:
    key, _ = _sd3(config, add, "sd3.safetensors", prefix="model.diffusion_model.")
    lacks = {SubModelType.TextEncoder: r"CLIP-L text encoder \(text_encoders\.clip_l\.transformer\.\*\)",
             SubModelType.TextEncoder2: r"CLIP-G text encoder \(text_encoders\.clip_g\.transformer\.\*\)",
             SubModelType.Vae: r"VAE \(first_stage_model\.\|vae\.\*\)",
             SubModelType.TextEncoder3: r"T5 text encoder \(text_encoders\.t5xxl\.transformer\.\*\)"}
    for sub, what in lacks.items():
        with pytest.raises(InvalidModelException, match=rf"sd3\.safetensors: this SD-3 checkpoint bundles no {what}"):
            service.get_model(key, sub)
    # what ships with the project still comes
    with service.get_model(key, SubModelType.Tokenizer2) as tokenizer, \
            service.get_model(key, SubModelType.Scheduler) as scheduler:
        assert tokenizer.pad_token == "!" and scheduler.config.shift == 3.0


def test_sd3_transformer_errors(service: ModelLoadService, config: Any, add: Any) -> None:
    def sd3(name: str, state: dict[str, torch.Tensor]) -> str:
        save_file({k: v.contiguous() for k, v in state.items()}, str(config.models_path / name))
        return add(name, "main", "checkpoint", base="sd-3")

    builders.write_sd3_checkpoint(config.models_path / "sai.safetensors", prefix="model.diffusion_model.")
    sai = load_file(str(config.models_path / "sai.safetensors"))
    partial = {k: v for k, v in sai.items() if not k.startswith("model.diffusion_model.final_layer.linear.")}
    with pytest.raises(InvalidModelException, match=r"partial\.safetensors: incomplete SAI-layout SD-3 transformer: "
                                                    r"no tensor 'final_layer\.linear\.weight'"):
        service.get_model(sd3("partial.safetensors", partial), SubModelType.UNet)
    table = sai["model.diffusion_model.pos_embed"]
    skewed = sai | {"model.diffusion_model.pos_embed": table[:, :-1]}
    with pytest.raises(InvalidModelException, match=r"skewed\.safetensors: SD-3 transformer positional table of shape "
                                                    r"\(1, 255, 128\) is no square grid"):
        service.get_model(sd3("skewed.safetensors", skewed), SubModelType.UNet)
    builders.write_sd3_checkpoint(config.models_path / "medium.safetensors", medium=True, layout="diffusers")
    medium = load_file(str(config.models_path / "medium.safetensors"))
    norm = "transformer_blocks.0.attn.norm_q.weight"
    with pytest.raises(InvalidModelException, match=r"heads\.safetensors: SD-3 transformer width 32 is not a multiple "
                                                    r"of its head width 12"):
        service.get_model(sd3("heads.safetensors", medium | {norm: medium[norm][:12]}), SubModelType.UNet)
    builders.write_sd1_checkpoint(config.models_path / "sd1.safetensors")
    probe.make_flux_diffusers_file(config.models_path / "flux.safetensors")
    for name in ("sd1.safetensors", "flux.safetensors"):  # an SD-1 UNet; FLUX's linear x_embedder
        with pytest.raises(InvalidModelException, match=rf"{name}: no SD-3 transformer weights"):
            service.get_model(add(name, "main", "checkpoint", base="sd-3"), SubModelType.UNet)


def test_sd3_diffusers_folder_serves_transformer_and_t5(service: ModelLoadService, config: Any, add: Any) -> None:
    models = builders.write_sd3_checkpoint(config.models_path / "sd3-all.safetensors", bundle=True)
    root = config.models_path / "sd3-pipe"
    models["transformer"].save_pretrained(root / "transformer")  # type: ignore[operator]
    models["text_encoder_3"].save_pretrained(root / "text_encoder_3")  # type: ignore[operator]
    index = {"transformer": ["diffusers", "SD3Transformer2DModel"], "text_encoder_3": ["transformers", "T5EncoderModel"]}
    (root / "model_index.json").write_text(json.dumps(index))
    shutil.copytree(root, config.models_path / "sd3-no-index", ignore=shutil.ignore_patterns("model_index.json"))
    for name in ("sd3-pipe", "sd3-no-index"):  # without an index: the transformer's config names its class
        key = add(name, "main", "diffusers", base="sd-3")
        with service.get_model(key, SubModelType.Transformer) as model, \
                service.get_model(key, SubModelType.TextEncoder3) as t5:
            assert _is(model, SD3Transformer2DModel) and _same(model, models["transformer"])
            assert type(t5) is T5EncoderModel and _same(t5, models["text_encoder_3"])
        with pytest.raises(InvalidModelException, match=rf"{name} has no 'tokenizer_3' folder for submodel tokenizer_3"):
            service.get_model(key, SubModelType.Tokenizer3)
