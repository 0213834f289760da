"""SSRF through model downloads: the address checked must be the address connected to.

The attack: a host name with a short TTL answers a public address to the private-address check and
127.0.0.1 to the connection that follows (DNS rebinding), a name answers one public and one private
address, a trailing dot, a name that does not resolve, and an ``HTTP_PROXY`` in the worker's
environment that would see (and could answer) every download. The real resolver is used with
``localhost`` and ``no-such-host.invalid``; a resolver of the test's own stands in for a DNS server
the attacker controls (no name of ours can be added to the machine's resolver)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import httpcore
import httpx
import pytest

from modelbus.services.config import AppConfig
from modelbus.services.download.errors import DownloadError, UnresolvableHostError, UnsafeURLError
from modelbus.services.download.network import PinnedBackend, download_client
from modelbus.services.download.transport import open_stream
from tests.hostile.test_servers import _download
from tests.servers import FileServer

DATA = b"\x00" * 1000 + b"weights" * 1000
PUBLIC = "93.184.216.34"
TIMEOUT = httpx.Timeout(5.0)


@pytest.fixture()
def cfg(cfg: AppConfig) -> AppConfig:
    """The hostile tests' download configuration, with private addresses refused."""
    return cfg.model_copy(update={"allow_private_downloads": False})


