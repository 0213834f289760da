"""fp8 weights kept in fp8 (``MODELBUS_FP8_STORAGE=on``): the loaded transformer holds the file's fp8
tensors, upcast layer by layer in its forward pass, ComfyUI's fp8_scaled scales applied; its outputs are
the upcast load's, it holds far less memory, and its stored tensors are never rewritten by a forward.
Tiny real FLUX (BFL layout: q/k/v split by the conversion) and Wan (ComfyUI's prefix) transformers."""

from __future__ import annotations

import json
from itertools import chain
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelbus.services.config import AppConfig, ConfigError
from modelbus.services.load import InvalidModelException, ModelLoadService
from modelbus.services.load.estimate import estimate_bytes
from modelbus.services.load.fp8 import keeps_fp8
from modelbus.services.load.kit import LoadRequest
from modelbus.services.records.enums import SubModelType
from tests.fixtures import loadable as builders
from tests.fixtures import transformer_files as tf
from tests.load.test_dit_load import _tiny

E4M3 = torch.float8_e4m3fn


@pytest.fixture()
def kept(store: Any, modelbus_env: dict[str, str]) -> ModelLoadService:
    cfg = AppConfig.load(device="cpu", ram_cache_size="256M", vram_cache_size="0", fp8_storage="on")
    return ModelLoadService(cfg, store)


