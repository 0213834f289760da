"""Which URLs we may fetch, and which token goes to which host.

A model manager that fetches user-given URLs must not become a way to reach the services of the
machine it runs on (SSRF): private and loopback addresses are refused unless the configuration
allows them, and the check is repeated on every redirect hop (transport.py follows redirects itself
for that reason). A token belongs to one origin (host and port) and is never sent anywhere else.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from services.config import AppConfig

from .errors import UnsafeURLError

_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_of(url: str) -> tuple[str, int]:
    """(host, port) of a URL, host lower-cased, port made explicit."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    return host, parts.port or _DEFAULT_PORTS.get(parts.scheme.lower(), 0)


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _addresses(host: str, port: int) -> list[str]:
    try:
        return [str(ipaddress.ip_address(host.strip("[]")))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        # the connection attempt will fail with a clear connect error; nothing private is reached
        return []
    return sorted({str(info[4][0]) for info in infos})


def check_url(url: str, allow_private: bool) -> None:
    """Raise :class:`UnsafeURLError` for a non-HTTP URL, or one whose host resolves to a private address."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in _DEFAULT_PORTS:
        raise UnsafeURLError(f"only http and https URLs can be downloaded: {url!r}")
    if not parts.hostname:
        raise UnsafeURLError(f"URL has no host: {url!r}")
    if allow_private:
        return
    host, port = origin_of(url)
    for address in _addresses(host, port):
        if not _is_public(address):
            raise UnsafeURLError(
                f"refusing to download from {host} ({address}): private or loopback address; "
                "set MODELBUS_ALLOW_PRIVATE_DOWNLOADS=1 to allow it"
            )


@dataclass(frozen=True)
class Credential:
    """A bearer token and the one origin it may be sent to."""

    token: str
    host: str
    port: int

    @classmethod
    def for_url(cls, token: str, url: str) -> Credential:
        host, port = origin_of(url)
        return cls(token=token, host=host, port=port)

    def applies_to(self, url: str) -> bool:
        return origin_of(url) == (self.host, self.port)

    def __repr__(self) -> str:  # never print the token itself
        return f"Credential(host={self.host!r}, port={self.port})"


def credential_for(url: str, config: AppConfig, explicit: str | None = None) -> Credential | None:
    """The token to send to ``url``: the explicit one, else a configured pattern, HF or Civitai token."""
    if explicit:
        return Credential.for_url(explicit, url)
    for pattern, token in config.remote_api_tokens.items():
        if re.search(pattern, url):
            return Credential.for_url(token, url)
    origin = origin_of(url)
    if config.hf_token and origin == origin_of(config.hf_endpoint):
        return Credential.for_url(config.hf_token, url)
    if config.civitai_token and origin == origin_of(config.civitai_api):
        return Credential.for_url(config.civitai_token, url)
    return None
