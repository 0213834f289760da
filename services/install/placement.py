"""Where installed models live, and getting them there without ever clobbering anything.

Models land in ``models/<base>/<type>/<name>``. A taken name becomes ``name_1``, ``name_2``...: the
destination is claimed atomically (a file by hard-linking it under the name, which fails on a taken
one; a folder by ``mkdir``, then renamed onto the claim), so two workers placing two models of one name
at once both succeed, under different names. Staging lives under the models directory (``.staging/<job id>``), on the
same filesystem, so the final step is a rename: a reader never sees half a model.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from modelbus.services import hfcache
from modelbus.services.config import AppConfig
from modelbus.services.install.defaults import MAX_NAME_COLLISIONS, STAGING_DIR
from modelbus.services.install.errors import InstallError, InvalidStagingNameError, SourceForbiddenError
from modelbus.services.records.enums import BaseModelType, ModelType

_UNSAFE_NAME = re.compile(r"[\x00-\x1f/\\:*?\"<>|]+")
COPY_BLOCK = 8 << 20

Progress = Callable[[int, int | None], None]


def staging_root(config: AppConfig) -> Path:
    return config.models_path / STAGING_DIR


#: what a staging folder may be named: one path component (a job id, ``local-<hex>``, ``convert-<key>``)
STAGING_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,254}")


def staging_dir(config: AppConfig, job_id: str) -> Path:
    """The staging folder of ``job_id`` (a name from a job, checked: never a path that leaves the staging folder)."""
    if not isinstance(job_id, str) or STAGING_NAME.fullmatch(job_id) is None:
        raise InvalidStagingNameError(f"staging folder name {str(job_id)[:300]!r}: use 1-255 letters, digits, "
                                      "'.', '_', ':' or '-', not starting with '.', '_', ':' or '-'")
    return staging_root(config) / job_id


def remove_tree(path: Path) -> None:
    """Remove a file or folder if it is there (a retried cleanup finds it gone)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def safe_name(name: str) -> str:
    """A single path component: no separators, no leading dots (no hidden or parent entries)."""
    cleaned = _UNSAFE_NAME.sub("_", name).strip().lstrip(".").strip()
    return cleaned or "model"


def destination_dir(config: AppConfig, base: BaseModelType, model_type: ModelType) -> Path:
    return config.models_path / base.value / model_type.value


def _candidates(name: str, is_file: bool) -> Iterator[str]:
    """``name``, then ``<stem>_1<suffix>`` ...: made one at a time (the first is nearly always free)."""
    stem, suffix = (Path(name).stem, Path(name).suffix) if is_file else (name, "")
    yield name
    for n in range(1, MAX_NAME_COLLISIONS):
        yield f"{stem}_{n}{suffix}"


def _claim(folder: Path, name: str, is_file: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for candidate in _candidates(name, is_file):
        target = folder / candidate
        try:
            if is_file:
                os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            else:
                os.mkdir(target)
        except FileExistsError:
            continue
        return target
    raise InstallError(f"no free name for {name!r} in {folder} after {MAX_NAME_COLLISIONS} tries")


# link()'s answers that mean "no hard links here" (a filesystem without them, or a policy against them)
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV, errno.ENOSYS}


def _link_into(staged: Path, folder: Path, name: str, on_claim: Callable[[Path], None] | None) -> Path | None:
    """Place a file by linking it under the first free name (the link is the claim: it fails on a taken
    name), then unlinking the staged name; None where the filesystem has no hard links.

    Not a rename onto a claimed empty file: replacing an existing file by a rename makes ext4 (and
    others, for safety against a crash) start writing the new file's data out at once, in the rename,
    so every install waited for the disk, and a dozen at once queued on it."""
    folder.mkdir(parents=True, exist_ok=True)
    for candidate in _candidates(name, True):
        target = folder / candidate
        if on_claim is not None:
            on_claim(target)  # before the link: a retried job finds where its model went (workers.hash)
        try:
            os.link(staged, target, follow_symlinks=False)
        except FileExistsError:
            continue
        except OSError as exc:
            if exc.errno in _NO_LINKS:
                return None
            raise
        os.unlink(staged)
        return target
    raise InstallError(f"no free name for {name!r} in {folder} after {MAX_NAME_COLLISIONS} tries")


def place(staged: Path, folder: Path, name: str, on_claim: Callable[[Path], None] | None = None) -> Path:
    """Move ``staged`` (same filesystem) into ``folder`` under ``name`` or the first free variant: a file
    by a hard link (:func:`_link_into`), a folder (or a file where links fail) by a rename.

    ``on_claim`` hears the destination before the rename, so that a retried job that died in between
    can find where its model went.
    """
    is_file = staged.is_file()
    if is_file:
        linked = _link_into(staged, folder, safe_name(name), on_claim)
        if linked is not None:
            return linked
    target = _claim(folder, safe_name(name), is_file)
    if on_claim is not None:
        on_claim(target)
    try:
        os.replace(staged, target)  # a folder replaces the empty folder claimed for it
    except OSError:
        remove_tree(target)
        raise
    return target


