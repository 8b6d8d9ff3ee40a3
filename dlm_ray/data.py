"""Ray Data corpus pipeline: read → tokenize → pack → mask, streamed to Ray Train workers.

    work items (files, or shards of the built-in corpus) × epochs
      └─ map_batches(TokenizePack, ActorPoolStrategy): read a file, tokenize, pack into rows,
         then mask_rows (forward diffusion: t and a masked copy) in the same actor, which saves
         a stage's copy of every row

One work item is one file (or one shard of the built-in corpus), read start to end by one actor
that holds the tokenizer, so packing never depends on scheduling: every row has a stable
``row_id`` and its mask is a function of (seed, epoch, row_id) alone. Each epoch repeats the work
items with a fresh mask draw, so one pass over the dataset is the whole run.

Packing concatenates documents, each followed by EOS, into ``seq_len`` rows. No token is dropped:
a file's last partial row is padded (attention_mask 0), and rows cut short for LLaDA's
random-length training hand their remaining tokens to the next row. So
``tokens in (documents + one EOS each) == sum(attention_mask)``, exactly.

Bad input never disappears: unreadable files and bad rows (missing/null text, bad JSON, non-UTF-8,
empty) are skipped and counted by reason in a ``PipelineStats`` actor, or with ``strict`` raise an
error that names the file and the row.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from typing import Any, Iterator

import numpy as np
import ray
from ray.data._internal.execution.execution_callback import ExecutionCallback

from dlm_ray.config import DataConfig, DiffusionConfig
from dlm_ray.sources import BadInputError, iter_documents, resolve_items
from dlm_ray.tokenizer import load_tokenizer

ROW_COLUMNS = ("input_ids", "attention_mask", "row_id")  # plus "doc_ids" with data.document_ids


def init_ray(**kwargs: Any) -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (``ray job submit`` sets it), else start a local one
    (``address="local"`` never joins a stale cluster left by a killed run).

    A local cluster gets 2 logical CPUs per core, so the data pipeline has room beside the Train
    workers; ``kwargs`` go to ``ray.init`` for it.
    """
    if ray.is_initialized():
        return
    if "RAY_ADDRESS" in os.environ:
        ray.init()
        return
    kwargs.setdefault("num_cpus", 2 * (os.cpu_count() or 2))
    ray.init(address="local", **kwargs)


def stable_id(*parts: Any) -> int:
    """A 63-bit id from the parts' text: the same on every machine and run."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@ray.remote(num_cpus=0)
class PipelineStats:
    """Counts what the pipeline read, skipped (by reason) and wrote, across all its actors."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def add(self, counts: dict[str, int]) -> None:
        self.counts.update(counts)

    def get(self) -> dict[str, int]:
        return dict(self.counts)


# -------------------------------------------------------------------------------------------- pack


class Packer:
    """Cuts a stream of documents into fixed-length rows, carrying the remainder between calls."""

    def __init__(self, seq_len: int, eos_id: int, pad_id: int, *, key: str, random_length_fraction: float = 0.0,
                 seed: int = 0) -> None:
        self.seq_len, self.eos_id, self.pad_id = seq_len, eos_id, pad_id
        self.key, self.fraction = key, random_length_fraction
        self.tokens: list[np.ndarray] = []
        self.docs: list[np.ndarray] = []
        self.num_docs = 0
        self.num_rows = 0
        self.rng = np.random.default_rng([seed, stable_id(key)])

    def add(self, docs: list[np.ndarray]) -> None:
        """Append documents (token id arrays), each followed by EOS."""
        if not docs:
            return
        lens = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
        flat = np.insert(np.concatenate(docs).astype(np.int32), np.cumsum(lens), self.eos_id)
        self.tokens.append(flat)
        self.docs.append(np.repeat(np.arange(self.num_docs, self.num_docs + len(docs), dtype=np.int32), lens + 1))
        self.num_docs += len(docs)

    def rows(self, *, final: bool = False) -> dict[str, np.ndarray] | None:
        """Every full row now available (and with ``final``, the padded tail)."""
        if not self.tokens:
            return None
        tokens, docs = np.concatenate(self.tokens), np.concatenate(self.docs)
        L, n = self.seq_len, len(tokens)
        lengths, pos = [], 0
        while n - pos >= L or (final and pos < n):
            take = L
            if self.fraction and self.rng.random() < self.fraction:
                take = int(self.rng.integers(1, L))
            take = min(take, n - pos)
            lengths.append(take)
            pos += take
        self.tokens, self.docs = [tokens[pos:]], [docs[pos:]]
        if not lengths:
            return None
        R = len(lengths)
        ids = np.full((R, L), self.pad_id, dtype=np.int32)
        am = np.zeros((R, L), dtype=np.int8)
        doc = np.full((R, L), -1, dtype=np.int32)
        starts = np.cumsum([0, *lengths[:-1]])
        for r, (a, k) in enumerate(zip(starts, lengths)):
            ids[r, :k] = tokens[a:a + k]
            am[r, :k] = 1
            doc[r, :k] = docs[a:a + k] - docs[a]  # documents numbered from 0 within each row
        row_ids = np.asarray([stable_id(self.key, self.num_rows + i) for i in range(R)], dtype=np.int64)
        self.num_rows += R
        return {"input_ids": ids, "attention_mask": am, "doc_ids": doc, "row_id": row_ids}


