"""Which URLs we may fetch, and which token goes to which host.

A model manager that fetches user-given URLs must not become a way to reach the services of the
machine it runs on (SSRF): private and loopback addresses are refused unless the configuration
allows them, on every redirect hop (transport.py follows redirects itself for that reason) and at the
moment of connecting, against the address connected to (network.py). A token belongs to one origin
(host and port) and is never sent anywhere else.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from modelbus.services.config import AppConfig

from .errors import UnsafeURLError

DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_of(url: str) -> tuple[str, int]:
    """(host, port) of a URL, host lower-cased without a trailing dot, port made explicit."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower().rstrip(".")
    return host, parts.port or DEFAULT_PORTS.get(parts.scheme.lower(), 0)


def is_public_address(address: str) -> bool:
    """Whether an IP address is a global unicast one (IPv4-mapped IPv6 judged as the IPv4 it maps)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def check_url(url: str, allow_private: bool) -> None:
    """Raise :class:`UnsafeURLError` for a non-HTTP URL, one without a host, or one naming a private address.

    Host names are not resolved here: network.py resolves each name once, when it connects, and checks
    the addresses it connects to."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in DEFAULT_PORTS:
        raise UnsafeURLError(f"only http and https URLs can be downloaded: {url!r}")
    if not parts.hostname:
        raise UnsafeURLError(f"URL has no host: {url!r}")
    if allow_private:
        return
    host = parts.hostname.rstrip(".")
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        return
    if not is_public_address(str(literal)):
        raise UnsafeURLError(f"refusing to download from {host}: private or loopback address; "
                             "set MODELBUS_ALLOW_PRIVATE_DOWNLOADS=1 to allow it")


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
