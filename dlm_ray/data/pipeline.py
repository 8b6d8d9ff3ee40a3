"""Ray Data corpus pipeline: read → tokenize → pack → mask, streamed to Ray Train workers.

    work items (files, or shards of the built-in corpus) × epochs, from a start position
      └─ map_batches(TokenizePack, ActorPoolStrategy): read an item, tokenize, pack into rows
         (``dlm_ray.data.packing``), then mask them (``dlm_ray.core.diffusion.mask_rows``) in the same actor,
         which saves a stage's copy of every row

One work item is one file (or one shard of the built-in corpus), read start to end by one actor
that holds the tokenizer, so packing never depends on scheduling: every row has a stable
``row_id`` and a ``row_index`` within its item, and its mask is a function of (seed, epoch, row)
alone. Each epoch repeats the items (reshuffled) with a fresh mask draw; ``shuffle: rows`` also
shuffles each item's rows in windows of ``shuffle_window``, numbered in their shuffled order.

A training run's place in this stream is a ``DataPosition`` (epoch, item in that epoch's order,
row in that item). Resuming builds the stream from there: earlier epochs and items are never
opened, a prepared Parquet file is read from the row group holding the row, and a raw file or
built-in shard is re-packed from its start (packing is sequential) with the rows before the
position left out. So resuming at step N costs at most one item's reading, whatever N is.

Bad input never disappears: unreadable files and bad rows (missing/null text, bad JSON, non-UTF-8,
empty, text that encodes to the mask or pad token) are skipped and counted by reason in a
``PipelineStats`` actor, or with ``strict`` raise an error that names the file and the row.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import ray

from dlm_ray.config.schema import DataConfig, DiffusionConfig
from dlm_ray.data.corpus import prompt_length
from dlm_ray.data.hashing import stable_id
from dlm_ray.data.packing import Packer, shuffle_in_windows
from dlm_ray.data.sources import BadInputError, iter_documents, resolve_items
from dlm_ray.io.storage import filesystem_for
from dlm_ray.core.tokenizer import load_tokenizer

ROW_COLUMNS = ("input_ids", "attention_mask", "row_id")  # plus "doc_ids" with document_ids=True
# Where a row sits in the stream: its epoch, its item's place in that epoch's order, its row in the item.
POSITION_COLUMNS = ("epoch", "item_index", "row_index")


@dataclass(frozen=True, order=True)
class DataPosition:
    """A place in the training stream: the first row not yet consumed. Ordered like the stream."""

    epoch: int = 0
    item: int = 0
    row: int = 0

    def to_list(self) -> list[int]:
        return [self.epoch, self.item, self.row]

    @classmethod
    def after_rows(cls, rows: dict[str, Any]) -> DataPosition:
        """The position just after the furthest of these rows (the last one, unless shuffled)."""
        e, i, r = (np.asarray(rows[c], dtype=np.int64) for c in POSITION_COLUMNS)
        k = np.lexsort((r, i, e))[-1]
        return cls(int(e[k]), int(i[k]), int(r[k]) + 1)


@ray.remote(num_cpus=0)
class PipelineStats:
    """Counts what the pipeline read, skipped (by reason) and wrote, across all its actors."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def add(self, counts: dict[str, int]) -> None:
        self.counts.update(counts)

    def get(self) -> dict[str, int]:
        return dict(self.counts)


# ------------------------------------------------------------------------------------- pack + mask


def _to_numpy(column: Any) -> np.ndarray:
    """A Parquet column of fixed-length rows (Ray's tensor extension, or plain lists) as a 2-D array."""
    arr = column.combine_chunks()
    if hasattr(arr, "to_numpy_ndarray"):  # Ray's ArrowTensorArray
        return arr.to_numpy_ndarray()
    out = arr.to_numpy(zero_copy_only=False)
    return np.stack(out) if out.dtype == object else out


