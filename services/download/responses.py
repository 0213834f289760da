"""Reading HTTP answers: which statuses to retry, Content-Range, Retry-After, login pages."""

from __future__ import annotations

import email.utils
import re
import time

import httpx

from .errors import RemoteError, Retry, TokenRequiredError

_HTML_MARKERS = (b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml")
_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)")


def retry_after_seconds(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def check_status(response: httpx.Response) -> None:
    code = response.status_code
    if code in (200, 206, 416):
        return
    url = str(response.request.url)
    if code in (401, 403):
        raise TokenRequiredError(
            f"HTTP {code} from {response.request.url.host}: this file needs an access token "
            "(pass access_token, or configure HF_TOKEN / CIVITAI_TOKEN / remote_api_tokens)",
            code,
        )
    if code in (408, 425, 429) or code >= 500:
        raise Retry(f"HTTP {code} from {url}", retry_after_seconds(response))
    raise RemoteError(f"HTTP {code} for {url}", code)


def parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total) of a Content-Range header; None where absent or '*'."""
    match = _CONTENT_RANGE.match(value or "")
    if not match:
        return None, None
    first, _, total = match.groups()
    return (int(first) if first else None), (int(total) if total and total != "*" else None)


def looks_like_page(chunk: bytes) -> bool:
    head = chunk[:256].lstrip().lower()
    return head.startswith(_HTML_MARKERS)
