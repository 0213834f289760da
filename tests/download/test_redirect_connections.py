"""A refused redirect (too many hops, a private target) closes the response it was reading: the
server sees its connections released, not one held open per hop."""

from __future__ import annotations

from pathlib import Path

from modelbus.services.config import AppConfig
from modelbus.services.download import DownloadJobStatus, DownloadQueueService
from modelbus.services.download.transport import MAX_REDIRECTS
from tests.servers import FileServer
from tests.waiting import wait_until

from .conftest import fast_options

PUBLIC = "http://93.184.216.34"  # a global address, reached through the loopback proxy below


def _refused(config: AppConfig, source: str, good: str, dest: Path, server: FileServer, error_type: str) -> None:
    svc = DownloadQueueService(1, config, options=fast_options(config))
    with svc:
        job = svc.wait_for_job(svc.download(source, dest), timeout=30)
        assert job.status == DownloadJobStatus.ERROR and job.error_type == error_type, job.error
        # the next download takes the released connection (and closes it when done); a connection
        # leaked by a refused hop would stay open for as long as the client lives
        after = svc.wait_for_job(svc.download(good, dest), timeout=30)
        assert after.status == DownloadJobStatus.COMPLETED, after.error
        wait_until(lambda: server.open_connections == 0, 10, "the server's connections to be released",
                   lambda: f"{server.open_connections} connections held after a refused redirect")


def test_too_many_redirects_release_every_hop(dl_config: AppConfig, file_server: FileServer, tmp_path: Path) -> None:
    for hop in range(MAX_REDIRECTS + 2):
        file_server.add_redirect(f"hop{hop}", f"/hop{hop + 1}", 302)
    good = file_server.add_file("m.safetensors", b"weights" * 100)
    _refused(dl_config, file_server.url_for("hop0"), good, tmp_path / "dl", file_server, "RemoteError")
    assert len([r for r in file_server.requests if "hop" in r.path]) == MAX_REDIRECTS + 1


def test_a_redirect_to_a_private_address_releases_its_connection(dl_config: AppConfig, tmp_path: Path) -> None:
    with FileServer() as proxy, FileServer() as internal:
        internal.add_file("m.safetensors", b"secret")
        proxy.add_redirect("go", internal.url_for("m.safetensors"), 302)
        proxy.add_file("ok.safetensors", b"weights" * 100)
        config = dl_config.model_copy(update={"allow_private_downloads": False, "download_proxy": proxy.url})
        _refused(config, f"{PUBLIC}/go", f"{PUBLIC}/ok.safetensors", tmp_path / "dl", proxy, "UnsafeURLError")
        assert internal.requests == [] and proxy.requests[0].path == f"{PUBLIC}/go"
