"""T2I-Adapters, FLUX transformers, FLUX and SD-3 ControlNets, T5 and CLIP image encoders, loaded
offline through the load service from single files (and from T2I-Adapter, T5 and CLIP folders).

None of these files carries a config: the loader reads it from the tensors' names and shapes.
Every loaded model is compared weight for weight with the model the file was written from, and
by a forward pass against a reference built from the config the test expects (so a config that
the weights cannot tell apart, such as heads or RoPE widths, is checked too).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers import FluxControlNetModel, FluxTransformer2DModel, SD3ControlNetModel, T2IAdapter
from safetensors.torch import load_file, save_file
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    T5Config,
    T5EncoderModel,
)

from modelbus.services.load import InvalidModelException, ModelLoadService, checkpoints, flux, kit, loaders
from modelbus.services.load.kit import LoadRequest
from modelbus.services.load.tensors import object_nbytes
from modelbus.services.records.enums import SubModelType
from tests.fixtures import loadable as builders
from tests.fixtures import transformer_files as probe
from tests.fixtures.model_files import write_safetensors

State = dict[str, torch.Tensor]


def _fp16(state: State) -> State:
    """What an fp16 file of ``state`` loads as on the CPU (fp32)."""
    return {k: v.detach().half().float() for k, v in state.items()}


def _unzeroed(state: State) -> State:
    """ControlNets start with zeroed output layers (so an untrained one adds nothing): random values
    instead, or their outputs would be zeros whatever was loaded."""
    torch.manual_seed(1)
    return {k: v if v.any() else torch.randn_like(v) for k, v in state.items()}


def _reference(cls: Any, config: dict[str, Any], state: State) -> Any:
    model = cls(**config).eval()
    model.load_state_dict(state)
    return model


def _same(model: torch.nn.Module, state: State) -> bool:
    got = model.state_dict()
    return got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in got)


def _is(obj: Any, cls: type) -> bool:
    """``isinstance`` that leaves ``obj`` typed Any (mypy sees diffusers' classes through lazy imports)."""
    return isinstance(obj, cls)


def _all_equal(a: Any, b: Any) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# ------------------------------------------------------------------------------ T2I-Adapter

def _t2i_config(kind: str, in_channels: int) -> dict[str, Any]:
    return {"in_channels": in_channels, "channels": [32, 64, 64, 64], "num_res_blocks": 2,
            "downscale_factor": 16 if kind == "full_adapter_xl" else 8, "adapter_type": kind}


def _t2i_features(model: Any, in_channels: int) -> list[torch.Tensor]:
    torch.manual_seed(0)
    with torch.no_grad():
        return model(torch.randn(1, in_channels, 64, 64))


@pytest.mark.parametrize(("kind", "in_channels", "prefixed"), [
    ("full_adapter", 3, True), ("full_adapter", 1, False), ("full_adapter_xl", 3, True), ("light_adapter", 3, False)])
def test_t2i_adapter_checkpoint(service: ModelLoadService, config: Any, add: Any, kind: probe.T2IKind,
                                in_channels: int, prefixed: bool) -> None:
    state = probe.t2i_adapter_state(kind, in_channels)
    stored = state if prefixed else {k.removeprefix("adapter."): v for k, v in state.items()}
    probe.write_state(config.models_path / "t2i.safetensors", stored)
    base = "sdxl" if kind == "full_adapter_xl" else "sd-1"
    with service.get_model(add("t2i.safetensors", "t2i_adapter", "checkpoint", base=base)) as model:
        assert _is(model, T2IAdapter) and model.config.adapter_type == kind
        assert (model.config.in_channels, model.config.downscale_factor) == (
            in_channels, 16 if kind == "full_adapter_xl" else 8)
        assert _same(model, _fp16(state))
        ref = _reference(T2IAdapter, _t2i_config(kind, in_channels), _fp16(state))
        assert _all_equal(_t2i_features(model, in_channels), _t2i_features(ref, in_channels))


def test_t2i_adapter_folder(service: ModelLoadService, config: Any, add: Any) -> None:
    torch.manual_seed(0)
    ref: Any = T2IAdapter(**_t2i_config("full_adapter_xl", 3))
    ref.eval()
    ref.save_pretrained(config.models_path / "t2i-xl")
    with service.get_model(add("t2i-xl", "t2i_adapter", "diffusers", base="sdxl")) as model:
        assert _is(model, T2IAdapter) and model.config.adapter_type == "full_adapter_xl"
        assert _same(model, ref.state_dict())
        assert _all_equal(_t2i_features(model, 3), _t2i_features(ref, 3))


def test_t2i_adapter_refusals(service: ModelLoadService, config: Any, add: Any) -> None:
    def load(name: str, state: State) -> None:
        probe.write_state(config.models_path / name, state)
        service.get_model(add(name, "t2i_adapter", "checkpoint"))

    # diffusers ships no conversion of TencentARC's original names: refused, the layout named
    kinds: tuple[probe.T2IKind, ...] = ("full_adapter", "light_adapter")
    for kind in kinds:
        with pytest.raises(InvalidModelException, match=rf"{kind}\.safetensors: T2I-Adapter in TencentARC's original"):
            load(f"{kind}.safetensors", probe.to_tencentarc_layout(probe.t2i_adapter_state(kind)))
    builders.write_lora(config.models_path / "lora.safetensors")
    with pytest.raises(InvalidModelException, match=r"lora\.safetensors: no T2I-Adapter weights"):
        service.get_model(add("lora.safetensors", "t2i_adapter", "checkpoint"))
    state = probe.t2i_adapter_state()
    narrow = state | {"adapter.conv_in.weight": state["adapter.conv_in.weight"][:, :100]}
    with pytest.raises(InvalidModelException, match=r"narrow\.safetensors: T2I-Adapter whose first convolution"):
        load("narrow.safetensors", narrow)
    cut = state | {"adapter.body.1.resnets.0.block2.weight": state["adapter.body.1.resnets.0.block2.weight"][:32]}
    with pytest.raises(InvalidModelException, match=r"cut\.safetensors"):
        load("cut.safetensors", cut)


# ------------------------------------------------------------------------------------ FLUX

def _flux_config(guidance: bool, in_channels: int = 64, single_layers: int = 1) -> dict[str, Any]:
    """The probe builders' tiny FLUX, with the RoPE widths the loader gives 16-wide heads (FLUX.1's
    proportions): RoPE has no weights, so the builders' own choice cannot be read back."""
    return {"patch_size": 1, "in_channels": in_channels, "out_channels": 64, "num_layers": 1,
            "num_single_layers": single_layers, "attention_head_dim": 16, "num_attention_heads": 2,
            "joint_attention_dim": 32, "pooled_projection_dim": 32, "guidance_embeds": guidance,
            "axes_dims_rope": (4, 6, 6)}


def _flux_inputs(in_channels: int, guidance: bool) -> dict[str, torch.Tensor | None]:
    torch.manual_seed(0)
    img_ids = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1]], dtype=torch.float32)
    return {"hidden_states": torch.randn(1, 4, in_channels), "encoder_hidden_states": torch.randn(1, 3, 32),
            "pooled_projections": torch.randn(1, 32), "timestep": torch.tensor([0.5]), "img_ids": img_ids,
            "txt_ids": torch.zeros(3, 3), "guidance": torch.tensor([3.5]) if guidance else None}


