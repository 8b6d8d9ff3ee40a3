"""Reading corpora without Ray: file listing, formats, validation and the content-hash split."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dlm_ray.config.schema import DataConfig
from dlm_ray.data.sources import iter_documents, list_files, resolve_items


def docs(cfg: DataConfig, split: str = "train"):
    return [d for item in resolve_items(cfg, split) for d in iter_documents(item, cfg)]


def test_formats_and_reasons(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(
        b'{"text": "alpha"}\n\n{"text": null}\n{"other": 1}\nnot json\n{"text": 5}\n{"text": "  "}\n'
        b'{"text": "beta"}\n["an", "array"]\n{"text": "caf\xe9"}\n')
    (tmp_path / "b.txt").write_bytes(b"one\r\ntwo\n\xff\xfe bad\n\nthree")
    pq.write_table(pa.table({"text": ["p1", None, "p2"]}), tmp_path / "c.parquet")
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "zipped"}) + "\n")
    got = docs(DataConfig(source=str(tmp_path), val_fraction=0))
    texts = [t for _, t, r in got if r is None]
    reasons = sorted(r for _, _, r in got if r is not None)
    assert texts == ["alpha", "beta", "one", "two", "three", "p1", "p2", "zipped"]
    assert reasons == ["bad_json", "empty", "empty", "missing_text", "missing_text", "missing_text",
                       "non_utf8", "non_utf8", "not_an_object", "not_text"]
    where = {(w, r) for w, _, r in got if r is not None}
    assert ("line 5", "bad_json") in where and ("line 3", "non_utf8") in where
    assert ("line 9", "not_an_object") in where and ("line 10", "non_utf8") in where


def test_random_bytes_under_a_text_name_are_one_unreadable_file(tmp_path):
    import random

    (tmp_path / "noise.jsonl").write_bytes(bytes(random.Random(0).getrandbits(8) for _ in range(20000)))
    item = resolve_items(DataConfig(source=str(tmp_path / "noise.jsonl"), val_fraction=0), "train")[0]
    with pytest.raises(OSError, match="not a text file"):
        list(iter_documents(item, DataConfig(source=str(tmp_path), val_fraction=0)))


def test_globs_and_one_doc_per_file(tmp_path):
    for i in range(3):
        (tmp_path / f"doc{i}.txt").write_text(f"line a {i}\nline b {i}\n")
    (tmp_path / "skip.md").write_text("not matched")
    assert len(list_files(str(tmp_path / "*.txt"))) == 3
    got = docs(DataConfig(source=str(tmp_path / "*.txt"), text_unit="file", val_fraction=0))
    assert [t for _, t, _ in got] == [f"line a {i}\nline b {i}\n" for i in range(3)]


def test_hash_split_is_disjoint_and_complete(tmp_path):
    lines = [f"document number {i}" for i in range(400)]
    (tmp_path / "x.txt").write_text("\n".join(lines))
    cfg = DataConfig(source=str(tmp_path / "x.txt"), val_fraction=0.25)
    train = {t for _, t, _ in docs(cfg, "train")}
    val = {t for _, t, _ in docs(cfg, "val")}
    assert train.isdisjoint(val) and train | val == set(lines) and 50 < len(val) < 150


def test_missing_source_and_column(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_items(DataConfig(source=str(tmp_path / "nope")), "train")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "c.parquet")
    cfg = DataConfig(source=str(tmp_path / "c.parquet"))
    with pytest.raises(OSError, match="no column 'text'"):
        docs(cfg)
    assert [t for _, t, _ in docs(cfg.model_copy(update={"text_column": "body", "val_fraction": 0.0}))] == ["x"]


def test_builtin_splits():
    cfg = DataConfig(builtin_docs=500, builtin_shards=3)
    train, val = docs(cfg, "train"), docs(cfg, "val")
    assert len(train) + len(val) == 500 and 20 < len(val) < 90
    assert {t for _, t, _ in train}.isdisjoint({t for _, t, _ in val})


def test_hf_dataset_dict_uses_its_own_validation_split(tmp_path):
    import datasets

    train, val = [f"train doc {i}" for i in range(50)], [f"val doc {i}" for i in range(7)]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": train}),
                          "validation": datasets.Dataset.from_dict({"text": val})}).save_to_disk(str(tmp_path / "hf"))
    cfg = DataConfig(source=f"hf:{tmp_path / 'hf'}", val_fraction=0.5)
    # No content-hash split on top: every train document trains, the validation split validates.
    assert [t for _, t, _ in docs(cfg, "train")] == train
    assert [t for _, t, _ in docs(cfg, "val")] == val


# A JSONL file with every kind of line: a BOM before the first record, a blank line, bad JSON, an
# array, a good record, and a line that is not UTF-8.
MIXED_JSONL = (b'\xef\xbb\xbf{"text": "a", "prompt": "p0", "response": "r0"}\n\n{oops\n[1, 2]\n'
               b'{"text": "b", "prompt": "p4", "response": "r4", "other": 1}\n{"text": "\xff"}\n')


def test_one_jsonl_reader_for_documents_examples_and_prompts(tmp_path):
    """Corpus documents, fine-tuning examples and batch prompts read a JSONL file alike: a record's
    number counts records (a blank line takes none: it is part of a prompt's id), its ``where``
    counts lines, and a line that holds no object is reported with its reason, never dropped."""
    from dlm_ray.config.inference import GenerateConfig
    from dlm_ray.data.prompts import _read_file
    from dlm_ray.data.sft import iter_records
    from dlm_ray.data.sources import iter_jsonl_records

    path = tmp_path / "mixed.jsonl"
    path.write_bytes(MIXED_JSONL)
    got = [(r.index, r.where, r.reason) for r in iter_jsonl_records(str(path))]
    assert got == [(0, "line 1", None), (1, "line 3", "bad_json"), (2, "line 4", "not_an_object"),
                   (3, "line 5", None), (4, "line 6", "non_utf8")]

    documents = docs(DataConfig(source=str(path), val_fraction=0))
    assert documents == [("line 1", "a", None), ("line 3", None, "bad_json"), ("line 4", None, "not_an_object"),
                         ("line 5", "b", None), ("line 6", None, "non_utf8")]

    item = {"format": "jsonl", "path": str(path), "split": "train", "holdout": "none"}
    examples = list(iter_records(item, DataConfig(task="sft")))
    assert [(w, r) for w, _, r in examples] == [(w, r) for w, _, r in documents]
    assert examples[3][1] == {"prompt": "p4", "response": "r4"}

    rows = [row for t in _read_file(str(path), "mixed.jsonl", "jsonl", GenerateConfig()) for row in t.to_pylist()]
    assert [r["id"] for r in rows] == [f"mixed.jsonl:{n}" for n in range(5)]
    assert [r["prompt"] for r in rows] == ["p0", None, None, "p4", None]
    assert rows[0]["error"] is None and rows[3]["error"] is None
    assert rows[1]["error"].startswith("bad JSON") and rows[4]["error"].startswith("bad JSON: not UTF-8")
    assert rows[2]["error"] == "record is list, not an object"


def test_a_runs_metrics_are_read_by_the_same_reader_and_a_bad_line_is_named(tmp_path):
    from dlm_ray.train.metrics import read_metrics

    assert read_metrics(str(tmp_path)) == []
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5}\n\n{"step": 2, "loss": 2.0}\n')
    assert read_metrics(str(tmp_path)) == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0}]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "lo\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl: line 2: bad JSON"):
        read_metrics(str(tmp_path))


def test_stored_hashes_keep_the_values_data_was_written_with():
    """The held-out splits, packed rows' ids and batch rows' seeds name stored data: each is still the
    blake2b formula it was, so no document changes side and a resumed job draws the same seeds."""
    import hashlib

    from dlm_ray.data.corpus import is_heldout
    from dlm_ray.data.hashing import stable_id
    from dlm_ray.data.prompts import row_seed
    from dlm_ray.data.sources import in_val

    def blake(text: str) -> int:
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")

    texts = [f"r{i:06d}=" for i in range(200)] + ["café", "document number 7", ""]
    assert {is_heldout(t) for t in texts} == {True, False}
    for t in texts:
        assert is_heldout(t) == (blake(t) % 10 == 0)
        assert in_val(t, 0.3) == (blake(t) / 2**64 < 0.3)
    assert stable_id("s3://b/x.jsonl:train", 5) == blake("s3://b/x.jsonl:train\x1f5") >> 1
    assert stable_id(0, 1, "k") == blake("0\x1f1\x1fk") >> 1
    assert row_seed(7, "a/part.jsonl:3") == blake("7:a/part.jsonl:3") >> 1