def _to_numpy(column: Any) -> np.ndarray:
    """A Parquet column of fixed-length rows (Ray's tensor extension, or plain lists) as a 2-D array."""
    arr = column.combine_chunks()
    if hasattr(arr, "to_numpy_ndarray"):  # Ray's ArrowTensorArray
        return arr.to_numpy_ndarray()
    out = arr.to_numpy(zero_copy_only=False)
    return np.stack(out) if out.dtype == object else out


class TokenizePack:
    """Actor UDF: one work item in, its packed rows out (streamed in batches). Loads the tokenizer once."""

    def __init__(self, data_cfg: dict[str, Any], tokenizer_cfg: dict[str, Any] | str, stats: Any,
                 diffusion: dict[str, Any] | None = None) -> None:
        self.cfg = DataConfig.model_validate(data_cfg)
        self.tok = load_tokenizer(tokenizer_cfg)
        self.stats = stats
        self.diffusion = diffusion

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for item_json, epoch in zip(batch["item"], batch["epoch"]):
            item = json.loads(str(item_json))
            for rows in self._item(item, int(epoch)):
                rows["epoch"] = np.full(len(rows["row_id"]), epoch, dtype=np.int32)
                if not self.cfg.document_ids:
                    rows.pop("doc_ids", None)  # a quarter of the bytes per row, unused unless asked for
                if self.diffusion is not None:
                    # Masking here, in the actor that packed the rows, saves a stage's copy of the data.
                    rows = mask_rows(rows, diffusion=self.diffusion, seed=self.cfg.seed, mask_id=self.tok.mask_id)
                yield rows

    def _item(self, item: dict[str, Any], epoch: int) -> Iterator[dict[str, np.ndarray]]:
        cfg, counts = self.cfg, Counter()
        if item["format"] == "prepared":
            # Already tokenized and packed by jobs/prepare_data.py: pass the rows through.
            import pyarrow.parquet as pq

            names = pq.read_schema(item["path"]).names
            table = pq.read_table(item["path"], columns=[c for c in (*ROW_COLUMNS, "doc_ids") if c in names])
            rows = {c: _to_numpy(table[c]) for c in table.column_names}
            if epoch == 0:
                self.stats.add.remote({"rows": table.num_rows, "tokens": int(rows["attention_mask"].sum())})
            yield rows
            return
        packer = Packer(cfg.seq_len, self.tok.eos_id, self.tok.pad_id, key=item["key"],
                        random_length_fraction=cfg.random_length_fraction, seed=cfg.seed)
        counts["files"] += 1
        texts: list[str] = []

        def flush() -> None:
            docs = self.tok.encode_batch(texts)
            texts.clear()
            counts["documents"] += len(docs)
            counts["tokens"] += sum(len(d) + 1 for d in docs)
            packer.add(docs)

        try:
            for where, text, reason in iter_documents(item, cfg):
                if reason is not None:
                    if cfg.strict:
                        raise BadInputError(f"{item['where']}: {where}: {reason.replace('_', ' ')}")
                    counts[f"skipped.{reason}"] += 1
                    continue
                texts.append(text)
                if len(texts) == cfg.docs_per_batch:
                    flush()
                    if (rows := packer.rows()) is not None:
                        counts["rows"] += len(rows["row_id"])
                        yield rows
        except BadInputError:
            raise
        except OSError as exc:  # unreadable file (permissions, corrupt Parquet, vanished object)
            if cfg.strict:
                raise BadInputError(f"{item['where']}: unreadable: {exc}") from exc
            counts["skipped_files.unreadable"] += 1
        flush()
        if (rows := packer.rows(final=True)) is not None:
            counts["rows"] += len(rows["row_id"])
            yield rows
        if epoch == 0:  # count documents once, not once per epoch
            self.stats.add.remote(dict(counts))


