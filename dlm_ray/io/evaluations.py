"""A run's checkpoint evaluations: one JSON record per evaluated checkpoint, in the run directory.

``<run dir>/evaluations/step_<step>.json`` is written by the task that evaluated the checkpoint
(``dlm_ray.eval.checkpoints``) and read by whoever adds the records to ``metrics.jsonl`` (rank 0 of
the training run, then the driver), so ``metrics.jsonl`` keeps a single writer at a time. Through the
run directory's pyarrow filesystem: local, ``s3://`` or ``gs://`` alike.
"""

from __future__ import annotations

import json
from typing import Any

from dlm_ray.io.storage import filesystem_for

EVAL_DIR = "evaluations"
MARK = {"evaluated": "checkpoint"}  # in each record: what tells it from the training loop's records


def write_evaluation(run_uri: str, record: dict[str, Any]) -> None:
    """Store the evaluation of the checkpoint of ``record["step"]`` (replacing an earlier one)."""
    filesystem, root = filesystem_for(run_uri)
    filesystem.create_dir(f"{root}/{EVAL_DIR}", recursive=True)
    with filesystem.open_output_stream(f"{root}/{EVAL_DIR}/step_{record['step']:09d}.json") as f:
        f.write(json.dumps({**record, **MARK}).encode())


def read_evaluations(run_uri: str, *, skip: set[int] = frozenset()) -> list[dict[str, Any]]:
    """The checkpoint evaluations written so far, by step (those of the steps in ``skip`` not read:
    one listing and a read per new record, however long the run)."""
    import pyarrow.fs as pafs

    filesystem, root = filesystem_for(run_uri)
    found = filesystem.get_file_info(pafs.FileSelector(f"{root}/{EVAL_DIR}", allow_not_found=True))
    records = []
    for info in sorted(found, key=lambda i: i.path):
        name = info.base_name
        if info.type != pafs.FileType.File or not (name.startswith("step_") and name.endswith(".json")):
            continue
        if int(name[len("step_"):-len(".json")]) in skip:
            continue
        with filesystem.open_input_stream(info.path) as f:
            records.append(json.loads(f.read()))
    return records


def unjoined(run_uri: str, records: list[dict[str, Any]], *, up_to: int | None = None) -> list[dict[str, Any]]:
    """The evaluations not yet among ``records`` (a run's metric records), at or before step ``up_to``."""
    have = {r["step"] for r in records if r.get("evaluated") == MARK["evaluated"]}
    return [r for r in read_evaluations(run_uri, skip=have) if up_to is None or r["step"] <= up_to]
