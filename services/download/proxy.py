"""The way out for every download and metadata call: ``MODELBUS_DOWNLOAD_PROXY``, or a direct connection.

The environment's proxies (``HTTP_PROXY``, ``ALL_PROXY``...) and ``.netrc`` are never used: only the
operator's setting decides where requests go. The private-address checks (security.py) apply to the
target of every hop, never to the proxy, which is the operator's own choice and may well be on a
private network. A proxy URL may carry credentials; they reach httpx and nothing else (``shown``
is what logs and errors print).
"""

from __future__ import annotations

import ssl
from typing import Any

import httpx

from services.config import AppConfig, redact_url

from .errors import ProxyUnavailableError

_TLS: ssl.SSLContext | None = None


def tls_context() -> ssl.SSLContext:
    """The TLS context of every download client (one per process)."""
    # the CA bundle (SSL_CERT_FILE/SSL_CERT_DIR honoured: corporate CAs) costs ~0.1 s to load: once per process
    global _TLS
    if _TLS is None:
        _TLS = httpx.create_ssl_context()
    return _TLS


def client_options(config: AppConfig) -> dict[str, Any]:
    """The keyword arguments every download client is built with: the proxy, never the environment's."""
    options: dict[str, Any] = {"trust_env": False, "verify": tls_context()}
    if config.download_proxy:
        options["proxy"] = config.download_proxy
    return options


def build_client(config: AppConfig, **kwargs: Any) -> httpx.Client:
    """An httpx client for downloads (timeouts, limits, headers from ``kwargs``) through the proxy."""
    try:
        return httpx.Client(**client_options(config), **kwargs)
    except ImportError as exc:  # httpx: "Using SOCKS proxy, but the 'socksio' package is not installed"
        raise ProxyUnavailableError(
            f"MODELBUS_DOWNLOAD_PROXY={shown(config.download_proxy)}: {exc}") from None


def shown(proxy: str | None) -> str:
    """The proxy URL as logs may print it: the password replaced."""
    return redact_url(proxy) if proxy else "none"