def test_rope_axes_keep_flux_proportions() -> None:
    assert flux.rope_axes(128) == (16, 56, 56)  # FLUX.1's own
    assert flux.rope_axes(16) == (4, 6, 6) and flux.rope_axes(64) == (8, 28, 28)


@pytest.mark.parametrize(("layout", "prefix", "flavour", "fill", "single_layers"), [
    ("diffusers", "", "dev", False, 1), ("diffusers", "transformer.", "schnell", False, 1),
    ("bfl", "", "dev", False, 2), ("bfl", "model.diffusion_model.", "schnell", True, 1)])
def test_flux_checkpoint(service: ModelLoadService, config: Any, add: Any, layout: str, prefix: str,
                         flavour: str, fill: bool, single_layers: int) -> None:
    guidance, in_channels = flavour == "dev", 384 if fill else 64
    state = probe.flux_transformer_state(guidance, in_channels, single_layers)
    stored = builders.flux_to_bfl(state) if layout == "bfl" else state
    probe.write_state(config.models_path / "flux.safetensors", stored, prefix)
    key = add("flux.safetensors", "main", "checkpoint", base="flux", config=f"flux-{flavour}")
    with service.get_model(key, SubModelType.Transformer) as model:
        assert _is(model, FluxTransformer2DModel)
        expected = _flux_config(guidance, in_channels, single_layers)
        assert {k: model.config[k] for k in expected} == expected
        assert _same(model, _fp16(state))
        ref = _reference(FluxTransformer2DModel, expected, _fp16(state))
        with torch.no_grad():
            got, want = model(**_flux_inputs(in_channels, guidance)), ref(**_flux_inputs(in_channels, guidance))
        assert torch.equal(got.sample, want.sample)
    with service.get_model(key, SubModelType.Transformer) as model, \
            service.get_model(key, SubModelType.UNet) as alias:  # the name it was served as before
        assert alias is model, "one cache entry for both names"


