"""ModelLoadService end to end on the CPU: real record store, tiny real model files."""

from __future__ import annotations

import os
import pickle
import threading
from typing import Any

import pytest
import torch
from diffusers import AutoencoderKL, ControlNetModel, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from modelbus.services.load import (
    InvalidModelException,
    ModelLoadService,
    ModelNotFoundException,
    SubmodelRequiredError,
    UnknownModelException,
    UnsafeModelException,
)
from modelbus.services.records.enums import SubModelType
from tests.fixtures import loadable as builders


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_every_diffusers_submodel_loads(service: ModelLoadService, pipeline: Any) -> None:
    key, ref = pipeline
    expected = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
                "tokenizer": CLIPTokenizer, "scheduler": PNDMScheduler}
    for sub, cls in expected.items():
        info = service.get_model(key, SubModelType(sub))
        with info as model:
            assert isinstance(model, cls), sub
            if sub in ref:
                assert _same(model, ref[sub]), sub
                assert next(model.parameters()).dtype == torch.float32  # fp32 on the CPU
    with service.get_model(key, "tokenizer") as tok:
        assert tok("a cat").input_ids[0] == 0


def test_model_info_fields_and_location(service: ModelLoadService, pipeline: Any, store: Any) -> None:
    key, _ = pipeline
    info = service.get_model(key, SubModelType.Vae)
    record = store.get_model(key)
    assert (info.key, info.name, info.base_model.value, info.type) == (key, record.name, "sd-1", SubModelType.Vae)
    assert info.location == service.config.model_path(record.path) and info.location.is_absolute()
    assert info.precision == torch.float32 and info.hash == record.hash


def test_hits_return_the_same_object(service: ModelLoadService, pipeline: Any) -> None:
    key, _ = pipeline
    first = service.get_model(key, SubModelType.UNet)
    second = service.get_model(key, SubModelType.UNet)
    assert (first.cache_hit, second.cache_hit) == (False, True)
    with first as a, second as b:
        assert a is b


def test_single_file_checkpoint_submodels(service: ModelLoadService, checkpoint: Any) -> None:
    key, ref = checkpoint
    for sub in ("unet", "vae", "text_encoder"):
        with service.get_model(key, SubModelType(sub)) as model:
            assert _same(model, ref[sub]), sub
    with service.get_model(key, SubModelType.Scheduler) as scheduler:
        assert scheduler.config.prediction_type == "epsilon"
    with service.get_model(key, SubModelType.Tokenizer) as tokenizer:  # shipped: the file has none
        assert tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
        assert tokenizer.pad_token == "<|endoftext|>"


def test_checkpoint_with_shipped_config_has_real_sd_shape(service: ModelLoadService, add: Any,
                                                         config: Any) -> None:
    # no config on the record: the shipped v1-inference.yaml decides the shape, which the tiny file does not have
    builders.write_sd1_checkpoint(config.models_path / "wrong.safetensors")
    key = add("wrong.safetensors", "main", "checkpoint")
    with pytest.raises(InvalidModelException, match="wrong.safetensors"):
        service.get_model(key, SubModelType.UNet)


def test_vae_lora_embedding_controlnet(service: ModelLoadService, add: Any, config: Any) -> None:
    root = config.models_path
    torch.manual_seed(5)
    vae = AutoencoderKL(**builders.VAE_CFG)
    vae.save_pretrained(root / "vae-d")
    cn = ControlNetModel(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64,
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), attention_head_dim=8,
                         conditioning_embedding_out_channels=(16, 32))
    cn.save_pretrained(root / "cn")
    lora = builders.write_lora(root / "lora.safetensors")
    emb = builders.write_embedding(root / "emb.safetensors")
    with service.get_model(add("vae-d", "vae", "diffusers")) as model:
        assert _same(model, vae)
    with service.get_model(add("cn", "controlnet", "diffusers")) as model:
        assert isinstance(model, ControlNetModel) and _same(model, cn)
    with service.get_model(add("lora.safetensors", "lora", "lycoris")) as sd:
        assert sd.keys() == lora.keys() and all(torch.equal(sd[k], lora[k]) for k in lora)
    with service.get_model(add("emb.safetensors", "embedding", "embedding_file")) as sd:
        assert torch.equal(sd["emb_params"], emb)


def test_vae_checkpoint(service: ModelLoadService, add: Any, config: Any) -> None:
    models = builders.write_sd1_checkpoint(config.models_path / "full.safetensors", dtype=torch.float32)
    from safetensors.torch import load_file, save_file
    vae_only = {k.removeprefix("first_stage_model."): v for k, v in
                load_file(str(config.models_path / "full.safetensors")).items() if k.startswith("first_stage_model.")}
    save_file(vae_only, str(config.models_path / "vae.safetensors"))
    yaml_path = builders.write_original_yaml(config.root / "tiny.yaml")
    key = add("vae.safetensors", "vae", "checkpoint", config=str(yaml_path))
    with service.get_model(key) as model:
        assert _same(model, models["vae"])


