"""GGUF transformers (real quantized weights written with the gguf package) load through the load
service with diffusers' GGUF support: their weights stay quantized, they compute what the dequantized
weights compute, and the load is what diffusers' own GGUF load (``from_single_file`` with a
``GGUFQuantizationConfig``) gives, parameter by parameter and byte for byte, and forward for forward.
Bad files (truncated, a type nobody or diffusers cannot dequantize, shapes the config disagrees with)
are refused, naming the problem."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import FluxTransformer2DModel

from modelbus.services.load import InvalidModelException, ModelLoadService
from modelbus.services.probe import probe
from modelbus.services.records.enums import SubModelType
from tests.fixtures import gguf_files as g
from tests.fixtures import transformer_files as tf
from tests.load.test_transformer_kinds import _flux_config, _flux_inputs


def test_gguf_flux_loads_quantized(service: ModelLoadService, config: Any, add: Any) -> None:
    from diffusers.quantizers.gguf.utils import GGUFParameter

    state = tf.flux_transformer_state()
    path = g.write_gguf_weights(config.models_path / "flux1-dev-tiny-Q8_0.gguf", state, "Q8_0")
    found = probe(path)
    assert (found.model_format, found.base_model, found.quantization) == ("gguf", "flux", "Q8_0")
    key = add(path.name, "main", "gguf", base="flux", quantization="Q8_0")
    with service.get_model(key, SubModelType.Transformer) as model:
        assert isinstance(model, FluxTransformer2DModel)
        to_q = model.transformer_blocks[0].attn.to_q.weight
        assert isinstance(to_q, GGUFParameter) and to_q.quant_type.name == "Q8_0"
        ref = FluxTransformer2DModel(**_flux_config(True)).eval()
        ref.load_state_dict(g.dequantized(path))
        with torch.no_grad():
            got, want = model(**_flux_inputs(64, True)).sample, ref(**_flux_inputs(64, True)).sample
        assert torch.allclose(got, want, atol=2e-3, rtol=1e-3)  # dequantized in another order


def test_gguf_loads_only_as_the_transformer(service: ModelLoadService, config: Any, add: Any) -> None:
    path = g.write_gguf_weights(config.models_path / "f.gguf", tf.flux_transformer_state(), "Q8_0")
    key = add(path.name, "main", "gguf", base="flux")
    with pytest.raises(InvalidModelException, match="holds only a transformer"):
        service.get_model(key, SubModelType.Vae)


def test_gguf_size_estimate_is_the_quantized_size(config: Any, add: Any, store: Any) -> None:
    from modelbus.services.load.estimate import estimate_bytes
    from modelbus.services.load.kit import LoadRequest
    from modelbus.services.probe.gguf_file import read_gguf_header

    state = tf.flux_transformer_state()
    path = g.write_gguf_weights(config.models_path / "q.gguf", state, "Q8_0")
    record = store.get_model(add(path.name, "main", "gguf", base="flux"))
    req = LoadRequest(record, path, SubModelType.Transformer, torch.device("cpu"), torch.float32)
    fp32 = sum(t.numel() * 4 for t in state.values())
    assert estimate_bytes(req) == read_gguf_header(path).data_bytes() < fp32 / 3


# tiny configs whose widths fill Q8_0/Q4_0 blocks of 32, so most weights are quantized
TINY: dict[str, tuple[str, dict[str, Any]]] = {
    "flux": ("FluxTransformer2DModel", _flux_config(True)),
    "qwen-image": ("QwenImageTransformer2DModel", {"patch_size": 2, "in_channels": 32, "out_channels": 4,
                   "num_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
                   "axes_dims_rope": [4, 6, 6]}),
    "wan-2.1": ("WanTransformer3DModel", {"patch_size": [1, 2, 2], "num_attention_heads": 2, "attention_head_dim": 16,
                "in_channels": 4, "out_channels": 4, "text_dim": 32, "freq_dim": 32, "ffn_dim": 64, "num_layers": 2,
                "rope_max_seq_len": 32}),
}  # fmt: skip
# the same families 256 wide (K-quant blocks are 256 long), so that most Linear weights take a K-quant
TINY_K: dict[str, tuple[str, dict[str, Any]]] = {
    "flux": ("FluxTransformer2DModel", _flux_config(True, 256) | {"num_attention_heads": 16, "joint_attention_dim": 256,
             "pooled_projection_dim": 256}),
    "qwen-image": ("QwenImageTransformer2DModel", TINY["qwen-image"][1] | {"in_channels": 256, "num_attention_heads": 16,
                   "joint_attention_dim": 256}),
    "wan-2.1": ("WanTransformer3DModel", TINY["wan-2.1"][1] | {"num_attention_heads": 16, "text_dim": 256,
                "freq_dim": 256, "ffn_dim": 512}),
}  # fmt: skip


def _tiny(base: str, tiny: dict[str, tuple[str, dict[str, Any]]] = TINY) -> torch.nn.Module:
    import diffusers

    cls, config = tiny[base]
    torch.manual_seed(0)
    model: torch.nn.Module = getattr(diffusers, cls)(**config)
    with torch.no_grad():  # zero-initialised layers (FLUX's, Qwen's output gates) would make every output 0
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _inputs(base: str, dtype: torch.dtype, width: int = 32) -> dict[str, Any]:
    """The tiny configs' inputs; ``width`` 256: ``TINY_K``'s."""
    torch.manual_seed(1)
    if base == "flux":
        feed = _flux_inputs(64, True) if width == 32 else _flux_inputs(width, True) | {
            "encoder_hidden_states": torch.randn(1, 3, width), "pooled_projections": torch.randn(1, width)}
    elif base == "qwen-image":
        feed = {"hidden_states": torch.randn(1, 4, width), "encoder_hidden_states": torch.randn(1, 3, width),
                "encoder_hidden_states_mask": torch.ones(1, 3), "timestep": torch.tensor([0.5]),
                "img_shapes": [(1, 2, 2)]}  # fmt: skip
    else:
        feed = {"hidden_states": torch.randn(1, 4, 1, 4, 4), "timestep": torch.tensor([500]),
                "encoder_hidden_states": torch.randn(1, 3, width)}  # fmt: skip
    floats = ("hidden_states", "encoder_hidden_states", "pooled_projections")
    return {k: v.to(dtype) if k in floats else v for k, v in feed.items()}


def _write(config: Any, base: str, quant: str, prefix: str = "",
           tiny: dict[str, tuple[str, dict[str, Any]]] = TINY) -> tuple[Path, dict[str, Any]]:
    cls, kwargs = tiny[base]
    state = {prefix + k: v for k, v in _tiny(base, tiny).state_dict().items()}
    path = g.write_gguf_weights(config.models_path / f"{base}-tiny-{quant}{prefix[:5]}.gguf", state, quant)
    folder = config.models_path / f"{base}-config"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": cls, **kwargs}))
    return path, {"_class_name": cls, **kwargs}


def _diffusers_gguf(path: Path, config: dict[str, Any], dtype: torch.dtype) -> Any:
    """diffusers' own GGUF load, the reference: its config from a folder, never the network."""
    import diffusers
    from diffusers import GGUFQuantizationConfig

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        return getattr(diffusers, config["_class_name"]).from_single_file(
            str(path), config=tmp, local_files_only=True, torch_dtype=dtype,
            quantization_config=GGUFQuantizationConfig(compute_dtype=dtype)).eval()  # fmt: skip