def _quantize(state: dict[str, torch.Tensor], scaled: bool, skip: tuple[str, ...] = ()
              ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A ComfyUI-style fp8 file of ``state`` (2-D weights fp8, per-tensor scales if ``scaled``; other
    tensors bf16, and the names in ``skip`` too) and the weights it stands for, in fp32."""
    stored: dict[str, torch.Tensor] = {}
    truth: dict[str, torch.Tensor] = {}
    for name, w in state.items():
        w = w.detach().float()
        if w.dim() == 2 and not name.startswith(skip):
            scale = (w.abs().max() / 200).clamp(min=1e-4).reshape(()) if scaled else torch.tensor(1.0)
            q = (w / scale).to(E4M3)
            stored[name] = q
            if scaled:
                stored[name.removesuffix(".weight") + ".scale_weight"] = scale
            truth[name] = q.float() * scale
        else:
            stored[name] = w.to(torch.bfloat16)
            truth[name] = stored[name].float()
    if scaled:
        stored["scaled_fp8"] = torch.zeros(0, dtype=E4M3)
    return stored, truth


def _write(path: Path, tensors: dict[str, torch.Tensor], prefix: str) -> Path:
    save_file({prefix + k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def held_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct memory the model's tensors lie in (a shared buffer once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in chain(model.parameters(), model.buffers())}
    return sum(storages.values())


def _flux_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"hidden_states": torch.randn(1, 16, 64, generator=g), "encoder_hidden_states": torch.randn(1, 4, 32, generator=g),
            "pooled_projections": torch.randn(1, 32, generator=g), "timestep": torch.tensor([0.5]),
            "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(4, 3), "guidance": torch.tensor([3.5])}  # fmt: skip


def _flux_file(config: Any, add: Any, name: str, scaled: bool, skip: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    diffusers_state = tf.flux_transformer_state()
    stored, truth = _quantize(builders.flux_to_bfl(diffusers_state, ""), scaled, skip)
    _write(config.models_path / f"{name}.safetensors", stored, "model.diffusion_model.")
    key = add(f"{name}.safetensors", "main", "checkpoint", base="flux", config="flux-dev", precision="fp8_e4m3fn",
              quantization="fp8_scaled" if scaled else None)
    return key, truth


# ComfyUI's fp8_scaled FLUX files keep the embedders and the final layer in bf16, only the blocks' linears scaled
_FLUX_BF16 = ("img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer")


@pytest.mark.parametrize("scaled", [False, True])
def test_flux_kept_fp8_matches_the_upcast_load_in_less_memory(service: ModelLoadService, kept: ModelLoadService,
                                                              config: Any, add: Any, scaled: bool) -> None:
    key, _ = _flux_file(config, add, f"flux-{scaled}", scaled, _FLUX_BF16)
    inputs = _flux_inputs()
    upcast_info = service.get_model(key, SubModelType.Transformer)
    with upcast_info as upcast:
        want = upcast(**inputs).sample
        upcast_bytes = held_bytes(upcast)
        assert all(p.dtype == torch.float32 for p in upcast.parameters())
    info = kept.get_model(key, SubModelType.Transformer)
    with info as model:
        stored = {n: (p.dtype, p.data_ptr()) for n, p in model.named_parameters()}
        fp8 = [n for n, (dtype, _) in stored.items() if dtype == E4M3]
        assert len(fp8) > 10 and all("blocks" in n for n in fp8), fp8
        assert model.dtype == torch.float32  # what pipelines cast their inputs to: the compute dtype
        got = model(**inputs).sample
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # the forward pass left the stored fp8 tensors where they were
        assert {n: (p.dtype, p.data_ptr()) for n, p in model.named_parameters()} == stored
        kept_bytes = held_bytes(model)
        fp8_elements = sum(p.numel() for p in model.parameters() if p.dtype == E4M3)
        tensor_bytes = sum(t.numel() * t.element_size() for t in chain(model.parameters(), model.buffers()))
    # the memory held is the tensors' (no dead copy beside them), and each fp8 element saves 3 of fp32's 4 bytes
    assert kept_bytes < 1.05 * tensor_bytes, (kept_bytes, tensor_bytes)
    assert upcast_bytes - kept_bytes > 0.95 * 3 * fp8_elements, (kept_bytes, upcast_bytes, fp8_elements)
    assert upcast_info.bytes - info.bytes > 0.95 * 3 * fp8_elements  # and the cache counts it so
    req = LoadRequest(kept.store.get_model(key), config.models_path / f"flux-{scaled}.safetensors",
                      SubModelType.Transformer, torch.device("cpu"), torch.float32, fp8_storage=True)
    assert abs(estimate_bytes(req) - info.bytes) < 0.05 * info.bytes  # the cache makes room for what is held


def test_scales_are_honoured(kept: ModelLoadService, config: Any, add: Any) -> None:
    """The kept model computes with the file's weights times their scales (a reference model built from those
    weights agrees), not with the stored fp8 values (which, unscaled, give another output)."""
    from diffusers import FluxTransformer2DModel

    from modelbus.services.load.flux import _from_bfl

    key, truth = _flux_file(config, add, "flux-scaled", True, _FLUX_BF16)
    reference = FluxTransformer2DModel.from_config(kept.get_model(key, SubModelType.Transformer).model.config)
    reference.load_state_dict(_from_bfl(truth, Path("truth")))
    unscaled = FluxTransformer2DModel.from_config(reference.config)
    unscaled.load_state_dict({k: (v.float() if v.dtype == E4M3 else v) for k, v in _from_bfl(
        _quantize(builders.flux_to_bfl(tf.flux_transformer_state(), ""), True, _FLUX_BF16)[0], Path("x")).items()
        if not k.endswith(("scale_weight", "scaled_fp8"))}, strict=False)
    inputs = _flux_inputs()
    with kept.get_model(key, SubModelType.Transformer) as model, torch.no_grad():
        got = model(**inputs).sample
    torch.testing.assert_close(got, reference(**inputs).sample, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, unscaled(**inputs).sample, rtol=1e-2, atol=1e-2)


def test_a_scale_the_conversion_cuts_falls_back_to_the_upcast(service: ModelLoadService, kept: ModelLoadService,
                                                              config: Any, add: Any) -> None:
    """A per-row scale of BFL's fused q/k/v, which the conversion splits in three: which rows each part
    holds is not carried by the tags, so the whole load is upcast (the per-row scales folded), and right.
    (Per-tensor scales follow a split, and the final layer's swapped halves, as the other tests show.)"""
    key, _ = _flux_file(config, add, "flux-rows", True, ())
    path = config.models_path / "flux-rows.safetensors"
    stored = dict(load_file(str(path)))
    name = "model.diffusion_model.double_blocks.0.img_attn.qkv"
    rows = torch.linspace(0.5, 2.0, stored[name + ".weight"].shape[0])
    stored[name + ".scale_weight"] = rows
    save_file(stored, str(path))
    inputs = _flux_inputs()
    with kept.get_model(key, SubModelType.Transformer) as model:
        assert all(p.dtype == torch.float32 for p in model.parameters())
        got = model(**inputs).sample
    with service.get_model(key, SubModelType.Transformer) as upcast:
        torch.testing.assert_close(got, upcast(**inputs).sample, rtol=0, atol=0)
        q = upcast.transformer_blocks[0].attn.to_q.weight
        assert torch.equal(q, stored[name + ".weight"][: q.shape[0]].float() * rows[: q.shape[0], None])


def test_wan_kept_fp8_in_comfyui_names(service: ModelLoadService, kept: ModelLoadService, config: Any,
                                       add: Any) -> None:
    model = _tiny("wan-2.1")
    folder = config.models_path / "wan-config"
    model.save_config(folder)  # type: ignore[attr-defined]
    stored, _ = _quantize(dict(model.state_dict()), scaled=True, skip=("patch_embedding", "condition_embedder"))
    _write(config.models_path / "wan-fp8.safetensors", stored, "model.diffusion_model.")
    key = add("wan-fp8.safetensors", "main", "checkpoint", base="wan-2.1", config=str(folder),
              precision="fp8_e4m3fn", quantization="fp8_scaled")
    g = torch.Generator().manual_seed(1)
    inputs = {"hidden_states": torch.randn(1, 4, 1, 4, 4, generator=g), "timestep": torch.tensor([10]),
              "encoder_hidden_states": torch.randn(1, 3, 16, generator=g), "return_dict": False}
    with service.get_model(key, SubModelType.Transformer) as upcast:
        want = upcast(**inputs)[0]
        upcast_bytes = held_bytes(upcast)
    with kept.get_model(key, SubModelType.Transformer) as loaded:
        assert any(p.dtype == E4M3 for p in loaded.parameters())
        torch.testing.assert_close(loaded(**inputs)[0], want, rtol=1e-5, atol=1e-5)
        fp8_elements = sum(p.numel() for p in loaded.parameters() if p.dtype == E4M3)
        assert upcast_bytes - held_bytes(loaded) > 0.95 * 3 * fp8_elements
    # the cache makes room for what each load holds: the file's tensors (fp8 ones at 1 byte when kept), and
    # beside them the model's own non-persistent buffers (RoPE tables), which no file holds
    for svc, keep in ((service, False), (kept, True)):
        req = LoadRequest(svc.store.get_model(key), config.models_path / "wan-fp8.safetensors", SubModelType.Transformer,
                          torch.device("cpu"), torch.float32, fp8_storage=keep)
        info = svc.get_model(key, SubModelType.Transformer)
        saved = set(info.model.state_dict())
        own = sum(b.numel() * b.element_size() for n, b in info.model.named_buffers()
                  if n not in saved and "_fp8_scale_" not in n)
        assert estimate_bytes(req) == info.bytes - own > 0, (keep, estimate_bytes(req), info.bytes, own)


def test_policy(monkeypatch: pytest.MonkeyPatch, modelbus_env: dict[str, str]) -> None:
    cpu = torch.device("cpu")
    assert (keeps_fp8("on", cpu), keeps_fp8("off", cpu), keeps_fp8("auto", cpu)) == (True, False, False)
    monkeypatch.setenv("MODELBUS_FP8_STORAGE", "sometimes")
    with pytest.raises(ConfigError, match="MODELBUS_FP8_STORAGE='sometimes': Input should be 'auto', 'on' or 'off'"):
        AppConfig.load()


def _comfy_quant_layout(stored: dict[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """``stored`` (a scaled file of :func:`_quantize`) in ComfyUI's newer layout: ``weight_scale``, a
    ``comfy_quant`` config and an ``input_scale`` per quantized layer, no marker."""
    out: dict[str, torch.Tensor] = {}
    conf = torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)
    for name, t in stored.items():
        if name.endswith(".scale_weight"):
            layer = name.removesuffix(".scale_weight")
            out[layer + ".weight_scale"], out[layer + ".input_scale"] = t, torch.tensor(5.0)
            out[layer + ".comfy_quant"] = conf.clone()
        elif name != "scaled_fp8":
            out[name] = t
    return out


@pytest.mark.parametrize("fmt", ["float8_e4m3fn", "nvfp4"])
def test_flux_kept_comfy_quant(service: ModelLoadService, kept: ModelLoadService, config: Any, add: Any,
                               fmt: str) -> None:
    """A comfy_quant fp8 file kept in fp8 computes what its upcast load does; another format is refused."""
    stored, _ = _quantize(builders.flux_to_bfl(tf.flux_transformer_state(), ""), True, _FLUX_BF16)
    _write(config.models_path / "flux-cq.safetensors", _comfy_quant_layout(stored, fmt), "model.diffusion_model.")
    key = add("flux-cq.safetensors", "main", "checkpoint", base="flux", config="flux-dev", precision="fp8_e4m3fn")
    if fmt == "nvfp4":
        with (pytest.raises(InvalidModelException, match="ComfyUI nvfp4 quantization is not supported: "),
              kept.get_model(key, SubModelType.Transformer)):
            pass
        return
    inputs = _flux_inputs()
    with service.get_model(key, SubModelType.Transformer) as upcast:
        want = upcast(**inputs).sample
    with kept.get_model(key, SubModelType.Transformer) as model:
        assert any(p.dtype == E4M3 for p in model.parameters())
        torch.testing.assert_close(model(**inputs).sample, want, rtol=1e-5, atol=1e-5)
