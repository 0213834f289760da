"""IP-Adapters loaded offline through the load service: h94's layout in one file (safetensors or a
torch pickle) and InvokeAI's folder; IP-Adapter, Plus, full-face, FaceID and FaceID Plus, for SD-1
and SDXL UNets.

The files are tiny but real (h94's key names, shapes sized to the builders' tiny UNets). Every
loaded adapter is checked against diffusers' own path (``UNet2DConditionModel._load_ip_adapter_weights``
on a copy of the UNet): the same image projection, weight for weight, and the same UNet output
once the loaded adapter is patched into the UNet.
"""

from __future__ import annotations

import copy
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.embeddings import MultiIPAdapterImageProjection

from modelbus.services.load import InvalidModelException, ModelLoadService, UnsafeModelException
from modelbus.services.load.estimate import estimate_bytes
from modelbus.services.load.ip_adapters import IPAdapter, load_ip_adapter
from modelbus.services.load.kit import LoadRequest
from modelbus.services.load.tensors import move_object, object_nbytes
from tests.fixtures import loadable as builders

KINDS = ["ip_adapter", "ip_adapter_plus", "ip_adapter_full", "faceid", "faceid_plus"]
UNETS: dict[str, dict[str, Any]] = {"sd-1": builders.UNET_CFG, "sdxl": builders.SDXL_UNET_CFG}
State = dict[str, dict[str, torch.Tensor]]


def _unet(base: str) -> Any:
    torch.manual_seed(0)
    unet: Any = UNet2DConditionModel(**UNETS[base])
    return unet.eval()


def _diffusers_reference(unet: Any, state: State) -> Any:
    """``unet`` with the adapter loaded by diffusers itself (random init, then ``load_state_dict``)."""
    ref = copy.deepcopy(unet)
    ref._load_ip_adapter_weights([state], low_cpu_mem_usage=False)
    return ref


def _same(a: Any, b: Any) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _image_inputs(kind: str, *projections: Any) -> list[torch.Tensor]:
    """One image's embeddings, as each kind takes them: the pooled CLIP embedding, CLIP's hidden states
    (Plus, full-face) or a face embedding (FaceID; FaceID Plus reads CLIP's hidden states beside it)."""
    torch.manual_seed(3)
    hidden = torch.randn(1, 1, 5, builders.IP_CLIP_HIDDEN)
    if kind == "faceid_plus":
        for projection in projections:
            projection.clip_embeds = hidden
    width = {"ip_adapter": builders.IP_CLIP_EMBED, "faceid": builders.IP_FACE_ID,
             "faceid_plus": builders.IP_FACE_ID}.get(kind)
    if width is None:
        return [hidden if kind == "ip_adapter_plus" else torch.randn(1, 1, 5, builders.IP_CLIP_EMBED)]
    return [torch.randn(1, 1, width)]