def _same_as_diffusers(ours: Any, theirs: Any) -> int:
    """Module for module, tensor for tensor: the same kinds, types, dtypes, shapes and bytes; returns
    how many weights are quantized."""
    from diffusers.quantizers.gguf.utils import GGUFParameter, dequantize_gguf_tensor

    assert [(n, type(m).__name__) for n, m in ours.named_modules()] == \
        [(n, type(m).__name__) for n, m in theirs.named_modules()]
    mine, want = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert mine.keys() == want.keys()
    quantized = 0
    for name, p in want.items():
        q = mine[name]
        # (diffusers leaves a weight it dequantizes at load, in a module kept in fp32, a plain tensor in
        # the module's parameters; ours is a Parameter: the same values, the same dtype)
        assert isinstance(q, GGUFParameter) == isinstance(p, GGUFParameter), name
        assert q.dtype == p.dtype and q.shape == p.shape, name
        if isinstance(p, GGUFParameter):
            quantized += 1
            assert q.quant_type == p.quant_type and q.quant_shape == p.quant_shape, name
            assert torch.equal(q.as_tensor(), p.as_tensor()), name
            assert torch.equal(dequantize_gguf_tensor(q), dequantize_gguf_tensor(p)), name
        else:
            assert torch.equal(q, p), name
    mine_b, want_b = dict(ours.named_buffers()), dict(theirs.named_buffers())
    assert mine_b.keys() == want_b.keys()
    for name, b in want_b.items():
        assert mine_b[name].dtype == b.dtype and torch.equal(mine_b[name], b), name
    return quantized


