"""Corpus sources: which files (or built-in shards) make up a split, and the documents in each.

``resolve_items`` runs on the driver and touches only metadata (file listings); ``iter_documents``
runs inside a pipeline actor and streams one item's documents. Files are opened through pyarrow
filesystems, so local paths, globs, ``s3://`` and ``gs://`` URIs behave the same, and ``.gz`` files
are decompressed on the fly. No Ray here: the reading logic is tested without a cluster.

Every document comes out as ``(where, text, None)`` or, when it cannot be used,
``(where, None, reason)`` with reason one of ``missing_text``, ``not_text``, ``bad_json``,
``not_an_object`` (a JSON line that is an array, a number, ...), ``non_utf8``, ``empty``: the
caller counts or raises, nothing is dropped here unseen. A file that is not text at all (its first
block mostly binary: an archive or random bytes under a text name) is one unreadable file
(``OSError``), not thousands of bad rows.

``iter_jsonl_records`` and ``iter_table_records`` are the package's readers of JSONL and of
Parquet/Arrow rows: fine-tuning examples, batch-generation prompts and a run's metrics are read
through them too.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any, Iterator, NamedTuple

from dlm_ray.config.schema import DataConfig
from dlm_ray.data.corpus import example_at, is_heldout
from dlm_ray.data.hashing import hash64
from dlm_ray.io.storage import filesystem_for

Doc = tuple[str, "str | None", "str | None"]
SUFFIX_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".json": "jsonl",
                  ".ndjson": "jsonl", ".arrow": "arrow"}
CHUNK_BYTES = 1 << 20


class BadInputError(ValueError):
    """A bad file or row under ``strict``; the message names the file and row."""


# ------------------------------------------------------------------------------------ file listing


def list_files(source: str) -> list[tuple[str, str]]:
    """(uri to reopen, path within its filesystem) of every data file of a path, directory or glob."""
    from pyarrow import fs as pafs

    filesystem, path = filesystem_for(source)
    prefix = source[: source.index("://") + 3] if "://" in source else ""
    pattern = None
    if any(ch in path for ch in "*?["):
        parts = path.split("/")
        first = next(i for i, p in enumerate(parts) if any(ch in p for ch in "*?["))
        pattern, path = path, "/".join(parts[:first]) or "/"
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"data source not found: {source}")
    if info.type == pafs.FileType.File:
        found = [path]
    else:
        entries = filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
        found = sorted(e.path for e in entries if e.type == pafs.FileType.File
                       and not Path(e.path).name.startswith((".", "_")))
    if pattern is not None:
        found = [f for f in found if fnmatch.fnmatch(f, pattern)]
    if not found:
        raise FileNotFoundError(f"no data files under {source}")
    return [(prefix + f if prefix else f, f) for f in found]


def file_format(path: str, configured: str) -> str:
    if configured != "auto":
        return "arrow" if configured == "hf" else configured
    name = path[:-3] if path.endswith(".gz") else path
    return SUFFIX_FORMATS.get(Path(name).suffix.lower(), "text")


def _hf_files(spec: str, split: str) -> tuple[list[str], bool]:
    """Arrow files behind a Hugging Face dataset, saved to disk or in the local cache (offline),
    and whether the dataset brings its own held-out split (``validation`` or ``test``)."""
    import datasets

    ds = datasets.load_from_disk(spec) if Path(spec).exists() else datasets.load_dataset(spec)
    own_val = False
    if isinstance(ds, datasets.DatasetDict):
        held = [n for n in ("validation", "test") if n in ds]
        own_val = bool(held)
        ds = ds["train"] if split == "train" or not held else ds[held[0]]
    files = [f["filename"] for f in ds.cache_files]
    if not files:
        raise ValueError(f"Hugging Face dataset {spec!r} has no files on disk; save it with save_to_disk first")
    return files, own_val


def _is_prepared(source: str) -> bool:
    """A directory written by ``jobs/prepare_data.py`` (it holds ``manifest.json``), local or remote."""
    from pyarrow import fs as pafs

    if any(ch in source for ch in "*?["):
        return False
    filesystem, path = filesystem_for(source)
    return filesystem.get_file_info(f"{path.rstrip('/')}/manifest.json").type == pafs.FileType.File


def resolve_items(cfg: DataConfig, split: str) -> list[dict[str, Any]]:
    """The work items of a split. ``split`` is ``train`` or ``val``."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if cfg.source == "builtin":
        per = -(-cfg.builtin_docs // cfg.builtin_shards)
        return [{"format": "builtin", "key": f"builtin:{cfg.corpus.seed}:{split}:{k}", "where": f"builtin shard {k}",
                 "split": split, "start": k * per, "stop": min(cfg.builtin_docs, (k + 1) * per)}
                for k in range(cfg.builtin_shards) if k * per < cfg.builtin_docs]
    source, holdout = cfg.source, "hash"
    if split == "val" and cfg.val_source is not None:
        source, holdout = cfg.val_source, "none"
    elif cfg.val_source is not None:
        holdout = "none"
    if cfg.format == "prepared" or (cfg.format == "auto" and _is_prepared(source)):
        files = list_files(f"{source.rstrip('/')}/{split}")
        return [{"format": "prepared", "path": uri, "key": uri, "where": uri, "split": split} for uri, _ in files]
    if source.startswith("hf:") or cfg.format == "hf":
        spec = source[3:] if source.startswith("hf:") else source
        paths, own_val = _hf_files(spec, split)
        files = [(f, f) for f in paths]
        if own_val:  # the dataset's own splits, not a content-hash split, separate train and val
            holdout = "none"
        fmt = "arrow"
    else:
        files = list_files(source)
        fmt = None
    return [{"format": fmt or file_format(uri, cfg.format), "path": uri, "key": f"{uri}:{split}", "where": uri,
             "split": split, "holdout": holdout} for uri, _ in files]


# ---------------------------------------------------------------------------------------- reading


def in_val(text: str, fraction: float) -> bool:
    """Content-hash split: the same document always lands on the same side (the built-in corpus has
    its own rule on the same hash, ``corpus.is_heldout``)."""
    return hash64(text) / 2**64 < fraction


def _check_text(value: Any) -> tuple[str | None, str | None]:
    if value is None:
        return None, "missing_text"
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None, "non_utf8"
    if not isinstance(value, str):
        return None, "not_text"
    if not value.strip():
        return None, "empty"
    return value, None


def _looks_binary(block: bytes) -> bool:
    """NUL bytes, or (in a block long enough to judge) more than a tenth of the characters invalid
    UTF-8 or control characters: an archive or random bytes, not text with a few bad lines."""
    if b"\x00" in block:
        return True
    if len(block) < 512:
        return False
    text = block.decode("utf-8", errors="replace")
    bad = sum(1 for ch in text if ch == "\ufffd" or (ord(ch) < 32 and ch not in "\t\n\r\f\b"))
    return bad > 0.1 * max(1, len(text))


def iter_lines(uri: str) -> Iterator[bytes]:
    """The raw lines of a (possibly compressed) text file, streamed in chunks: no file is read whole.
    A NUL byte in the first chunk means the file is not text: ``OSError``, one unreadable file."""
    filesystem, path = filesystem_for(uri)
    with filesystem.open_input_stream(path, compression="detect") as f:
        rest = b""
        first = True
        while chunk := f.read(CHUNK_BYTES):
            if first and _looks_binary(chunk[:8192]):
                raise OSError("binary content, not a text file")
            first = False
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            yield from lines
        if rest:
            yield rest


def _raw_documents(item: dict[str, Any], cfg: DataConfig) -> Iterator[tuple[str, Any, str | None]]:
    """(where, raw value, reason) before validation; raw may be bytes, str or None, and a JSONL line
    that holds no record comes with its reason."""
    fmt, uri = item["format"], item.get("path", "")
    if fmt == "text" and cfg.text_unit == "line":
        for n, line in enumerate(iter_lines(uri), 1):
            yield f"line {n}", line.rstrip(b"\r"), None
    elif fmt == "text":
        filesystem, path = filesystem_for(uri)
        with filesystem.open_input_stream(path, compression="detect") as f:
            yield "file", f.read(), None
    elif fmt == "jsonl":
        fast = _arrow_jsonl(uri, cfg.text_column)
        if fast is not None:
            for n, value in enumerate(fast):
                yield f"record {n}", value, None
            return
        for r in iter_jsonl_records(uri):
            yield r.where, None if r.record is None else r.record.get(cfg.text_column), r.reason
    elif fmt in ("parquet", "arrow"):
        for where, record in iter_table_records(fmt, uri, [cfg.text_column], required=cfg.text_column):
            yield where, record[cfg.text_column], None
    else:
        raise ValueError(f"unknown format {fmt!r} for {uri}")


class JsonRecord(NamedTuple):
    """One non-blank line of a JSONL file: the object it holds, or why it holds none."""

    index: int  # among the file's records, from 0 (blank lines are not records)
    line: int  # in the file, from 1
    record: dict[str, Any] | None  # None when the line is no JSON object
    reason: str | None  # then: bad_json, not_an_object or non_utf8 (a counter's name)
    error: str | None  # and the same in words, for a message

    @property
    def where(self) -> str:
        return f"line {self.line}"


def iter_jsonl_records(uri: str) -> Iterator[JsonRecord]:
    """Every record of a (possibly compressed) JSONL file, streamed; a line that holds no JSON object
    comes with its reason, never dropped or raised here: the caller counts, reports or raises it."""
    index = 0
    for n, line in enumerate(iter_lines(uri), 1):
        if not line.strip():
            continue  # blank lines between records are not records
        record, reason, error = None, None, None
        try:
            value = json.loads(line.decode("utf-8-sig" if n == 1 else "utf-8"))  # some editors open a file with a BOM
        except UnicodeDecodeError as exc:
            reason, error = "non_utf8", f"bad JSON: not UTF-8 ({exc})"
        except json.JSONDecodeError as exc:
            reason, error = "bad_json", f"bad JSON: {exc}"
        else:
            if isinstance(value, dict):
                record = value
            else:
                reason, error = "not_an_object", f"record is {type(value).__name__}, not an object"
        yield JsonRecord(index, n, record, reason, error)
        index += 1


def iter_table_records(fmt: str, uri: str, columns: list[str], *, required: str | None = None
                       ) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record of the ``columns`` the file has) of each row of a Parquet or Arrow file; a file
    without the ``required`` column, or not readable as its format, is an ``OSError``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    filesystem, path = filesystem_for(uri)
    with filesystem.open_input_file(path) as f:
        try:
            reader = pq.ParquetFile(f) if fmt == "parquet" else pa.ipc.open_stream(f)
        except pa.ArrowInvalid as exc:
            raise OSError(str(exc)) from exc
        schema = reader.schema_arrow if fmt == "parquet" else reader.schema
        if required is not None and required not in schema.names:
            raise OSError(f"no column {required!r} (columns: {schema.names})")
        cols = [c for c in columns if c in schema.names]
        batches = reader.iter_batches(columns=cols) if fmt == "parquet" else reader
        n = 0
        for batch in batches:
            for record in batch.select(cols).to_pylist():
                yield f"row {n}", record
                n += 1