def test_flux_bundle_loads_only_the_transformer(config: Any, add: Any, store: Any) -> None:
    # ComfyUI's all-in-one files hold the VAE and text encoders beside model.diffusion_model.*
    state = probe.flux_transformer_state()
    others = {"vae.decoder.conv_in.weight": torch.randn(64, 16, 3, 3),
              "text_encoders.t5xxl.transformer.shared.weight": torch.randn(2048, 64)}
    bundle = builders.flux_to_bfl(state, "model.diffusion_model.") | others
    probe.write_state(config.models_path / "bundle.safetensors", bundle)
    record = store.get_model(add("bundle.safetensors", "main", "checkpoint", base="flux", config="flux-dev"))
    req = LoadRequest(record, config.models_path / "bundle.safetensors", SubModelType.UNet, torch.device("cpu"),
                      torch.float32)
    loaded = checkpoints.load_main_checkpoint(req)
    assert _same(loaded.model, _fp16(state))
    others_bytes = sum(t.numel() * 4 for t in others.values())
    assert loaded.buffer is not None and others_bytes > object_nbytes(loaded.model)
    assert loaded.buffer.numel() < 1.3 * object_nbytes(loaded.model)  # the others were never read


def test_a_mostly_dead_buffer_is_let_go() -> None:
    # a conversion that made new tensors leaves the old ones dead in the file's buffer
    model = torch.nn.Linear(16, 16)
    whole = torch.zeros(16 * 16 * 4 + 16 * 4, dtype=torch.uint8)
    model.weight.data = whole[:1024].view(torch.float32).view(16, 16)
    model.bias.data = whole[1024:].view(torch.float32)
    assert kit.live_buffer(model, whole) is whole  # all of it in use: kept
    dead = torch.zeros(4096, dtype=torch.uint8)
    model.bias.data = dead[:64].view(torch.float32)
    model.bias.data.copy_(torch.arange(16.0))
    assert kit.live_buffer(model, dead) is None  # 64 of 4096 bytes in use: let go...
    assert model.bias.untyped_storage().data_ptr() != dead.untyped_storage().data_ptr()
    assert torch.equal(model.bias, torch.arange(16.0))  # ...what was still in it copied out


