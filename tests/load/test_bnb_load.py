"""bitsandbytes NF4/FP4 and LLM.int8 FLUX transformers load kept quantized, on the CPU where bitsandbytes'
CPU backend runs: lllyasviel's layout (BFL names, nested or plain block scales, the VAE bundled) and
diffusers' names. The files are made here by quantizing a tiny FLUX with bitsandbytes' own functions.
A bad quant state refuses the load with one line naming the tensor."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file

from modelbus.services.load import InvalidModelException, ModelLoadService
from modelbus.services.load.tensors import move_object
from modelbus.services.probe import probe
from modelbus.services.records.enums import SubModelType
from tests.fixtures import transformer_files as tf
from tests.fixtures.loadable import T5_CFG, flux_to_bfl

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install -e .[dev])")
F = bnb.functional
_QS = ".quant_state.bitsandbytes__"


def _quantize(state: dict[str, torch.Tensor], kind: str, nested: bool
              ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``state``'s matrices quantized as bnb saves them, and every tensor as the quantized file gives it back."""
    stored: dict[str, torch.Tensor] = {}
    back: dict[str, torch.Tensor] = {}
    for key, w in state.items():
        w = w.detach().to(torch.bfloat16)
        if w.dim() != 2:
            stored[key] = back[key] = w
        elif kind == "int8":
            cb, scb, _ = F.int8_vectorwise_quant(w.half())
            stem = key.removesuffix(".weight")
            stored |= {key: cb, stem + ".SCB": scb, stem + ".weight_format": torch.zeros((), dtype=torch.uint8)}
            back[key] = (cb.float() * scb.float()[:, None] / 127).to(torch.bfloat16)
        else:
            data, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type=kind)
            stored[key] = data
            stored |= {f"{key}.{k}": v for k, v in qs.as_dict(packed=True).items()}
            back[key] = F.dequantize_4bit(data, qs)
    return stored, back


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def _reference(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, out_channels=64, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8))
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"hidden_states": torch.randn(1, 16, 64, generator=g), "encoder_hidden_states": torch.randn(1, 8, 32, generator=g),
            "pooled_projections": torch.randn(1, 32, generator=g), "timestep": torch.tensor([0.5]),
            "guidance": torch.tensor([3.5]), "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(8, 3)}


def _run(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**_inputs(), return_dict=False)[0].float()


LAYOUTS = [("nf4", True, "bfl"), ("nf4", False, "bfl"), ("fp4", False, "bfl"), ("nf4", True, "diffusers"),
           ("int8", False, "bfl"), ("int8", False, "diffusers")]


@pytest.mark.parametrize(("kind", "nested", "layout"), LAYOUTS)
def test_bnb_flux_loads_quantized_and_matches(service: ModelLoadService, config: Any, add: Any, kind: str,
                                              nested: bool, layout: str) -> None:
    state = tf.flux_transformer_state()
    stored, back = _quantize(state, kind, nested)
    if layout == "bfl":  # lllyasviel's: BFL names under model.diffusion_model., a bundled VAE beside them
        stored = _bfl_quantized(state, kind, nested) | {"vae.decoder.conv_in.weight": torch.ones(4, 4, 3, 3)}
    path = _write(config.models_path / f"flux1-dev-bnb-{kind}.safetensors", stored)
    found = probe(path)
    assert (found.model_format, found.base_model, found.quantization) == (
        "bnb_quantized_int8b" if kind == "int8" else "bnb_quantized_nf4b", "flux", kind)
    key = add(path.name, "main", found.model_format, base="flux", quantization=kind)
    with service.get_model(key, SubModelType.Transformer) as model:
        linears = [m for m in model.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]
        assert len(linears) == sum(1 for v in state.values() if v.dim() == 2)  # every matrix stayed quantized
        got = _run(model)
        # the cache moves a model as one flat buffer of its parameters and buffers: the quant state follows
        flat = move_object(model, None, torch.device("cpu"))
        assert flat is not None and torch.equal(_run(model), got)
        for m in linears:  # ... the state the kernels read is the moved one, not a copy left behind
            read = m.state.SCB if kind == "int8" else m.weight.quant_state.absmax
            assert read.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    want_dequantized, want_original = _run(_reference(back)), _run(_reference(state))
    assert got.shape == want_original.shape
    # the quantized model computes with the file's dequantized weights (bf16 rounding apart) ...
    assert torch.allclose(got, want_dequantized, atol=0.05, rtol=0.05), (got - want_dequantized).abs().max()
    # ... and is as near the unquantized model as bnb's quantization error lets it be
    error = (got - want_original).abs().mean() / want_original.abs().mean()
    assert error < (0.25 if kind in ("nf4", "fp4") else 0.03), error  # (measured: 0.12-0.16, 0.010)
    assert error > 0  # the weights really were quantized