def test_pickle_checkpoint_loads_and_unsafe_one_is_refused(service: ModelLoadService, add: Any, config: Any) -> None:
    lora = builders.write_lora(config.models_path / "tmp.safetensors")
    torch.save(lora, config.models_path / "lora.ckpt")
    with service.get_model(add("lora.ckpt", "lora", "lycoris")) as sd:
        assert all(torch.equal(sd[k], lora[k]) for k in lora)

    class Evil:
        def __reduce__(self) -> Any:
            return (os.system, ("touch /tmp/modelbus-pwned",))

    (config.models_path / "evil.ckpt").write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(UnsafeModelException, match="system"):
        service.get_model(add("evil.ckpt", "lora", "lycoris"))


def test_errors(service: ModelLoadService, pipeline: Any, add: Any, config: Any) -> None:
    key, _ = pipeline
    with pytest.raises(UnknownModelException):
        service.get_model("0" * 32, SubModelType.UNet)
    with pytest.raises(SubmodelRequiredError):
        service.get_model(key)
    gone = add("gone.safetensors", "lora", "lycoris")
    with pytest.raises(ModelNotFoundException, match="gone.safetensors"):
        service.get_model(gone)
    (config.models_path / "junk.safetensors").write_bytes(b"this is an HTML login page")
    with pytest.raises(InvalidModelException, match="junk.safetensors"):
        service.get_model(add("junk.safetensors", "lora", "lycoris"))
    (config.models_path / "novae").mkdir()
    (config.models_path / "novae" / "model_index.json").write_text("{}")
    with pytest.raises(InvalidModelException, match="vae"):
        service.get_model(add("novae", "main", "diffusers"), SubModelType.Vae)


class Bus:
    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []
        self.queue_id, self.queue_item_id, self.queue_batch_id = "q", 7, "b"
        self.graph_execution_state_id = "g"

    def emit(self, kind: str, payload: dict[str, Any]) -> None:
        self.seen.append((kind, payload))


def test_events_and_payloads(service: ModelLoadService, pipeline: Any, events: list[Any]) -> None:
    key, _ = pipeline
    bus = Bus()
    info = service.get_model(key, SubModelType.Vae, context=bus)
    service.get_model(key, SubModelType.Vae, context={"queue_id": "q2"})
    kinds = [k for k, _ in events]
    assert kinds == ["model_load_started", "model_load_completed"] * 2
    started, completed = events[0][1], events[1][1]
    spec = {"queue_id": "q", "queue_item_id": 7, "queue_batch_id": "b", "graph_execution_state_id": "g",
            "model_key": key, "submodel": "vae", "hash": info.hash, "location": str(info.location),
            "precision": "torch.float32"}
    assert {k: completed[k] for k in spec} == spec and {k: started[k] for k in spec} == spec
    assert completed["cache_hit"] is False and completed["bytes"] == info.bytes > 0
    assert completed["device"] == "cpu" and completed["worker"] == service.worker_id and completed["seconds"] > 0
    assert events[3][1]["cache_hit"] is True and events[3][1]["queue_id"] == "q2"
    assert bus.seen == events[:2]  # the context's bus got the same two events


def test_eviction_is_published(config: Any, store: Any, pipeline: Any, events: list[Any]) -> None:
    key, _ = pipeline
    small = type(config).load(device="cpu", ram_cache_size=6_000_000)  # unet 4.5 MB + vae 2.6 MB do not fit
    service = ModelLoadService(small, store, publisher=lambda e: events.append((e.kind, e.payload.model_dump(by_alias=True))))
    service.get_model(key, SubModelType.UNet)
    with service.get_model(key, SubModelType.TextEncoder):
        service.get_model(key, SubModelType.Vae)
    evicted = [p for k, p in events if k == "cache_evicted"]
    assert evicted and evicted[0]["model_key"] == key and evicted[0]["submodel"] == "unet"


def test_concurrent_get_model_loads_once(service: ModelLoadService, pipeline: Any, events: list[Any]) -> None:
    key, _ = pipeline
    got: list[Any] = []
    threads = [threading.Thread(target=lambda: got.append(service.get_model(key, SubModelType.UNet)))
               for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    completed = [p for k, p in events if k == "model_load_completed"]
    assert len(got) == 6 and [p["cache_hit"] for p in completed].count(False) == 1
    assert len({id(i.model) for i in got}) == 1
    assert service.cache.stats().ram.misses == 1
