"""What a later attempt of a repo install takes over from its staging folder (services.install.kept): the
recorded whole files that still match the plan; everything else it will not use goes, partial files of
planned files stay for their resume; a retry of the attempt's step only names what it keeps."""

from __future__ import annotations

import hashlib
from pathlib import Path

from modelbus.services.config import AppConfig
from modelbus.services.install.jobs import InstallJob, InstallStatus
from modelbus.services.install.kept import clean_after_failure, keepable, take_over
from modelbus.services.install.placement import staging_dir
from modelbus.services.install.sources import PlannedFile

FOLDER = "tiny-repo"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _staged(app_config: AppConfig, job: InstallJob, files: dict[str, bytes]) -> Path:
    root = staging_dir(app_config, job.id) / FOLDER
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def _planned(name: str, data: bytes) -> PlannedFile:
    return PlannedFile(f"http://hub/{name}", name, len(data), _sha(data))


def _left(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_a_later_attempt_keeps_what_still_matches_and_clears_the_rest(app_config: AppConfig) -> None:
    good, changed, unrecorded = b"weights" * 10, b"config", b"tokens"
    job = InstallJob(id="job-kept", source="acme/tiny", attempt=1, status=InstallStatus.DOWNLOADING,
                     downloaded={"unet/w.safetensors": (len(good), _sha(good)),
                                 "unet/config.json": (len(changed), _sha(changed))})
    root = _staged(app_config, job, {
        "unet/w.safetensors": good, "unet/config.json": changed, "tokenizer/vocab.json": unrecorded,
        "vae/w.safetensors.part": b"half", "vae/w.safetensors.part.json": b"{}",
        "gone/old.bin.part": b"x", "gone/old.bin": b"the repo no longer has it"})
    plan = [_planned("unet/w.safetensors", good), _planned("unet/config.json", b"config, edited upstream"),
            _planned("tokenizer/vocab.json", unrecorded), _planned("vae/w.safetensors", b"whole vae")]
    before = _left(root)
    # a retry of the attempt's first step: the same answer, and nothing removed
    assert take_over(app_config, job, FOLDER, plan, tidy=False) == {"unet/w.safetensors"}
    assert _left(root) == before
    assert take_over(app_config, job, FOLDER, plan) == {"unet/w.safetensors"}
    # kept: the recorded file as planned; the partial vae resumes; the rest is fetched again or not wanted
    assert _left(root) == {"unet/w.safetensors", "vae/w.safetensors.part", "vae/w.safetensors.part.json"}


def test_a_kept_file_cut_short_is_fetched_again(app_config: AppConfig) -> None:
    data = b"0123456789" * 5
    job = InstallJob(id="job-short", source="acme/tiny", attempt=2, downloaded={"w.bin": (len(data), None)})
    root = _staged(app_config, job, {"w.bin": data[:-1]})
    assert take_over(app_config, job, FOLDER, [PlannedFile("http://hub/w.bin", "w.bin", None, None)]) == set()
    assert _left(root) == set()


def test_what_a_failed_job_keeps(app_config: AppConfig) -> None:
    data = b"whole"
    failed = InstallJob(id="job-failed", source="acme/tiny", status=InstallStatus.ERROR,
                        downloaded={"a.bin": (len(data), None)})
    root = _staged(app_config, failed, {"a.bin": data, "b.bin.part": b"ha"})
    assert keepable(failed) == ["a.bin"]
    clean_after_failure(app_config, failed)
    assert _left(root) == {"a.bin"}  # the partial file goes, the whole one stays for the restart
    # failed after its downloads (the model was being recorded), or cancelled: nothing is kept
    later = InstallJob(id="job-failed", source="acme/tiny", status=InstallStatus.ERROR, download_path=str(root),
                       downloaded=dict(failed.downloaded))
    assert keepable(later) == []
    clean_after_failure(app_config, later)
    assert not staging_dir(app_config, failed.id).exists()
    cancelled = InstallJob(id="job-cancelled", source="acme/tiny", status=InstallStatus.CANCELLED,
                           downloaded={"a.bin": (len(data), None)})
    _staged(app_config, cancelled, {"a.bin": data})
    assert keepable(cancelled) == []
    clean_after_failure(app_config, cancelled)
    assert not staging_dir(app_config, cancelled.id).exists()