class TokenizePack:
    """Actor UDF: one work item in, its packed (and masked) rows out, streamed. Loads the tokenizer once."""

    def __init__(self, data_cfg: dict[str, Any], tokenizer_cfg: dict[str, Any] | str, stats: Any,
                 diffusion: dict[str, Any] | None = None, strata: int = 1, block_size: int | None = None,
                 document_ids: bool = False, given: bool = False) -> None:
        self.cfg = DataConfig.model_validate(data_cfg)
        self.document_ids, self.given = document_ids, given
        self.tok = load_tokenizer(tokenizer_cfg)
        self.stats = stats
        self.diffusion = None if diffusion is None else DiffusionConfig.model_validate(diffusion)
        if self.diffusion is not None:
            # Imported only when masking: the actors of a pack-only pipeline (prepare) never load torch.
            from dlm_ray.core.diffusion import mask_rows

            self.mask_rows = mask_rows
        self.strata, self.block_size = strata, block_size
        self.forbidden = np.asarray(sorted({self.tok.mask_id, self.tok.pad_id}))

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for item_json, epoch, index, skip in zip(batch["item"], batch["epoch"], batch["index"], batch["skip_rows"]):
            item = json.loads(str(item_json))
            skipped = 0
            for rows in self._ordered(item, int(epoch), int(skip)):
                keep = rows["row_index"] >= skip
                if not keep.all():  # rows a resumed run already trained on
                    skipped += int((~keep).sum())
                    rows = {k: v[keep] for k, v in rows.items()}
                    if not len(rows["row_id"]):
                        continue
                n = len(rows["row_id"])
                rows["epoch"] = np.full(n, epoch, dtype=np.int32)
                rows["item_index"] = np.full(n, index, dtype=np.int32)
                if not self.document_ids:
                    rows.pop("doc_ids", None)  # a quarter of the bytes per row; training never reads it
                if self.diffusion is not None:
                    rows = self.mask_rows(rows, self.diffusion, seed=self.cfg.seed, mask_id=self.tok.mask_id,
                                          item_id=stable_id(item["key"]), strata=self.strata,
                                          prompt_len_R=rows.get("prompt_len"), block_size=self.block_size)
                if not self.given:
                    rows.pop("given", None)  # read by the masking, or by a loss that noises itself
                yield rows
            self.stats.add.remote({"resume.rows_passed_over": skipped})

    def _ordered(self, item: dict[str, Any], epoch: int, skip: int) -> Iterator[dict[str, np.ndarray]]:
        """The item's rows in stream order, from about row ``skip`` on. With ``shuffle: rows`` they are
        shuffled in windows (``shuffle_in_windows``) and packing restarts at the start of the window
        holding ``skip``, so a resumed stream is the uninterrupted one's tail."""
        window = self.cfg.shuffle_window if self.cfg.shuffle == "rows" else 0
        if not window:
            yield from self._item(item, epoch, skip)
            return
        start = skip - skip % window
        aligned = ({k: v[r["row_index"] >= start] for k, v in r.items()} for r in self._item(item, epoch, start))
        yield from shuffle_in_windows(aligned, window, key=("rows", self.cfg.seed, epoch, item["key"]))

    def _item(self, item: dict[str, Any], epoch: int, skip: int) -> Iterator[dict[str, np.ndarray]]:
        if self.cfg.task == "sft":
            yield from self._examples(item, epoch, skip)
            return
        if item["format"] == "prepared":
            yield from self._prepared(item, epoch, skip)
            return
        cfg, counts = self.cfg, Counter()
        # Conditional pretraining: a drawn fraction of the training documents keep their prompt.
        share = cfg.conditional_share
        conditional = share > 0 and item["split"] == "train" and item["format"] == "builtin"
        packer = Packer(cfg.seq_len, self.tok.eos_id, self.tok.pad_id, key=item["key"],
                        random_length_fraction=cfg.random_length_fraction, seed=cfg.seed, track_given=conditional)
        counts["files"] += 1
        texts: list[str] = []
        wheres: list[str] = []

        def flush() -> None:
            docs = self.tok.encode_batch(texts)
            good, given = [], []
            for where, text, doc in zip(wheres, texts, docs):
                # Content must never become the mask (or pad) token: a masked target equal to the mask
                # has infinite loss, and an unmasked one looks like a hole to fill.
                if np.isin(doc, self.forbidden).any():
                    if cfg.strict:
                        raise BadInputError(f"{item['where']}: {where}: encodes to the mask or pad token")
                    counts["skipped.special_token"] += 1
                else:
                    good.append(doc)
                    if conditional:
                        drawn = stable_id("given", cfg.seed, epoch, item["key"], where) / 2**63 < share
                        given.append(len(self.tok.encode(text[:prompt_length(text)])) if drawn else 0)
            texts.clear()
            wheres.clear()
            counts["documents"] += len(good)
            counts["tokens"] += sum(len(d) + 1 for d in good)
            packer.add(good, given if conditional else None)

        try:
            for where, text, reason in iter_documents(item, cfg):
                if reason is not None:
                    if cfg.strict:
                        raise BadInputError(f"{item['where']}: {where}: {reason.replace('_', ' ')}")
                    counts[f"skipped.{reason}"] += 1
                    continue
                texts.append(text)
                wheres.append(where)
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
        if epoch == 0 and not skip:  # count each document once: not again per epoch, nor on a resume
            self.stats.add.remote(dict(counts))

    def _examples(self, item: dict[str, Any], epoch: int, skip: int) -> Iterator[dict[str, np.ndarray]]:
        """Fine-tuning rows (``dlm_ray.data.sft``): one example each; a row's index is its example's."""
        from dlm_ray.data.sft import ExampleError, build_rows, encode_example, iter_records

        cfg, counts = self.cfg, Counter({"files": 1})
        batch: list[tuple[list[int], list[int]]] = []
        first = n = 0

        def flush() -> dict[str, np.ndarray]:
            nonlocal first
            rows = build_rows(batch, seq_len=cfg.seq_len, eos_id=self.tok.eos_id, key=item["key"], first_index=first)
            first += len(batch)
            batch.clear()
            counts["rows"] += len(rows["row_id"])
            return rows

        try:
            for where, record, reason in iter_records(item, cfg):
                try:
                    if reason is not None:
                        raise ExampleError(reason, reason.replace("_", " "))
                    prompt, response = encode_example(self.tok, record, cfg)
                    if len(prompt) + len(response) >= cfg.seq_len:  # room for at least one EOS
                        raise ExampleError("too_long", f"{len(prompt)} prompt + {len(response)} response tokens "
                                                       f"leave no room for EOS in seq_len {cfg.seq_len}")
                except ExampleError as exc:
                    if cfg.strict:
                        raise BadInputError(f"{item['where']}: {where}: {exc}") from None
                    counts[f"skipped.{exc.reason}"] += 1
                    continue
                n += 1
                if n <= skip:  # rows a resumed run already trained on: not even built
                    first += 1
                    continue
                batch.append((prompt, response))
                counts["documents"] += 1
                counts["tokens"] += len(prompt) + len(response)
                if len(batch) == cfg.docs_per_batch:
                    yield flush()
        except OSError as exc:
            if cfg.strict:
                raise BadInputError(f"{item['where']}: unreadable: {exc}") from exc
            counts["skipped_files.unreadable"] += 1
        if batch:
            yield flush()
        if epoch == 0 and not skip:
            self.stats.add.remote(dict(counts))

    def _prepared(self, item: dict[str, Any], epoch: int, skip: int) -> Iterator[dict[str, np.ndarray]]:
        """Rows tokenized and packed by ``jobs/prepare_data.py``, from the row group holding row ``skip``."""
        import pyarrow.parquet as pq

        filesystem, path = filesystem_for(item["path"])
        with filesystem.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
            starts = np.cumsum([0, *sizes])
            first = max(0, int(np.searchsorted(starts, skip, side="right")) - 1)
            groups = list(range(first, pf.num_row_groups))
            table = pf.read_row_groups(groups, columns=[c for c in (*ROW_COLUMNS, "doc_ids") if c in names])
        rows = {c: _to_numpy(table[c]) for c in table.column_names}
        rows["row_index"] = np.arange(starts[first], starts[first] + table.num_rows, dtype=np.int64)
        real = rows["attention_mask"].astype(bool)
        bad = (np.isin(rows["input_ids"], self.forbidden) & real).any(1)
        counts = {"resume.rows_read": table.num_rows}
        if bad.any():
            if self.cfg.strict:
                raise BadInputError(f"{item['where']}: row {int(rows['row_index'][bad][0])}: holds the mask or pad token")
            rows = {k: v[~bad] for k, v in rows.items()}
            counts["skipped.special_token_rows"] = int(bad.sum())
        if epoch == 0 and not skip:
            counts.update(rows=len(rows["row_id"]), tokens=int(rows["attention_mask"].sum()))
        self.stats.add.remote(counts)
        yield rows


