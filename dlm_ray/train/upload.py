"""Checkpoint uploads off the training path.

Each rank writes its part of a checkpoint to a local staging directory and hands it to
``ray.train.report`` with ``CheckpointUploadMode.ASYNC``: a background thread of Ray Train copies it
to the run directory (local disk, ``s3://``, ``gs://``) and deletes the staged copy, while the rank
goes on to its next step. Ray Train commits the checkpoint (it joins the run's checkpoint list, the
one a resume reads) only once every rank's part is up.

The copy itself is ``upload_checkpoint`` below, Ray Train's own persist step tried
``train.upload_attempts`` times with a growing pause between tries. Every failed try is reported on
the worker's console; when the last one fails the exception goes back to Ray Train, which stops the
workers and restarts them (``FailureConfig``) from the last committed checkpoint, so a failed upload
can cost steps but never leaves a run resuming from a checkpoint that is not all there.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from dlm_ray.config.schema import PretrainConfig
from dlm_ray.io.checkpoint import run_dir
from dlm_ray.train.metrics import run_marker, say

BACKOFF_S = 2.0  # the pause before the second try; doubled before each later one


class UploadFailed(RuntimeError):
    """A checkpoint that could not be uploaded after every try."""


def staging_dir(cfg: PretrainConfig, rank: int) -> Path:
    """A fresh local directory for one rank's part of one checkpoint (deleted once uploaded), named
    for the run and the rank so that ``clear_staged`` can find what a killed rank left."""
    root = cfg.train.checkpoint_staging
    if root:
        Path(root).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=_staging_prefix(cfg, rank), dir=root))


def clear_staged(cfg: PretrainConfig, rank: int) -> None:
    """Delete this run's and rank's staged copies on this node: a rank killed while its upload was in
    flight (a restart after another rank's failed upload, a lost worker) leaves its copy behind, and
    a rank starting over never uploads it."""
    root = Path(cfg.train.checkpoint_staging or tempfile.gettempdir())
    for old in root.glob(_staging_prefix(cfg, rank) + "*"):
        shutil.rmtree(old, ignore_errors=True)


def _staging_prefix(cfg: PretrainConfig, rank: int) -> str:
    return f"dlm-checkpoint-{cfg.run_name}-rank{rank}-"


def upload_fn(cfg: PretrainConfig, *, step: int, rank: int) -> Callable[[Any, str], Any]:
    """The ``checkpoint_upload_fn`` for this rank's checkpoint of ``step``."""
    return functools.partial(upload_checkpoint, cfg=cfg, step=step, rank=rank)


def upload_checkpoint(checkpoint: Any, dir_name: str, *, cfg: PretrainConfig, step: int, rank: int,
                      persist: Callable[[Any, str], Any] | None = None, backoff_s: float = BACKOFF_S) -> Any:
    """Copy the staged ``checkpoint`` to ``dir_name`` in the run directory; return the stored one.
    ``persist`` is Ray Train's copy (its storage context's) unless given."""
    tc = cfg.train
    if persist is None:
        import ray.train

        persist = ray.train.get_context().get_storage().persist_current_checkpoint
    marker = f".upload_failed_rank{rank}"  # the drill fails each rank's upload once per run
    drill = tc.fail_upload_at_step == step and not run_marker(run_dir(cfg), marker)
    for attempt in range(1, tc.upload_attempts + 1):
        try:
            if tc.upload_delay_s:
                time.sleep(tc.upload_delay_s)  # the drill: a slow object store
            if drill:
                raise OSError(f"injected upload failure at step {step}")
            return persist(checkpoint, dir_name)
        except Exception as exc:  # noqa: BLE001 - every failure is reported, the last one raised
            last = attempt == tc.upload_attempts
            pause = backoff_s * 2 ** (attempt - 1)
            say(f"[checkpoint] upload of step {step} (rank {rank}) failed, try {attempt} of {tc.upload_attempts}: "
                 f"{type(exc).__name__}: {exc}" + ("; giving up (the staged copy deleted): the run restarts from its "
                                                   "last committed checkpoint"
                                                   if last else f"; trying again in {pause:g} s"))
            if last:
                if drill:
                    run_marker(run_dir(cfg), marker, mark=True)
                # The restart writes its own checkpoints: a staged copy left behind would only fill the disk.
                shutil.rmtree(getattr(checkpoint, "path", ""), ignore_errors=True)
                # The cause is chained, not quoted: Ray Train retries an upload whose error text names
                # a transient S3 error, and this one's staged copy is gone.
                raise UploadFailed(f"checkpoint of step {step} could not be uploaded to {dir_name} after "
                                   f"{tc.upload_attempts} tries (the last error is chained)") from exc
            time.sleep(pause)
    raise AssertionError("unreachable")