def source_files(source: Path) -> list[tuple[str, Path]]:
    """``(relative path, real path)`` of each file a local source holds, sorted; hidden entries are not the
    model's (as in services.hashing). A symlink is followed only to a file inside the source folder (or,
    for a Hugging Face cache snapshot, its repo's blobs: :func:`source_roots`): one that leads elsewhere,
    or to a folder, is refused naming the link (SourceForbiddenError)."""
    if source.is_symlink():
        blobs = hfcache.snapshot_blobs(source)  # one file of a cache snapshot: its blob, under the file's name
        target = os.path.realpath(source)
        if blobs is None or blobs.is_symlink() or not target.startswith(os.path.realpath(blobs) + os.sep) \
                or not os.path.isfile(target):
            raise SourceForbiddenError(f"{source} is a symlink; give the file or folder it points to")
        return [(source.name, Path(target))]
    if source.is_file():
        return [(source.name, source)]
    allowed = tuple(r + os.sep for r in source_roots(source))
    found = []
    for dirpath, dirnames, filenames in os.walk(source, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in [*dirnames, *filenames]:
            entry = Path(dirpath, name)
            rel = entry.relative_to(source).as_posix()
            if entry.is_symlink():
                target = os.path.realpath(entry)
                if not target.startswith(allowed):
                    raise SourceForbiddenError(f"{rel} in {source} is a symlink leading out of the source folder: "
                                               "refused (copy the file it points to into the folder instead)")
                if not os.path.isfile(target):
                    raise SourceForbiddenError(f"{rel} in {source} is a symlink to a folder or a special file: refused")
                if name in filenames and not name.startswith("."):
                    found.append((rel, Path(target)))
            elif name in filenames and not name.startswith(".") and entry.is_file():
                found.append((rel, entry))
    return sorted(found)


def source_roots(source: Path) -> tuple[str, ...]:
    """Where the files of a source may really lie: its own folder, and for a Hugging Face cache snapshot
    (services.hfcache) also its repo's ``blobs`` folder, which the snapshot's symlinks point into."""
    root = os.path.realpath(source)
    blobs = hfcache.snapshot_blobs(source)
    return (root,) if blobs is None or blobs.is_symlink() else (root, os.path.realpath(blobs))


def _open_regular(path: Path, within: tuple[str, ...]) -> int:
    """A read descriptor on a regular file, never through a symlink swapped in since it was listed: the
    last component is opened with ``O_NOFOLLOW``, and (where ``/proc`` tells) the file opened must lie
    at or under ``within`` (the source's real path), so a folder above it swapped for a link is refused."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SourceForbiddenError(f"{path} became a symlink while it was copied: refused") from exc
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SourceForbiddenError(f"{path} is not a regular file: refused")
        opened = _opened_path(fd)
        if opened is not None and not any(opened == w or opened.startswith(w.rstrip(os.sep) + os.sep) for w in within):
            raise SourceForbiddenError(f"{path} led to {opened}, outside the source, while it was copied: refused")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _opened_path(fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None  # no /proc (not Linux): O_NOFOLLOW and the listing's checks stand alone


def copy_into(source: Path, folder: Path, progress: Progress | None = None,
              check: Callable[[], None] | None = None) -> Path:
    """Copy a file or folder into ``folder`` (a staging dir), reporting bytes copied; ``check`` is called
    between blocks and may raise to stop (a cancel). Files are listed by :func:`source_files` (no symlink
    out of the source) and opened with ``O_NOFOLLOW``."""
    files = source_files(source)
    within = source_roots(source)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / safe_name(source.name)
    remove_tree(target)  # a retried copy starts over: the source is local and cheap to read again
    total = sum(p.stat().st_size for _, p in files)
    done = 0
    for rel, file in files:
        dest = target if source.is_file() else target.joinpath(*rel.split("/"))
        dest.parent.mkdir(parents=True, exist_ok=True)
        with os.fdopen(_open_regular(file, within), "rb") as src, dest.open("wb") as out:
            for n in _copy_blocks(src.fileno(), out.fileno()):
                if check is not None:
                    check()
                done += n
                if progress is not None:
                    progress(done, total)
            st = os.fstat(src.fileno())
        os.chmod(dest, stat.S_IMODE(st.st_mode) | stat.S_IRUSR | stat.S_IWUSR)
        os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns))
    if progress is not None:
        progress(done, total)
    return target


# copy_file_range's answers that mean "not between these two files" (another filesystem on old kernels,
# a filesystem or file kind without it): the plain read/write loop copies the rest
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM}


def _copy_blocks(src: int, dst: int) -> Iterator[int]:
    """Copy ``src`` to ``dst`` from their current offsets to the end, yielding each block's byte count.

    The kernel copies (``copy_file_range``): no pass of the bytes through this process, about half the
    time of a read/write loop on ext4, and a reflink (no bytes written at all) on XFS, btrfs and other
    filesystems that share extents. Where it is refused, a read/write loop goes on from where it stopped."""
    kernel = hasattr(os, "copy_file_range")
    while kernel:
        try:
            n = os.copy_file_range(src, dst, COPY_BLOCK)
        except OSError as exc:
            if exc.errno not in _NO_KERNEL_COPY:
                raise
            break
        if n == 0:
            return
        yield n
    while block := os.read(src, COPY_BLOCK):
        view = memoryview(block)
        while view:
            written = os.write(dst, view)
            view = view[written:]
        yield len(block)


def is_inside(path: Path, folder: Path) -> bool:
    try:
        Path(os.path.realpath(path)).relative_to(os.path.realpath(folder))
    except ValueError:
        return False
    return True


def size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def model_in_staging(config: AppConfig, job_id: str, folder: str | None) -> Path | None:
    """The downloaded model: the plan's folder, or the one file the server named (None: not there)."""
    root = staging_dir(config, job_id)
    if folder:
        path = root / folder
        return path if path.exists() else None
    if not root.is_dir():
        return None
    entries = [p for p in root.iterdir() if not p.name.startswith(".") and not _is_partial(p.name)]
    return entries[0] if len(entries) == 1 else None


def partial_files(path: Path) -> list[Path]:
    """Leftovers of an unfinished download under ``path``."""
    if path.is_file():
        return [path] if _is_partial(path.name) else []
    return [p for p in path.rglob("*") if _is_partial(p.name)] if path.is_dir() else []


def _is_partial(name: str) -> bool:
    return name.endswith((".part", ".part.json", ".part.tmp"))