# -------------------------------------------------------------------------------------------- mask


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def counter_uniforms(seed: int, epoch: np.ndarray, row_id: np.ndarray, num: int) -> np.ndarray:
    """Uniforms in [0, 1), shape [rows, num], a pure function of (seed, epoch, row_id, column).

    A counter-based generator (splitmix64 of the mixed counters), vectorised over the batch: the
    same row gets the same numbers whatever batch it lands in, at numpy speed.
    """
    with np.errstate(over="ignore"):
        key = _splitmix64(np.uint64(seed) ^ _splitmix64(epoch.astype(np.uint64) ^ _splitmix64(row_id.astype(np.uint64))))
        x = _splitmix64(key[:, None] + np.arange(num, dtype=np.uint64)[None, :] * np.uint64(0xD1B54A32D192ED03))
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def mask_rows(batch: dict[str, np.ndarray], *, diffusion: dict[str, Any], seed: int, mask_id: int) -> dict[str, np.ndarray]:
    """Forward diffusion per row, deterministic from (seed, epoch, row_id): the same row gets the
    same mask on a rerun, and a fresh one each epoch. t is drawn per row (i.i.d.), since rows are
    batched for training only later."""
    # Imported here, not at the top: the tokenizer actors then start without loading torch.
    from dlm_ray.diffusion import apply_mask, mask_probability

    cfg = DiffusionConfig.model_validate(diffusion)
    x0 = batch["input_ids"]
    L = x0.shape[1]
    u = counter_uniforms(seed, batch["epoch"], batch["row_id"], L + 1)
    t = cfg.eps + (1 - cfg.eps) * u[:, L]
    p = mask_probability(t, cfg)
    noisy, masked = apply_mask(x0, p, u[:, :L], batch["attention_mask"].astype(bool), mask_id)
    return {**batch, "noisy_ids": noisy.astype(np.int32), "loss_mask": masked,
            "t": t.astype(np.float32), "p_mask": p.astype(np.float32)}


# ----------------------------------------------------------------------------------------- dataset


class PaceScheduler(ExecutionCallback):
    """Backs Ray Data's scheduling loop off while it makes no progress.

    When the training feed is backpressured (the trainer is the bottleneck, as it should be) the
    loop has no task to wait on and spins: measured here at about half a core of a 2-core machine,
    taken from the trainer; a fixed 10 ms pause still left 13% of a core. So the pause doubles, from
    1 ms up to ``DLM_RAY_SCHEDULER_SLEEP_MS`` (default 100; 0 turns pacing off), for as long as
    no task is submitted or finished and no output is taken, and drops back at the first change.
    A consumer that drains the buffer waits at most that long for the loop to refill it.
    """

    MIN_MS = 1.0

    def __init__(self) -> None:
        self._last: tuple[int, ...] | None = None
        self._ms = self.MIN_MS

    def on_execution_step(self, executor: Any) -> None:
        cap = float(os.environ.get("DLM_RAY_SCHEDULER_SLEEP_MS", "100"))
        if cap <= 0:
            return
        progress = _progress(executor)
        if progress is None:  # this Ray version hides the counters: a fixed pause
            self._ms = min(10.0, cap)
        elif progress != self._last:
            self._ms = self.MIN_MS
        else:
            self._ms = min(2 * self._ms, cap)
        self._last = progress
        time.sleep(self._ms / 1000)


def _progress(executor: Any) -> tuple[int, ...] | None:
    """Counters that move whenever the loop does work; None if this Ray version hides them."""
    try:
        out: list[int] = []
        for op, state in executor._topology.items():
            m = op.metrics
            out += [m.num_tasks_submitted, m.num_tasks_finished, m.num_outputs_taken, len(state.output_queue)]
        return tuple(out)
    except (AttributeError, TypeError):
        return None


