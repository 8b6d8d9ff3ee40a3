"""Prompts for batch generation: reading them with stable ids, and checking each row.

``PromptSource`` is a Ray Data datasource with one read task per input file (Parquet or JSONL,
local or ``s3://``/``gs://``) or per shard of the built-in held-out prompts (``builtin:N``: shard k
holds the first 500 held-out draws of the stream from draw k × 200,000 on, so any shard is made
without the draws before it, and shard 0 is the held-out set evaluation scores). Each
row carries a stable ``id`` from the first operator on: the configured id column, or else
``<file>:<row>`` (the file relative to the input root), so a rerun gives every row the same id and
seed, and the read tasks themselves drop the ids an earlier run finished (``done``).

A row that cannot be used (bad JSON, no prompt, a bad override) is never dropped: it travels on
with an ``error`` and ends up in the output as an error row. ``prepare_batch`` tokenizes the
prompts (and suffixes, for infilling) and resolves each row's sampler settings (config defaults + the row's own columns).
"""

from __future__ import annotations

import json
from pathlib import PurePosixPath
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import ray
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from dlm_ray.config.schema import CorpusConfig, ModelConfig, SampleConfig
from dlm_ray.config.inference import GenerateConfig, RowOverrides, check_overrides, resolve_overrides
from dlm_ray.data.corpus import HELDOUT_SEED, iter_examples
from dlm_ray.data.hashing import hash64
from dlm_ray.core.kinds import kind_of
from dlm_ray.core.text import encode_chat, encode_prompt
from dlm_ray.data.sources import BadInputError, file_format, iter_jsonl_records, iter_table_records, list_files

# Per-row sampler overrides: input columns with these names, when present and not null. They are
# checked as a Serve request's sampler fields are (config_inference.SampleOverrides).
OVERRIDE_FIELDS = tuple(RowOverrides.model_fields)
ROWS_PER_BLOCK = 1024  # read granularity only: build_dataset re-forms blocks for the model
BUILTIN_SHARD = 500  # built-in prompts per read task
BUILTIN_WINDOW = 200_000  # draws of the built-in stream between the starts of two read tasks

READ_SCHEMA = pa.schema([("id", pa.string()), ("where", pa.string()), ("prompt", pa.string()), ("messages", pa.string()),
                         ("suffix", pa.string()), ("overrides", pa.string()), ("error", pa.string())])


def _rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=READ_SCHEMA)


def _row(id_: str, where: str, prompt: Any, overrides: dict[str, Any], error: str | None,
         messages: Any = None, suffix: Any = None) -> dict[str, Any]:
    """A read row; ``messages`` (a conversation) stands in for the prompt, checked when encoded. A
    ``suffix`` (text after the completion: infilling) goes with a prompt."""
    if error is None and messages is not None and prompt is not None:
        error = "row has both a prompt and messages; give one"
    if error is None and suffix is not None and not isinstance(suffix, str):
        error = f"suffix is {type(suffix).__name__}, not text"
    if error is None and suffix is not None and messages is not None:
        error = "a suffix goes with a prompt, not with messages"
    if error is None and messages is None and not isinstance(prompt, str):
        error = "prompt is missing (null)" if prompt is None else f"prompt is {type(prompt).__name__}, not text"
    if error is None and messages is None and not prompt.strip():
        error = "prompt is empty"
    kept = {k: v for k, v in overrides.items() if v is not None}
    return {"id": id_, "where": where, "prompt": prompt if isinstance(prompt, str) else None,
            "messages": None if messages is None else json.dumps(messages, ensure_ascii=False),
            "suffix": suffix if isinstance(suffix, str) and suffix else None,
            "overrides": json.dumps(kept, sort_keys=True) if kept else None, "error": error}


def _records(fmt: str, uri: str, columns: set[str]) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """(row number, record or None, parse error) of one file, only the columns we use. A JSONL row's
    number counts records, not lines (a blank line takes none): it is part of the row's id."""
    if fmt == "parquet":
        for n, (_, record) in enumerate(iter_table_records(fmt, uri, sorted(columns))):
            yield n, record, None
        return
    for r in iter_jsonl_records(uri):
        yield r.index, None if r.record is None else {k: v for k, v in r.record.items() if k in columns}, r.error


def _read_file(uri: str, name: str, fmt: str, cfg: GenerateConfig) -> Iterator[pa.Table]:
    columns = {cfg.prompt_column, cfg.messages_column, cfg.suffix_column, *OVERRIDE_FIELDS} | \
        ({cfg.id_column} if cfg.id_column else set())
    rows: list[dict[str, Any]] = []
    for n, record, error in _records(fmt, uri, columns):
        where = f"{name} row {n}"
        id_ = f"{name}:{n}"
        if record is not None and cfg.id_column:
            given = record.get(cfg.id_column)
            if given is None:
                error = f"id column {cfg.id_column!r} is missing"
            else:
                id_ = str(given)
        record = record or {}
        overrides = {k: record.get(k) for k in OVERRIDE_FIELDS}
        rows.append(_row(id_, where, record.get(cfg.prompt_column), overrides, error, record.get(cfg.messages_column),
                         record.get(cfg.suffix_column)))
        if len(rows) == ROWS_PER_BLOCK:
            yield _rows_to_table(rows)
            rows = []
    if rows:
        yield _rows_to_table(rows)


