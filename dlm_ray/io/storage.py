"""Storage: pyarrow filesystems, the per-node checkpoint cache, staged directory swaps.

``filesystem_for`` resolves a local path or an ``s3://`` / ``gs://`` URI to a pyarrow filesystem.

The node cache (``node_copy``). A directory at a URI is copied to local disk once per node, into
``$DLM_RAY_CACHE_DIR`` (default ``<system temp dir>/dlm-ray-cache-<uid>``), and every process on the
node (generation actors, Serve replicas, training workers, the driver) reads that one copy. An entry
is named by the URI and by its content as the remote metadata shows it: each file's name, size and
modification time, and the bytes of ``config.json`` (an export records the hash of its weights
there). An export replaced at the same URI therefore gets a new entry; a stale copy is never reused.
Files are fetched as they are needed (the settings alone skip the weights), each under a temporary
name renamed into place when complete, so a file present in an entry is a whole one.

Locks (``fcntl.flock``; the kernel drops them when a process dies, so a crash leaves none held):

    .locks/cache.lock     held briefly, to choose what to evict and to start using an entry, so
                          that the two never interleave
    .locks/<entry>.use    held shared by every process using the entry, for the process's lifetime
                          (a tokenizer path in a config may point into it); eviction needs it exclusive
    .locks/<entry>.write  exclusive while a process copies files into the entry: the others wanting
                          them wait, then find them present and copy nothing

The size limit, ``$DLM_RAY_CACHE_GB`` (default 64), is kept before each copy by deleting the least
recently used entries that no process uses. Entries in use are never deleted, so the cache can pass
the limit when everything in it is in use or one checkpoint is larger than the limit; a warning
says so.

Staged swaps (``staged_dir``). A directory is written whole into a fresh staging directory and then
takes the target's place, so the target never mixes files of two writes. Locally the staging
directory is a sibling of the target and the swap is one ``renameat2(RENAME_EXCHANGE)`` where the
filesystem has it (else two renames: for an instant the target is absent, never mixed). Object
storage has no rename: the files are staged locally, then the target's marker file (config.json)
is deleted first, the earlier files no longer wanted are deleted, the new files are uploaded and
the marker last. A reader therefore sees the earlier directory, no model (no marker), or the new
one; a copy that overlaps the swap sees the listing change and fails rather than mixing.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import logging
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

CACHE_DIR_ENV = "DLM_RAY_CACHE_DIR"
CACHE_GB_ENV = "DLM_RAY_CACHE_GB"
DEFAULT_CACHE_GB = 64.0
MARKER = "config.json"
_LOCKS = ".locks"
_PART = ".part-"
_HELD: dict[str, int] = {}  # an entry's .use lock file -> this process's shared lock on it, kept for life
log = logging.getLogger(__name__)


class StorageError(RuntimeError):
    """A remote directory is missing or changed while copied, or a target cannot be replaced."""


def filesystem_for(source: str):  # -> (pyarrow FileSystem, path)
    """The pyarrow filesystem and in-filesystem path of a local path or URI."""
    from pyarrow import fs as pafs

    if "://" in source:
        return pafs.FileSystem.from_uri(source)
    return pafs.LocalFileSystem(), os.path.abspath(source)


@dataclass(frozen=True)
class RemoteFile:
    path: str  # relative to the directory, "/"-separated
    size: int
    mtime_ns: int | None


def list_tree(uri: str) -> tuple[object, str, list[RemoteFile]]:
    """(filesystem, root, every file under it) of the directory ``uri``; metadata only."""
    from pyarrow import fs as pafs

    filesystem, root = filesystem_for(uri.rstrip("/"))
    root = root.rstrip("/")
    if filesystem.get_file_info(root).type != pafs.FileType.Directory:
        raise StorageError(f"{uri}: no such directory")
    infos = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
    files = [RemoteFile(i.path[len(root) + 1:], i.size, i.mtime_ns) for i in infos if i.type == pafs.FileType.File]
    return filesystem, root, sorted(files, key=lambda f: f.path)


def read_bytes(filesystem: object, path: str) -> bytes:
    with filesystem.open_input_stream(path) as f:  # type: ignore[attr-defined]
        return f.read()


# -------------------------------------------------------------------------------------- node cache


def cache_root() -> Path:
    """This node's cache directory (``$DLM_RAY_CACHE_DIR`` or one under the system temp dir)."""
    given = os.environ.get(CACHE_DIR_ENV)
    return Path(given) if given else Path(tempfile.gettempdir()) / f"dlm-ray-cache-{os.getuid()}"