def work_items(cfg: DataConfig, split: str, num_epochs: int, start_epoch: int = 0) -> list[dict[str, Any]]:
    """The (item, epoch) rows that drive one pass; file order reshuffled per epoch when asked."""
    items = resolve_items(cfg, split)
    out = []
    for epoch in range(start_epoch, num_epochs):
        order = list(range(len(items)))
        if cfg.shuffle != "none":
            np.random.default_rng([cfg.seed, epoch]).shuffle(order)
        out += [{"item": json.dumps(items[i]), "epoch": epoch} for i in order]
    return out


def packed_dataset(cfg: DataConfig, tokenizer_cfg: dict[str, Any] | str, split: str, *, num_epochs: int = 1,
                   start_epoch: int = 0, stats: Any = None, diffusion: DiffusionConfig | None = None) -> ray.data.Dataset:
    """Read → tokenize → pack: rows of ``input_ids``, ``attention_mask``, ``row_id``, ``epoch`` (and
    ``doc_ids``, each position's document number within its row, with ``data.document_ids``).

    With ``diffusion`` the rows are masked too (see ``mask_rows``)."""
    stats = stats if stats is not None else PipelineStats.remote()
    lo, hi = cfg.tokenizer_actors
    ds = ray.data.from_items(work_items(cfg, split, num_epochs, start_epoch))
    ds = ds.map_batches(
        TokenizePack, batch_size=1, compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
        fn_constructor_kwargs={"data_cfg": cfg.to_dict(), "tokenizer_cfg": tokenizer_cfg, "stats": stats,
                               "diffusion": None if diffusion is None else diffusion.to_dict()},
        num_cpus=0.5,
    )
    if cfg.shuffle == "rows":
        ds = ds.random_shuffle(seed=cfg.seed)
    if PaceScheduler not in ds.context.custom_execution_callback_classes:
        ds.context.custom_execution_callback_classes.append(PaceScheduler)
    return ds


def masked_dataset(cfg: DataConfig, tokenizer_cfg: dict[str, Any] | str, diffusion: DiffusionConfig, split: str, *,
                   num_epochs: int = 1, start_epoch: int = 0, stats: Any = None) -> ray.data.Dataset:
    """The training feed: packed rows plus ``noisy_ids``, ``loss_mask``, ``t`` and ``p_mask``."""
    return packed_dataset(cfg, tokenizer_cfg, split, num_epochs=num_epochs, start_epoch=start_epoch, stats=stats,
                          diffusion=diffusion)


# ------------------------------------------------------------------------------------- prepare once


def prepare(cfg: DataConfig, tokenizer_cfg: dict[str, Any] | str, output: str, *, overwrite: bool = False,
            rows_per_file: int = 100_000) -> dict[str, Any]:
    """Tokenize and pack both splits to Parquet under ``output/{train,val}`` plus ``manifest.json``.

    Training reads the result directly (``data.source=<output>``). An existing output with the same
    settings is kept (returns its manifest); one with other settings is refused unless ``overwrite``.
    """
    import shutil
    from pathlib import Path

    out = Path(output)
    manifest_path = out / "manifest.json"
    settings = {"data": cfg.to_dict(), "tokenizer": tokenizer_cfg}
    if manifest_path.exists() and not overwrite:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("settings") == settings:
            print(f"{out} is already prepared with these settings; skipping (pass --overwrite to redo)")
            return manifest
        raise FileExistsError(f"{out} holds data prepared with other settings; pass --overwrite to replace it")
    if out.exists() and overwrite:
        shutil.rmtree(out)
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not a prepared dataset; choose an empty directory")
    manifest: dict[str, Any] = {"settings": settings, "seq_len": cfg.seq_len, "splits": {}}
    for split in ("train", "val"):
        stats = PipelineStats.remote()
        ds = packed_dataset(cfg, tokenizer_cfg, split, stats=stats).drop_columns(["epoch"])
        ds.write_parquet(str(out / split), max_rows_per_file=rows_per_file)
        counts = ray.get(stats.get.remote())
        manifest["splits"][split] = counts
        print(f"[prepare] {split}: {summary_line(counts)}")
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return manifest


def summary_line(counts: dict[str, int]) -> str:
    skipped = {k.split(".", 1)[1]: v for k, v in counts.items() if k.startswith("skipped")}
    return (f"{counts.get('documents', 0)} documents, {counts.get('tokens', 0)} tokens in "
            f"{counts.get('rows', 0)} rows from {counts.get('files', 0)} items; skipped {skipped or 'none'}")
