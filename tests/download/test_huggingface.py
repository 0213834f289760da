"""Hugging Face repos from the local hub server: file choice, variants, subfolders, hashes, tokens."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from modelbus.services.config import AppConfig
from modelbus.services.download import DownloadJobStatus, DownloadQueueService
from modelbus.services.download.huggingface import select_files
from tests.servers import HFServer

from .conftest import fast_options


def _weights(path: Path, keys: dict[str, tuple[int, ...]], dtype: type = np.float32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.random.rand(*shape).astype(dtype) for k, shape in keys.items()}, str(path))


def make_tiny_pipeline(root: Path) -> Path:
    """A diffusers-shaped repo: listed components, an unlisted folder, a root checkpoint, variants."""
    (root / "unet").mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "scheduler": ["diffusers", "PNDMScheduler"],
        "safety_checker": [None, None],
    }))
    unet_keys = {"conv_in.weight": (4, 4, 3, 3), "conv_in.bias": (4,)}
    (root / "unet" / "config.json").write_text('{"in_channels": 4}')
    _weights(root / "unet" / "diffusion_pytorch_model.safetensors", unet_keys)
    _weights(root / "unet" / "diffusion_pytorch_model.fp16.safetensors", unet_keys, np.float16)
    (root / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle" * 100)
    (root / "vae").mkdir()
    (root / "vae" / "config.json").write_text('{"latent_channels": 4}')
    _weights(root / "vae" / "diffusion_pytorch_model.safetensors", {"decoder.conv_in.weight": (4, 4, 3, 3)})
    (root / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"pickle" * 100)
    (root / "text_encoder").mkdir()
    (root / "text_encoder" / "config.json").write_text('{"hidden_size": 8}')
    _weights(root / "text_encoder" / "model.safetensors",
             {"text_model.embeddings.token_embedding.weight": (16, 8)})
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text('{"num_train_timesteps": 1000}')
    _weights(root / "safety_checker" / "model.safetensors", {"vision_model.x": (2, 2)})
    _weights(root / "v1-5-pruned.safetensors", {"model.diffusion_model.x": (2, 2)})
    (root / "README.md").write_text("# tiny\n")
    return root


EXPECTED = {
    "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
    "text_encoder/model.safetensors", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
}


@pytest.fixture()
def tiny_repo(tmp_path: Path, hf_server: HFServer) -> Path:
    root = make_tiny_pipeline(tmp_path / "repo-src")
    hf_server.add_repo("acme/tiny-sd", root, card={"license": "openrail"}, tags=["diffusers", "license:openrail"])
    return root


@pytest.fixture()
def hf_service(dl_config: AppConfig, hf_server: HFServer):  # type: ignore[no-untyped-def]
    cfg = dl_config.model_copy(update={"hf_endpoint": hf_server.url})
    with DownloadQueueService(3, cfg, options=fast_options(cfg)) as svc:
        yield svc


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_select_files_rules() -> None:
    paths = ["model_index.json", "unet/a.safetensors", "unet/a.fp16.safetensors", "unet/a.bin",
             "vae/a.bin", "other/x.safetensors", "x.ckpt", "README.md", ".gitattributes",
             "te/model.fp16-00001-of-00002.safetensors", "te/model.fp16-00002-of-00002.safetensors",
             "te/model.safetensors.index.fp16.json", "te/model.safetensors.index.json",
             "te/model-00001-of-00001.safetensors"]
    index = {"unet": ["d", "U"], "vae": ["d", "A"], "te": ["t", "C"], "_class_name": "P"}
    assert select_files(paths, None, None, index) == [
        "model_index.json", "te/model-00001-of-00001.safetensors", "te/model.safetensors.index.json",
        "unet/a.safetensors", "vae/a.bin"]
    assert select_files(paths, None, "fp16", index) == [
        "model_index.json", "te/model.fp16-00001-of-00002.safetensors", "te/model.fp16-00002-of-00002.safetensors",
        "te/model.safetensors.index.fp16.json", "unet/a.fp16.safetensors", "vae/a.bin"]
    assert select_files(["x.ckpt", "x.safetensors", "README.md"], None, None, None) == ["x.safetensors"]


def test_repo_download_keeps_listed_folders_and_safetensors(hf_service: DownloadQueueService, tiny_repo: Path,
                                                            tmp_path: Path) -> None:
    job = hf_service.wait_for_job(hf_service.download("acme/tiny-sd", tmp_path / "models"), timeout=30)
    assert job.status == DownloadJobStatus.COMPLETED, job.error
    assert job.download_path == tmp_path / "models" / "tiny-sd"
    assert _files(job.download_path) == EXPECTED
    for rel in EXPECTED:
        assert (job.download_path / rel).read_bytes() == (tiny_repo / rel).read_bytes()
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["tiny-sd"]  # staging folder gone
    meta = job.metadata
    assert meta is not None and meta.author == "acme" and meta.license == "openrail"
    assert "diffusers" in meta.tags and meta.repo_id == "acme/tiny-sd" and meta.revision


def test_variant_and_subfolder(hf_service: DownloadQueueService, tiny_repo: Path, tmp_path: Path) -> None:
    job = hf_service.wait_for_job(hf_service.download("acme/tiny-sd", tmp_path, variant="fp16"), timeout=30)
    assert job.status == DownloadJobStatus.COMPLETED, job.error
    files = _files(job.download_path)  # type: ignore[arg-type]
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in files
    assert "unet/diffusion_pytorch_model.safetensors" not in files
    assert "vae/diffusion_pytorch_model.safetensors" in files  # no fp16 there: the plain one
    sub = hf_service.wait_for_job(hf_service.download("acme/tiny-sd:vae", tmp_path), timeout=30)
    assert sub.status == DownloadJobStatus.COMPLETED, sub.error
    assert sub.download_path == tmp_path / "tiny-sd_vae"
    assert _files(sub.download_path) == {"config.json", "diffusion_pytorch_model.safetensors"}


def test_lfs_sha256_is_verified(hf_service: DownloadQueueService, tiny_repo: Path, tmp_path: Path) -> None:
    target = tiny_repo / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF  # the server now serves bytes that differ from its published sha256
    target.write_bytes(bytes(data))
    job = hf_service.wait_for_job(hf_service.download("acme/tiny-sd", tmp_path / "m"), timeout=30)
    assert job.status == DownloadJobStatus.ERROR and job.error_type == "IntegrityError"
    assert "diffusion_pytorch_model.safetensors" in (job.error or "")
    assert not (tmp_path / "m").exists() or list((tmp_path / "m").iterdir()) == []


def test_unknown_repo_and_private_repo(dl_config: AppConfig, tmp_path: Path) -> None:
    root = make_tiny_pipeline(tmp_path / "src")
    with HFServer(require_token="hf_secret") as hub:
        hub.add_repo("acme/private", root)
        cfg = dl_config.model_copy(update={"hf_endpoint": hub.url})
        with DownloadQueueService(1, cfg, options=fast_options(cfg)) as svc:
            job = svc.wait_for_job(svc.download("acme/private", tmp_path / "a"), timeout=30)
            assert job.error_type == "TokenRequiredError" and "HF_TOKEN" in (job.error or "")
        cfg = cfg.model_copy(update={"hf_token": "hf_secret"})
        with DownloadQueueService(1, cfg, options=fast_options(cfg)) as svc:
            job = svc.wait_for_job(svc.download("acme/private", tmp_path / "b"), timeout=30)
            assert job.status == DownloadJobStatus.COMPLETED, job.error
            missing = svc.wait_for_job(svc.download("acme/nope", tmp_path / "c"), timeout=30)
            assert missing.error_type == "MetadataError" and "404" in (missing.error or "")


def test_real_hub_client_downloads_the_same_repo(hf_server: HFServer, tiny_repo: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import huggingface_hub
    import huggingface_hub.constants
    # the library reads HF_HUB_OFFLINE once, at its import: a test that imported it under the suite's
    # offline environment (tests/install) left it offline for the whole process
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    # and its token file's path (a test whose environment had HF_TOKEN_PATH="" left it '.', a folder)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))

    out = huggingface_hub.snapshot_download("acme/tiny-sd", endpoint=hf_server.url,
                                            cache_dir=tmp_path / "cache", local_dir=tmp_path / "local")
    got = {p for p in _files(Path(out)) if not p.startswith(".cache/")}
    assert got == _files(tiny_repo)
    for rel in got:
        assert (Path(out) / rel).read_bytes() == (tiny_repo / rel).read_bytes()


def test_revision_by_commit_and_unknown_revision(hf_service: DownloadQueueService, hf_server: HFServer,
                                                 tiny_repo: Path, tmp_path: Path) -> None:
    commit = hf_server.repos["acme/tiny-sd"].commit
    job = hf_service.wait_for_job(hf_service.download("acme/tiny-sd:vae", tmp_path, revision=commit), timeout=30)
    assert job.status == DownloadJobStatus.COMPLETED, job.error
    assert job.metadata is not None and job.metadata.revision == commit
    bad = hf_service.wait_for_job(hf_service.download("acme/tiny-sd", tmp_path / "x", revision="nope"), timeout=30)
    assert bad.error_type == "MetadataError" and "'nope'" in (bad.error or "")


def test_repo_larger_than_free_space_fails_before_writing(dl_config: AppConfig, hf_server: HFServer,
                                                          tiny_repo: Path, tmp_path: Path) -> None:
    cfg = dl_config.model_copy(update={"hf_endpoint": hf_server.url})
    with DownloadQueueService(1, cfg, options=fast_options(cfg, disk_reserve=1 << 60)) as svc:
        job = svc.wait_for_job(svc.download("acme/tiny-sd", tmp_path / "m"), timeout=30)
    assert job.error_type == "InsufficientSpaceError" and "8 files" in (job.error or "")
    assert not (tmp_path / "m").exists() or list((tmp_path / "m").iterdir()) == []
