"""Stale locks left by an interrupted build of a compiled op.

DeepSpeed compiles its CPU ops (the fused Adam, the shared-memory communication backend) on first
use, through torch's extension builder, in a directory per op under ``TORCH_EXTENSIONS_DIR`` (by
default ``~/.cache/torch_extensions/<python>_<device>``). The process that builds takes a ``lock``
file there; every other process waits for it to disappear, with no time limit. A build killed
half-way (a job stopped, a worker lost, a test timed out) leaves the file behind, and from then on
every run on that machine waits forever at its first step, printing nothing.

``clear_stale_build_locks`` removes a lock only when nothing in its directory has changed for
``idle_s`` seconds: a live build writes object files as it goes, so its lock is never that idle.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

STALE_AFTER_S = 900.0


def extensions_root() -> Path:
    """Where torch's extension builder (and so DeepSpeed) puts compiled ops on this machine."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def clear_stale_build_locks(root: str | Path | None = None, *, idle_s: float = STALE_AFTER_S,
                            now: float | None = None) -> list[Path]:
    """Remove every ``<root>/**/lock`` whose directory has been idle for ``idle_s`` seconds; the
    paths removed, each also named on stderr (a user who wonders why a build starts again sees why)."""
    base = Path(root) if root is not None else extensions_root()
    if not base.is_dir():
        return []
    now = time.time() if now is None else now
    removed = []
    for lock in sorted(base.glob("**/lock")):
        try:
            newest = max(p.stat().st_mtime for p in lock.parent.iterdir())
        except OSError:  # another process removed it, or the op's directory, meanwhile
            continue
        if now - newest < idle_s:
            continue
        try:
            lock.unlink()
        except FileNotFoundError:
            continue
        removed.append(lock)
        print(f"[train] removed {lock}: left by an interrupted build of a compiled op "
              f"(idle {(now - newest) / 60:.0f} min); the op is built again", file=sys.stderr)
    return removed
