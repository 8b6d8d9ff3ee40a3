"""A lock left by an interrupted build of a compiled op is cleared; a live build's is not."""

from __future__ import annotations

import os
import time

from torch.utils.file_baton import FileBaton

from dlm_ray.train.op_builds import clear_stale_build_locks


def _op_dir(root, name: str, age_s: float):
    d = root / "py311_cpu" / name
    d.mkdir(parents=True)
    then = time.time() - age_s
    for f in ("build.ninja", "fused_adam.o", "lock"):
        (d / f).write_text("")
        os.utime(d / f, (then, then))
    return d


def test_an_idle_lock_is_removed_and_torch_s_baton_can_be_taken_again(tmp_path, capsys):
    stale = _op_dir(tmp_path, "fused_adam", age_s=3600)
    live = _op_dir(tmp_path, "deepspeed_shm_comm", age_s=3600)
    (live / "shm.o").write_text("")  # a build that is writing its objects now
    # torch's own lock, as the builder takes it: held by a file nobody will remove.
    assert not FileBaton(str(stale / "lock")).try_acquire()
    removed = clear_stale_build_locks(tmp_path, idle_s=900)
    assert removed == [stale / "lock"] and (live / "lock").exists()
    assert FileBaton(str(stale / "lock")).try_acquire()  # the next build proceeds instead of waiting
    assert "interrupted build" in capsys.readouterr().err


def test_nothing_to_clear(tmp_path):
    assert clear_stale_build_locks(tmp_path / "absent") == []
    _op_dir(tmp_path, "fused_adam", age_s=60)
    assert clear_stale_build_locks(tmp_path, idle_s=900) == [] and (tmp_path / "py311_cpu/fused_adam/lock").exists()