def _bfl_quantized(state: dict[str, torch.Tensor], kind: str, nested: bool) -> dict[str, torch.Tensor]:
    """BFL's layout quantized after fusing (as lllyasviel's files are): fused q/k/v are quantized whole."""
    bfl = flux_to_bfl({k: v.detach() for k, v in state.items()}, prefix="model.diffusion_model.")
    return _quantize(bfl, kind, nested)[0]


def test_bnb_split_parts_dequantize_to_the_fused_rows(service: ModelLoadService, config: Any, add: Any) -> None:
    """A fused q/k/v split by the loader is the fused weight's rows, bit for bit after dequantizing."""
    state = tf.flux_transformer_state()
    stored = _bfl_quantized(state, "nf4", True)
    path = _write(config.models_path / "flux-nf4-split.safetensors", stored)
    key = add(path.name, "main", "bnb_quantized_nf4b", base="flux", quantization="nf4")
    from bitsandbytes.functional import QuantState

    fused = "model.diffusion_model.double_blocks.0.img_attn.qkv.weight"
    qs = QuantState.from_dict({k[len(fused) + 1:]: v for k, v in stored.items() if k.startswith(fused + ".")}, torch.device("cpu"))
    whole = F.dequantize_4bit(stored[fused], qs)
    with service.get_model(key, SubModelType.Transformer) as model:
        for i, name in enumerate(("to_q", "to_k", "to_v")):
            layer = getattr(model.transformer_blocks[0].attn, name)
            part = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
            assert torch.equal(part, whole[32 * i: 32 * (i + 1)]), name


