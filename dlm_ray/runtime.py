"""Starting or joining Ray, and the one opt-in tuning of Ray Data that reads Ray's internals.

``init_ray`` is how every job gets a cluster: the one ``RAY_ADDRESS`` names (``ray job submit``
sets it), else a fresh local one. ``pace_scheduling`` slows Ray Data's scheduling loop down while
it has nothing to do; it reads private executor state, so it is imported lazily, falls back to a
no-op on a Ray without those internals, and is on by default only where it was measured to help:
a local, CPU-only cluster (``pacing: auto``).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any, Literal

import ray

Pacing = Literal["auto", "on", "off"]
SLEEP_CAP_ENV = "DLM_RAY_SCHEDULER_SLEEP_MS"

# Third-party log lines that say nothing a user of these jobs can act on. Filtered by logger, at
# their source; errors from these loggers still show.
QUIET_LOGGERS = ("ray.train", "ray.data", "ray.tune", "ray.serve", "DeepSpeed", "deepspeed",
                 "torch.distributed", "ray._private")


def init_ray(**kwargs: Any) -> None:
    """Join the cluster named by ``RAY_ADDRESS``, else start a local one (``address="local"``
    never joins a stale cluster left by a killed run).

    A local cluster gets 2 logical CPUs per core, so the data pipeline has room beside the Train
    workers. Ray's own INFO lines from the workers (per-report dumps, dataset plans) are kept out of
    the console; warnings and errors still show. ``kwargs`` go to ``ray.init``.
    """
    if ray.is_initialized():
        return
    kwargs.setdefault("logging_config", ray.LoggingConfig(log_level="WARNING"))
    quiet_third_party()
    if "RAY_ADDRESS" in os.environ:
        ray.init(**kwargs)
        return
    kwargs.setdefault("num_cpus", 2 * (os.cpu_count() or 2))
    # The raylet expects at most one worker process starting per physical core and warns past a few
    # times that; with two logical CPUs per core and fractional-CPU pipeline actors, a run starts
    # about ten by design. The expectation follows the logical CPUs given to this cluster.
    os.environ.setdefault("RAY_worker_maximum_startup_concurrency", str(int(kwargs["num_cpus"])))
    # Ray announces, as a warning, that a new local cluster uses token authentication, its default.
    # (Setting RAY_AUTH_MODE here instead is too late: Ray reads it when it is imported.)
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # Nothing drains a local machine's only node, so Ray Train's preemption watcher has nothing to
    # watch; its actor is also what makes Ray log an error-level line at every run's start.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    ray.init(address="local", **kwargs)


def quiet_third_party(level: int = logging.WARNING) -> None:
    """Raise the level of the chattiest third-party loggers in this process: those named in
    ``QUIET_LOGGERS``, and Ray's loggers named by their file path (Ray Train's per-report dump is
    one), which sit outside the ``ray`` logger tree. Warnings and errors still show."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(level)
    for name in list(logging.root.manager.loggerDict):
        if f"{os.sep}ray{os.sep}" in name and name.endswith(".py"):
            logging.getLogger(name).setLevel(level)


def is_local_cpu_cluster() -> bool:
    """This process started its own Ray (no ``RAY_ADDRESS``) and the cluster has no GPU."""
    return "RAY_ADDRESS" not in os.environ and not ray.cluster_resources().get("GPU", 0)


# ------------------------------------------------------------------------------------------ pacing


def pace_scheduling(context: Any, pacing: Pacing) -> bool:
    """Add the pacing callback to a dataset's ``DataContext`` when ``pacing`` asks for it (``auto``:
    on a local CPU-only cluster). Returns whether pacing is on."""
    if pacing == "off" or (pacing == "auto" and not is_local_cpu_cluster()):
        return False
    cls = pace_scheduler_class()
    if cls is None:
        return False
    if cls not in context.custom_execution_callback_classes:
        context.custom_execution_callback_classes.append(cls)
    return True


@functools.lru_cache(maxsize=1)
def pace_scheduler_class() -> type | None:
    """The callback class, or None when this Ray has no execution callbacks to hook into."""
    try:
        from ray.data._internal.execution.execution_callback import ExecutionCallback
    except ImportError:
        return None

    class PaceScheduler(ExecutionCallback):
        """Backs Ray Data's scheduling loop off while it makes no progress.

        When the training feed is backpressured (the trainer is the bottleneck, as it should be)
        the loop has no task to wait on and spins: measured at about half a core of a 2-core
        machine, taken from the trainer; a fixed 10 ms pause still left 13% of a core. So the
        pause doubles, from 1 ms up to ``DLM_RAY_SCHEDULER_SLEEP_MS`` (default 100; 0 turns it off),
        for as long as no task is submitted or finished and no output is taken, and drops back at
        the first change. A consumer that drains the buffer waits at most that long for a refill.
        """

        MIN_MS = 1.0

        def __init__(self) -> None:
            self._last: tuple[int, ...] | None = None
            self._ms = self.MIN_MS

        def on_execution_step(self, executor: Any) -> None:
            cap = float(os.environ.get(SLEEP_CAP_ENV, "100"))
            if cap <= 0:
                return
            progress = scheduler_progress(executor)
            if progress is None:  # the counters moved or vanished: a fixed short pause
                self._ms = min(10.0, cap)
            elif progress != self._last:
                self._ms = self.MIN_MS
            else:
                self._ms = min(2 * self._ms, cap)
            self._last = progress
            time.sleep(self._ms / 1000)

    return PaceScheduler


def scheduler_progress(executor: Any) -> tuple[int, ...] | None:
    """Counters that move whenever the loop does work; None if this Ray version hides them."""
    try:
        out: list[int] = []
        for op, state in executor._topology.items():
            m = op.metrics
            out += [m.num_tasks_submitted, m.num_tasks_finished, m.num_outputs_taken, len(state.output_queue)]
        return tuple(out)
    except (AttributeError, TypeError):
        return None