CASES = {  # base, quantization, compute dtype, name prefix (ComfyUI's)
    "flux-Q8_0-bf16": ("flux", "Q8_0", torch.bfloat16, ""),
    "flux-Q4_0-fp32": ("flux", "Q4_0", torch.float32, ""),
    "qwen-image-Q8_0-bf16-comfy": ("qwen-image", "Q8_0", torch.bfloat16, "model.diffusion_model."),
    "qwen-image-Q5_1-fp32": ("qwen-image", "Q5_1", torch.float32, ""),
    "wan-Q8_0-bf16": ("wan-2.1", "Q8_0", torch.bfloat16, ""),  # Wan keeps its norms and time embedder in fp32
    "wan-Q4_0-fp32-comfy": ("wan-2.1", "Q4_0", torch.float32, "model.diffusion_model."),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_gguf_load_is_diffusers_gguf_load(config: Any, add: Any, store: Any, case: str) -> None:
    from modelbus.services.load.gguf import load_gguf_main
    from modelbus.services.load.kit import LoadRequest

    base, quant, dtype, prefix = CASES[case]
    path, model_config = _write(config, base, quant, prefix)
    key = add(path.name, "main", "gguf", base=base, quantization=quant,
              **({} if base == "flux" else {"config": f"{base}-config"}))
    req = LoadRequest(store.get_model(key), path, SubModelType.Transformer, torch.device("cpu"), dtype)
    ours = load_gguf_main(req).model
    # diffusers' GGUF load takes no ComfyUI prefix: its reference is the same file without one
    plain = path if not prefix else _write(config, base, quant)[0].rename(config.models_path / "plain.gguf")
    theirs = _diffusers_gguf(plain, model_config, dtype)
    assert _same_as_diffusers(ours, theirs) > 0
    feed = _inputs(base, dtype)
    with torch.no_grad():
        got, want = ours(**feed, return_dict=False)[0], theirs(**feed, return_dict=False)[0]
    assert got.dtype == dtype and got.abs().sum() > 0
    assert torch.equal(got, want)


K_CASES = [(base, quant, torch.bfloat16 if quant == "Q4_K" else torch.float32)
           for base in ("flux", "qwen-image", "wan-2.1") for quant in g.K_QUANTS]


@pytest.mark.parametrize(("base", "quant", "dtype"), K_CASES, ids=[f"{b}-{q}-{str(d)[6:]}" for b, q, d in K_CASES])
def test_gguf_k_quant_load_is_diffusers_gguf_load(config: Any, add: Any, store: Any, base: str, quant: str,
                                                  dtype: torch.dtype) -> None:
    """K-quants (what most community FLUX/Qwen-Image/Wan GGUFs ship): the same parameters, types, raw
    bytes, dequantized values and forward output as diffusers' own GGUF load of the same file."""
    from diffusers.quantizers.gguf.utils import GGUFParameter

    from modelbus.services.load.gguf import load_gguf_main
    from modelbus.services.load.kit import LoadRequest

    path, model_config = _write(config, base, quant, tiny=TINY_K)
    key = add(path.name, "main", "gguf", base=base, quantization=quant,
              **({} if base == "flux" else {"config": f"{base}-config"}))
    req = LoadRequest(store.get_model(key), path, SubModelType.Transformer, torch.device("cpu"), dtype)
    ours = load_gguf_main(req).model
    theirs = _diffusers_gguf(path, model_config, dtype)
    kinds = {p.quant_type.name for p in ours.parameters() if isinstance(p, GGUFParameter)}
    assert _same_as_diffusers(ours, theirs) > 10 and kinds == {quant}
    feed = _inputs(base, dtype, 256)
    with torch.no_grad():
        got, want = ours(**feed, return_dict=False)[0], theirs(**feed, return_dict=False)[0]
    assert got.dtype == dtype and torch.isfinite(got).all() and got.abs().sum() > 0
    assert torch.equal(got, want)


@pytest.mark.parametrize("quant", sorted(g.K_QUANTS))
def test_gguf_k_quant_probe_and_size_estimate(config: Any, add: Any, store: Any, quant: str) -> None:
    """A K-quant file is recorded as its type (``Q4_K``...) and estimated at its blocks' size."""
    import gguf

    from modelbus.services.load.estimate import estimate_bytes
    from modelbus.services.load.kit import LoadRequest

    path, _ = _write(config, "flux", quant, tiny=TINY_K)
    found = probe(path)
    assert (found.model_format, found.base_model, found.quantization) == ("gguf", "flux", quant)
    record = store.get_model(add(path.name, "main", "gguf", base="flux", quantization=quant))
    req = LoadRequest(record, path, SubModelType.Transformer, torch.device("cpu"), torch.float32)
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[quant]]
    reader = gguf.GGUFReader(path)
    want = sum(int(t.n_elements) // block * size if t.tensor_type.name == quant else int(t.n_bytes)
               for t in reader.tensors)  # fmt: skip
    assert estimate_bytes(req) == want < sum(int(t.n_elements) * 4 for t in reader.tensors) / 4


