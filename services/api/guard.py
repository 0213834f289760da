"""Who may talk to the API, checked before any route runs or any body is read.

- **Host.** Only the names the API is known by: the address it is bound to, ``localhost``,
  ``127.0.0.1``, ``[::1]`` and ``MODELBUS_API_ALLOWED_HOSTS`` (an entry without a port matches any port,
  ``*`` turns the check off). Any other Host header is answered 400: a page that rebinds its own name
  to 127.0.0.1 (DNS rebinding) still sends its own name as the Host.
- **Browsers.** A state-changing request (POST, PUT, PATCH, DELETE) that carries ``Origin`` or
  ``Sec-Fetch-Site`` comes from a browser; it passes only when it is same-origin (its Origin is this
  API's own scheme and Host, Sec-Fetch-Site is ``same-origin`` or ``none``) or carries the token;
  otherwise 403 (a form or ``no-cors`` fetch from another page needs no preflight). No CORS header is
  ever sent, so another origin cannot read an answer either.
- **Documents.** With a token set, ``/metrics``, ``/docs``, ``/redoc`` and ``/openapi.json`` need it
  too, unless ``MODELBUS_API_PUBLIC_METRICS=1``.

``/healthz`` is exempt from all three: container and Kubernetes probes call it with the pod's IP as
Host and no token, and it changes nothing and tells little. Starlette's TrustedHostMiddleware is not
used: it splits the Host at the first ``:`` (so no IPv6 literal matches) and answers in plain text.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from modelbus.services.api.auth import UNAUTHORIZED, bearer_token, token_matches
from modelbus.services.api.errors import error_response
from modelbus.services.config import AppConfig

EXEMPT = frozenset({"/healthz"})
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
SAME_ORIGIN_FETCH = frozenset({"same-origin", "none"})
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "[::1]")
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def split_host(value: str) -> tuple[str, int | None] | None:
    """``name[:port]``, ``[v6][:port]`` or a bare IPv6 address -> (lower-cased name without a trailing
    dot, IPv6 in brackets; port or None); None when it is no host at all."""
    value = value.strip().lower()
    port: str | None = None
    if value.startswith("["):
        host, sep, rest = value.partition("]")
        host += sep
        if rest:
            if not rest.startswith(":"):
                return None
            port = rest[1:]
    elif value.count(":") > 1:  # a bare IPv6 address (only in configuration)
        host = f"[{value}]"
    else:
        host, _, port = value.partition(":") if ":" in value else (value, "", None)
    host = host.rstrip(".")
    if not host or (port is not None and not (port.isdigit() and int(port) < 65536)):
        return None
    return host, int(port) if port is not None else None


def _address_name(address: str | None) -> str | None:
    """An address the server is bound to, as a Host header names it; None for 0.0.0.0 and ``::``
    (browsers let pages reach "0.0.0.0" as if it were localhost: it is never a name we answer to)."""
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return address.lower() if address else None
    if ip.is_unspecified:
        return None
    return f"[{ip}]" if ip.version == 6 else str(ip)


class AllowedHosts:
    """The Host values one API answers to."""

    def __init__(self, config: AppConfig) -> None:
        self.any = "*" in config.api_allowed_hosts
        names = (*DEFAULT_HOSTS, _address_name(config.api_host), *config.api_allowed_hosts)
        entries = [split_host(e) for e in names if e and e != "*"]
        self.entries = {e for e in entries if e is not None}

    def allows(self, host_header: str | None, bound: str | None) -> bool:
        if self.any:
            return True
        parsed = split_host(host_header or "")
        if parsed is None:
            return False
        name, port = parsed
        if name == _address_name(bound):
            return True  # the address the server listens on, whatever the configuration says
        return (name, None) in self.entries or (name, port) in self.entries


def _same_origin(headers: Headers, scheme: str) -> bool:
    """Whether a browser says this request comes from a page of this API itself."""
    fetch_site = headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site.lower() not in SAME_ORIGIN_FETCH:
        return False
    origin = headers.get("origin")
    if origin is None:
        return True
    parts = urlsplit(origin)
    own = split_host(headers.get("host", ""))
    try:
        theirs = (parts.hostname or "", parts.port or _DEFAULT_PORTS.get(parts.scheme, 0))
    except ValueError:
        return False
    if own is None or parts.scheme != scheme:
        return False
    own_host, own_port = own
    return theirs == (own_host.strip("[]"), own_port or _DEFAULT_PORTS.get(scheme, 0))


class Guard:
    """ASGI middleware keeping the three rules of this module."""

    def __init__(self, app: ASGIApp, config: AppConfig, documents: frozenset[str]) -> None:
        self.app = app
        self.config = config
        self.hosts = AllowedHosts(config)
        self.documents = documents if config.api_token and not config.api_public_metrics else frozenset()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in EXEMPT:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        bound = (scope.get("server") or (None, None))[0]
        refusal = None
        if not self.hosts.allows(headers.get("host"), bound):
            shown = (headers.get("host") or "")[:100]
            refusal = error_response(400, "HostNotAllowed", f"Host {shown!r} is not a name this API answers to; "
                                     "add it to MODELBUS_API_ALLOWED_HOSTS")
        elif scope["path"] in self.documents and not self._has_token(headers):
            refusal = error_response(401, "HTTPError", UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})
        elif (scope.get("method") in STATE_CHANGING and ("origin" in headers or "sec-fetch-site" in headers)
              and not _same_origin(headers, scope.get("scheme", "http")) and not self._has_token(headers)):
            refusal = error_response(403, "CrossSiteRequest", "a cross-site request from a browser may not change "
                                     "anything here (send the bearer token, or call from the same origin)")
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _has_token(self, headers: Headers) -> bool:
        expected = self.config.api_token
        return bool(expected) and token_matches(expected, bearer_token(headers.get("authorization")))


def install_guard(app: FastAPI, config: AppConfig) -> None:
    documents = frozenset(p for p in (app.openapi_url, app.docs_url, app.redoc_url,
                                      app.swagger_ui_oauth2_redirect_url, "/metrics") if p)
    app.add_middleware(Guard, config=config, documents=documents)