def test_flux_checkpoint_errors(service: ModelLoadService, config: Any, add: Any) -> None:
    def flux(name: str, state: State) -> str:
        probe.write_state(config.models_path / name, state)
        return add(name, "main", "checkpoint", base="flux", config="flux-dev")

    state = probe.flux_transformer_state()
    key = flux("flux.safetensors", state)
    for sub in (SubModelType.Vae, SubModelType.TextEncoder3):
        with pytest.raises(InvalidModelException, match=r"flux\.safetensors: a FLUX checkpoint holds the transformer "
                                                        rf"alone; load it as the transformer submodel .* not as {sub.value}"):
            service.get_model(key, sub)
    builders.write_sd1_checkpoint(config.models_path / "sd1.safetensors")
    with pytest.raises(InvalidModelException, match=r"sd1\.safetensors: no FLUX transformer weights"):
        service.get_model(add("sd1.safetensors", "main", "checkpoint", base="flux"), SubModelType.UNet)
    bfl = builders.flux_to_bfl(state)
    partial = {k: v for k, v in bfl.items() if not k.startswith("final_layer.linear.")}
    with pytest.raises(InvalidModelException, match=r"partial\.safetensors: incomplete BFL-layout FLUX"):
        service.get_model(flux("partial.safetensors", partial), SubModelType.UNet)
    fused = bfl | {"single_blocks.0.linear1.weight": bfl["single_blocks.0.linear1.weight"][:200]}
    with pytest.raises(InvalidModelException, match=r"fused\.safetensors: single_blocks\.0\.linear1\.weight has 200"):
        service.get_model(flux("fused.safetensors", fused), SubModelType.UNet)
    narrow = state | {"context_embedder.weight": state["context_embedder.weight"][:16]}
    with pytest.raises(InvalidModelException, match=r"narrow\.safetensors"):
        service.get_model(flux("narrow.safetensors", narrow), SubModelType.UNet)


# ------------------------------------------------------------------------- FLUX / SD-3 ControlNets

_FLUX_CONTROLNET_CFG = {k: v for k, v in _flux_config(True).items() if k != "out_channels"}


@pytest.mark.parametrize("single_layers", [1, 0])
def test_flux_controlnet(service: ModelLoadService, config: Any, add: Any, single_layers: int) -> None:
    state = _unzeroed(probe.flux_controlnet_state(single_layers))
    probe.write_state(config.models_path / "fcn.safetensors", state)
    with service.get_model(add("fcn.safetensors", "controlnet", "checkpoint", base="flux")) as model:
        assert _is(model, FluxControlNetModel) and model.config.num_single_layers == single_layers
        assert _same(model, _fp16(state))
        ref = _reference(FluxControlNetModel, _FLUX_CONTROLNET_CFG | {"num_single_layers": single_layers},
                         _fp16(state))
        inputs = _flux_inputs(64, True) | {"controlnet_cond": torch.randn(1, 4, 64)}
        with torch.no_grad():
            got, want = model(**inputs), ref(**inputs)
        assert _all_equal(got.controlnet_block_samples, want.controlnet_block_samples)
        assert _all_equal(got.controlnet_single_block_samples or (), want.controlnet_single_block_samples or ())


def test_flux_union_controlnet_with_hint_encoder(service: ModelLoadService, config: Any, add: Any) -> None:
    # Union ControlNets embed their modes; some encode the hint image themselves (input_hint_block)
    torch.manual_seed(0)
    cfg = _FLUX_CONTROLNET_CFG | {"num_mode": 3, "conditioning_embedding_channels": 16}
    ref: Any = FluxControlNetModel(**cfg)
    ref.eval()
    probe.write_state(config.models_path / "union.safetensors", ref.state_dict())
    with service.get_model(add("union.safetensors", "controlnet", "checkpoint", base="flux")) as model:
        assert (model.config.num_mode, model.config.conditioning_embedding_channels) == (3, 16)
        assert _same(model, _fp16(ref.state_dict()))


_SD3_CONTROLNET_CFG = {"sample_size": 32, "patch_size": 2, "in_channels": 16, "num_layers": 1,
                       "attention_head_dim": 16, "num_attention_heads": 1, "joint_attention_dim": 32,
                       "caption_projection_dim": 16, "pooled_projection_dim": 32, "out_channels": 16}