@pytest.mark.parametrize("quant", sorted(g.K_QUANTS))
def test_gguf_package_and_diffusers_dequantize_k_quants_alike(quant: str) -> None:
    """The two references agree on the same bytes: diffusers' dequantize in float32 is gguf-py's
    exactly; diffusers' default (the loads', in the fp16 of the block scales) is it to fp16 rounding."""
    import gguf
    from diffusers.quantizers.gguf.utils import GGUFParameter, dequantize_functions, dequantize_gguf_tensor

    kind = gguf.GGMLQuantizationType[quant]
    block, size = gguf.GGML_QUANT_SIZES[kind]
    raw = g.kquant_blocks((48, 512), quant)
    ref = torch.from_numpy(gguf.quants.dequantize(raw, kind))
    assert ref.shape == (48, 512) and torch.isfinite(ref).all() and 0.01 < ref.abs().max() < 0.1
    blocks = torch.from_numpy(raw).reshape(-1, size)
    assert torch.equal(dequantize_functions[kind](blocks, block, size, torch.float32).reshape(48, 512), ref)
    default = dequantize_gguf_tensor(GGUFParameter(torch.from_numpy(raw), quant_type=kind))
    assert default.shape == ref.shape
    torch.testing.assert_close(default.float(), ref, rtol=0, atol=ref.abs().max().item() * 2e-3)


