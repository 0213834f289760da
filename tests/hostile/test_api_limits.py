"""Limits before work, against a real uvicorn process: bodies far over the limit (300 MB, generated as
they are sent, with a Content-Length or chunked), an unauthenticated body, more requests at once than
allowed, and more event streams per client than allowed. Memory is measured (the server's resident set,
sampled while the body is sent), never time."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from tests.hostile.api_process import ApiProcess, PeakRss, api_process, send_body
from tests.waiting import wait_until

HUGE = 300 << 20          # what an attacker sends
COST_CEILING = 64 << 20   # what it may cost the server at most (today's code: several times HUGE)
TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture()
def logs(tmp_path: Path) -> Path:
    path = tmp_path / "logs"
    path.mkdir()
    return path


@pytest.fixture()
def guarded_api(modelbus_env: dict[str, str], logs: Path) -> Iterator[ApiProcess]:
    """The API with a token and the default body limit (1 MiB)."""
    with api_process(modelbus_env, logs, token=TOKEN) as api:
        yield api


def _measure(api: ApiProcess, label: str, **kwargs: object) -> tuple[int | None, int]:
    httpx.get(f"{api.url}/healthz", timeout=30)  # warm: the first request's own allocations are not the body's
    with PeakRss(api) as peak:
        baseline = api.rss()
        answer = send_body(api, "POST", "/api/v2/models/install", HUGE, **kwargs)  # type: ignore[arg-type]
    growth = peak.peak - baseline
    print(f"\n{label}: sent {answer.sent / 2**20:.1f} MiB of {HUGE >> 20} MiB before the answer "
          f"{answer.head.splitlines()[0] if answer.head else None!r}; server RSS grew {growth / 2**20:.1f} MiB")
    return answer.status, growth


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_far_over_the_limit_is_refused_before_it_is_read(guarded_api: ApiProcess, chunked: bool) -> None:
    status, growth = _measure(guarded_api, f"300 MB body ({'chunked' if chunked else 'Content-Length'})",
                              chunked=chunked, headers=AUTH)
    assert status == 413, guarded_api.log_tail()
    assert growth < COST_CEILING, f"a refused body cost the API {growth >> 20} MiB"
    # a body within the limit is served as before
    small = httpx.post(f"{guarded_api.url}/api/v2/models/i/nope/rename", json={"name": "x"}, headers=AUTH, timeout=30)
    assert small.status_code == 404, small.text


def test_a_body_without_the_token_is_refused_before_it_is_read(modelbus_env: dict[str, str], logs: Path) -> None:
    # a body limit larger than the body: only authentication can stop it early
    with api_process(modelbus_env, logs, token=TOKEN, max_body="1G") as api:
        status, growth = _measure(api, "300 MB body without Authorization")
        assert status == 401, api.log_tail()
        assert growth < COST_CEILING, f"an unauthenticated body cost the API {growth >> 20} MiB"
        assert httpx.post(f"{api.url}/api/v2/models/i/nope/rename", json={"name": "x"},
                          headers={"Authorization": "Bearer wrong"}, timeout=30).status_code == 401


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_an_oversized_body_is_answered_by_the_api_itself(guarded_api: ApiProcess, chunked: bool) -> None:
    # at the default limit too, no token is 401 (Starlette's app-wide body limit used to answer a declared
    # length first with its own plain-text 413, and log an internal error with a traceback for each)
    without = send_body(guarded_api, "POST", "/api/v2/models/install", HUGE, chunked=chunked)
    assert without.status == 401, guarded_api.log_tail()
    refused = send_body(guarded_api, "POST", "/api/v2/models/install", HUGE, chunked=chunked, headers=AUTH)
    assert refused.status == 413 and "application/json" in refused.head, refused.head
    assert "api_internal_error" not in guarded_api.log.read_text(errors="replace"), guarded_api.log_tail()


def _hold_request(api: ApiProcess) -> socket.socket:
    """A request in flight until closed: its headers promise a body that never comes."""
    sock = socket.create_connection(("127.0.0.1", api.port), timeout=30)
    sock.sendall(b"POST /api/v2/models/install HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
    return sock


def test_requests_over_the_concurrency_limit_get_503(modelbus_env: dict[str, str], logs: Path) -> None:
    with api_process(modelbus_env, logs, max_requests="2", queue_wait="0.2", body_timeout="600") as api, \
            ExitStack() as held:
        for _ in range(2):
            held.callback(_hold_request(api).close)
        refused = wait_until(lambda: (r := httpx.get(f"{api.url}/api/v2/models", timeout=30)).status_code == 503
                             and r, 60, "a request over the limit to be refused", api.log_tail)
        assert refused.headers["Retry-After"]
        assert "MODELBUS_API_MAX_REQUESTS" in refused.json()["error"]["message"]
        held.close()  # the two requests end: the API serves again
        wait_until(lambda: httpx.get(f"{api.url}/api/v2/models", timeout=30).status_code == 200, 60,
                   "the API to serve again once the held requests ended", api.log_tail)


def test_a_body_that_stops_coming_is_408_and_frees_its_slot(modelbus_env: dict[str, str], logs: Path) -> None:
    with api_process(modelbus_env, logs, max_requests="1", queue_wait="0", body_timeout="1") as api:
        sock = _hold_request(api)
        try:
            sock.settimeout(120)
            answer = b""
            while more := sock.recv(65536):  # the server answers by itself, and closes: the body paused
                answer += more
        finally:
            sock.close()
        assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
        assert b"MODELBUS_API_BODY_TIMEOUT" in answer
        wait_until(lambda: httpx.get(f"{api.url}/api/v2/models", timeout=30).status_code == 200, 60,
                   "the slot of the stalled request to be free again", api.log_tail)


def test_event_streams_per_client_are_limited(modelbus_env: dict[str, str], logs: Path) -> None:
    with api_process(modelbus_env, logs, max_streams_per_client="2") as api, httpx.Client(timeout=30) as http:
        with ExitStack() as streams:
            lines = []  # kept: a line iterator that is dropped closes its stream
            for _ in range(2):
                response = streams.enter_context(http.stream("GET", f"{api.url}/api/v2/events"))
                assert response.status_code == 200
                lines.append(response.iter_lines())
                next(lines[-1])  # the stream is open on the server
            with http.stream("GET", f"{api.url}/api/v2/events") as third:
                assert third.status_code == 429
                assert third.headers["Retry-After"]
                assert "MODELBUS_API_MAX_STREAMS_PER_CLIENT" in third.read().decode()
            # requests that are not streams are not affected
            assert http.get(f"{api.url}/api/v2/models").status_code == 200

        def opens() -> bool:
            with http.stream("GET", f"{api.url}/api/v2/events") as again:
                return again.status_code == 200

        wait_until(opens, 60, "a stream to open once the others closed", api.log_tail)