class Resolver:
    """A DNS server the attacker controls: one list of addresses per lookup, the last one repeated."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers = list(answers)
        self.lookups: list[str] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        return self.answers[min(len(self.lookups), len(self.answers)) - 1]


class LoopbackOnly(httpcore.SyncBackend):
    """The machine's network, minus the internet: records every address a connection is opened to and
    connects only to loopback ones (a test must not leave the machine)."""

    def __init__(self) -> None:
        self.connected: list[str] = []

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None) -> httpcore.NetworkStream:
        self.connected.append(host)
        if host not in ("127.0.0.1", "::1"):
            raise httpcore.ConnectError(f"test network: {host} is not reachable from here")
        return super().connect_tcp(host, port, timeout, local_address, socket_options)


def test_dns_rebinding_the_checked_address_is_the_one_connected_to() -> None:
    dns, network = Resolver([PUBLIC], ["127.0.0.1"]), LoopbackOnly()
    with FileServer() as internal, download_client(allow_private=False, timeout=TIMEOUT, headers={},
                                                   backend=PinnedBackend(False, dns, inner=network)) as client:
        internal.add_file("m.safetensors", DATA)
        url = f"http://rebind.test:{internal.port}/m.safetensors"
        # the first lookup says public: the connection goes to that address, not to a second lookup's
        with pytest.raises(httpx.ConnectError):
            open_stream(client, url, credential=None, allow_private=False)
        assert dns.lookups == ["rebind.test"] and network.connected == [PUBLIC]
        # the next connection looks up again and is told 127.0.0.1: refused before connecting
        with pytest.raises(UnsafeURLError, match=r"rebind\.test \(127\.0\.0\.1\)"):
            open_stream(client, url, credential=None, allow_private=False)
        assert dns.lookups == ["rebind.test"] * 2 and network.connected == [PUBLIC]
        assert internal.requests == []


@pytest.mark.parametrize("answer", [[PUBLIC, "127.0.0.1"], ["10.0.0.7", PUBLIC], ["::ffff:127.0.0.1"],
                                    ["169.254.169.254"], ["fd00::1"], ["0.0.0.0"]])
def test_a_name_with_any_private_address_is_refused(answer: list[str]) -> None:
    dns, network = Resolver(answer), LoopbackOnly()
    client = download_client(allow_private=False, timeout=TIMEOUT, headers={},
                             backend=PinnedBackend(False, dns, inner=network))
    with client, pytest.raises(UnsafeURLError, match="MODELBUS_ALLOW_PRIVATE_DOWNLOADS"):
        open_stream(client, "http://mixed.test/m.safetensors", credential=None, allow_private=False)
    assert network.connected == []


def test_the_host_name_is_kept_for_the_host_header(cfg: AppConfig) -> None:
    dns = Resolver(["127.0.0.1"])
    with FileServer() as files, download_client(allow_private=True, timeout=TIMEOUT, headers={},
                                                resolver=dns) as client:
        files.add_file("m.safetensors", DATA)
        response = open_stream(client, f"http://models.test.:{files.port}/m.safetensors", credential=None,
                               allow_private=True)
        body = response.read()
        response.close()
        assert body == DATA and dns.lookups == ["models.test"]  # the trailing dot dropped before the lookup
        assert files.requests[0].headers["Host"] == f"models.test:{files.port}"


def test_localhost_is_refused_by_the_real_resolver(cfg: AppConfig, tmp_path: Path) -> None:
    with FileServer() as files:
        files.add_file("m.safetensors", DATA)
        for host in ("localhost", "localhost.", "LOCALHOST"):
            status, error_type, error = _download(cfg, f"http://{host}:{files.port}/m.safetensors", tmp_path / "a")
            print(f"\n{host}: {status} ({error_type}: {error})")
            assert status == "error" and error_type == "UnsafeURLError" and "127.0.0.1" in (error or ""), error
        assert files.requests == []
        allowed = cfg.model_copy(update={"allow_private_downloads": True})
        status, _, error = _download(allowed, f"http://localhost.:{files.port}/m.safetensors", tmp_path / "b")
        assert status == "completed", error  # 'localhost.' is localhost: this resolver knows no 'localhost.'
        assert (tmp_path / "b" / "m.safetensors").read_bytes() == DATA


@pytest.mark.parametrize("allow_private", [False, True])
def test_a_name_that_does_not_resolve_is_refused_naming_it(cfg: AppConfig, tmp_path: Path,
                                                           allow_private: bool) -> None:
    config = cfg.model_copy(update={"allow_private_downloads": allow_private, "download_retries": 5})
    status, error_type, error = _download(config, "http://no-such-host.invalid/m.safetensors", tmp_path)
    print(f"\nno-such-host.invalid: {status} ({error_type}: {error})")
    assert status == "error" and error_type == "UnresolvableHostError", (error_type, error)
    assert "no-such-host.invalid" in (error or "") and "does not resolve" in (error or "")
    assert issubclass(UnresolvableHostError, DownloadError)  # final: not retried


def test_the_environment_proxy_is_not_used(cfg: AppConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    allowed = cfg.model_copy(update={"allow_private_downloads": True})
    with FileServer() as proxy, FileServer() as files:
        files.add_file("m.safetensors", DATA)
        proxy.add_file("m.safetensors", b"the proxy's answer")
        for var in ("HTTP_PROXY", "http_proxy", "ALL_PROXY"):
            monkeypatch.setenv(var, proxy.url)
        status, _, error = _download(allowed, f"{files.url}/m.safetensors", tmp_path / "direct")
        assert status == "completed", error
        assert (tmp_path / "direct" / "m.safetensors").read_bytes() == DATA
        assert proxy.requests == [] and len(files.requests) >= 1
        # a configured proxy is used (the proxy answers absolute-form requests by their path)
        proxied = allowed.model_copy(update={"download_proxy": proxy.url})
        status, _, error = _download(proxied, f"{files.url}/m.safetensors", tmp_path / "proxied")
        assert status == "completed", error
        assert (tmp_path / "proxied" / "m.safetensors").read_bytes() == b"the proxy's answer"


def test_through_a_configured_proxy_private_targets_are_still_refused(cfg: AppConfig, tmp_path: Path) -> None:
    with FileServer() as proxy:
        proxy.add_file("m.safetensors", DATA)
        proxied = cfg.model_copy(update={"download_proxy": proxy.url})
        for url in ("http://localhost/m.safetensors", "http://127.0.0.1/m.safetensors"):
            status, error_type, error = _download(proxied, url, tmp_path)
            assert status == "error" and error_type == "UnsafeURLError", (url, error)
        assert proxy.requests == []


def _certificate(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for ``name`` only (not for 127.0.0.1)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_keeps_the_host_name_for_sni_and_the_certificate(tmp_path: Path) -> None:
    import ssl
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    cert, key = _certificate(tmp_path, "models.test")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    names: list[str | None] = []
    server_ctx.sni_callback = lambda sock, name, ctx: names.append(name)  # type: ignore[assignment,misc,func-returns-value]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(DATA)))
            self.end_headers()
            self.wfile.write(DATA)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.socket = server_ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    port = httpd.server_address[1]
    trust = ssl.create_default_context(cafile=str(cert))
    try:
        with download_client(allow_private=True, timeout=TIMEOUT, headers={}, verify=trust,
                             resolver=Resolver(["127.0.0.1"])) as client:
            response = open_stream(client, f"https://models.test:{port}/m.safetensors", credential=None,
                                   allow_private=True)
            assert response.read() == DATA
            response.close()
            assert names == ["models.test"]  # SNI: the name, though the connection went to 127.0.0.1
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                open_stream(client, f"https://127.0.0.1:{port}/m.safetensors", credential=None, allow_private=True)
    finally:
        httpd.shutdown()
        httpd.server_close()
