"""Where a download connects: the address checked is the address connected to.

httpx resolves a host name when it opens a connection, so a check made beforehand (resolve, look at
the address, then send the request) can be told one address and connect to another: a name with a
short TTL answers a public address to the check and 127.0.0.1 to the connection (DNS rebinding).
Here the connection pool's network backend (httpcore's ``NetworkBackend.connect_tcp``, where the name
is resolved) resolves the name once, checks every address it got against the private/loopback rule
(all of them: a name answering one public and one private address is refused) and connects to those
addresses themselves. httpcore keeps the URL's host name for TLS (SNI, the certificate check) and the
Host header. A name that does not resolve is refused naming it; a trailing dot is dropped first.

httpx has no public way to give ``HTTPTransport`` a network backend (httpcore's pool takes one), so
:func:`download_client` sets it on the transport's pool and fails at once if that pool changes shape
in a later httpx, rather than download unguarded.

Proxies: the environment's ``HTTP_PROXY``/``HTTPS_PROXY``/``ALL_PROXY`` and ``~/.netrc`` are not used
(``trust_env=False``); a proxy is used only when configured (``MODELBUS_DOWNLOAD_PROXY``). Through a
proxy the proxy resolves the name, which cannot be pinned from here: the target's addresses are then
checked before each request, and the proxy is the operator's place to enforce the rest.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable, Mapping

import httpcore
import httpx

from modelbus.services import hfcache
from modelbus.services.config import redact_url

from .errors import HFOfflineError, ProxyUnavailableError, UnresolvableHostError, UnsafeURLError
from .security import DEFAULT_PORTS, is_public_address

#: host name, port -> the addresses to try, in order
Resolver = Callable[[str, int], list[str]]


def system_resolver(host: str, port: int) -> list[str]:
    """getaddrinfo: every address, in the resolver's order, without repeats."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno == socket.EAI_AGAIN:  # the resolver is unreachable now: a connection error, retried
            raise httpcore.ConnectError(f"cannot resolve {host} now: {exc.strerror}") from exc
        raise UnresolvableHostError(f"cannot download from {host}: the name does not resolve "
                                    f"({exc.strerror})") from exc
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def checked_addresses(host: str, port: int, allow_private: bool, resolver: Resolver = system_resolver) -> list[str]:
    """The addresses ``host`` resolves to, once; UnsafeURLError if any is private and that is not allowed."""
    name = host.strip("[]").rstrip(".").lower()
    try:
        addresses = [str(ipaddress.ip_address(name))]
    except ValueError:
        addresses = resolver(name, port)
    if not addresses:
        raise UnresolvableHostError(f"cannot download from {host}: the name resolves to no address")
    if not allow_private:
        for address in addresses:
            if not is_public_address(address):
                raise UnsafeURLError(f"refusing to download from {name} ({address}): private or loopback address; "
                                     "set MODELBUS_ALLOW_PRIVATE_DOWNLOADS=1 to allow it")
    return addresses


class PinnedBackend(httpcore.NetworkBackend):
    """Resolves, checks and connects to the checked addresses (the first that accepts)."""

    def __init__(self, allow_private: bool, resolver: Resolver = system_resolver,
                 inner: httpcore.NetworkBackend | None = None) -> None:
        self.allow_private = allow_private
        self.resolver = resolver
        self.inner = inner or httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None) -> httpcore.NetworkStream:
        failure: Exception | None = None
        for address in checked_addresses(host, port, self.allow_private, self.resolver):
            try:
                return self.inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None
        raise failure

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None) -> httpcore.NetworkStream:
        raise UnsafeURLError("downloads never connect to a unix socket")

    def sleep(self, seconds: float) -> None:
        self.inner.sleep(seconds)


class _CheckedProxyTransport(httpx.HTTPTransport):
    """Through a configured proxy: the target's addresses are checked before each request."""

    def __init__(self, allow_private: bool, resolver: Resolver, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.allow_private, self.resolver = allow_private, resolver

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        checked_addresses(url.host, url.port or DEFAULT_PORTS.get(url.scheme, 0), self.allow_private, self.resolver)
        return super().handle_request(request)


def hf_offline_guard(hf_endpoint: str) -> Callable[[httpx.Request], None]:
    """A request hook that refuses every request to Hugging Face while it is offline (services.hfcache): each
    request and each redirect hop, whatever sends it (downloads, listings, metadata, thumbnails)."""
    def guard(request: httpx.Request) -> None:
        url = str(request.url)
        why = hfcache.offline_for_url(url, hf_endpoint)
        if why is not None:
            raise HFOfflineError(f"not calling {request.url.host} ({redact_url(url.split('?', 1)[0])[:300]}): {why} "
                                 "forbids network access to Hugging Face; only files in the Hugging Face cache at "
                                 f"{hfcache.hub_cache()} can be installed")
    return guard


def download_client(*, allow_private: bool, timeout: httpx.Timeout, headers: Mapping[str, str],
                    proxy: str | None = None, verify: object = True, limits: httpx.Limits | None = None,
                    resolver: Resolver = system_resolver, backend: PinnedBackend | None = None,
                    hf_endpoint: str = hfcache.PUBLIC_HUB) -> httpx.Client:
    """An httpx client for model downloads: pinned connections, no proxy or credentials from the environment,
    no request to Hugging Face while it is offline (``hf_endpoint``: the configured one, see hf_offline_guard).
    ``backend`` replaces the default ``PinnedBackend(allow_private, resolver)`` (tests: to see what it connects to)."""
    options: dict[str, object] = {"verify": verify, "trust_env": False, "limits": limits or httpx.Limits()}
    transport: httpx.HTTPTransport
    if proxy:
        try:
            transport = _CheckedProxyTransport(allow_private, resolver, proxy=proxy, **options)
        except ImportError as exc:  # httpx: "Using SOCKS proxy, but the 'socksio' package is not installed"
            raise ProxyUnavailableError(f"MODELBUS_DOWNLOAD_PROXY={redact_url(proxy)!r}: {exc}") from None
    else:
        transport = httpx.HTTPTransport(**options)  # type: ignore[arg-type]
        pool = getattr(transport, "_pool", None)
        if not isinstance(pool, httpcore.ConnectionPool) or not hasattr(pool, "_network_backend"):
            raise RuntimeError("httpx's transport no longer has an httpcore pool with a network backend: "
                               "downloads cannot be pinned to checked addresses (see services/download/network.py)")
        pool._network_backend = backend or PinnedBackend(allow_private, resolver)
    return httpx.Client(transport=transport, timeout=timeout, headers=dict(headers), trust_env=False,
                        event_hooks={"request": [hf_offline_guard(hf_endpoint)]})
