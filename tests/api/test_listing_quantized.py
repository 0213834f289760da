"""``GET /api/v2/models?format=gguf&quantization=Q4_K`` and ``modelbus list --format/--quantization``:
the listing filtered by the record's format and quantization, the new bases and types accepted."""

from __future__ import annotations

from fastapi.testclient import TestClient

from modelbus.services.client import ModelBusClient
from modelbus.services.config import AppConfig
from tests.client.conftest import model_config, put_file

SEED = [("k0", "flux-q4", "flux", "gguf", "Q4_K"), ("k1", "flux-q8", "flux", "gguf", "Q8_0"),
        ("k2", "qwen-q4", "qwen-image", "gguf", "Q4_K"), ("k3", "flux-fp8", "flux", "checkpoint", "fp8_scaled"),
        ("k4", "wan", "wan-2.2", "checkpoint", None)]  # fmt: skip


def _seed(app_config: AppConfig) -> ModelBusClient:
    client = ModelBusClient(app_config)
    for key, name, base, fmt, quant in SEED:
        put_file(app_config, f"{key}.safetensors")
        client.add_model(key, model_config(name, f"{key}.safetensors", base_model=base, model_format=fmt,
                                           quantization=quant))
    return client


def _keys(http: TestClient, **params: object) -> list[str]:
    answer = http.get("/api/v2/models", params=params)
    assert answer.status_code == 200, answer.text
    return [m["key"] for m in answer.json()["items"]]


def test_filter_by_format_and_quantization(http: TestClient, app_config: AppConfig) -> None:
    client = _seed(app_config)
    assert _keys(http, format="gguf") == ["k0", "k1", "k2"]
    assert _keys(http, format="gguf", quantization="q4_k") == ["k0", "k2"]
    assert _keys(http, quantization="fp8_scaled") == ["k3"]
    assert _keys(http, base="qwen-image", format="gguf") == ["k2"]
    assert _keys(http, base="wan-2.2") == ["k4"]
    page = http.get("/api/v2/models", params={"format": "gguf", "limit": 1, "offset": 1}).json()
    assert (page["total"], [m["key"] for m in page["items"]]) == (3, ["k1"])
    assert [m.key for m in client.list_models(format="gguf", quantization="Q8_0")] == ["k1"]


def test_unknown_format_or_base_is_a_422(http: TestClient, app_config: AppConfig) -> None:
    _seed(app_config)
    for field, value in (("format", "ggml"), ("base", "flux3")):
        answer = http.get("/api/v2/models", params={field: value})
        assert answer.status_code == 422 and value in answer.text
