"""MODELBUS_DOWNLOAD_PROXY: every download and metadata call goes through it, the private-address checks
apply to the target (not to the proxy on loopback), its credentials reach the proxy and no log, and
the environment's proxies are ignored.

A FileServer / HFServer answers absolute-form requests (``GET http://host/path``) by their path, so
on loopback it plays a forward proxy in front of a 'public' host."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
import structlog

from modelbus.services.config import AppConfig, ConfigError
from modelbus.services.download import DownloadJobStatus, DownloadQueueService
from modelbus.services.download.errors import ProxyUnavailableError
from modelbus.workers.install import http_client
from tests.servers import FileServer, HFServer

from .conftest import fast_options

DATA = os.urandom(300_000)
PUBLIC = "http://93.184.216.34"  # a global address: only reachable here through the proxy
SECRET = "pr0xy-s3cret"


@pytest.fixture()
def no_env_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy",
                "NO_PROXY", "no_proxy", "MODELBUS_DOWNLOAD_PROXY"):
        monkeypatch.delenv(var, raising=False)


def _via(config: AppConfig, proxy: FileServer | HFServer, *, private: bool = False) -> AppConfig:
    return config.model_copy(update={"download_proxy": f"http://alice:{SECRET}@127.0.0.1:{proxy.port}",
                                     "allow_private_downloads": private})


def _download(config: AppConfig, source: str, dest: Path) -> DownloadQueueService:
    svc = DownloadQueueService(1, config, options=fast_options(config))
    with svc:
        svc.wait_for_job(svc.download(source, dest), timeout=30)
    return svc


def test_downloads_go_through_the_proxy_with_its_credentials(dl_config: AppConfig, no_env_proxies: None,
                                                             tmp_path: Path) -> None:
    with FileServer() as proxy, structlog.testing.capture_logs() as logs:
        proxy.add_file("m.safetensors", DATA)
        svc = _download(_via(dl_config, proxy), f"{PUBLIC}/m.safetensors", tmp_path)
    [job] = svc.list_jobs()
    assert job.status == DownloadJobStatus.COMPLETED, job.error
    assert (tmp_path / "m.safetensors").read_bytes() == DATA
    assert proxy.requests and all(r.path.startswith(f"{PUBLIC}/") for r in proxy.requests)  # absolute form
    expected = "Basic " + base64.b64encode(f"alice:{SECRET}".encode()).decode()
    assert all(r.headers.get("Proxy-Authorization") == expected for r in proxy.requests)
    assert logs and SECRET not in repr(logs)


def test_the_private_address_check_is_on_the_target_not_the_proxy(dl_config: AppConfig, no_env_proxies: None,
                                                                  tmp_path: Path) -> None:
    with FileServer() as proxy, FileServer() as internal:
        internal.add_file("m.safetensors", DATA)
        config = _via(dl_config, proxy, private=False)  # the proxy itself is on loopback: allowed
        svc = _download(config, f"http://127.0.0.1:{internal.port}/m.safetensors", tmp_path / "refused")
        proxied = list(proxy.requests)
    [job] = svc.list_jobs()
    assert job.status == DownloadJobStatus.ERROR and job.error_type == "UnsafeURLError", job.error
    assert proxied == [] and internal.requests == []
    assert not (tmp_path / "refused").exists() or list((tmp_path / "refused").iterdir()) == []


def test_metadata_calls_go_through_the_proxy(dl_config: AppConfig, no_env_proxies: None, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "unet").mkdir(parents=True)
    (repo / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (repo / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(DATA)
    with HFServer() as hub:
        hub.add_repo("acme/tiny", repo)
        config = _via(dl_config, hub).model_copy(update={"hf_endpoint": PUBLIC})
        svc = _download(config, "acme/tiny", tmp_path / "models")
        seen = [r.path for r in hub.requests]
        # the install workers' client (metadata of Hugging Face and Civitai sources) takes the same way
        with http_client(config) as client:
            answer = client.get(f"{PUBLIC}/api/models/acme/tiny")
        assert answer.status_code == 200 and len(hub.requests) == len(seen) + 1
    [job] = svc.list_jobs()
    assert job.status == DownloadJobStatus.COMPLETED, job.error
    assert any("/api/models/acme/tiny" in p for p in seen) and all(p.startswith(PUBLIC) for p in seen)


def test_environment_proxies_are_ignored(dl_config: AppConfig, file_server: FileServer, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch, no_env_proxies: None) -> None:
    url = file_server.add_file("m.safetensors", DATA)
    with FileServer() as env_proxy:
        for var in ("HTTP_PROXY", "http_proxy", "ALL_PROXY"):
            monkeypatch.setenv(var, env_proxy.url)
        svc = _download(dl_config, url, tmp_path)
        with http_client(dl_config) as client:
            assert client.get(url).content == DATA
        assert env_proxy.requests == []
    [job] = svc.list_jobs()
    assert job.status == DownloadJobStatus.COMPLETED, job.error
    assert len(file_server.requests) >= 2  # both went straight to the server


@pytest.mark.parametrize("bad", ["ftp://alice:{s}@proxy:21", "http://alice:{s}@", "proxy.example:3128",
                                 "http://alice:{s}@ host:1"])
def test_a_bad_proxy_is_named_without_its_password(bad: str, tmp_path: Path, no_env_proxies: None) -> None:
    with pytest.raises(ConfigError, match="MODELBUS_DOWNLOAD_PROXY") as info:
        AppConfig.load(root=tmp_path, download_proxy=bad.format(s=SECRET))
    assert SECRET not in str(info.value)


def test_the_proxy_password_stays_out_of_the_configs_repr(tmp_path: Path, no_env_proxies: None) -> None:
    config = AppConfig.load(root=tmp_path, download_proxy=f"socks5://alice:{SECRET}@127.0.0.1:1080")
    assert config.download_proxy == f"socks5://alice:{SECRET}@127.0.0.1:1080"
    assert SECRET not in repr(config) and SECRET not in str(config)


def test_a_socks_proxy_without_socksio_is_named(dl_config: AppConfig, no_env_proxies: None) -> None:
    try:
        import socksio  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("socksio is installed: SOCKS proxies work here")
    config = dl_config.model_copy(update={"download_proxy": f"socks5://alice:{SECRET}@127.0.0.1:1080"})
    with pytest.raises(ProxyUnavailableError, match="socksio") as info:
        DownloadQueueService(1, config, options=fast_options(config)).start()
    assert SECRET not in str(info.value) and "MODELBUS_DOWNLOAD_PROXY" in str(info.value)
    with pytest.raises(ProxyUnavailableError, match="socksio"):
        http_client(config)