def _bad(stored: dict[str, torch.Tensor], how: str) -> dict[str, torch.Tensor]:
    key = "model.diffusion_model.double_blocks.0.img_attn.qkv.weight"
    blob = stored[key + _QS + "nf4"]
    if how == "missing-state":
        del stored[key + _QS + "nf4"]
    elif how == "truncated-state":
        stored[key + _QS + "nf4"] = blob[: len(blob) // 2]
    elif how == "unknown-type":
        stored[key + _QS + "nf3"] = stored.pop(key + _QS + "nf4")
    elif how == "missing-absmax":
        del stored[key + ".absmax"]
    elif how == "short-data":
        stored[key] = stored[key][: stored[key].shape[0] // 2]
    elif how in ("wrong-type-in-state", "zero-blocksize", "not-a-dtype"):
        change = {"wrong-type-in-state": {"quant_type": "int3"}, "zero-blocksize": {"blocksize": 0},
                  "not-a-dtype": {"dtype": "Tensor"}}[how]
        packed = json.loads(bytes(blob.numpy()).decode()) | change
        stored[key + _QS + "nf4"] = torch.tensor(list(json.dumps(packed).encode()), dtype=torch.uint8)
    return stored


@pytest.mark.parametrize(("how", "says"), [
    ("missing-state", "absmax has no quant state beside it"),
    ("truncated-state", "quant state is truncated or not JSON"),
    ("unknown-type", "bitsandbytes quant type 'nf3' is not one it knows"),
    ("missing-absmax", "is missing its bitsandbytes absmax"),
    ("short-data", "holds .* bytes and .* block scales; its shape"),
    ("wrong-type-in-state", "quant state says quant type 'int3'"),
    ("zero-blocksize", r"block size \[0, 256\]"),
    ("not-a-dtype", "bitsandbytes uses blocks of .* and a floating dtype"),
])
def test_bnb_bad_quant_state_refused_naming_it(service: ModelLoadService, config: Any, add: Any, how: str,
                                               says: str) -> None:
    stored = _bad(_bfl_quantized(tf.flux_transformer_state(), "nf4", True), how)
    path = _write(config.models_path / f"flux-nf4-{how}.safetensors", stored)
    key = add(path.name, "main", "bnb_quantized_nf4b", base="flux", quantization="nf4")
    with pytest.raises(InvalidModelException, match=says) as err:
        service.get_model(key, SubModelType.Transformer)
    assert "\n" not in str(err.value) and "img_attn.qkv" in str(err.value)
    assert service.cache.stats().models == 0  # nothing half-loaded stays cached


def test_bnb_refused_on_a_device_bitsandbytes_does_not_support(service: ModelLoadService, config: Any) -> None:
    from modelbus.services.load.bnb import bitsandbytes_for

    supported = set(bnb.supported_torch_devices)
    assert "cpu" in supported  # bitsandbytes >= 0.48 runs on the CPU: the loads above ran there
    with pytest.raises(InvalidModelException, match=r"does not run on this worker's device \(meta; it supports .*cpu"):
        bitsandbytes_for(torch.device("meta"), config.models_path / "x.safetensors")


def _quantization_config(kind: str) -> dict[str, Any]:
    if kind == "int8":
        return {"quant_method": "bitsandbytes", "load_in_8bit": True, "llm_int8_threshold": 6.0}
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": kind,
            "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "bfloat16"}


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_bnb_diffusers_folder_loads_quantized(service: ModelLoadService, config: Any, add: Any, kind: str) -> None:
    """A pipeline folder whose transformer (diffusers) and T5 encoder (transformers) were saved with a bnb
    ``quantization_config``, as diffusers' and transformers' ``save_pretrained`` write them."""
    state = tf.flux_transformer_state()
    stored, back = _quantize(state, kind, True)
    root = config.models_path / f"flux-bnb-{kind}"
    folder = root / "transformer"
    _write(folder / "diffusion_pytorch_model.safetensors", stored)
    flux_config = dict(_reference(state).config) | {"_class_name": "FluxTransformer2DModel",
                                                    "quantization_config": _quantization_config(kind)}
    (folder / "config.json").write_text(json.dumps(flux_config))
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(5)
    t5 = T5EncoderModel(T5Config(**T5_CFG)).eval()
    t5.save_pretrained(root / "text_encoder_2")  # its config.json; the weights are replaced by quantized ones
    # what transformers quantizes: the Linears but those it keeps in fp32 (T5's wo)
    keep = set(t5._keep_in_fp32_modules or ())
    linears = {f"{n}.weight" for n, m in t5.named_modules()
               if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] not in keep}
    matrices = {k: v for k, v in t5.state_dict().items() if k in linears}
    rest = {k: v.detach().to(torch.bfloat16) for k, v in t5.state_dict().items()
            if k not in linears and k != "encoder.embed_tokens.weight"}  # (tied to shared.weight)
    t5_quantized, t5_back = _quantize(matrices, kind, True)
    t5_stored = t5_quantized | rest
    _write(root / "text_encoder_2" / "model.safetensors", t5_stored)
    t5_config = json.loads((root / "text_encoder_2" / "config.json").read_text())
    (root / "text_encoder_2" / "config.json").write_text(json.dumps(t5_config | {"quantization_config": _quantization_config(kind)}))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline",
                                                       "transformer": ["diffusers", "FluxTransformer2DModel"],
                                                       "text_encoder_2": ["transformers", "T5EncoderModel"]}))
    found = probe(root)
    assert (found.model_type, found.model_format, found.base_model, found.quantization) == (
        "main", "diffusers", "flux", kind)
    key = add(root.name, "main", "diffusers", base="flux", quantization=kind)
    with service.get_model(key, SubModelType.Transformer) as model:
        assert any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in model.modules())
        got = _run(model)
    assert torch.allclose(got, _run(_reference(back)), atol=0.05, rtol=0.05)
    with service.get_model(key, SubModelType.TextEncoder2) as encoder:
        quantized = [m for m in encoder.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]
        assert len(quantized) == len(matrices)
        ids = torch.tensor([[1, 2, 3, 4]])
        with torch.no_grad():
            out = encoder(input_ids=ids).last_hidden_state.float()
            want = t5(input_ids=ids).last_hidden_state.float()
    t5.load_state_dict({k: v.float() for k, v in t5_back.items()}, strict=False)  # the file's weights, dequantized
    with torch.no_grad():
        dequantized = t5(input_ids=ids).last_hidden_state.float()
    assert torch.allclose(out, dequantized, atol=0.05, rtol=0.05), (out - dequantized).abs().max()
    assert not torch.equal(out, want)  # the weights really were quantized