def cache_limit_bytes() -> int:
    raw = os.environ.get(CACHE_GB_ENV, "")
    try:
        gb = float(raw) if raw else DEFAULT_CACHE_GB
    except ValueError:
        raise StorageError(f"{CACHE_GB_ENV}={raw!r} is not a number of gigabytes") from None
    if gb < 0:
        raise StorageError(f"{CACHE_GB_ENV}={raw!r} must not be negative")
    return int(gb * 1e9)


def entry_name(uri: str, files: list[RemoteFile], marker: bytes) -> str:
    """``<hash of the URI>-<hash of the content as metadata shows it>``."""
    content = hashlib.sha256(marker)
    for f in files:
        content.update(f"{f.path}\0{f.size}\0{f.mtime_ns}\n".encode())
    where = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    return f"{where}-{content.hexdigest()[:16]}"


def _identify(uri: str) -> tuple[object, str, list[RemoteFile], str]:
    """(filesystem, root, files, entry name) of the remote directory ``uri``, from metadata only."""
    filesystem, root, files = list_tree(uri)
    marker = read_bytes(filesystem, f"{root}/{MARKER}") if any(f.path == MARKER for f in files) else b""
    return filesystem, root, files, entry_name(uri, files, marker)


def node_copy(uri: str, *, weights: bool = True) -> Path:
    """A local directory on this node holding the files of the remote directory ``uri``, shared by
    the node's processes. ``weights=False`` fetches everything but ``*.safetensors``."""
    filesystem, root, files, name = _identify(uri)
    base = cache_root()
    (base / _LOCKS).mkdir(parents=True, exist_ok=True)
    entry = base / name
    _start_using(base, name)
    wanted = [f for f in files if weights or not f.path.endswith(".safetensors")]
    if all(_present(entry, f) for f in wanted):
        return entry
    with _flock(base / _LOCKS / f"{name}.write", fcntl.LOCK_EX):
        missing = [f for f in wanted if not _present(entry, f)]  # another process may have copied them
        if not missing:
            return entry
        for part in entry.rglob(f"{_PART}*"):  # left by a process that died copying: no writer now
            part.unlink()
        _make_room(base, name, sum(f.size for f in missing))
        failure: BaseException | None = None
        try:
            for f in missing:
                _fetch(filesystem, root, f, entry / f.path)
        except (OSError, StorageError) as exc:
            failure = exc
        if not _unchanged(uri, name):
            for f in missing:
                (entry / f.path).unlink(missing_ok=True)
            raise StorageError(f"{uri} changed while it was being copied (replaced by a new export?); "
                               "load it again") from failure
        if failure is not None:
            raise failure
    return entry


def _unchanged(uri: str, name: str) -> bool:
    try:
        return _identify(uri)[3] == name
    except (OSError, StorageError):
        return False


def _present(entry: Path, f: RemoteFile) -> bool:
    try:
        return (entry / f.path).stat().st_size == f.size
    except FileNotFoundError:
        return False


def _fetch(filesystem: object, root: str, f: RemoteFile, dest: Path) -> None:
    from pyarrow import fs as pafs

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f"{_PART}{os.getpid()}-{dest.name}")
    try:
        pafs.copy_files(f"{root}/{f.path}", str(part), source_filesystem=filesystem,
                        destination_filesystem=pafs.LocalFileSystem())
        if part.stat().st_size != f.size:
            raise StorageError(f"{root}/{f.path}: copied {part.stat().st_size} bytes, the listing said {f.size}")
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)


@contextlib.contextmanager
def _flock(path: Path, mode: int) -> Iterator[int]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, mode)
        yield fd
    finally:
        os.close(fd)


def _start_using(base: Path, name: str) -> None:
    """Hold the entry's ``.use`` lock shared (once per process) and mark it recently used."""
    use = base / _LOCKS / f"{name}.use"
    if str(use) not in _HELD:
        with _flock(base / _LOCKS / "cache.lock", fcntl.LOCK_EX):
            fd = os.open(use, os.O_RDWR | os.O_CREAT, 0o644)
            # Only eviction takes .use exclusively, and only under cache.lock: this cannot block.
            fcntl.flock(fd, fcntl.LOCK_SH)
            _HELD[str(use)] = fd
    os.utime(use)  # exists while held: eviction cannot remove it


def _entry_bytes(entry: Path) -> int:
    return sum(p.stat().st_size for p in entry.rglob("*") if p.is_file())


