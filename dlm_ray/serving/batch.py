"""Batch generation: prompts in, a Parquet dataset of completions out, every id exactly once.

    read prompts (PromptSource, finished ids left out) → prepare_batch (tokenize, check, settings)
      → Completer actors (ActorPoolStrategy; the checkpoint loaded once per actor) → write_parquet

Exactly once comes from Ray Data's row-level checkpointing: each written block also records its
ids under ``<output>/_checkpoint`` (written pending, committed after the data file). A rerun with
the same output first deletes data files whose block never got its committed checkpoint (a kill
between the two writes), then the read tasks leave out the committed ids. Ray Data's own filter
stage is not used: it is an actor pool holding a CPU and 1 GiB for the whole job, which on a small
node took the place of a generation actor, for a set lookup the read task does at no cost.
Each output file gathers ``min_rows_per_file`` rows (several actor calls) and is committed with one
checkpoint file, so file counts grow with blocks of rows, not with calls. Nothing the driver holds
grows with the rows as Python objects: the finished ids are one Arrow column, handed to the read
tasks as a sorted array (``prompts.done_lookup``), and the summary reads the output a batch at a time.
The checkpoint is kept after success, so a rerun of a finished job writes nothing, and a rerun over
a grown input generates only the new ids. ``<output>/_job.json`` pins the settings an output was
made with (every setting that changes a row's output); resuming with other settings is refused
rather than mixing two kinds of rows.

A row may hold ``messages`` (a conversation, OpenAI's format) instead of a prompt: it is rendered
with the model's chat template, and the answer ends at the model's end-of-turn token.

A row may also hold a ``suffix``: the completion is then inserted between prompt and suffix
(infilling; a full-attention model only).

Output columns: id, prompt, messages (JSON, for conversations), suffix, completion, completion_ids,
num_model_calls, num_generated_tokens, seed, sample (the row's sampler settings as JSON),
checkpoint (hash), source (file and row), error.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import ray
from pyarrow import fs as pafs
from ray.data import ActorPoolStrategy, DataContext
from ray.data.checkpoint import CheckpointConfig, IdColumnCheckpointManager

from dlm_ray.io.checkpoint import checkpoint_hash, inference_placement, load_inference, read_inference_config
from dlm_ray.config.schema import ModelConfig, SampleConfig
from dlm_ray.config.inference import GenerateConfig
from dlm_ray.data.corpus import check_answer
from dlm_ray.core.inference import complete_ids
from dlm_ray.data.prompts import BUILTIN_SHARD, PromptSource, builtin_count, done_lookup, prepare_batch
from dlm_ray.runtime import pace_scheduling
from dlm_ray.io.storage import filesystem_for

OUTPUT_SCHEMA = pa.schema([
    ("id", pa.string()), ("prompt", pa.string()), ("messages", pa.string()), ("suffix", pa.string()),
    ("completion", pa.string()),
    ("completion_ids", pa.list_(pa.int32())), ("num_model_calls", pa.int32()),
    ("num_generated_tokens", pa.int32()), ("seed", pa.int64()), ("sample", pa.string()),
    ("checkpoint", pa.string()), ("source", pa.string()), ("error", pa.string()),
])
JOB_FILE = "_job.json"
SUMMARY_FILE = "_summary.json"
CHECKPOINT_DIR = "_checkpoint"
PENDING_SUFFIX = ".pending.parquet"  # Ray Data's name for a block checkpoint not yet committed


class Completer:
    """The actor UDF: one model per actor, ``generate`` on groups of similar rows."""

    def __init__(self, cfg: dict[str, Any], ckpt_hash: str) -> None:
        self.cfg = c = GenerateConfig.model_validate(cfg)
        self.device, dtype = inference_placement(c.gpus_per_actor > 0, c.dtype, c.torch_threads or int(c.cpus_per_actor))
        self.model, self.tok, _ = load_inference(c.checkpoint, device=self.device, dtype=dtype,
                                                  compile=c.compile, kind=c.model_kind)
        self.hash = ckpt_hash

    def _maybe_fail(self) -> None:
        marker = self.cfg.fail_once_marker
        if marker and not os.path.exists(marker):
            Path(marker).write_text(str(os.getpid()))
            os._exit(1)  # an actor dying mid-batch, as a lost node or an OOM kill would

    def __call__(self, table: pa.Table) -> pa.Table:
        self._maybe_fail()
        batch = table.to_pydict()
        n = table.num_rows
        completion: list[str | None] = [None] * n
        comp_ids: list[list[int] | None] = [None] * n
        calls = np.zeros(n, dtype=np.int32)
        gen_tokens = np.zeros(n, dtype=np.int32)
        ok = [i for i in range(n) if batch["error"][i] is None]
        parsed = {j: SampleConfig.model_validate_json(j) for j in {batch["sample"][i] for i in ok}}
        results = complete_ids(self.model, self.tok, [batch["prompt_ids"][i] for i in ok],
                               [parsed[batch["sample"][i]] for i in ok], [batch["seed"][i] for i in ok],
                               batch_size=self.cfg.batch_size, device=self.device,
                               suffixes=[batch["suffix_ids"][i] for i in ok])
        for i, c in zip(ok, results):
            completion[i], comp_ids[i], calls[i], gen_tokens[i] = c.text, c.ids, c.num_model_calls, c.num_generated
        return pa.table({
            "id": batch["id"], "prompt": batch["prompt"], "messages": batch["messages"], "suffix": batch["suffix"],
            "completion": completion,
            "completion_ids": comp_ids,
            "num_model_calls": calls, "num_generated_tokens": gen_tokens, "seed": batch["seed"],
            "sample": batch["sample"], "checkpoint": [self.hash] * n, "source": batch["where"],
            "error": batch["error"],
        }, schema=OUTPUT_SCHEMA)


# ------------------------------------------------------------------------------------------ driver


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def _job_identity(cfg: GenerateConfig, ckpt_hash: str) -> dict[str, Any]:
    """Every setting that changes what a row's output is: which weights (and the kind they are run
    as), how a row is read (its
    format, the columns its prompt, messages, suffix and id come from), how it is encoded and
    sampled, and the number format the model runs in. Batch sizes, actors and the like only change
    how fast (a row's output does not depend on its batch), so a rerun may change them."""
    return {"checkpoint": ckpt_hash, "model_kind": cfg.model_kind, "sample": cfg.sample.to_dict(), "seed": cfg.seed, "format": cfg.format,
            "prompt_column": cfg.prompt_column, "messages_column": cfg.messages_column,
            "suffix_column": cfg.suffix_column, "id_column": cfg.id_column, "prepend_eos": cfg.prepend_eos,
            "dtype": cfg.dtype, "device": "gpu" if cfg.gpus_per_actor > 0 else "cpu",
            # Built-in prompts past the first shard have been numbered by windows of draws since this key.
            **({"builtin_prompts": "windows"} if builtin_count(cfg.input) is not None else {})}


def check_output(cfg: GenerateConfig, identity: dict[str, Any]) -> pa.ChunkedArray:
    """Refuse an output made with other settings, or one that is not ours; finish what a killed
    run left half written; return the ids done (an Arrow column: a million ids as Python strings
    would cost the driver ~100 MB for the whole job)."""
    filesystem, root = filesystem_for(cfg.output)
    job_file = f"{root}/{JOB_FILE}"
    if filesystem.get_file_info(job_file).type == pafs.FileType.File:
        with filesystem.open_input_stream(job_file) as f:
            before = json.loads(f.read())
        # A setting an older output did not record (added since) is no difference.
        diff = sorted(k for k in identity if k in before and before[k] != identity[k])
        if "builtin_prompts" in identity and "builtin_prompts" not in before and \
                (builtin_count(cfg.input) or 0) > BUILTIN_SHARD:
            raise ValueError(f"{cfg.output} holds built-in prompts numbered as they were before each shard had a "
                             "window of draws of its own: past the first 500 the same ids are other prompts now; "
                             "write to a new output")
        if diff:
            raise ValueError(f"{cfg.output} was generated with other settings ({', '.join(diff)} differ); "
                             "write to a new output, or delete it to start over")
    elif filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        raise ValueError(f"{cfg.output} exists and is not a generation output (no {JOB_FILE}); "
                         "choose an empty or new directory")
    filesystem.create_dir(root, recursive=True)
    with filesystem.open_output_stream(job_file) as f:
        f.write(json.dumps(identity, indent=2).encode())
    files = _checkpoint_files(filesystem, f"{root}/{CHECKPOINT_DIR}")
    if any(p.endswith(PENDING_SUFFIX) for p in files):
        _drop_uncommitted(cfg.output)
        files = [p for p in files if not p.endswith(PENDING_SUFFIX)]
    return _read_ids(filesystem, files)


def _checkpoint_config(output: str) -> CheckpointConfig:
    return CheckpointConfig(id_column="id", checkpoint_path=f"{output}/{CHECKPOINT_DIR}",
                            delete_checkpoint_on_success=False, checkpoint_manager_cls=_FilteredAtRead)


class _FilteredAtRead(IdColumnCheckpointManager):
    """Ray Data's checkpoint manager, told there is nothing for its filter stage to do: pending
    checkpoints were dealt with in ``check_output`` and the read tasks leave out finished ids."""

    def load_checkpoint(self, data_file_dir: str | None = None, data_file_filesystem: Any = None) -> tuple[None, int]:
        return None, 0


def _drop_uncommitted(output: str) -> None:
    """Delete the data files of blocks whose checkpoint stayed pending, and those checkpoints,
    with Ray Data's own cleanup (it knows how its data files are named after their checkpoint)."""
    manager = IdColumnCheckpointManager(checkpoint_config=_checkpoint_config(output),
                                        data_context=DataContext.get_current())
    manager._clean_pending_checkpoints(output, filesystem_for(output)[0])


def _checkpoint_files(filesystem: Any, path: str) -> list[str]:
    found = filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return [f.path for f in found if f.type == pafs.FileType.File and f.path.endswith(".parquet")]


def _read_ids(filesystem: Any, files: list[str]) -> pa.ChunkedArray:
    import pyarrow.dataset as pads

    if not files:
        return pa.chunked_array([], pa.string())
    return pads.dataset(files, filesystem=filesystem, format="parquet").to_table().column(0).cast(pa.string())


def _data_files(output: str) -> set[str]:
    """The output's Parquet data files (its checkpoint and job files start with "_" and are not data)."""
    import pyarrow.dataset as pads

    filesystem, root = filesystem_for(output)
    if not filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        return set()
    return set(pads.dataset(root, filesystem=filesystem, format="parquet").files)


def build_dataset(cfg: GenerateConfig, ckpt_hash: str, done: pa.ChunkedArray | None = None) -> ray.data.Dataset:
    """The pipeline for the prompts of ``cfg.input`` less the ids in ``done``."""
    meta, tokenizer = read_inference_config(cfg.checkpoint, kind=cfg.model_kind)
    max_seq_len = ModelConfig.model_validate(meta["model"]).max_seq_len
    source = PromptSource(cfg, done_lookup(done) if done is not None and len(done) else None)
    # No automatic split of the read into Ray Data's default 200 blocks: on a resume that split fed
    # the model one-row blocks (4x slower end to end). Instead the rows a resume leaves are re-formed
    # into blocks of one actor call's worth.
    ds = ray.data.read_datasource(source, override_num_blocks=source.num_read_tasks())
    ds = ds.repartition(target_num_rows_per_block=cfg.batch_size * cfg.group_batches)
    ds = ds.map_batches(prepare_batch, batch_format="pyarrow", batch_size=cfg.batch_size * cfg.group_batches,
                        fn_kwargs={"cfg": cfg, "tokenizer": tokenizer, "max_seq_len": max_seq_len,
                                   "model_cfg": meta["model"]})
    lo, hi = cfg.actors
    # The loop waits on a few long actor calls: on a small CPU machine it would spin on a core they need.
    pace_scheduling(ds.context, cfg.pacing)
    return ds.map_batches(
        Completer, fn_constructor_kwargs={"cfg": cfg.to_dict(), "ckpt_hash": ckpt_hash},
        batch_format="pyarrow", batch_size=cfg.batch_size * cfg.group_batches,
        compute=ActorPoolStrategy(min_size=lo, max_size=hi),
        num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor or None,
    )


def run(cfg: GenerateConfig) -> dict[str, Any]:
    """Generate a completion for every prompt not yet in ``cfg.output``; return the summary."""
    t0 = time.time()
    ckpt_hash = checkpoint_hash(cfg.checkpoint)
    output = _absolute(cfg.output)
    cfg = cfg.model_copy(update={"output": output, "checkpoint": _absolute(cfg.checkpoint)})
    done_before = check_output(cfg, _job_identity(cfg, ckpt_hash))
    files_before = _data_files(output)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress_bars
    with checkpointing(cfg.output):
        # A file, and its checkpoint, gathers several actor calls' blocks: the output's file count
        # grows with the rows over min_rows_per_file, not with one file per call.
        build_dataset(cfg, ckpt_hash, done_before).write_parquet(
            output, min_rows_per_file=min(cfg.min_rows_per_file, cfg.rows_per_file), max_rows_per_file=cfg.rows_per_file)
    summary = summarize(cfg, files_before, len(done_before), time.time() - t0)
    filesystem, root = filesystem_for(output)
    with filesystem.open_output_stream(f"{root}/{SUMMARY_FILE}") as f:
        f.write(json.dumps(summary, indent=2).encode())
    return summary


@contextlib.contextmanager
def checkpointing(output: str) -> Iterator[None]:
    """Datasets built inside write each block's ids to ``output``'s checkpoint after its data file
    (a dataset takes its context when it is built, so this must wrap the building too)."""
    ctx = DataContext.get_current()
    ctx.checkpoint_config = _checkpoint_config(output)
    try:
        yield
    finally:
        ctx.checkpoint_config = None


def summarize(cfg: GenerateConfig, files_before: set[str], done_before: int, seconds: float) -> dict[str, Any]:
    """Counts over the whole output (exactly-once shows as duplicate_ids == 0) and this run's rates
    (its rows are those of the data files it wrote). Read a batch at a time: only the id column is
    held whole, as Arrow, for the count of distinct ids."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    filesystem, root = filesystem_for(cfg.output)
    dataset = pads.dataset(root, filesystem=filesystem, format="parquet")
    ids = dataset.to_table(columns=["id"])["id"]
    totals = {"rows_this_run": 0, "rows_errored": 0, "calls_ok": 0, "rows_ok_this_run": 0, "tokens": 0, "valid": 0}
    errors: list[str] = []
    builtin = builtin_count(cfg.input) is not None
    cols = ["error", "num_model_calls", "num_generated_tokens", "source"] + (["prompt", "completion"] if builtin else [])
    for fragment in dataset.get_fragments():
        fresh = fragment.path not in files_before
        for batch in fragment.to_batches(columns=cols):
            failed = pc.is_valid(batch["error"])
            totals["rows_errored"] += pc.sum(failed).as_py() or 0
            if len(errors) < 5:
                bad = batch.filter(failed)
                pairs = zip(bad["source"].to_pylist(), bad["error"].to_pylist())
                errors += [f"{s}: {e}" for s, e in pairs][:5 - len(errors)]
            ok = batch.filter(pc.invert(failed))
            if builtin:
                totals["valid"] += sum(map(check_answer, ok["prompt"].to_pylist(), ok["completion"].to_pylist()))
            if fresh:
                totals["rows_this_run"] += batch.num_rows
                totals["rows_ok_this_run"] += ok.num_rows
                totals["calls_ok"] += pc.sum(ok["num_model_calls"]).as_py() or 0
                totals["tokens"] += pc.sum(batch["num_generated_tokens"]).as_py() or 0
    rows = len(ids)
    summary: dict[str, Any] = {
        "output": cfg.output, "rows": rows, "unique_ids": pc.count_distinct(ids).as_py(),
        "rows_errored": totals["rows_errored"], "rows_this_run": totals["rows_this_run"], "rows_done_before": done_before,
        # Calls of the generate() batch each row was in (one call serves the whole batch).
        "mean_model_calls_per_row": round(totals["calls_ok"] / max(1, totals["rows_ok_this_run"]), 2),
        "generated_tokens_this_run": int(totals["tokens"]),
        "seconds": round(seconds, 2),
        "data_files": len(dataset.files),
    }
    summary["duplicate_ids"] = summary["rows"] - summary["unique_ids"]
    summary["prompts_per_s"] = round(totals["rows_this_run"] / seconds, 2)
    summary["generated_tokens_per_s"] = round(summary["generated_tokens_this_run"] / seconds, 1)
    summary["errors"] = errors
    if builtin:
        summary["builtin_validity"] = round(totals["valid"] / max(1, rows - totals["rows_errored"]), 4)
    return summary
