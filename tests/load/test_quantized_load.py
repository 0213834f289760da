"""fp8 FLUX transformers (e4m3fn, e5m2, ComfyUI's fp8_scaled) are identified with the file's precision and
loaded upcast on the CPU, the scales folded back in; bitsandbytes checkpoints are identified, and refused
where bitsandbytes does not import."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from modelbus.services.load import InvalidModelException, ModelLoadService
from modelbus.services.probe import probe
from modelbus.services.records.enums import SubModelType
from tests.fixtures import transformer_files as tf


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("scaled", [False, True])
def test_fp8_flux_identified_and_loaded_upcast(service: ModelLoadService, config: Any, add: Any,
                                               dtype: torch.dtype, scaled: bool) -> None:
    state = tf.flux_transformer_state()
    stored: dict[str, torch.Tensor] = {}
    expected: dict[str, torch.Tensor] = {}
    for name, w in state.items():
        w = w.detach().float()
        if scaled and w.dim() == 2:
            scale = (w.abs().max() / 8).clamp(min=1e-3).reshape(())
            q = (w / scale).to(dtype)
            stored[name], stored[name.removesuffix(".weight") + ".scale_weight"] = q, scale.float()
            expected[name] = q.float() * scale
        else:
            stored[name] = w.to(dtype)
            expected[name] = stored[name].float()
    if scaled:
        stored["scaled_fp8"] = torch.zeros(0, dtype=dtype)
    path = _write(config.models_path / "flux-fp8.safetensors", stored)
    found = probe(path)
    precision = "fp8_e4m3fn" if dtype == torch.float8_e4m3fn else "fp8_e5m2"
    assert (found.base_model, found.precision) == ("flux", precision)
    assert found.quantization == ("fp8_scaled" if scaled else None)
    key = add("flux-fp8.safetensors", "main", "checkpoint", base="flux", config="flux-dev", precision=precision)
    with service.get_model(key, SubModelType.Transformer) as model:
        got = model.state_dict()
        assert got.keys() == expected.keys()
        for name, want in expected.items():
            assert got[name].dtype == torch.float32, name
            assert torch.equal(got[name], want), name


def _bnb_flux(path: Path, kind: str) -> Path:
    """Key layout of a bitsandbytes-quantized FLUX (BFL names under model.diffusion_model.)."""
    from tests.fixtures.model_files import flux_checkpoint_shapes

    def u8() -> torch.Tensor:
        return torch.zeros(8, 1, dtype=torch.uint8)

    tensors: dict[str, torch.Tensor] = {}
    for name, shape in flux_checkpoint_shapes().items():
        key = "model.diffusion_model." + name
        if len(shape) == 2 and kind == "nf4":
            tensors |= {key: u8(), key + ".absmax": torch.zeros(4), key + ".quant_map": torch.zeros(16),
                        key + ".quant_state.bitsandbytes__nf4": u8()}  # fmt: skip
        elif len(shape) == 2:
            tensors |= {key: torch.zeros(shape, dtype=torch.int8), key.removesuffix(".weight") + ".SCB": torch.zeros(shape[0]),
                        key.removesuffix(".weight") + ".weight_format": torch.zeros((), dtype=torch.uint8)}  # fmt: skip
        else:
            tensors[key] = torch.zeros(shape, dtype=torch.bfloat16)
    return _write(path, tensors)


@pytest.mark.parametrize(("kind", "fmt"), [("nf4", "bnb_quantized_nf4b"), ("int8", "bnb_quantized_int8b")])
def test_bitsandbytes_identified_and_refused_without_it(service: ModelLoadService, config: Any, add: Any,
                                                        monkeypatch: pytest.MonkeyPatch, kind: str, fmt: str) -> None:
    """Identified from the key layout alone; a worker where bitsandbytes does not import says so (its load where
    it does: tests/load/test_bnb_load.py)."""
    path = _bnb_flux(config.models_path / f"flux1-dev-bnb-{kind}.safetensors", kind)
    found = probe(path)
    assert (found.model_type, found.model_format, found.base_model, found.quantization) == ("main", fmt, "flux", kind)
    key = add(path.name, "main", fmt, base="flux", quantization=kind)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # the package absent: its import raises ImportError
    with pytest.raises(InvalidModelException, match="bitsandbytes checkpoints need bitsandbytes, which does not import") as err:
        service.get_model(key, SubModelType.Transformer)
    assert "\n" not in str(err.value)
    assert service.cache.stats().models == 0


def _comfy_quant(fmt: str) -> torch.Tensor:
    return torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_comfy_quant_fp8_flux_loaded_with_its_weight_scales(service: ModelLoadService, config: Any, add: Any,
                                                            dtype: torch.dtype) -> None:
    """ComfyUI's newer "fp8_mixed" layout: each quantized layer has ``.comfy_quant`` (uint8 JSON naming its
    format), ``.weight_scale`` and ``.input_scale``; no ``scaled_fp8`` marker. The weights are loaded upcast
    times their weight_scale, and no config or input scale is left in the model."""
    state = tf.flux_transformer_state()
    fmt = "float8_e4m3fn" if dtype == torch.float8_e4m3fn else "float8_e5m2"
    stored: dict[str, torch.Tensor] = {}
    expected: dict[str, torch.Tensor] = {}
    for name, w in state.items():
        w = w.detach().float()
        if w.dim() == 2:
            layer = name.removesuffix(".weight")
            scale = (w.abs().max() / 8).clamp(min=1e-3).reshape(())
            stored[name] = (w / scale).to(dtype)
            stored[layer + ".weight_scale"] = scale.float()
            stored[layer + ".input_scale"] = torch.tensor(3.0)  # would change the values were it folded
            stored[layer + ".comfy_quant"] = _comfy_quant(fmt)
            expected[name] = stored[name].float() * scale
        else:
            expected[name] = stored[name] = w.to(torch.bfloat16).float()
    path = _write(config.models_path / "flux-fp8-mixed.safetensors", stored)
    assert probe(path).quantization == "fp8_scaled"
    precision = "fp8_e4m3fn" if dtype == torch.float8_e4m3fn else "fp8_e5m2"
    key = add("flux-fp8-mixed.safetensors", "main", "checkpoint", base="flux", config="flux-dev", precision=precision)
    with service.get_model(key, SubModelType.Transformer) as model:
        got = model.state_dict()
        assert got.keys() == expected.keys()
        for name, want in expected.items():
            assert torch.equal(got[name], want), name


@pytest.mark.parametrize("conf", ["nvfp4", "malformed"])
def test_comfy_quant_other_formats_refused_naming_them(service: ModelLoadService, config: Any, add: Any,
                                                       conf: str) -> None:
    state = {k: v.detach().to(torch.bfloat16) for k, v in tf.flux_transformer_state().items()}
    layer = next(k for k, v in state.items() if v.dim() == 2).removesuffix(".weight")
    rows, cols = state[layer + ".weight"].shape
    state[layer + ".weight"] = torch.zeros(rows, cols // 2, dtype=torch.uint8)  # two fp4 values a byte
    state[layer + ".weight_scale"] = torch.ones(rows, max(cols // 16, 1)).to(torch.float8_e4m3fn)
    state[layer + ".weight_scale_2"] = torch.tensor(1.0)
    state[layer + ".comfy_quant"] = (_comfy_quant("nvfp4") if conf == "nvfp4"
                                     else torch.tensor(list(b"{not json"), dtype=torch.uint8))
    _write(config.models_path / "flux-nvfp4.safetensors", state)
    key = add("flux-nvfp4.safetensors", "main", "checkpoint", base="flux", config="flux-dev")
    want = (f"ComfyUI nvfp4 quantization is not supported: {layer}$" if conf == "nvfp4"
            else f"ComfyUI quantization config {layer}.comfy_quant is malformed")
    with pytest.raises(InvalidModelException, match=want), service.get_model(key, SubModelType.Transformer):
        pass