def _make_room(base: Path, name: str, need: int) -> None:
    """Delete least recently used entries no process uses until ``need`` more bytes fit the limit."""
    limit = cache_limit_bytes()
    with _flock(base / _LOCKS / "cache.lock", fcntl.LOCK_EX):
        entries = []
        for entry in base.iterdir():
            if entry.is_dir() and not entry.name.startswith("."):
                use = base / _LOCKS / f"{entry.name}.use"
                used = use.stat().st_mtime if use.exists() else 0.0
                entries.append((used, entry, _entry_bytes(entry)))
        total = sum(size for _, _, size in entries)
        for _, entry, size in sorted(entries, key=lambda e: e[0]):
            if total + need <= limit:
                break
            if entry.name != name and _evict(base, entry):
                total -= size
        if total + need > limit:
            log.warning("checkpoint cache %s: %.2f GB in use plus %.2f GB to copy exceeds %s=%.2f", base,
                        total / 1e9, need / 1e9, CACHE_GB_ENV, limit / 1e9)


def _evict(base: Path, entry: Path) -> bool:
    """Delete ``entry`` if no process uses it (caller holds cache.lock)."""
    use = base / _LOCKS / f"{entry.name}.use"
    fd = os.open(use, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        shutil.rmtree(entry)
        # Lock files are opened only under cache.lock (or while .use is held), so removing them here
        # cannot split one lock into two files.
        use.unlink(missing_ok=True)
        (base / _LOCKS / f"{entry.name}.write").unlink(missing_ok=True)
        return True
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------ staged swaps


@contextlib.contextmanager
def staged_dir(out: str | Path, *, replaceable: Callable[[list[str]], bool]) -> Iterator[Path]:
    """A fresh local directory to write into; on success its files replace the directory ``out``
    (local or a URI) whole. An existing ``out`` whose file list ``replaceable`` rejects is refused
    before anything is written; on failure ``out`` is left as it was."""
    if "://" in str(out):
        existing = _remote_names(str(out))
        _check_replaceable(str(out), existing, replaceable)
        with tempfile.TemporaryDirectory(prefix="dlm-stage-") as d:
            yield Path(d)
            _replace_remote(Path(d), str(out))
        return
    target = Path(out).resolve()
    if target.exists():
        if not target.is_dir():
            raise StorageError(f"{target} exists and is not a directory")
        _check_replaceable(str(target), [str(p.relative_to(target)) for p in target.rglob("*")
                                         if not p.is_dir()], replaceable)
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = target.parent / f".{target.name}.staging-{os.getpid()}-{secrets.token_hex(4)}"
    stage.mkdir()  # mkdir, not mkdtemp: the umask's permissions, which the target keeps
    try:
        yield stage
        _swap_local(stage, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # the staging files, or the earlier directory after a swap


def _check_replaceable(where: str, names: list[str], replaceable: Callable[[list[str]], bool]) -> None:
    if names and not replaceable(names):
        raise StorageError(f"{where} holds other files ({', '.join(sorted(names)[:5])}, ...); refusing to replace "
                           "it: choose a new or empty directory")


def _remote_names(uri: str) -> list[str]:
    try:
        return [f.path for f in list_tree(uri)[2]]
    except StorageError:
        return []  # not there yet


def _swap_local(stage: Path, target: Path) -> None:
    """Put ``stage`` at ``target``; afterwards ``stage`` holds the earlier directory (if any)."""
    if _rename_exchange(stage, target):
        return
    old = target.parent / f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        os.rename(target, old)
    except FileNotFoundError:
        old = None
    os.rename(stage, target)
    if old is not None:
        os.rename(old, stage)


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths (Linux renameat2); False where unavailable or b is absent."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOENT, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _replace_remote(local: Path, uri: str) -> None:
    from pyarrow import fs as pafs

    existing = _remote_names(uri)  # now, not when staging began
    filesystem, root = filesystem_for(uri.rstrip("/"))
    root = root.rstrip("/")
    new = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    # Without the marker the directory is no model: take it away first and put it back last.
    if MARKER in existing:
        filesystem.delete_file(f"{root}/{MARKER}")
    for name in set(existing) - set(new) - {MARKER}:
        filesystem.delete_file(f"{root}/{name}")
    filesystem.create_dir(root, recursive=True)
    for name in [n for n in new if n != MARKER] + [n for n in new if n == MARKER]:
        pafs.copy_files(str(local / name), f"{root}/{name}", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=filesystem)