def test_gguf_mixed_k_quant_file_is_diffusers_gguf_load(config: Any, add: Any, store: Any) -> None:
    """A Q4_K_M-style file (most weights Q4_K, the value and MLP-out ones Q6_K, a few Q8_0): recorded
    as Q4_K, each weight kept in its own type, as diffusers' load keeps it."""
    from diffusers.quantizers.gguf.utils import GGUFParameter

    from modelbus.services.load.gguf import load_gguf_main
    from modelbus.services.load.kit import LoadRequest

    state = _tiny("flux", TINY_K).state_dict()
    types = {k: "Q6_K" for k in state if k.endswith(("attn.to_v.weight", "ff.net.2.weight"))}
    types |= {"x_embedder.weight": "Q8_0", "proj_out.weight": "Q8_0"}
    path = g.write_gguf_weights(config.models_path / "flux1-dev-tiny-Q4_K_M.gguf", state, "Q4_K", types=types)
    assert probe(path).quantization == "Q4_K"
    req = LoadRequest(store.get_model(add(path.name, "main", "gguf", base="flux")), path, SubModelType.Transformer,
                      torch.device("cpu"), torch.bfloat16)  # fmt: skip
    ours = load_gguf_main(req).model
    theirs = _diffusers_gguf(path, {"_class_name": "FluxTransformer2DModel", **TINY_K["flux"][1]}, torch.bfloat16)
    assert _same_as_diffusers(ours, theirs) > 10
    kinds = {n: p.quant_type.name for n, p in ours.named_parameters() if isinstance(p, GGUFParameter)}
    assert set(kinds.values()) == {"Q4_K", "Q6_K", "Q8_0"}
    assert all(kinds[n] == types.get(n, "Q4_K") for n in kinds)
    feed = _inputs("flux", torch.bfloat16, 256)
    with torch.no_grad():
        assert torch.equal(ours(**feed, return_dict=False)[0], theirs(**feed, return_dict=False)[0])


def test_k_quant_type_on_rows_short_of_a_block_is_refused(service: ModelLoadService, config: Any, add: Any) -> None:
    """A header declaring a K-quant for a 32-wide weight (K blocks are 256 long) is refused, naming it."""
    import gguf

    name = "transformer_blocks.0.attn.to_q.weight"  # (32, 32)
    path = _flux_retyped(config, "short.gguf", name, gguf.GGMLQuantizationType.Q4_K.value)
    _refused(service, add(path.name, "main", "gguf", base="flux"),
             rf"{name}' of shape \(32, 32\) does not fill whole Q4_K blocks of 256")


def test_gguf_loads_again_from_the_skeleton_and_both_compute_alike(service: ModelLoadService, config: Any,
                                                                   add: Any) -> None:
    """A second load (the skeleton's clone, recycled host memory) is the first's twin, and turning one
    clone's layers into GGUF layers leaves the kept skeleton plain."""
    from diffusers.quantizers.gguf.utils import GGUFLinear

    from modelbus.services.load import skeleton

    path, _ = _write(config, "qwen-image", "Q8_0")
    key = add(path.name, "main", "gguf", base="qwen-image", config="qwen-image-config")
    outs = []
    for _ in range(2):
        service.drop_model(key)  # the second load is a load, not the cache's copy
        with service.get_model(key, SubModelType.Transformer) as model:
            assert isinstance(model.transformer_blocks[0].attn.to_q, GGUFLinear)
            with torch.no_grad():
                outs.append(model(**_inputs("qwen-image", torch.float32), return_dict=False)[0])
    assert torch.equal(outs[0], outs[1])
    if skeleton.SKELETONS > 0:  # (MODELBUS_SKELETON_CACHE=0 keeps none)
        kept = skeleton.skeleton_model(type(model), TINY["qwen-image"][1], lambda: pytest.fail("no skeleton kept"))
        assert type(kept.transformer_blocks[0].attn.to_q) is torch.nn.Linear


def _flux_retyped(config: Any, file: str, name: str, quant_type: int) -> Path:
    """A tiny FLUX Q8_0 GGUF whose header then declares ``name`` of ``quant_type``."""
    path = g.write_gguf_weights(config.models_path / file, tf.flux_transformer_state(), "Q8_0")
    g.set_tensor_type(path, name, quant_type)
    return path


def _refused(service: ModelLoadService, key: str, match: str) -> None:
    with pytest.raises(InvalidModelException, match=match):
        service.get_model(key, SubModelType.Transformer)


def test_truncated_gguf_is_refused(service: ModelLoadService, config: Any, add: Any) -> None:
    path = g.write_gguf_weights(config.models_path / "cut.gguf", tf.flux_transformer_state(), "Q8_0")
    with path.open("r+b") as fh:
        fh.truncate(path.stat().st_size - 1000)
    _refused(service, add(path.name, "main", "gguf", base="flux"), r"truncated GGUF: tensor .* ends at byte")


