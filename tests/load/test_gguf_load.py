"""A GGUF FLUX transformer (real Q8_0 weights written with the gguf package) loads through the load
service with diffusers' GGUF support: its weights stay quantized, and it computes what the dequantized
weights compute."""

from __future__ import annotations

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