def _unet_out(unet: Any, base: str, image_embeds: list[torch.Tensor] | None) -> torch.Tensor:
    torch.manual_seed(1)
    sample, text = torch.randn(1, 4, 8, 8), torch.randn(1, 3, int(unet.config.cross_attention_dim))
    added: dict[str, Any] = {}
    if base == "sdxl":
        added = {"text_embeds": torch.randn(1, builders.OPEN_CLIP_CFG["projection_dim"]),
                 "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])}
    if image_embeds is not None:
        added["image_embeds"] = image_embeds
    with torch.no_grad():
        return unet(sample, 10, text, added_cond_kwargs=added or None).sample  # type: ignore[no-any-return]


def _patched(unet: Any, adapter: IPAdapter) -> Any:
    """A copy of ``unet`` running ``adapter``, set up as diffusers' ``_load_ip_adapter_weights`` does."""
    patched = copy.deepcopy(unet)
    patched.set_attn_processor(adapter.attn_processors(patched))
    patched.encoder_hid_proj = MultiIPAdapterImageProjection([adapter.image_proj])
    patched.config.encoder_hid_dim_type = "ip_image_proj"
    return patched


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("base", list(UNETS))
def test_ip_adapter_loads_as_diffusers_converts_it(service: ModelLoadService, config: Any, add: Any, base: str,
                                                   kind: str) -> None:
    unet = _unet(base)
    state = builders.ip_adapter_weights(kind, unet)
    builders.write_ip_adapter(config.models_path / "ip.safetensors", state)
    ref = _diffusers_reference(unet, state)
    with service.get_model(add("ip.safetensors", "ip_adapter", "checkpoint", base=base)) as model:
        adapter: Any = model
        assert isinstance(model, IPAdapter) and adapter.kind == kind and adapter.image_encoder is None
        projection = ref.encoder_hid_proj.image_projection_layers[0]
        assert type(adapter.image_proj) is type(projection) and _same(adapter.image_proj, projection)
        layers = state["ip_adapter"]
        assert sorted(adapter.attn, key=int) == sorted({k.split(".")[0] for k in layers if "_ip." in k}, key=int)
        for index, processor in adapter.attn.items():
            assert torch.equal(processor.to_k_ip[0].weight, layers[f"{index}.to_k_ip.weight"])
            assert torch.equal(processor.to_v_ip[0].weight, layers[f"{index}.to_v_ip.weight"])
        # patched into the UNet, the loaded adapter steers it as diffusers' own loading does
        got = _unet_out(_patched(unet, adapter), base, _image_inputs(kind, adapter.image_proj, projection))
        want = _unet_out(ref, base, _image_inputs(kind, adapter.image_proj, projection))
        assert torch.allclose(got, want, rtol=0, atol=1e-5)
        assert (got - _unet_out(unet, base, None)).abs().max() > 1e-3  # the adapter did change the output
        lora = adapter.lora_state_dict(unet)
        if kind.startswith("faceid"):  # FaceID's LoRA, named for diffusers' load_lora_weights
            assert len(lora) == 8 * len(unet.attn_processors)
            for index, name in enumerate(unet.attn_processors):
                for part in ("to_q_lora.down", "to_k_lora.up", "to_out_lora.down"):
                    assert torch.equal(lora[f"unet.{name}.{part}.weight"], layers[f"{index}.{part}.weight"])
        else:
            assert lora == {} and len(adapter.lora) == 0


@pytest.mark.parametrize("kind", ["ip_adapter_plus", "faceid"])
@pytest.mark.parametrize("layout", ["bin", "folder"])
def test_ip_adapter_pickle_and_invokeai_folder(service: ModelLoadService, config: Any, add: Any, layout: str,
                                               kind: str) -> None:
    # h94 publishes .bin pickles of {"image_proj": {...}, "ip_adapter": {...}}; InvokeAI's folder holds one
    unet = _unet("sdxl")
    state = builders.ip_adapter_weights(kind, unet)
    name = "ip.bin" if layout == "bin" else "ip-adapter-folder"
    builders.write_ip_adapter(config.models_path / name, state, "ip_adapter_sdxl_image_encoder")
    key = add(name, "ip_adapter", "checkpoint" if layout == "bin" else "invokeai", base="sdxl")
    ref = _diffusers_reference(unet, state)
    with service.get_model(key) as model:
        adapter: Any = model
        assert adapter.kind == kind
        assert _same(adapter.image_proj, ref.encoder_hid_proj.image_projection_layers[0])
        assert all(torch.equal(p.to_k_ip[0].weight, state["ip_adapter"][f"{i}.to_k_ip.weight"])
                   for i, p in adapter.attn.items())
        assert adapter.image_encoder == ("ip_adapter_sdxl_image_encoder" if layout == "folder" else None)


def test_ip_adapter_pickle_is_scanned_first(service: ModelLoadService, config: Any, add: Any) -> None:
    class Evil:
        def __reduce__(self) -> Any:
            return (os.system, ("touch /tmp/modelbus-pwned",))

    folder = config.models_path / "evil"
    folder.mkdir()
    (folder / "ip_adapter.bin").write_bytes(pickle.dumps({"image_proj": {"x": Evil()}}))
    with pytest.raises(UnsafeModelException, match="system"):
        service.get_model(add("evil", "ip_adapter", "invokeai"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ip_adapter_bytes_estimate_and_moves(config: Any, add: Any, store: Any, dtype: torch.dtype) -> None:
    state = builders.ip_adapter_weights("ip_adapter_plus", _unet("sd-1"))
    path = builders.write_ip_adapter(config.models_path / "ip.safetensors", state)
    request = LoadRequest(store.get_model(add("ip.safetensors", "ip_adapter", "checkpoint")), path, None,
                          torch.device("cpu"), dtype)
    loaded = load_ip_adapter(request)
    stored = sum(t.numel() for tensors in state.values() for t in tensors.values()) * dtype.itemsize
    assert object_nbytes(loaded.model) == estimate_bytes(request) == stored  # every tensor, none copied
    assert all(t.dtype == dtype for t in loaded.model.state_dict().values())
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    buffer = move_object(loaded.model, loaded.buffer, torch.device("cpu"))  # as the cache moves a model
    assert buffer is not None and buffer is not loaded.buffer
    after = loaded.model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(t.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr() for t in after.values())


def _write(config: Any, name: str, state: State) -> Path:
    return builders.write_ip_adapter(config.models_path / name, state)


def test_ip_adapter_errors(service: ModelLoadService, config: Any, add: Any) -> None:
    def load(name: str, state: State | None = None) -> None:
        if state is not None:
            _write(config, name, state)
        service.get_model(add(name, "ip_adapter", "checkpoint"))

    unet = _unet("sd-1")
    plain, plus = builders.ip_adapter_weights("ip_adapter", unet), builders.ip_adapter_weights("ip_adapter_plus", unet)
    builders.write_lora(config.models_path / "lora.safetensors")
    with pytest.raises(InvalidModelException, match=r"lora\.safetensors: no IP-Adapter weights"):
        load("lora.safetensors")
    with pytest.raises(InvalidModelException, match=r"odd\.safetensors: IP-Adapter image projection .*cannot convert"):
        load("odd.safetensors", plain | {"image_proj": {"mystery.weight": torch.randn(4, 4)}})
    narrow = plain["image_proj"] | {"norm.weight": torch.randn(8)}
    with pytest.raises(InvalidModelException, match=r"narrow\.safetensors: IP-Adapter image projection"):
        load("narrow.safetensors", plain | {"image_proj": narrow})
    three = {k: v for k, v in plus["image_proj"].items() if not k.startswith("layers.3.")}
    with pytest.raises(InvalidModelException, match=r"three\.safetensors: incomplete IP-Adapter image projection"):
        load("three.safetensors", plus | {"image_proj": three})
    half = {k: v for k, v in plain["ip_adapter"].items() if k != "3.to_v_ip.weight"}
    with pytest.raises(InvalidModelException, match=r"half\.safetensors: IP-Adapter layer 3 needs to_k_ip and to_v_ip"):
        load("half.safetensors", plain | {"ip_adapter": half})
    extra = plain["ip_adapter"] | {"1.norm_ip.weight": torch.randn(4)}
    with pytest.raises(InvalidModelException, match=r"extra\.safetensors: unexpected IP-Adapter weight ip_adapter\.1"):
        load("extra.safetensors", plain | {"ip_adapter": extra})
    (config.models_path / "empty").mkdir()
    with pytest.raises(InvalidModelException, match=r"empty: an IP-Adapter folder holds ip_adapter"):
        service.get_model(add("empty", "ip_adapter", "invokeai"))


def test_ip_adapter_for_another_unet_is_refused(config: Any, add: Any, store: Any) -> None:
    sdxl = _unet("sdxl")
    path = _write(config, "xl.safetensors", builders.ip_adapter_weights("ip_adapter", sdxl))
    request = LoadRequest(store.get_model(add("xl.safetensors", "ip_adapter", "checkpoint", base="sdxl")), path,
                          None, torch.device("cpu"), torch.float32)
    adapter: Any = load_ip_adapter(request).model
    assert len(adapter.attn_processors(sdxl)) == len(sdxl.attn_processors)
    with pytest.raises(InvalidModelException, match="does not fit this UNet"):
        adapter.attn_processors(_unet("sd-1"))