def test_unknown_and_undequantizable_types_are_refused(service: ModelLoadService, config: Any, add: Any) -> None:
    import gguf

    name = "time_text_embed.timestep_embedder.linear_1.weight"  # (32, 256): whole blocks of 256 too
    path = _flux_retyped(config, "odd.gguf", name, 99)
    _refused(service, add(path.name, "main", "gguf", base="flux"), f"{name}' has unknown quantization type 99")
    path = _flux_retyped(config, "iq.gguf", name, gguf.GGMLQuantizationType.IQ2_XXS.value)
    _refused(service, add(path.name, "main", "gguf", base="flux"),
             f"{name}' .* is IQ2_XXS, which diffusers' GGUF support cannot dequantize")


def test_tensor_shapes_disagreeing_with_the_config_are_refused(service: ModelLoadService, config: Any,
                                                                add: Any) -> None:
    path, _ = _write(config, "qwen-image", "Q8_0")
    wider = json.loads((config.models_path / "qwen-image-config" / "config.json").read_text())
    folder = config.models_path / "wider"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(wider | {"joint_attention_dim": 64}))
    _refused(service, add(path.name, "main", "gguf", base="qwen-image", config="wider"),
             r"GGUF tensor txt_norm.weight \(F32\) has shape \[32\], the QwenImageTransformer2DModel of its config "
             r"has \[64\]")
    state = tf.flux_transformer_state()  # FLUX: the config comes from the file; one block disagrees with it
    state["transformer_blocks.0.attn.to_k.weight"] = torch.randn(32, 64)
    path = g.write_gguf_weights(config.models_path / "bad-flux.gguf", state, "Q8_0")
    _refused(service, add(path.name, "main", "gguf", base="flux"),
             r"transformer_blocks.0.attn.to_k.weight \(Q8_0\) has shape \[32, 64\], .* has \[32, 32\]")


DEQUANTIZED = [("flux", "Q8_0", torch.bfloat16), ("wan-2.1", "Q8_0", torch.bfloat16),
               ("qwen-image", "Q5_1", torch.float32), ("flux", "Q5_K", torch.bfloat16),
               ("wan-2.1", "Q3_K", torch.bfloat16), ("qwen-image", "Q6_K", torch.float32)]


@pytest.mark.parametrize(("base", "quant", "dtype"), DEQUANTIZED, ids=[f"{b}-{q}-{str(d)[6:]}" for b, q, d in DEQUANTIZED])
def test_gguf_dequantized_on_load_is_diffusers_dequantize(config: Any, store: Any, add: Any, base: str, quant: str,
                                                          dtype: torch.dtype) -> None:
    """``gguf_dequantize``: plain layers holding the dequantized weights in the inference dtype (float32
    in the modules the class keeps so), what diffusers' ``model.dequantize()`` makes of its GGUF load;
    the size estimate is then the dequantized size. K-quants: on the 256-wide configs."""
    from modelbus.services.load.estimate import estimate_bytes
    from modelbus.services.load.gguf import load_gguf_main
    from modelbus.services.load.kit import LoadRequest

    width = 256 if quant in g.K_QUANTS else 32
    path, model_config = _write(config, base, quant, tiny=TINY_K if width == 256 else TINY)
    key = add(path.name, "main", "gguf", base=base, **({} if base == "flux" else {"config": f"{base}-config"}))
    req = LoadRequest(store.get_model(key), path, SubModelType.Transformer, torch.device("cpu"), dtype,
                      gguf_dequantize=True)  # fmt: skip
    ours = load_gguf_main(req).model
    theirs = _diffusers_gguf(path, model_config, dtype)
    theirs.dequantize()
    assert _same_as_diffusers(ours, theirs) == 0
    feed = _inputs(base, dtype, width)
    with torch.no_grad():
        got, want = ours(**feed, return_dict=False)[0], theirs(**feed, return_dict=False)[0]
    assert torch.equal(got, want)
    assert estimate_bytes(req) == sum(t.numel() for t in g.dequantized(path).values()) * dtype.itemsize