@pytest.mark.parametrize("sd35_large", [False, True], ids=["sd3", "sd3.5-large"])
def test_sd3_controlnet(service: ModelLoadService, config: Any, add: Any, sd35_large: bool) -> None:
    state = _unzeroed(probe.sd3_controlnet_state(sd35_large))
    probe.write_state(config.models_path / "scn.safetensors", state)
    with service.get_model(add("scn.safetensors", "controlnet", "checkpoint", base="sd-3")) as model:
        assert _is(model, SD3ControlNetModel) and _same(model, _fp16(state))
        assert model.config.use_pos_embed is not sd35_large
        assert model.config.force_zeros_for_pooled_projection is not sd35_large
        if sd35_large:
            assert model.config.joint_attention_dim is None
            return
        # SD-3's heads are 64 wide; a 16-wide model is read as one head (the builders' 2 x 8 cannot be seen)
        ref = _reference(SD3ControlNetModel, _SD3_CONTROLNET_CFG, _fp16(state))
        torch.manual_seed(0)
        inputs = {"hidden_states": torch.randn(1, 16, 8, 8), "controlnet_cond": torch.randn(1, 16, 8, 8),
                  "encoder_hidden_states": torch.randn(1, 3, 32), "pooled_projections": torch.randn(1, 32),
                  "timestep": torch.tensor([10])}
        with torch.no_grad():
            got, want = model(**inputs), ref(**inputs)
        assert _all_equal(got.controlnet_block_samples, want.controlnet_block_samples)


def _refused(service: ModelLoadService, key: str, message: str) -> None:
    """Loading ``key`` fails with an InvalidModelException matching ``message``."""
    with pytest.raises(InvalidModelException, match=message):
        service.get_model(key)


def test_transformer_controlnet_refusals(service: ModelLoadService, config: Any, add: Any) -> None:
    write_safetensors(config.models_path / "xlabs.safetensors", probe.xlabs_flux_controlnet_shapes())
    _refused(service, add("xlabs.safetensors", "controlnet", "checkpoint", base="flux"),
             r"xlabs\.safetensors: FLUX ControlNet in XLabs' layout")
    write_safetensors(config.models_path / "sai.safetensors", probe.sai_sd35_controlnet_shapes())
    _refused(service, add("sai.safetensors", "controlnet", "checkpoint", base="sd-3"),
             r"sai\.safetensors: SD-3 ControlNet in Stability's layout")
    probe.make_flux_diffusers_file(config.models_path / "flux.safetensors")
    _refused(service, add("flux.safetensors", "controlnet", "checkpoint", base="flux"),
             r"flux\.safetensors: no FLUX ControlNet weights")
    probe.make_flux_diffusers_file(config.models_path / "flux2.safetensors")
    _refused(service, add("flux2.safetensors", "controlnet", "checkpoint", base="sd-3"),
             r"flux2\.safetensors: no SD-3 ControlNet weights")
    state = probe.flux_controlnet_state()
    probe.write_state(config.models_path / "cut.safetensors", state | {
        "transformer_blocks.0.attn.norm_q.weight": state["transformer_blocks.0.attn.norm_q.weight"][:12]})
    _refused(service, add("cut.safetensors", "controlnet", "checkpoint", base="flux"),
             r"cut\.safetensors: FLUX ControlNet width 32 is not a multiple")


# ----------------------------------------------------------------------- T5 and CLIP encoders

@pytest.mark.parametrize("embedding", ["shared.weight", "encoder.embed_tokens.weight"])
def test_t5_encoder_checkpoint(service: ModelLoadService, config: Any, add: Any, embedding: str) -> None:
    built = builders.write_t5_encoder(config.models_path / "t5.safetensors", embedding=embedding)
    ref = _reference(T5EncoderModel, {"config": T5Config(**builders.T5_CFG)}, _fp16(built.state_dict()))
    with service.get_model(add("t5.safetensors", "t5_encoder", "checkpoint", base="any")) as model:
        assert _is(model, T5EncoderModel) and model.config.feed_forward_proj == "gated-gelu"
        assert model.shared.weight is model.encoder.embed_tokens.weight  # tied, stored once
        assert _same(model, ref.state_dict())
        ids = torch.tensor([[3, 17, 9, 1]])
        with torch.no_grad():
            assert torch.equal(model(ids).last_hidden_state, ref(ids).last_hidden_state)