def _arrow_jsonl(uri: str, column: str) -> list[Any] | None:
    """The text column of a clean JSONL file via Arrow's C++ reader, or None if anything is off
    (bad JSON, non-UTF-8, mixed types): then the line-by-line reader finds and names the bad rows."""
    import pyarrow as pa
    import pyarrow.json as pajson

    filesystem, path = filesystem_for(uri)
    try:
        with filesystem.open_input_stream(path, compression="detect") as f:
            table = pajson.read_json(f)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    if column not in table.column_names:
        return [None] * table.num_rows
    return table[column].to_pylist()


def iter_documents(item: dict[str, Any], cfg: DataConfig) -> Iterator[Doc]:
    """The documents of one work item that belong to its split, validated."""
    if item["format"] == "builtin":
        c = cfg.corpus
        for index in range(item["start"], item["stop"]):
            ex = example_at(c.families, index, seed=c.seed)
            if is_heldout(ex.text) == (item["split"] == "val"):
                yield f"document {index}", ex.text, None
        return
    hashed = item.get("holdout") == "hash" and cfg.val_fraction > 0
    for where, raw, reason in _raw_documents(item, cfg):
        text, reason = (None, reason) if reason else _check_text(raw)
        if text is not None and hashed and in_val(text, cfg.val_fraction) != (item["split"] == "val"):
            continue  # belongs to the other split
        if text is None and hashed and item["split"] == "val":
            continue  # bad rows are counted once, by the train split
        yield where, text, reason