def _read_builtin(shard: int, count: int, families: dict[str, float]) -> Iterator[pa.Table]:
    """The ``count`` held-out prompts of shard ``shard``: the first held-out draws from the shard's
    own window of draws on. Shard 0's window starts at draw 0, so its prompts are the held-out set
    evaluation scores; a later shard starts at its window without making the draws before it (which
    made reading N prompts cost N² / 2 draws in all)."""
    start = shard * BUILTIN_WINDOW
    rows = []
    for index, ex in iter_examples(families, seed=HELDOUT_SEED, split="heldout", start=start):
        if index >= start + BUILTIN_WINDOW:  # ~10 draws per held-out prompt: 40x the draws a shard needs
            raise RuntimeError(f"built-in shard {shard} found {len(rows)} held-out prompts in its window of "
                               f"{BUILTIN_WINDOW} draws")
        k = shard * BUILTIN_SHARD + len(rows)
        rows.append(_row(f"builtin:{index}", f"builtin prompt {k} ({ex.family})", ex.prompt, {}, None))
        if len(rows) == count:
            break
    yield _rows_to_table(rows)


def builtin_count(spec: str) -> int | None:
    """N for an input of ``builtin:N``; None for any other input."""
    if not spec.startswith("builtin:"):
        return None
    try:
        n = int(spec.removeprefix("builtin:"))
    except ValueError:
        raise ValueError(f"input {spec!r}: expected builtin:<number of prompts>") from None
    if n <= 0:
        raise ValueError(f"input {spec!r}: the number of prompts must be positive")
    return n


class PromptSource(Datasource):
    """The prompts of ``cfg.input`` as rows (id, where, prompt, overrides, error)."""

    def __init__(self, cfg: GenerateConfig, done: np.ndarray | None = None) -> None:
        """``done``: the ids already in the output (``done_lookup``'s array), left out. A built-in
        shard whose ids are all done is not read at all: making its prompts only to drop them cost a
        resumed job 113 s before its first new row with half a million prompts done."""
        super().__init__()
        self.cfg = cfg
        self.done = ray.put(done) if done is not None and len(done) else None
        self.num_builtin = builtin_count(cfg.input)
        self.finished: set[int] = set()  # built-in shards with nothing left to generate
        if self.num_builtin is not None:
            self.sizes = [min(BUILTIN_SHARD, self.num_builtin - s) for s in range(0, self.num_builtin, BUILTIN_SHARD)]
            if self.done is not None:
                self.finished = _finished_shards(done, self.sizes)
        else:
            found = list_files(cfg.input)
            root = _common_root([p for _, p in found])
            self.files = [(uri, str(PurePosixPath(p).relative_to(root)) if root else PurePosixPath(p).name,
                           "parquet" if cfg.format == "parquet" else file_format(uri, cfg.format))
                          for uri, p in found]
            bad = [uri for uri, _, fmt in self.files if fmt not in ("parquet", "jsonl")]
            if bad:
                raise ValueError(f"prompts must be Parquet or JSONL; cannot read {bad[:3]} (set format:)")

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def num_read_tasks(self) -> int:
        """One read task per file (or built-in shard not finished; at least one): pass it as
        ``override_num_blocks`` so that Ray Data does not split the blocks further to reach its
        default parallelism."""
        if self.num_builtin is not None:
            return max(1, len(self.sizes) - len(self.finished))
        return len(self.files)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        cfg = self.cfg
        if self.num_builtin is not None:
            families = CorpusConfig().families
            reads = [(lambda k=k, n=n: _read_builtin(k, n, families), _meta(n, None))
                     for k, n in enumerate(self.sizes) if k not in self.finished]
            if not reads:  # every prompt done: one task that reads nothing
                reads = [(lambda: iter([_rows_to_table([])]), _meta(0, None))]
        else:
            reads = [(lambda u=uri, n=name, f=fmt: _read_file(u, n, f, cfg), _meta(None, uri))
                     for uri, name, fmt in self.files]
        if self.done is None:
            return [ReadTask(read, meta, READ_SCHEMA) for read, meta in reads]
        # How many rows a task leaves is known only once it has read them.
        return [ReadTask(lambda read=read, done=self.done: _left_out(read(), done),
                         _meta(None, (meta.input_files or [None])[0]), READ_SCHEMA) for read, meta in reads]


