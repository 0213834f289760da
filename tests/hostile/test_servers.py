"""Hostile servers, end to end through the download queue: HF repos listing files that climb out,
Civitai file names and Content-Disposition headers with traversal, and redirects to private
addresses when private downloads are not allowed. Each is refused (or the name reduced to one
component) and nothing is written outside the destination folder."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelbus.services.config import AppConfig
from modelbus.services.download import DownloadQueueService
from tests.download.conftest import fast_options
from tests.servers import CivitaiServer, FileServer, HFServer
from tests.servers.hf_server import RepoFileEntry

DATA = b"\x00" * 1000 + b"weights" * 1000


def _tree(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def _download(cfg: AppConfig, source: str, dest: Path) -> tuple[str, str | None, str | None]:
    with DownloadQueueService(1, cfg, options=fast_options(cfg)) as svc:
        job = svc.wait_for_job(svc.download(source, dest), timeout=30)
    return job.status.value, job.error_type, job.error


# --- Hugging Face file names ---------------------------------------------------------------------

@pytest.mark.parametrize("evil", ["../../evil.safetensors", "unet/../../../evil.safetensors",
                                  "/tmp/evil.safetensors", "..\\..\\evil.safetensors"])
def test_hf_file_names_that_climb_out_are_refused(cfg: AppConfig, tmp_path: Path, evil: str) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "model.safetensors").write_bytes(DATA)
    with HFServer() as hub:
        hub.add_repo("acme/evil", repo)
        # the hub lists (and would serve) a file whose name climbs out of the repo folder
        hub.repos["acme/evil"].files[evil] = RepoFileEntry(evil, repo / "model.safetensors", len(DATA),
                                                            "0" * 40, hashlib.sha256(DATA).hexdigest())
        work = tmp_path / "work"
        dest = work / "models"
        status, error_type, error = _download(cfg.model_copy(update={"hf_endpoint": hub.url}), "acme/evil", dest)
        served = [r.path for r in hub.requests if "/resolve/" in r.path]
    print(f"\nHF sibling {evil!r}: job {status} ({error_type}: {error}); files under work: {_tree(work)}")
    evil_requested = [p for p in served if "evil" in p.split("/resolve/", 1)[1]]
    if status == "error":  # refused before a byte was asked for
        assert error_type == "UnsafePathError" and served == [], (error, served)
    else:  # or not chosen at all (a backslash is no separator on a hub)
        assert status == "completed" and evil_requested == [], (error, served)
    assert all(p == "models" or p.startswith("models/") for p in _tree(work))
    assert not any("evil.safetensors" in p for p in _tree(tmp_path)), _tree(tmp_path)
    assert not Path("/tmp/evil.safetensors").exists()


# --- Civitai file names ---------------------------------------------------------------------------

@pytest.mark.parametrize("evil", ["../../evil.safetensors", "..\\..\\evil.safetensors", "/etc/evil.safetensors",
                                  "sub/dir/../../../evil.safetensors"])
def test_civitai_file_names_are_reduced_to_one_component(cfg: AppConfig, tmp_path: Path, evil: str) -> None:
    with CivitaiServer() as civ, FileServer() as files:
        civ.add_model(5, "Evil", versions=[{"id": 50, "files": [
            {"name": "placeholder.safetensors", "content": DATA, "primary": True}]}])
        # the API names the file with a path that climbs out; the bytes come from a plain file server
        entry = civ.versions[50]["files"][0]
        entry["name"] = evil
        entry["downloadUrl"] = files.add_file("blob", DATA)
        dest = tmp_path / "work" / "models"
        status, error_type, error = _download(cfg.model_copy(update={"civitai_api": civ.url}), "civitai:5", dest)
    print(f"\nCivitai file name {evil!r}: job {status} ({error_type}); files under work: {_tree(tmp_path / 'work')}")
    assert status == "completed", error
    assert _tree(tmp_path / "work") == ["models", "models/evil.safetensors"]
    assert (dest / "evil.safetensors").read_bytes() == DATA


# --- Content-Disposition --------------------------------------------------------------------------

@pytest.mark.parametrize("header", [
    'attachment; filename="../../evil.safetensors"',
    'attachment; filename="..\\..\\evil.safetensors"',
    "attachment; filename*=UTF-8''..%2F..%2Fevil.safetensors",
    'attachment; filename="/etc/evil.safetensors"',
    'attachment; filename="evil.safetensors\x00.txt"',  # the HTTP client itself refuses the NUL
])
def test_content_disposition_cannot_place_a_file_outside(cfg: AppConfig, tmp_path: Path, header: str) -> None:
    dest = tmp_path / "work" / "models"
    with FileServer() as files:
        url = files.add_file("dl/123", DATA, disposition=header)
        status, _, error = _download(cfg, url, dest)
    found = _tree(tmp_path / "work")
    print(f"\nContent-Disposition {header!r}: job {status}; files under work: {found}")
    if status == "error":
        assert found == [] or found == ["models"], found
        return
    assert status == "completed", error
    assert len(found) == 2 and found[0] == "models" and found[1].startswith("models/") and "/" not in found[1][7:]
    assert not found[1][7:].startswith(".")


def test_a_dots_and_spaces_name_stays_inside(cfg: AppConfig, tmp_path: Path) -> None:
    dest = tmp_path / "work" / "models"
    with FileServer() as files:
        url = files.add_file("dl/123", DATA, disposition='attachment; filename=". . ."')
        status, error_type, _ = _download(cfg, url, dest)
    found = _tree(tmp_path / "work")
    print(f"\nContent-Disposition '. . .': job {status} ({error_type}); under work: {found}")
    assert dest.is_dir() and len(found) == 2 and found[1].startswith("models/")


# --- redirects to private addresses ---------------------------------------------------------------

PUBLIC = "http://93.184.216.34"  # a global address: the first hop passes the private-address check


@pytest.fixture()
def proxy() -> Iterator[FileServer]:
    """A loopback HTTP proxy (configured: the environment's proxies are never used) through which the
    'public' host is reached: a FileServer answers absolute-form requests by their path, so it plays
    the public server without leaving the machine."""
    with FileServer() as srv:
        yield srv


@pytest.mark.parametrize("target", ["http://127.0.0.1:{port}/m.safetensors", "http://localhost:{port}/m.safetensors",
                                    "http://[::1]:{port}/m.safetensors", "http://169.254.169.254/latest/meta-data",
                                    "http://10.0.0.1/m.safetensors", "file:///etc/passwd"])
def test_redirect_to_a_private_address_is_refused(cfg: AppConfig, proxy: FileServer, tmp_path: Path,
                                                   target: str) -> None:
    private = cfg.model_copy(update={"allow_private_downloads": False, "download_proxy": proxy.url})
    with FileServer() as internal:
        internal.add_file("m.safetensors", DATA)
        proxy.add_redirect("go", target.format(port=internal.port), 302)
        proxy.add_file("public.safetensors", DATA)
        dest = tmp_path / "work"
        # control: the proxy route itself works, a public-to-public redirect is followed
        proxy.add_redirect("fine", f"{PUBLIC}/public.safetensors", 302)
        ok = _download(private, f"{PUBLIC}/fine", dest / "ok")
        status, error_type, error = _download(private, f"{PUBLIC}/go", dest / "refused")
        reached = list(internal.requests)
    print(f"\nredirect {PUBLIC}/go -> {target}: job {status} ({error_type}); internal server saw {len(reached)} "
          f"requests; control download {ok[0]}")
    assert ok[0] == "completed", ok
    assert status == "error" and error_type == "UnsafeURLError", error
    assert reached == [] and not (dest / "refused").exists() or _tree(dest / "refused") == []