# ----------------------------------------------------------------------------------------- dataset


def work_items(cfg: DataConfig, split: str, num_epochs: int, start: DataPosition = DataPosition()) -> list[dict[str, Any]]:
    """The (item, epoch, index, skip_rows) rows that drive the stream from ``start`` on; the item order
    is reshuffled per epoch when asked (a function of (seed, epoch), so a resume sees the same order).
    Items before ``start`` are left out without being opened."""
    items = resolve_items(cfg, split)
    out = []
    for epoch in range(start.epoch, num_epochs):
        order = list(range(len(items)))
        if cfg.shuffle != "none":
            np.random.default_rng([cfg.seed, epoch]).shuffle(order)
        for index, i in enumerate(order):
            if epoch == start.epoch and index < start.item:
                continue
            skip = start.row if (epoch, index) == (start.epoch, start.item) else 0
            out.append({"item": json.dumps(items[i]), "epoch": epoch, "index": index, "skip_rows": skip})
    return out


def packed_dataset(cfg: DataConfig, tokenizer_cfg: dict[str, Any] | str, split: str, *, num_epochs: int = 1,
                   start: DataPosition = DataPosition(), stats: Any = None, diffusion: DiffusionConfig | None = None,
                   strata: int = 1, block_size: int | None = None, document_ids: bool = False,
                   given: bool = False) -> ray.data.Dataset:
    """Read → tokenize → pack: rows of ``input_ids``, ``attention_mask``, ``row_id`` and the position
    columns ``epoch``, ``item_index``, ``row_index`` (and ``doc_ids``, each position's document number
    within its row, with ``document_ids``: for inspecting packing; training does not read it), from
    ``start`` on.

    With ``diffusion`` the rows are masked too (``mask_rows``, t stratified over ``strata`` rows). With
    ``given`` a conditional document's prompt positions are kept as the column ``given`` (1 where
    given), for a loss that draws its noise itself (embedding diffusion)."""
    stats = stats if stats is not None else PipelineStats.remote()
    lo, hi = cfg.tokenizer_actors
    ds = ray.data.from_items(work_items(cfg, split, num_epochs, start))
    ds = ds.map_batches(
        TokenizePack, batch_size=1, compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
        fn_constructor_kwargs={"data_cfg": cfg.to_dict(), "tokenizer_cfg": tokenizer_cfg, "stats": stats,
                               "diffusion": None if diffusion is None else diffusion.to_dict(), "strata": strata,
                               "block_size": block_size, "document_ids": document_ids, "given": given},
        num_cpus=0.5,
    )
    return ds


