"""HTTP requests with redirects followed by hand.

httpx could follow redirects itself, but then we could neither re-check each hop against the
private-address rule nor decide per hop whether the token may go along (Civitai's download URL
answers 307 to a presigned URL on another host, which fails if it receives our Authorization).
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urljoin

import httpx

from modelbus.events.logs import get_logger

from .errors import RemoteError
from .security import Credential, check_url

log = get_logger(__name__)

MAX_REDIRECTS = 10
BODY_READ_SIZE = 1 << 20
_REDIRECTS = {301, 302, 303, 307, 308}


def open_stream(
    client: httpx.Client,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    credential: Credential | None,
    allow_private: bool,
    method: str = "GET",
) -> httpx.Response:
    """Send a request and follow redirects, checking every hop; the caller closes the response."""
    for _ in range(MAX_REDIRECTS + 1):
        check_url(url, allow_private)
        url = _without_trailing_dot(url)
        hop_headers = dict(headers or {})
        if credential is not None and credential.applies_to(url):
            hop_headers["Authorization"] = f"Bearer {credential.token}"
        request = client.build_request(method, url, headers=hop_headers)
        response = client.send(request, stream=True, follow_redirects=False)
        location = response.headers.get("location")
        if response.status_code not in _REDIRECTS or not location:
            return response
        response.close()
        next_url = urljoin(url, location)
        log.debug("download.redirect", status=response.status_code, to_host=httpx.URL(next_url).host)
        if response.status_code == 303:
            method = "GET"
        url = next_url
    raise RemoteError(f"more than {MAX_REDIRECTS} redirects starting from {url}")


def _without_trailing_dot(url: str) -> str:
    """``host.`` names the same host as ``host``: one spelling for the token's origin, SNI and the Host header."""
    parsed = httpx.URL(url)
    return str(parsed.copy_with(host=parsed.host.rstrip("."))) if parsed.host.endswith(".") else url


def widen_reads(response: httpx.Response, size: int = BODY_READ_SIZE) -> None:
    """Let this response's connection read ``size`` bytes per socket read instead of 64 KiB.

    httpcore reads a body 64 KiB at a time, and each read costs a trip through h11 in Python: for
    large model files 1 MiB reads use several times less CPU (see tests/bench/bench_download.py).
    httpcore has no option for it, so the per-connection attribute is set through its private
    stream chain; if that chain changes, this does nothing and downloads just cost more CPU.
    """
    stream: object = response.stream
    for attr in ("_stream", "_httpcore_stream", "_stream"):  # httpx bound -> httpx -> httpcore pool
        stream = getattr(stream, attr, None)
    connection = getattr(stream, "_connection", None)
    if connection is not None and hasattr(connection, "READ_NUM_BYTES"):
        connection.READ_NUM_BYTES = size


def get_json(
    client: httpx.Client, url: str, *, credential: Credential | None, allow_private: bool
) -> tuple[int, object]:
    """GET a JSON document (following redirects safely): (status, parsed body or None)."""
    response = open_stream(
        client, url, headers={"Accept": "application/json"}, credential=credential, allow_private=allow_private
    )
    try:
        response.read()
        if response.status_code >= 400:
            return response.status_code, None
        return response.status_code, response.json()
    finally:
        response.close()