def test_gguf_dequantize_setting_reaches_the_loader(modelbus_env: dict[str, str], store: Any, add: Any,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """``MODELBUS_GGUF_DEQUANTIZE`` through the load service: no GGUF layer left."""
    from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter

    from modelbus.services.config import AppConfig

    monkeypatch.setenv("MODELBUS_GGUF_DEQUANTIZE", "1")
    cfg = AppConfig.load(device="cpu", ram_cache_size="256M", vram_cache_size="0")
    cfg.models_path.mkdir(parents=True, exist_ok=True)
    path = g.write_gguf_weights(cfg.models_path / "d.gguf", tf.flux_transformer_state(), "Q8_0")
    with ModelLoadService(cfg, store).get_model(add(path.name, "main", "gguf", base="flux"),
                                                SubModelType.Transformer) as model:
        assert not any(isinstance(m, GGUFLinear) for m in model.modules())
        assert not any(isinstance(p, GGUFParameter) for p in model.parameters())
        assert model.transformer_blocks[0].attn.to_q.weight.dtype == torch.float32


def test_gguf_flux_in_bfl_layout_is_diffusers_gguf_load_of_its_diffusers_names(config: Any, store: Any,
                                                                                add: Any) -> None:
    """city96's FLUX files keep BFL's names (``double_blocks``, q/k/v and a single block's MLP fused):
    converted on the quantized bytes (row splits keep whole blocks), they are what diffusers' GGUF load
    makes of the same weights written in diffusers' names."""
    from modelbus.services.load.gguf import load_gguf_main
    from modelbus.services.load.kit import LoadRequest
    from tests.fixtures.loadable import flux_to_bfl

    state = _tiny("flux").state_dict()
    bfl = g.write_gguf_weights(config.models_path / "flux1-dev-bfl-Q8_0.gguf", flux_to_bfl(state, ""), "Q8_0")
    named = g.write_gguf_weights(config.models_path / "flux1-dev-diffusers-Q8_0.gguf", state, "Q8_0")
    req = LoadRequest(store.get_model(add(bfl.name, "main", "gguf", base="flux")), bfl, SubModelType.Transformer,
                      torch.device("cpu"), torch.bfloat16)  # fmt: skip
    ours = load_gguf_main(req).model
    theirs = _diffusers_gguf(named, {"_class_name": "FluxTransformer2DModel", **TINY["flux"][1]}, torch.bfloat16)
    assert _same_as_diffusers(ours, theirs) > 0
    feed = _inputs("flux", torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(ours(**feed, return_dict=False)[0], theirs(**feed, return_dict=False)[0])


def test_tensors_sharing_bytes_or_misaligned_are_refused(service: ModelLoadService, config: Any, add: Any) -> None:
    """Each tensor is a view of one buffer: a hostile header cannot make two weights one, nor a float
    tensor start between its elements."""
    from modelbus.services.probe.gguf_file import read_gguf_header

    state = tf.flux_transformer_state()
    path = g.write_gguf_weights(config.models_path / "alias.gguf", state, "Q8_0")
    tensors = read_gguf_header(path).tensors
    g.set_tensor_offset(path, "transformer_blocks.0.attn.to_k.weight", tensors["transformer_blocks.0.attn.to_q.weight"][2])
    _refused(service, add(path.name, "main", "gguf", base="flux"), r"GGUF tensors '.*' and '.*' overlap in the file")
    path = g.write_gguf_weights(config.models_path / "odd.gguf", state, "Q8_0")
    bias = "transformer_blocks.0.attn.to_q.bias"
    assert tensors[bias][1] == "F32"
    g.set_tensor_offset(path, bias, tensors[bias][2] + 2)
    _refused(service, add(path.name, "main", "gguf", base="flux"),
             f"GGUF tensor '{bias}' \\(F32\\) starts at data offset {tensors[bias][2] + 2}, not aligned")