def masked_dataset(cfg: DataConfig, tokenizer_cfg: dict[str, Any] | str, diffusion: DiffusionConfig, split: str, *,
                   num_epochs: int = 1, start: DataPosition = DataPosition(), stats: Any = None,
                   strata: int = 1, block_size: int | None = None, document_ids: bool = False) -> ray.data.Dataset:
    """The training feed: packed rows plus ``noisy_ids``, ``loss_mask``, ``t`` and ``p_mask``. With
    ``time_sampling: low_discrepancy``, ``strata`` (the micro-batch size) consecutive rows of an item
    spread their t evenly. With ``block_size`` (block diffusion) each block has its own t."""
    return packed_dataset(cfg, tokenizer_cfg, split, num_epochs=num_epochs, start=start, stats=stats,
                          diffusion=diffusion, strata=strata, block_size=block_size, document_ids=document_ids)


# ------------------------------------------------------------------------------------- prepare once


def prepare(cfg: DataConfig, tokenizer_cfg: dict[str, Any] | str, output: str, *, overwrite: bool = False,
            rows_per_file: int = 100_000) -> dict[str, Any]:
    """Tokenize and pack both splits to Parquet under ``output/{train,val}`` plus ``manifest.json``
    (a local path or an ``s3://`` / ``gs://`` URI).

    Training reads the result directly (``data.source=<output>``). An existing output with the same
    settings is kept (returns its manifest); one with other settings is refused unless ``overwrite``.
    """
    from pyarrow import fs as pafs

    filesystem, root = filesystem_for(output)
    manifest_path = f"{root}/manifest.json"
    settings = {"data": cfg.to_dict(), "tokenizer": tokenizer_cfg}
    if filesystem.get_file_info(manifest_path).type == pafs.FileType.File and not overwrite:
        with filesystem.open_input_stream(manifest_path) as f:
            manifest = json.loads(f.read())
        if manifest.get("settings") == settings:
            print(f"{output} is already prepared with these settings; skipping (pass --overwrite to redo)")
            return manifest
        raise FileExistsError(f"{output} holds data prepared with other settings; pass --overwrite to replace it")
    existing = filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    if existing and overwrite:
        filesystem.delete_dir_contents(root)
    elif existing:
        raise FileExistsError(f"{output} exists and is not a prepared dataset; choose an empty directory")
    manifest: dict[str, Any] = {"settings": settings, "seq_len": cfg.seq_len, "splits": {}}
    for split in ("train", "val"):
        stats = PipelineStats.remote()
        ds = packed_dataset(cfg, tokenizer_cfg, split, stats=stats).drop_columns(list(POSITION_COLUMNS))
        ds.write_parquet(f"{output.rstrip('/')}/{split}", max_rows_per_file=rows_per_file)
        counts = ray.get(stats.get.remote())
        manifest["splits"][split] = {k: v for k, v in counts.items() if not k.startswith("resume.")}
        print(f"[prepare] {split}: {summary_line(counts)}")
    filesystem.create_dir(root, recursive=True)
    with filesystem.open_output_stream(manifest_path) as f:
        f.write(json.dumps(manifest, indent=2).encode())
    return manifest


def summary_line(counts: dict[str, int]) -> str:
    skipped = {k.split(".", 1)[1]: v for k, v in counts.items() if k.startswith("skipped")}
    return (f"{counts.get('documents', 0)} documents, {counts.get('tokens', 0)} tokens in "
            f"{counts.get('rows', 0)} rows from {counts.get('files', 0)} items; skipped {skipped or 'none'}")