def test_t5_encoder_in_fp16_keeps_its_output_layers_in_fp32(config: Any, add: Any, store: Any) -> None:
    builders.write_t5_encoder(config.models_path / "t5.safetensors")
    record = store.get_model(add("t5.safetensors", "t5_encoder", "checkpoint", base="any"))
    req = LoadRequest(record, config.models_path / "t5.safetensors", None, torch.device("cpu"), torch.float16)
    loaded = loaders.load_t5_encoder_checkpoint(req)
    dtypes = {n: p.dtype for n, p in loaded.model.named_parameters()}
    assert {d for n, d in dtypes.items() if n.endswith(".wo.weight")} == {torch.float32}
    assert {d for n, d in dtypes.items() if not n.endswith(".wo.weight")} == {torch.float16}


@pytest.mark.parametrize("projection", [True, False])
def test_clip_vision_checkpoint(service: ModelLoadService, config: Any, add: Any, projection: bool) -> None:
    # a whole CLIP model's file: its text tower is not read
    text = {"text_model.embeddings.token_embedding.weight": torch.randn(16, 64), "logit_scale": torch.tensor(2.0)}
    built = builders.write_clip_vision(config.models_path / "clip.safetensors", projection=projection, extra=text)
    cls = CLIPVisionModelWithProjection if projection else CLIPVisionModel
    ref = _reference(cls, {"config": CLIPVisionConfig(**builders.CLIP_VISION_CFG)}, _fp16(built.state_dict()))
    with service.get_model(add("clip.safetensors", "clip_vision", "checkpoint", base="any")) as model:
        assert type(model) is cls and model.config.image_size == 32 and model.config.hidden_act == "quick_gelu"
        assert _same(model, ref.state_dict())
        torch.manual_seed(0)
        pixels = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            got, want = model(pixels), ref(pixels)
        assert torch.equal(got[0], want[0])


def test_encoder_refusals(service: ModelLoadService, config: Any, add: Any) -> None:
    builders.write_lora(config.models_path / "lora.safetensors")
    _refused(service, add("lora.safetensors", "t5_encoder", "checkpoint", base="any"),
             r"lora\.safetensors: no T5 encoder weights")
    builders.write_lora(config.models_path / "lora2.safetensors")
    _refused(service, add("lora2.safetensors", "clip_vision", "checkpoint", base="any"),
             r"lora2\.safetensors: no CLIP image encoder weights")
    builders.write_t5_encoder(config.models_path / "t5.safetensors")
    sd = load_file(str(config.models_path / "t5.safetensors"))
    del sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    save_file(sd, str(config.models_path / "t5-cut.safetensors"))
    with pytest.raises(InvalidModelException, match=r"t5-cut\.safetensors: not a complete T5 encoder: no tensor "
                                                    r"encoder\.block\.0\.layer\.0\.SelfAttention\.relative"):
        service.get_model(add("t5-cut.safetensors", "t5_encoder", "checkpoint", base="any"))
    builders.write_clip_vision(config.models_path / "clip.safetensors")
    sd = load_file(str(config.models_path / "clip.safetensors"))
    sd["vision_model.embeddings.position_embedding.weight"] = sd["vision_model.embeddings.position_embedding.weight"][:12]
    save_file(sd, str(config.models_path / "clip-cut.safetensors"))
    _refused(service, add("clip-cut.safetensors", "clip_vision", "checkpoint", base="any"),
             r"clip-cut\.safetensors: 12 position embeddings")


@pytest.mark.parametrize(("model_type", "fmt"), [("t5_encoder", "t5_encoder"), ("clip_vision", "diffusers")])
def test_transformers_folders(service: ModelLoadService, config: Any, add: Any, model_type: str, fmt: str) -> None:
    torch.manual_seed(0)
    ref: Any = (T5EncoderModel(T5Config(**builders.T5_CFG)) if model_type == "t5_encoder"
                else CLIPVisionModelWithProjection(CLIPVisionConfig(**builders.CLIP_VISION_CFG)))
    ref.eval().save_pretrained(config.models_path / "encoder")
    with service.get_model(add("encoder", model_type, fmt, base="any")) as model:
        assert type(model) is type(ref) and _same(model, ref.state_dict())
