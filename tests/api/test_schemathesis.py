"""A schemathesis run over the OpenAPI document, with a bearer token configured and sent (as a real
deployment runs): no generated request may get a 500, and every status must be one the document
declares. (Driven through hypothesis directly: schemathesis's pytest plugin does not support this
pytest's version.)"""

from __future__ import annotations

import time

import pytest

schemathesis = pytest.importorskip("schemathesis")

from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.specs.openapi.checks import status_code_conformance

from modelbus.services.api import create_app
from modelbus.services.config import AppConfig
from tests.client.conftest import model_config, put_file

EXAMPLES = 12
TOKEN = "schemathesis-s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@schemathesis.check
def no_internal_error(ctx, response, case):  # type: ignore[no-untyped-def]
    """A 500 is a bug; 502/503/504 are answers the document declares (worker failed, Redis or GPU
    worker missing, timeout), and status_code_conformance checks they are declared."""
    if response.status_code == 500:
        raise AssertionError(f"500 for {case.method} {case.formatted_path}: {response.text[:300]}")

SKIPPED = {"/api/v2/events"}  # the SSE stream never ends by design; test_events_sse.py covers it


def test_no_generated_request_gets_a_500(app_config: AppConfig) -> None:
    app_config.models_path.mkdir(parents=True, exist_ok=True)
    app = create_app(app_config.model_copy(update={"api_token": TOKEN}))
    put_file(app_config, "m.safetensors")
    app.state.client.add_model("k1", model_config("seed", "m.safetensors"))  # something to find
    with TestClient(app) as http:  # the token is required, so every call below is an authorized one
        assert http.get("/api/v2/models").status_code == 401
        assert http.get("/api/v2/models", headers=AUTH).status_code == 200
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers=AUTH)  # the document needs it too
    failures: list[str] = []
    ran = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path in SKIPPED:
            continue
        ran += 1

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                  phases=[Phase.explicit, Phase.generate])  # no shrinking: the first failure is enough
        def check(case) -> None:  # type: ignore[no-untyped-def]
            case.call_and_validate(headers=AUTH, checks=[no_internal_error, status_code_conformance])

        started = time.perf_counter()
        try:
            check()
        except Exception as exc:  # noqa: BLE001 - collect every operation's failure, then report them all
            failures.append(f"{operation.method.upper()} {operation.path}: {str(exc)[:800]}")
        print(f"{operation.method.upper()} {operation.path}: {time.perf_counter() - started:.1f}s")
    assert ran >= 12
    assert not failures, "\n\n".join(failures)