def _finished_shards(done: np.ndarray, sizes: list[int]) -> set[int]:
    """The built-in shards all of whose ids (``builtin:<draw>``, the draw in the shard's window) are done."""
    draws = np.array([int(i[8:]) for i in done if i.startswith("builtin:")], dtype=np.int64)
    counts = np.bincount(draws // BUILTIN_WINDOW, minlength=len(sizes))
    return {k for k, n in enumerate(sizes) if counts[k] >= n}


def done_lookup(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Finished ids in the form the read tasks look them up in: a sorted array, read from the object
    store without a copy and searched in O(log n) per row. A hash set would be built again by every
    read task, which at a million finished ids costs more than the task's own rows."""
    return np.sort(np.asarray(ids.to_numpy(zero_copy_only=False), dtype=str))


def _left_out(tables: Iterator[pa.Table], done_ref: ray.ObjectRef) -> Iterator[pa.Table]:
    """The rows whose id is not in ``done`` (``done_lookup``'s array). A lookup in the read task
    itself: it needs no resources of its own, where a separate filter stage holds a CPU for the whole job."""
    done = ray.get(done_ref)
    for table in tables:
        ids = np.asarray(table["id"].to_numpy(zero_copy_only=False), dtype=str)
        at = np.minimum(np.searchsorted(done, ids), len(done) - 1)
        yield table.filter(pa.array(done[at] != ids))


def _meta(num_rows: int | None, uri: str | None) -> BlockMetadata:
    return BlockMetadata(num_rows=num_rows, size_bytes=None, input_files=[uri] if uri else None, exec_stats=None)


def _common_root(paths: list[str]) -> str:
    if len(paths) == 1:
        return str(PurePosixPath(paths[0]).parent)
    parts = [PurePosixPath(p).parts for p in paths]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return str(PurePosixPath(*common)) if common else ""


# --------------------------------------------------------------------------------------- per row


def row_seed(base_seed: int, id_: str) -> int:
    """The sampling seed of a row without its own: stable in the id, not in the row's position."""
    # stable_id(base_seed, id_) but joined by ":", as outputs already written were seeded: a rerun
    # that completes an output must draw the seeds its first rows were generated with.
    return hash64(f"{base_seed}:{id_}") >> 1  # fits int64


def resolve_row(overrides_json: str | None, defaults: SampleConfig) -> tuple[SampleConfig, int | None]:
    """The row's sampler settings and its own seed (if given); raises ValueError naming the field,
    in the words Serve answers a request with the same setting."""
    given = check_overrides(json.loads(overrides_json) if overrides_json else {})
    return resolve_overrides(defaults, given.model_dump(exclude_none=True)), given.seed


PREPARED_SCHEMA = READ_SCHEMA.append(pa.field("prompt_ids", pa.list_(pa.int32()))) \
    .append(pa.field("suffix_ids", pa.list_(pa.int32()))) \
    .append(pa.field("sample", pa.string())).append(pa.field("seed", pa.int64()))


def prepare_batch(batch: pa.Table, *, cfg: GenerateConfig, tokenizer: Any, max_seq_len: int,
                  model_cfg: dict[str, Any] | None = None) -> pa.Table:
    """Add ``prompt_ids``, ``suffix_ids``, ``sample`` (the row's settings as JSON, as the model runs
    them) and ``seed``; fill ``error`` for rows that cannot be generated. Under ``cfg.strict`` the first bad
    row raises instead."""
    kind = kind_of(None if model_cfg is None else ModelConfig.model_validate(model_cfg))
    rows = batch.to_pydict()
    n = batch.num_rows
    prompt_ids: list[list[int]] = []
    suffix_ids: list[list[int]] = []
    samples: list[str | None] = []
    seeds: list[int] = []
    errors = rows["error"]
    for i in range(n):
        ids: list[int] = []
        tail: list[int] = []
        sample, seed = None, 0
        if errors[i] is None:
            try:
                if rows["messages"][i] is not None:
                    ids = encode_chat(tokenizer, json.loads(rows["messages"][i]))
                else:
                    ids = encode_prompt(tokenizer, rows["prompt"][i], prepend_eos=cfg.prepend_eos)
                sc, own_seed = resolve_row(rows["overrides"][i], cfg.sample)
                sc = kind.resolve(sc)
                seed = own_seed if own_seed is not None else row_seed(cfg.seed, rows["id"][i])
                if rows["suffix"][i] is not None:
                    kind.check_infill()
                    tail = encode_prompt(tokenizer, rows["suffix"][i], prepend_eos=False)
                if len(ids) + sc.gen_length + len(tail) > max_seq_len:
                    with_suffix = f" and a suffix of {len(tail)}" if tail else ""
                    raise ValueError(f"prompt is {len(ids)} tokens; with gen_length {sc.gen_length}{with_suffix} "
                                     f"that is over the model's context of {max_seq_len}")
                sample = sc.model_dump_json()
            except ValueError as exc:
                errors[i] = str(exc)
        if errors[i] is not None and cfg.strict:
            raise BadInputError(f"{rows['where'][i]} (id {rows['id'][i]!r}): {errors[i]}")
        prompt_ids.append(ids if errors[i] is None else [])
        suffix_ids.append(tail if errors[i] is None else [])
        samples.append(sample)
        seeds.append(seed)
    rows.update(prompt_ids=prompt_ids, suffix_ids=suffix_ids, sample=samples, seed=seeds, error=errors)
    return pa.Table.from_pydict(rows, schema=PREPARED_SCHEMA)
