"""fp8 text encoders as ComfyUI users download them (``t5xxl_fp8_e4m3fn.safetensors``,
``t5xxl_fp8_e4m3fn_scaled.safetensors``, ``umt5_xxl_fp8_e4m3fn_scaled.safetensors``,
``qwen_2.5_vl_7b_fp8_scaled.safetensors``) are identified with the file's precision and loaded through the
load service upcast to the worker's precision, each scale folded in as ComfyUI folds it
(``weight.to(dtype) * scale_weight.to(dtype)``). The files are tiny real T5 / UMT5 / Qwen2.5-VL models
quantized at test time in ComfyUI's layout: every Linear weight ``w / scale`` in float8_e4m3fn beside its
``<layer>.scale_weight`` (fp32, one per tensor) and a ``scaled_fp8`` marker; the embeddings fp8 without a
scale, the norms bf16."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import save_file

from modelbus.services.load import InvalidModelException, ModelLoadService
from modelbus.services.probe import probe
from tests.fixtures.loadable import T5_CFG
from tests.load.test_llm_encoders_load import QWEN25_VL, _tiny

FP8 = torch.float8_e4m3fn


def comfy_fp8(model: torch.nn.Module, state: dict[str, torch.Tensor], scaled: bool, fp8: torch.dtype = FP8,
              ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor | None]]]:
    """``state`` (file names) as ComfyUI's fp8 files store it, and for each name the stored tensor and its
    scale (None: none). ``model``'s Linear weights are the ones ComfyUI scales; file names may lack the
    model's leading levels, matched by suffix."""
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for name, w in state.items():
        w = w.detach().float()
        is_linear = any(full == name or full.endswith("." + name) or name.endswith("." + full) for full in linear)
        if w.dim() == 2 and is_linear and scaled:
            scale = (w.abs().max() / torch.finfo(fp8).max).clamp(min=1e-6).reshape(())
            q = (w / scale).to(fp8)
            out[name], out[name.removesuffix(".weight") + ".scale_weight"] = q, scale
            parts[name] = (q, scale)
        elif w.dim() >= 2:
            out[name] = w.to(fp8)
            parts[name] = (out[name], None)
        else:
            out[name] = w.to(torch.bfloat16)
            parts[name] = (out[name], None)
    if scaled:
        out["scaled_fp8"] = torch.empty(0, dtype=fp8)
    return out, parts


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def _upcast(stored: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """ComfyUI's arithmetic: the weight in the compute dtype, times the scale in it."""
    up = stored.to(dtype)
    return up if scale is None else up * scale.to(dtype)


def _t5(kind: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(3)
    if kind == "umt5":
        model: Any = transformers.UMT5EncoderModel(transformers.UMT5Config(**T5_CFG)).eval()
    else:
        model = transformers.T5EncoderModel(transformers.T5Config(**T5_CFG)).eval()
    state = {k: v for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}  # tied: stored once
    return model, state


def _check_loaded(loaded: torch.nn.Module, parts: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
                  dtype: torch.dtype, rename: Any = lambda k: k) -> None:
    got = loaded.state_dict()
    for name, (stored, scale) in parts.items():
        have = got[rename(name)]
        assert have.dtype == dtype, name
        want = _upcast(stored, scale, dtype)
        assert torch.equal(have, want), name


T5_LAYOUTS = [("t5", False, "t5xxl_fp8_e4m3fn.safetensors", "any"),
              ("t5", True, "t5xxl_fp8_e4m3fn_scaled.safetensors", "any"),
              ("t5", False, "t5xxl_fp8_e5m2.safetensors", "any"),
              ("t5", True, "t5xxl_fp8_e5m2_scaled.safetensors", "any"),
              ("umt5", True, "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan-2.1")]


def _dtype_of(filename: str) -> torch.dtype:
    return torch.float8_e5m2 if "e5m2" in filename else FP8


@pytest.mark.parametrize(("kind", "scaled", "filename", "base"), T5_LAYOUTS)
def test_fp8_t5_encoders_identified_and_loaded_upcast(service: ModelLoadService, config: Any, add: Any,
                                                      kind: str, scaled: bool, filename: str, base: str) -> None:
    model, state = _t5(kind)
    stored, parts = comfy_fp8(model, state, scaled, _dtype_of(filename))
    path = _write(config.models_path / filename, stored)
    found = probe(path)
    precision = "fp8_e5m2" if "e5m2" in filename else "fp8_e4m3fn"
    assert (found.model_type, found.base_model, found.precision) == ("t5_encoder", base, precision)
    assert found.quantization == ("fp8_scaled" if scaled else None)
    key = add(filename, "t5_encoder", "checkpoint", base=base, precision=found.precision,
              quantization=found.quantization)
    with service.get_model(key) as loaded:
        assert type(loaded) is type(model)
        _check_loaded(loaded, parts, service.precision)


def test_fp8_scaled_qwen25_vl_identified_and_loaded_upcast(service: ModelLoadService, config: Any, add: Any) -> None:
    """ComfyUI's qwen_2.5_vl_7b_fp8_scaled.safetensors: transformers 4's names, no head, fp8_scaled."""
    folder = config.models_path / "qwen-vl-config"
    model = _tiny("Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl", QWEN25_VL, folder)
    state = {k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v
             for k, v in model.state_dict().items() if not k.startswith("lm_head.")}
    stored, parts = comfy_fp8(model, state, scaled=True)
    name = "qwen_2.5_vl_7b_fp8_scaled.safetensors"
    path = _write(config.models_path / name, stored)
    found = probe(path)
    assert (found.model_type, found.precision, found.quantization) == ("qwen2_5_vl", "fp8_e4m3fn", "fp8_scaled")
    key = add(name, "qwen2_5_vl", "checkpoint", base="qwen-image", config=str(folder), precision=found.precision)
    with service.get_model(key) as loaded:
        assert type(loaded).__name__ == "Qwen2_5_VLModel"

        _check_loaded(loaded, parts, service.precision,
                      lambda k: k if k.startswith("visual.") else "language_model." + k.removeprefix("model."))


Q = "encoder.block.1.layer.0.SelfAttention.q"


@pytest.mark.parametrize(("case", "message"), [
    ("missing", f"fp8 tensor {Q}.weight has no scale in a scaled file"),
    ("wrong-shape", f"fp8 scale {Q}.scale_weight of shape (3,) fits no row of {Q}.weight"),
    ("matrix", f"fp8 scale {Q}.scale_weight of shape (16, 16) fits no row of {Q}.weight"),
    ("nan", f"fp8 scale {Q}.scale_weight is not a finite number"),
])
def test_bad_scales_refused_naming_the_tensor(service: ModelLoadService, config: Any, add: Any, case: str,
                                              message: str) -> None:
    model, state = _t5("t5")
    stored, _ = comfy_fp8(model, state, scaled=True)
    if case == "missing":
        del stored[f"{Q}.scale_weight"]
    else:
        stored[f"{Q}.scale_weight"] = {"wrong-shape": torch.ones(3), "matrix": torch.ones(16, 16),
                                       "nan": torch.tensor(float("nan"))}[case]
    _write(config.models_path / f"bad-{case}.safetensors", stored)
    key = add(f"bad-{case}.safetensors", "t5_encoder", "checkpoint", base="any")
    with pytest.raises(InvalidModelException) as err:
        service.get_model(key)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert service.cache.stats().models == 0


@pytest.mark.parametrize(("kind", "scaled", "filename", "base"), T5_LAYOUTS)
def test_fp8_t5_encoders_kept_in_fp8(service: ModelLoadService, config: Any, add: Any, store: Any,
                                     kind: str, scaled: bool, filename: str, base: str) -> None:
    """With ``fp8_storage`` on (as on an fp8-capable GPU), the encoder holds the file's fp8 tensors, upcast
    (times their scale) layer by layer: its outputs are the upcast load's, and a forward leaves them fp8.
    T5's ``wo`` layers, whose dtype T5 casts its feed-forward to, are upcast as the upcast load does."""
    from modelbus.services.config import AppConfig

    model, state = _t5(kind)
    stored, parts = comfy_fp8(model, state, scaled, _dtype_of(filename))
    _write(config.models_path / filename, stored)
    key = add(filename, "t5_encoder", "checkpoint", base=base)
    kept = ModelLoadService(AppConfig.load(device="cpu", ram_cache_size="256M", vram_cache_size="0",
                                           fp8_storage="on"), store)
    ids = torch.tensor([[1, 5, 9, 30, 2]])
    with service.get_model(key) as upcast, torch.no_grad():
        want = upcast(input_ids=ids).last_hidden_state
    with kept.get_model(key) as loaded, torch.no_grad():
        got = loaded.state_dict()
        fp8 = {n for n, (t, _) in parts.items() if t.dtype == _dtype_of(filename) and ".wo." not in n}
        assert fp8 and all(got[n].dtype == _dtype_of(filename) for n in fp8)
        wo = [n for n in parts if ".wo." in n]
        assert wo and all(torch.equal(got[n], _upcast(*parts[n], service.precision)) for n in wo)
        assert all(torch.equal(got[n].view(torch.uint8), parts[n][0].view(torch.uint8)) for n in fp8)
        assert torch.equal(loaded(input_ids=ids).last_hidden_state, want)
        assert all(loaded.state_dict()[n].dtype == _dtype_of(filename) for n in fp8)


def test_fp8_scaled_qwen25_vl_kept_in_fp8(config: Any, add: Any, store: Any, service: ModelLoadService) -> None:
    """Kept: the language model's fp8 weights stay fp8 and its hidden states are the upcast load's; the
    vision tower (which reads its weights' dtype outside their layers) is upcast."""
    from modelbus.services.config import AppConfig
    from tests.load.test_llm_encoders_load import IDS, _hidden

    folder = config.models_path / "qwen-vl-config"
    model = _tiny("Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl", QWEN25_VL, folder)
    state = {k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v
             for k, v in model.state_dict().items() if not k.startswith("lm_head.")}
    stored, parts = comfy_fp8(model, state, scaled=True)
    _write(config.models_path / "qwen-vl-fp8.safetensors", stored)
    key = add("qwen-vl-fp8.safetensors", "qwen2_5_vl", "checkpoint", base="qwen-image", config=str(folder))
    kept = ModelLoadService(AppConfig.load(device="cpu", ram_cache_size="256M", vram_cache_size="0",
                                           fp8_storage="on"), store)
    with service.get_model(key) as upcast:
        want = _hidden(upcast, IDS)
    with kept.get_model(key) as loaded:
        got = loaded.state_dict()
        text = [n for n, (t, _) in parts.items() if t.dtype == FP8 and n.startswith("model.")]
        assert text and all(got["language_model." + n.removeprefix("model.")].dtype == FP8 for n in text)
        vision = [n for n in parts if n.startswith("visual.")]
        assert all(torch.equal(got[n], _upcast(*parts[n], service.precision)) for n in vision)
        assert torch.equal(_hidden(loaded, IDS), want)


def test_fp8_scaled_clip_l_identified_and_loaded_upcast(service: ModelLoadService, config: Any, add: Any,
                                                         tmp_path: Path) -> None:
    """The rarer clip_l fp8 variants: ComfyUI's names (``text_model.*``, ``text_projection``), fp8_scaled."""
    from safetensors.torch import load_file

    from tests.modeldata.companions import write_clip_l_file

    model = write_clip_l_file(tmp_path / "clip_l.safetensors")
    stored, parts = comfy_fp8(model, load_file(str(tmp_path / "clip_l.safetensors")), scaled=True)
    assert any(s is not None for _, s in parts.values())
    path = _write(config.models_path / "clip_l_fp8_e4m3fn_scaled.safetensors", stored)
    found = probe(path)
    assert (found.model_type, found.precision, found.quantization) == ("clip_embed", "fp8_e4m3fn", "fp8_scaled")
    with service.get_model(add(path.name, "clip_embed", "checkpoint", base="any")) as loaded:
        assert type(loaded).__name__ == "CLIPTextModelWithProjection"
        got = {k.removeprefix("text_model."): v for k, v in loaded.state_dict().items()}
        for name, (tensor, scale) in parts.items():
            have = got[name.removeprefix("text_model.")]
            assert torch.equal(have, _upcast(tensor, scale, service.precision)), name


def test_fp8_scaled_t5_in_fp16_folds_in_fp16_and_keeps_wo_fp32(config: Any, add: Any, store: Any) -> None:
    """A worker of fp16 precision: each weight is ComfyUI's fp16 one (``q.to(fp16) * scale.to(fp16)``), and T5's
    ``wo`` layers are then held in fp32 as transformers keeps them (the fp16 values, widened)."""
    from modelbus.services.load.kit import LoadRequest
    from modelbus.services.load.loaders import load_t5_encoder_checkpoint

    model, state = _t5("t5")
    stored, parts = comfy_fp8(model, state, scaled=True)
    path = _write(config.models_path / "t5-fp16.safetensors", stored)
    record = store.get_model(add(path.name, "t5_encoder", "checkpoint", base="any"))
    for keep in (False, True):  # a worker that keeps fp8 upcasts here: fp16 T5 holds ``wo`` in fp32
        req = LoadRequest(record, path, None, torch.device("cpu"), torch.float16, fp8_storage=keep)
        got = load_t5_encoder_checkpoint(req).model.state_dict()
        for name, (tensor, scale) in parts.items():
            want = _upcast(tensor, scale, torch.float16)
            assert torch.equal(got[name], want.float() if ".wo." in name else want), name


def test_only_a_weight_whose_kin_of_its_rank_are_scaled_needs_a_scale() -> None:
    """``mlp.0`` (a Linear, scaled) and ``mlp.1`` (a norm, fp8 as plain fp8 files store norms) are not kin;
    ``mlp.2`` (a Linear, fp8 without its scale) is ``mlp.0``'s."""
    from modelbus.services.load.fp8 import fold_fp8_scales

    def file(with_bad: bool) -> dict[str, torch.Tensor]:
        q = torch.randn(4, 4).to(FP8)
        out = {"mlp.0.weight": q.float(), "mlp.0.scale_weight": torch.tensor(0.5),
               "mlp.1.weight": torch.ones(4).to(FP8).float()}
        return out | ({"mlp.2.weight": q.float()} if with_bad else {})

    folded = fold_fp8_scales(file(False), "f", fp8={"mlp.0.weight", "mlp.1.weight"})
    assert folded.keys() == {"mlp.0.weight", "mlp.1.weight"} and torch.equal(folded["mlp.1.weight"], torch.ones(4))
    with pytest.raises(InvalidModelException, match=r"^f: fp8 tensor mlp\.2\.weight has no scale in a scaled file"):
        fold_fp8_scales(file(True), "f", fp8={"mlp.0.weight", "mlp.1.weight", "mlp.2.weight"})
