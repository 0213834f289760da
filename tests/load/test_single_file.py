"""Single-file SD-2 and SDXL main checkpoints and ControlNets, loaded offline into diffusers objects.

The files are tiny but carry the real key names of each layout; every loaded model is checked
weight for weight against the diffusers model the file was written from, and by a forward pass
(which also checks what the config decides: heads, activation, pooling, the embeddings' types).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers import AutoencoderKL, ControlNetModel, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from modelbus.services.load import InvalidModelException, ModelLoadService, checkpoints
from modelbus.services.load.kit import LoadRequest
from modelbus.services.load.safetensors_fast import empty_model
from modelbus.services.records.enums import SubModelType
from tests.fixtures import loadable as builders

IDS = torch.tensor([[0, 5, 9, 3, 15, 1, 1, 1]])  # the largest id (15) is where OpenCLIP pools


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _unet_out(unet: Any, context: int, added: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    torch.manual_seed(0)
    sample, states = torch.randn(1, 4, 8, 8), torch.randn(1, 3, context)
    with torch.no_grad():
        return unet(sample, 10, states, added_cond_kwargs=added).sample  # type: ignore[no-any-return]


def _sdxl_added() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {"text_embeds": torch.randn(1, builders.OPEN_CLIP_CFG["projection_dim"]),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])}


def _text_out(model: Any) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        out = model(IDS)
    return (out.last_hidden_state,) + ((out.text_embeds,) if hasattr(out, "text_embeds") else ())


@pytest.fixture()
def sd2(config: Any, add: Any) -> tuple[str, dict[str, torch.nn.Module]]:
    models = builders.write_sd2_checkpoint(config.models_path / "tiny-sd2.safetensors")
    yaml_path = builders.write_sd2_yaml(config.root / "tiny-sd2.yaml")
    return add("tiny-sd2.safetensors", "main", "checkpoint", base="sd-2", config=str(yaml_path)), models


@pytest.fixture()
def sdxl(config: Any, add: Any) -> tuple[str, dict[str, torch.nn.Module]]:
    models = builders.write_sdxl_checkpoint(config.models_path / "tiny-sdxl.safetensors", dtype=torch.float16)
    yaml_path = builders.write_sdxl_yaml(config.root / "tiny-sdxl.yaml")
    key = add("tiny-sdxl.safetensors", "main", "checkpoint", base="sdxl", config=str(yaml_path))
    return key, {k: m.half().float() for k, m in models.items()}  # the file is fp16; loads as fp32 on the CPU


def test_sd2_checkpoint_submodels(service: ModelLoadService, sd2: Any) -> None:
    key, ref = sd2
    with service.get_model(key, SubModelType.UNet) as unet:
        assert isinstance(unet, UNet2DConditionModel) and _same(unet, ref["unet"])
        assert unet.config.use_linear_projection is True
        assert torch.equal(_unet_out(unet, 64), _unet_out(ref["unet"], 64))
    with service.get_model(key, SubModelType.Vae) as vae:
        assert isinstance(vae, AutoencoderKL) and _same(vae, ref["vae"])
    with service.get_model(key, SubModelType.TextEncoder) as te:
        # the OpenCLIP weights became a transformers CLIPTextModel, without the unused last layer
        assert type(te) is CLIPTextModel and te.config.num_hidden_layers == 2 and te.config.hidden_act == "gelu"
        assert _same(te, ref["text_encoder"])
        assert all(torch.equal(a, b) for a, b in zip(_text_out(te), _text_out(ref["text_encoder"]), strict=True))
    with service.get_model(key, SubModelType.Scheduler) as scheduler:
        assert scheduler.config.prediction_type == "v_prediction"
    with service.get_model(key, SubModelType.Tokenizer) as tokenizer:
        assert isinstance(tokenizer, CLIPTokenizer) and tokenizer.pad_token == "!"
        assert tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    with pytest.raises(InvalidModelException, match="text_encoder_2"):
        service.get_model(key, SubModelType.TextEncoder2)


def test_sd2_checkpoint_without_open_clip_is_refused(service: ModelLoadService, config: Any, add: Any) -> None:
    builders.write_sd1_checkpoint(config.models_path / "sd1.safetensors", dtype=torch.float32)  # CLIP, not OpenCLIP
    yaml_path = builders.write_sd2_yaml(config.root / "tiny-sd2.yaml")
    key = add("sd1.safetensors", "main", "checkpoint", base="sd-2", config=str(yaml_path))
    with pytest.raises(InvalidModelException, match=r"sd1.safetensors: no OpenCLIP text encoder"):
        service.get_model(key, SubModelType.TextEncoder)


def test_sdxl_checkpoint_submodels(service: ModelLoadService, sdxl: Any) -> None:
    key, ref = sdxl
    with service.get_model(key, SubModelType.UNet) as unet:
        assert isinstance(unet, UNet2DConditionModel) and _same(unet, ref["unet"])
        assert (unet.config.addition_embed_type, unet.config.class_embed_type) == ("text_time", None)
        assert torch.equal(_unet_out(unet, 128, _sdxl_added()), _unet_out(ref["unet"], 128, _sdxl_added()))
    with service.get_model(key, SubModelType.Vae) as vae:
        assert _same(vae, ref["vae"]) and vae.config.scaling_factor == 0.13025
    with service.get_model(key, SubModelType.TextEncoder) as te:
        assert type(te) is CLIPTextModel and _same(te, ref["text_encoder"])
        assert torch.equal(_text_out(te)[0], _text_out(ref["text_encoder"])[0])
    with service.get_model(key, SubModelType.TextEncoder2) as te2:
        assert isinstance(te2, CLIPTextModelWithProjection) and _same(te2, ref["text_encoder_2"])
        assert te2.config.projection_dim == builders.OPEN_CLIP_CFG["projection_dim"]
        assert all(torch.equal(a, b) for a, b in zip(_text_out(te2), _text_out(ref["text_encoder_2"]), strict=True))
    with service.get_model(key, SubModelType.Scheduler) as scheduler:
        assert isinstance(scheduler, EulerDiscreteScheduler) and scheduler.config.prediction_type == "epsilon"
    with service.get_model(key, SubModelType.Tokenizer) as tok, service.get_model(key, SubModelType.Tokenizer2) as tok2:
        assert (tok.pad_token, tok2.pad_token) == ("<|endoftext|>", "!")
        assert tok("a cat")["input_ids"] == tok2("a cat")["input_ids"] == [49406, 320, 2368, 49407]


def test_sdxl_refiner_checkpoint(service: ModelLoadService, config: Any, add: Any) -> None:
    ref = builders.write_sdxl_checkpoint(config.models_path / "refiner.safetensors", refiner=True)
    yaml_path = builders.write_sdxl_yaml(config.root / "refiner.yaml", refiner=True)
    key = add("refiner.safetensors", "main", "checkpoint", base="sdxl-refiner", config=str(yaml_path))
    added = {"text_embeds": _sdxl_added()["text_embeds"], "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 6.0]])}
    with service.get_model(key, SubModelType.UNet) as unet:
        assert _same(unet, ref["unet"]) and unet.config.addition_embed_type == "text_time"
        assert torch.equal(_unet_out(unet, 64, added), _unet_out(ref["unet"], 64, added))
    with service.get_model(key, SubModelType.TextEncoder2) as te2:
        assert isinstance(te2, CLIPTextModelWithProjection) and _same(te2, ref["text_encoder_2"])
    with pytest.raises(InvalidModelException, match="no text_encoder submodel"):
        service.get_model(key, SubModelType.TextEncoder)


_SD2_CONTROLNET_CFG = builders.CONTROLNET_CFG | {"attention_head_dim": (4, 8), "use_linear_projection": True}


@pytest.mark.parametrize("original", [True, False], ids=["control_model", "diffusers"])
@pytest.mark.parametrize("base", ["sd-1", "sd-2"])
def test_controlnet_checkpoint(service: ModelLoadService, config: Any, add: Any, original: bool, base: str) -> None:
    cfg, write_yaml = ((builders.CONTROLNET_CFG, builders.write_original_yaml) if base == "sd-1"
                       else (_SD2_CONTROLNET_CFG, builders.write_sd2_yaml))
    ref = builders.write_controlnet(config.models_path / "cn.safetensors", cfg, original)
    yaml_path = write_yaml(config.root / "tiny.yaml")
    with service.get_model(add("cn.safetensors", "controlnet", "checkpoint", base=base, config=str(yaml_path))) as model:
        assert isinstance(model, ControlNetModel) and _same(model, ref)
        torch.manual_seed(0)
        sample, states, cond = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 64), torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            got, want = model(sample, 10, states, cond), ref(sample, 10, states, cond)
        assert all(torch.equal(a, b) for a, b in zip(got.down_block_res_samples, want.down_block_res_samples,
                                                     strict=True))
        assert torch.equal(got.mid_block_res_sample, want.mid_block_res_sample)


@pytest.mark.parametrize("original", [True, False], ids=["control_model", "diffusers"])
def test_sdxl_controlnet_checkpoint(service: ModelLoadService, config: Any, add: Any, original: bool) -> None:
    ref = builders.write_controlnet(config.models_path / "cnxl.safetensors", builders.SDXL_CONTROLNET_CFG, original)
    yaml_path = builders.write_sdxl_yaml(config.root / "tiny-sdxl.yaml")
    key = add("cnxl.safetensors", "controlnet", "checkpoint", base="sdxl", config=str(yaml_path))
    with service.get_model(key) as model:
        assert isinstance(model, ControlNetModel) and _same(model, ref)
        assert model.config.addition_embed_type == "text_time"
        torch.manual_seed(0)
        sample, states, cond = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 128), torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            got = model(sample, 10, states, cond, added_cond_kwargs=_sdxl_added())
            want = ref(sample, 10, states, cond, added_cond_kwargs=_sdxl_added())
        assert torch.equal(got.mid_block_res_sample, want.mid_block_res_sample)


def test_controlnet_of_a_full_model_file_reads_only_the_controlnet(config: Any, add: Any, store: Any) -> None:
    # ControlNet 1.0 files hold the whole SD model beside control_model.*: only the ControlNet is read
    from safetensors.torch import load_file, save_file
    ref = builders.write_controlnet(config.models_path / "cn.safetensors", builders.CONTROLNET_CFG, True)
    builders.write_sd1_checkpoint(config.models_path / "sd.safetensors", dtype=torch.float32)
    both = load_file(str(config.models_path / "sd.safetensors")) | load_file(str(config.models_path / "cn.safetensors"))
    save_file(both, str(config.models_path / "full.safetensors"))
    yaml_path = builders.write_original_yaml(config.root / "tiny.yaml")
    record = store.get_model(add("full.safetensors", "controlnet", "checkpoint", config=str(yaml_path)))
    req = LoadRequest(record, config.models_path / "full.safetensors", None, torch.device("cpu"), torch.float32)
    loaded = checkpoints.load_controlnet_checkpoint(req)
    assert _same(loaded.model, ref)
    controlnet_bytes = sum(t.numel() * t.element_size() for t in ref.state_dict().values())
    assert loaded.buffer is not None and controlnet_bytes <= loaded.buffer.numel() < 1.1 * controlnet_bytes


def test_controlnet_checkpoint_errors(service: ModelLoadService, config: Any, add: Any) -> None:
    yaml_path = builders.write_original_yaml(config.root / "tiny.yaml")
    builders.write_lora(config.models_path / "lora.safetensors")
    with pytest.raises(InvalidModelException, match="lora.safetensors: no ControlNet weights"):
        service.get_model(add("lora.safetensors", "controlnet", "checkpoint", config=str(yaml_path)))
    # a ControlNet wider than its config says: the file is named, the load fails cleanly
    builders.write_controlnet(config.models_path / "cn.safetensors", builders.CONTROLNET_CFG | {
        "block_out_channels": (32, 96)}, True)
    with pytest.raises(InvalidModelException, match="cn.safetensors"):
        service.get_model(add("cn.safetensors", "controlnet", "checkpoint", config=str(yaml_path)))


@pytest.mark.parametrize(("name", "context", "linear"), [("cldm_v15.yaml", 768, False), ("cldm_v21.yaml", 1024, True)])
def test_shipped_controlnet_configs(add: Any, store: Any, name: str, context: int, linear: bool) -> None:
    # the probe names these (configs/controlnet/...) on ControlNet records: they must ship, and give
    # the published ControlNet shape (lllyasviel/sd-controlnet-*, thibaud/controlnet-sd21)
    record = store.get_model(add("cn.safetensors", "controlnet", "checkpoint", config=f"configs/controlnet/{name}"))
    cfg = checkpoints.controlnet_config(checkpoints.original_config(record), "sd-1")
    assert cfg["block_out_channels"] == [320, 640, 1280, 1280] and cfg["cross_attention_dim"] == context
    assert cfg["use_linear_projection"] is linear and cfg["layers_per_block"] == 2
    assert cfg["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert (checkpoints.CONFIGS_DIR / "controlnet" / name).is_file()
    skeleton = empty_model(lambda: ControlNetModel.from_config(cfg))  # a valid config; meta: no memory
    assert isinstance(skeleton, ControlNetModel)
