"""Batch generation on local Ray: exactly once, schema, reproducibility, kill/rerun, actor loss, bad rows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch

from dlm_ray.io.checkpoint import save_inference
from dlm_ray.config.schema import CorpusConfig, SampleConfig
from dlm_ray.config.inference import GenerateConfig
from dlm_ray.config.io import ConfigError, load_config
from dlm_ray.serving.batch import CHECKPOINT_DIR, OUTPUT_SCHEMA, check_output, run
from dlm_ray.core.model import Denoiser
from dlm_ray.data.prompts import PromptSource, row_seed

ROOT = Path(__file__).resolve().parents[1]
NUM_GOOD = 200
# (record, expected error fragment): every bad row must come out as an error row.
BAD_ROWS = [
    ({"prompt": None}, "prompt is missing"),
    ({"prompt": "   "}, "prompt is empty"),
    ({"prompt": 7}, "prompt is int"),
    ({"prompt": "x" * 200}, "over the model's context of 128"),
    ({"prompt": "ok", "steps": 5, "block_length": 8}, "not divisible"),
    ({"prompt": "ok", "temperature": -1}, "temperature"),
    # Serve answers 400 to it, with the same message (tests/test_serve.py).
    ({"prompt": "ok", "temperature": 5}, "temperature: Input should be less than or equal to 2"),
    ({"prompt": "ok", "seed": "abc"}, "seed: Input should be a valid integer"),
    ({"prompt": "ok", "seed": 2**64}, "seed: Input should be less than"),
    ({"prompt": "ok", "no_such_setting": 1}, None),  # unknown columns are ignored, not errors
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_cfg) -> str:
    torch.manual_seed(0)
    return str(save_inference(Denoiser(tiny_cfg).eval(), {"kind": "byte"}, tmp_path_factory.mktemp("ckpt")))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    """Two JSONL files in nested directories (ids come from relative paths), one bad JSON line."""
    root = tmp_path_factory.mktemp("prompts")
    (root / "a").mkdir()
    (root / "b").mkdir()
    good = [{"prompt": f"q{i % 17}:" + "0123456789"[: i % 9 + 1]} for i in range(NUM_GOOD)]
    for rec in good[::10]:
        rec["gen_length"], rec["steps"], rec["block_length"] = 8, 8, 8  # a second settings group
    lines_a = [json.dumps(r) for r in good[:120]]
    lines_b = [json.dumps(r) for r in good[120:]] + [json.dumps(r) for r, _ in BAD_ROWS] + ["{not json"]
    (root / "a" / "part.jsonl").write_text("\n".join(lines_a) + "\n")
    (root / "b" / "part.jsonl").write_text("\n".join(lines_b) + "\n")
    return root


def make_cfg(checkpoint: str, prompts: Path, output: Path, **kw) -> GenerateConfig:
    base = dict(checkpoint=checkpoint, input=str(prompts), output=str(output), batch_size=16,
                group_batches=2, actors=(2, 2), progress_bars=False, min_rows_per_file=16,
                sample=SampleConfig(gen_length=16, steps=8, block_length=16, temperature=1.0))
    return GenerateConfig(**{**base, **kw})


def read_output(output: Path) -> pa.Table:
    return pads.dataset(str(output), format="parquet").to_table()


def expected_ids() -> set[str]:
    return ({f"a/part.jsonl:{i}" for i in range(120)}
            | {f"b/part.jsonl:{i}" for i in range(NUM_GOOD - 120 + len(BAD_ROWS) + 1)})


def test_every_id_once_schema_errors_and_reproducible(ray_cluster, checkpoint, prompts, tmp_path):
    cfg = make_cfg(checkpoint, prompts, tmp_path / "out")
    summary = run(cfg)
    table = read_output(tmp_path / "out")
    assert table.schema.remove_metadata() == OUTPUT_SCHEMA
    ids = table["id"].to_pylist()
    assert len(ids) == len(set(ids)) and set(ids) == expected_ids()
    assert summary["rows"] == len(ids) and summary["duplicate_ids"] == 0
    rows = {r["id"]: r for r in table.to_pylist()}
    bad_start = NUM_GOOD - 120
    for k, (_, fragment) in enumerate(BAD_ROWS):
        row = rows[f"b/part.jsonl:{bad_start + k}"]
        if fragment is None:
            assert row["error"] is None and row["completion"] is not None
        else:
            assert fragment in row["error"] and row["completion"] is None and row["completion_ids"] is None
    assert "bad JSON" in rows[f"b/part.jsonl:{bad_start + len(BAD_ROWS)}"]["error"]
    good = [r for r in rows.values() if r["error"] is None]
    assert summary["rows_errored"] == len(rows) - len(good) == 10
    for r in good:
        settings = json.loads(r["sample"])
        assert r["num_generated_tokens"] == settings["gen_length"] and r["num_model_calls"] == settings["steps"]
        assert len(r["completion_ids"]) <= settings["gen_length"] and 258 not in r["completion_ids"]
        assert r["seed"] == row_seed(cfg.seed, r["id"])
    assert {json.loads(r["sample"])["gen_length"] for r in good} == {8, 16}
    assert len({r["checkpoint"] for r in rows.values()}) == 1

    # Same seeds, other actors and batch size: the same completions, row by row.
    again = run(make_cfg(checkpoint, prompts, tmp_path / "again", actors=(1, 1), batch_size=8))
    rows2 = {r["id"]: r for r in read_output(tmp_path / "again").to_pylist()}
    assert again["rows"] == len(rows2) == len(rows)
    assert all(rows2[i]["completion_ids"] == rows[i]["completion_ids"] for i in rows)

    # A finished output is complete: a rerun generates nothing and duplicates nothing.
    rerun = run(cfg)
    assert rerun["rows_this_run"] == 0 and rerun["rows"] == len(ids) and rerun["duplicate_ids"] == 0


def test_strict_fails_naming_the_row(ray_cluster, checkpoint, prompts, tmp_path):
    with pytest.raises(Exception, match=r"b/part.jsonl row 80 \(id 'b/part.jsonl:80'\): prompt is missing"):
        run(make_cfg(checkpoint, prompts, tmp_path / "out", strict=True))


def test_actor_death_is_retried_exactly_once(ray_cluster, checkpoint, prompts, tmp_path):
    marker = tmp_path / "died"
    summary = run(make_cfg(checkpoint, prompts, tmp_path / "out", fail_once_marker=str(marker)))
    assert marker.exists()  # an actor really died mid-batch
    ids = read_output(tmp_path / "out")["id"].to_pylist()
    assert len(ids) == len(set(ids)) and set(ids) == expected_ids()
    assert summary["duplicate_ids"] == 0


def test_killed_job_rerun_gives_every_id_once(ray_cluster, checkpoint, tmp_path):
    # Enough slow work that the driver is killed part way: 16 files of 40 prompts, gen_length 64.
    src = tmp_path / "prompts"
    src.mkdir()
    for f in range(16):
        pq.write_table(pa.table({"key": [f"k{f}-{i}" for i in range(40)],
                                 "text": [f"prompt {f} {i}" for i in range(40)]}), src / f"p{f:02d}.parquet")
    out = tmp_path / "out"
    args = [f"--checkpoint={checkpoint}", f"--input={src}", f"--output={out}", "--prompt_column=text",
            "--id_column=key", "--batch_size=8", "--group_batches=1", "--actors=[1, 1]", "--min_rows_per_file=8",
            "--progress_bars=false", "--sample.gen_length=64", "--sample.steps=64", "--sample.block_length=64"]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "generate.py"), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        done = list((out / CHECKPOINT_DIR).glob("*.parquet")) if (out / CHECKPOINT_DIR).exists() else []
        if len(done) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the job finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    cfg = load_config(GenerateConfig, None, args)
    summary = run(cfg)
    ids = read_output(out)["id"].to_pylist()
    assert 0 < summary["rows_done_before"] < 640 and summary["rows_this_run"] == 640 - summary["rows_done_before"]
    assert len(ids) == len(set(ids)) == 640 and set(ids) == {f"k{f}-{i}" for f in range(16) for i in range(40)}


def test_twenty_thousand_prompts_killed_half_way_and_resumed(ray_cluster, checkpoint, tmp_path):
    """The million-prompt benchmark's check at 20,000 (benchmarks/batch_scale.py): the driver killed
    once about half way, the same command run again, and every built-in prompt in the output once."""
    import pyarrow.compute as pc

    n, out = 20_000, tmp_path / "out"
    args = [f"--checkpoint={checkpoint}", f"--input=builtin:{n}", f"--output={out}", "--batch_size=64",
            "--actors=[1, 1]", "--progress_bars=false", "--sample.gen_length=4", "--sample.steps=1",
            "--sample.block_length=4"]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "generate.py"), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, committed = time.time() + 300, 0
    while time.time() < deadline and proc.poll() is None and committed < n // 2:
        files = [f for f in (out / CHECKPOINT_DIR).glob("*.parquet") if not f.name.endswith(".pending.parquet")] \
            if (out / CHECKPOINT_DIR).exists() else []
        committed = sum(pq.read_metadata(f).num_rows for f in files)
        time.sleep(0.2)
    assert proc.poll() is None, "the job finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    summary = run(load_config(GenerateConfig, None, args))
    assert n // 2 <= summary["rows_done_before"] < n and summary["rows_this_run"] == n - summary["rows_done_before"]
    table = read_output(out).select(["id", "source"])
    ranks = pc.cast(pc.struct_field(pc.extract_regex(table["source"], r"builtin prompt (?P<k>\d+) "), "k"), "int64")
    assert table.num_rows == n and pc.count_distinct(table["id"]).as_py() == n  # none duplicated
    assert sorted(ranks.to_pylist()) == list(range(n))  # none lost
    assert summary["duplicate_ids"] == 0 and summary["data_files"] < n // 500  # files by blocks, not rows


def test_a_resumed_job_feeds_the_model_whole_blocks(ray_cluster, checkpoint, tmp_path):
    """A rerun over a grown input (what a resume is) leaves out the finished ids in the read tasks.
    No filter stage may hold resources of its own (Ray Data's holds a CPU, which on 2 cores left room
    for one generation actor), and the blocks must reach the model whole: an automatic split of the
    read once fed it one-row blocks and the resumed job ran 4-5x slower than a fresh one."""
    import re

    from dlm_ray.io.checkpoint import checkpoint_hash
    from dlm_ray.serving.batch import _job_identity, build_dataset, checkpointing

    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jsonl").write_text("".join(json.dumps({"prompt": f"s{i}="}) + "\n" for i in range(48)))
    cfg = make_cfg(checkpoint, src, tmp_path / "out", batch_size=8, group_batches=2, actors=(1, 1))
    run(cfg)
    (src / "b.jsonl").write_text("".join(json.dumps({"prompt": f"r{i}="}) + "\n" for i in range(48)))
    ckpt = checkpoint_hash(checkpoint)
    done = check_output(cfg, _job_identity(cfg, ckpt))
    assert len(done) == 48
    with checkpointing(cfg.output):  # what run() does, keeping the dataset to read its stats
        ds = build_dataset(cfg, ckpt, done)
        ds.write_parquet(cfg.output, max_rows_per_file=cfg.rows_per_file)
    stats = ds.stats()
    ids = read_output(tmp_path / "out")["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 96  # the new rows only, each once
    assert "CheckpointFilter" not in stats, stats[:2000]
    pools = re.findall(r"Operator \d+ ([^:]+): .*?\n", stats)
    assert [p for p in pools if "Completer" not in p and "Read" not in p and "prepare_batch" not in p
            and "Repartition" not in p and "Write" not in p] == [], pools
    rows = re.search(r"Read.*?Output num rows per block: (\d+) min, (\d+) max", stats, re.S)
    assert rows and int(rows.group(1)) == 0 and int(rows.group(2)) == 48, stats[:2000]  # a.jsonl: all left out
    rows = re.search(r"StreamingRepartition.*?Output num rows per block: (\d+) min, (\d+) max", stats, re.S)
    assert rows and int(rows.group(2)) == 16, stats[:2000]  # re-formed to one actor call's rows


def test_a_block_whose_checkpoint_stayed_pending_is_generated_again(ray_cluster, checkpoint, tmp_path):
    """A kill between a block's data file and its checkpoint commit: the rerun deletes that data file
    and generates its rows again; nothing is duplicated or lost."""
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jsonl").write_text("".join(json.dumps({"prompt": f"s{i}="}) + "\n" for i in range(48)))
    cfg = make_cfg(checkpoint, src, tmp_path / "out", batch_size=8, group_batches=2, actors=(1, 1))
    run(cfg)
    committed = sorted((tmp_path / "out" / CHECKPOINT_DIR).glob("*.parquet"))
    assert len(committed) >= 2
    lost = pq.read_table(committed[0]).column(0).to_pylist()
    committed[0].rename(committed[0].with_name(committed[0].stem + ".pending.parquet"))
    before = read_output(tmp_path / "out")
    summary = run(cfg)
    after = read_output(tmp_path / "out")
    ids = after["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 48
    assert summary["rows_done_before"] == 48 - len(lost) and summary["rows_this_run"] == len(lost)
    assert before.num_rows == 48  # the stale rows were there, and were replaced, not added to
    assert not list((tmp_path / "out" / CHECKPOINT_DIR).glob("*.pending.parquet"))


def test_a_messages_column_is_rendered_with_the_models_chat_template(ray_cluster, tmp_path):
    from dlm_ray.io.checkpoint import load_inference
    from dlm_ray.core.inference import complete_ids
    from dlm_ray.core.text import encode_chat
    from tests.llada_dir import write_llada_dir

    ckpt = str(write_llada_dir(tmp_path / "llada"))
    convs = [[{"role": "user", "content": f"question {i}"}] for i in range(6)]
    rows = [{"messages": c} for c in convs] + [
        {"messages": [{"role": "wizard", "content": "x"}]}, {"messages": []},
        {"messages": convs[0], "prompt": "also a prompt"}, {"prompt": "plain"}]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = make_cfg(ckpt, tmp_path / "in", tmp_path / "out", actors=(1, 1))
    summary = run(cfg)
    out = {r["id"]: r for r in read_output(tmp_path / "out").to_pylist()}
    assert summary["rows"] == 10 and summary["rows_errored"] == 3
    assert "role is 'wizard'" in out["chat.jsonl:6"]["error"] and "non-empty" in out["chat.jsonl:7"]["error"]
    assert "both a prompt and messages" in out["chat.jsonl:8"]["error"]
    assert out["chat.jsonl:9"]["error"] is None and out["chat.jsonl:9"]["messages"] is None
    model, tok, _ = load_inference(ckpt)
    for i in (0, 5):
        row = out[f"chat.jsonl:{i}"]
        assert json.loads(row["messages"]) == convs[i] and row["prompt"] is None
        local = complete_ids(model, tok, [encode_chat(tok, convs[i])], cfg.sample, [row["seed"]])[0]
        assert row["completion"] == local.text and row["completion_ids"] == local.ids


def test_a_suffix_column_fills_the_gap_and_a_model_that_cannot_infill_says_so(ray_cluster, checkpoint, tmp_path,
                                                                             tiny_cfg):
    from dlm_ray.io.checkpoint import load_inference
    from dlm_ray.core.inference import complete_ids
    from dlm_ray.core.text import encode_prompt
    from dlm_ray.data.prompts import READ_SCHEMA, _row, prepare_batch

    rows = [{"prompt": f"s{i}3=", "suffix": f"{i}\n", "tail": "9"} for i in range(4)] + [
        {"prompt": "s9=", "suffix": 7}, {"prompt": "s1="}]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "gaps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = make_cfg(checkpoint, tmp_path / "in", tmp_path / "out", actors=(1, 1))
    summary = run(cfg)
    out = {r["id"]: r for r in read_output(tmp_path / "out").to_pylist()}
    assert summary["rows"] == 6 and summary["rows_errored"] == 1
    assert "suffix is int, not text" in out["gaps.jsonl:4"]["error"]
    model, tok, _ = load_inference(checkpoint)
    for i in (0, 3, 5):
        row = out[f"gaps.jsonl:{i}"]
        suffix = rows[i].get("suffix")
        assert row["suffix"] == suffix and row["error"] is None
        local = complete_ids(model, tok, [encode_prompt(tok, rows[i]["prompt"])], cfg.sample, [row["seed"]],
                             suffixes=[tok.encode(suffix) if suffix else []])[0]
        assert row["completion"] == local.text and row["completion_ids"] == local.ids
    # Another suffix column gives other rows: a rerun with it may not resume into this output.
    before = read_output(tmp_path / "out")
    with pytest.raises(ValueError, match=r"other settings \(suffix_column differ"):
        run(cfg.model_copy(update={"suffix_column": "tail"}))
    assert read_output(tmp_path / "out").equals(before)
    # An autoregressive model cannot see the suffix: such a row is an error row, named.
    table = pa.Table.from_pylist([_row("x", "x row 0", "s1=", {}, None, None, "9")], schema=READ_SCHEMA)
    ar = tiny_cfg.model_copy(update={"attention": "causal"}).to_dict()
    prepared = prepare_batch(table, cfg=cfg, tokenizer=tok, max_seq_len=128, model_cfg=ar).to_pylist()[0]
    assert "infilling needs a full-attention model" in prepared["error"]


def test_an_autoregressive_checkpoint_runs_in_the_same_job(ray_cluster, tmp_path, tiny_cfg):
    from dlm_ray.io.checkpoint import load_inference
    from dlm_ray.core.inference import complete_ids
    from dlm_ray.core.kinds import kind_of
    from dlm_ray.core.text import encode_prompt

    torch.manual_seed(0)
    ar = save_inference(Denoiser(tiny_cfg.model_copy(update={"attention": "causal"})).eval(), {"kind": "byte"},
                        tmp_path / "ar")
    cfg = make_cfg(str(ar), Path("unused"), tmp_path / "out", input="builtin:40", actors=(1, 1),
                   sample=SampleConfig(gen_length=16, steps=8, block_length=8, temperature=1.0, stop_at_eos=True))
    summary = run(cfg)
    out = read_output(tmp_path / "out").to_pylist()
    assert summary["rows"] == 40 and summary["rows_errored"] == 0
    model, tok, _ = load_inference(str(ar))
    ran = kind_of(model.config).resolve(cfg.sample)
    for row in out[:5]:
        # The recorded settings are the ones it ran with: one token per step, one block.
        assert SampleConfig.model_validate_json(row["sample"]) == ran and ran.steps == ran.gen_length == 16
        local = complete_ids(model, tok, [encode_prompt(tok, row["prompt"])], ran, [row["seed"]])[0]
        assert row["completion"] == local.text and row["num_model_calls"] <= 16


def test_an_embedding_diffusion_checkpoint_runs_in_the_same_job(ray_cluster, tmp_path, tiny_cfg):
    from dlm_ray.io.checkpoint import load_inference
    from dlm_ray.core.inference import complete_ids
    from dlm_ray.core.kinds import EmbeddingDiffusion, kind_of
    from dlm_ray.core.text import encode_prompt

    torch.manual_seed(0)
    emb = save_inference(Denoiser(tiny_cfg.model_copy(update={"noise": "gaussian"})).eval(), {"kind": "byte"},
                         tmp_path / "emb")
    cfg = make_cfg(str(emb), Path("unused"), tmp_path / "out", input="builtin:30", actors=(1, 1),
                   sample=SampleConfig(gen_length=16, steps=4, block_length=8, stop_at_eos=True))
    summary = run(cfg)
    out = read_output(tmp_path / "out").to_pylist()
    assert summary["rows"] == 30 and summary["rows_errored"] == 0
    model, tok, _ = load_inference(str(emb))
    assert isinstance(kind_of(model.config), EmbeddingDiffusion)
    ran = kind_of(model.config).resolve(cfg.sample)
    for row in out[:5]:
        # The recorded settings are the ones it ran with: the whole answer as one block, 4 calls.
        assert SampleConfig.model_validate_json(row["sample"]) == ran and ran.block_length == 16
        local = complete_ids(model, tok, [encode_prompt(tok, row["prompt"])], ran, [row["seed"]])[0]
        assert row["completion"] == local.text and row["num_model_calls"] == 4


def test_resume_with_other_settings_or_foreign_output_is_refused(checkpoint, prompts, tmp_path):
    cfg = make_cfg(checkpoint, prompts, tmp_path / "out")
    check_output(cfg, {"checkpoint": "aaa", "seed": 0})
    with pytest.raises(ValueError, match="other settings \\(checkpoint differ"):
        check_output(cfg, {"checkpoint": "bbb", "seed": 0})
    # Every setting that changes a row's output is part of the job's identity; speed settings are not.
    from dlm_ray.serving.batch import _job_identity

    first = make_cfg(checkpoint, prompts, tmp_path / "job")
    assert len(check_output(first, _job_identity(first, "aaa"))) == 0
    for change in ({"suffix_column": "tail"}, {"format": "jsonl"}, {"messages_column": "chat"},
                   {"dtype": "bfloat16"}, {"gpus_per_actor": 1.0}, {"prepend_eos": False}):
        other = first.model_copy(update=change)
        with pytest.raises(ValueError, match="other settings"):
            check_output(other, _job_identity(other, "aaa"))
    faster = first.model_copy(update={"batch_size": 4, "group_batches": 1, "actors": (1, 1), "torch_threads": 1,
                                      "rows_per_file": 10, "strict": True})
    assert len(check_output(faster, _job_identity(faster, "aaa"))) == 0
    # An output of more than one shard of built-in prompts, made before shards had windows of their own.
    old = make_cfg(checkpoint, prompts, tmp_path / "old_builtin", input="builtin:2000")
    identity = _job_identity(old, "aaa")
    (tmp_path / "old_builtin").mkdir()
    (tmp_path / "old_builtin" / "_job.json").write_text(json.dumps({k: v for k, v in identity.items()
                                                                     if k != "builtin_prompts"}))
    with pytest.raises(ValueError, match="numbered as they were before"):
        check_output(old, identity)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "data.parquet").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a generation output"):
        check_output(make_cfg(checkpoint, prompts, tmp_path / "foreign"), {"checkpoint": "aaa"})
    with pytest.raises(ConfigError, match="actors"):
        load_config(GenerateConfig, None, ["--actors=[2, 1]"])


def test_prompt_source_ids_and_builtin(prompts, checkpoint, tmp_path):
    cfg = make_cfg(checkpoint, prompts, tmp_path / "out")
    src = PromptSource(cfg)
    assert [name for _, name, _ in src.files] == ["a/part.jsonl", "b/part.jsonl"]
    tables = [t for task in src.get_read_tasks(1) for t in task()]
    assert sum(t.num_rows for t in tables) == len(expected_ids())
    builtin = PromptSource(cfg.model_copy(update={"input": "builtin:700"}))
    rows = [r for task in builtin.get_read_tasks(1) for t in task() for r in t.to_pylist()]
    assert len(rows) == len({r["id"] for r in rows}) == 700 and all(r["error"] is None for r in rows)
    with pytest.raises(ValueError, match="builtin:<number"):
        PromptSource(cfg.model_copy(update={"input": "builtin:many"}))
    with pytest.raises(FileNotFoundError):
        PromptSource(cfg.model_copy(update={"input": str(tmp_path / "missing")}))


def test_builtin_shards_are_read_on_their_own_and_finished_ones_not_at_all(ray_cluster, checkpoint, prompts, tmp_path):
    from dlm_ray.data.corpus import HELDOUT_SEED, take_examples
    from dlm_ray.data.prompts import BUILTIN_SHARD, BUILTIN_WINDOW, done_lookup

    cfg = make_cfg(checkpoint, prompts, tmp_path / "out", input="builtin:1200")
    rows = [r for task in PromptSource(cfg).get_read_tasks(1) for t in task() for r in t.to_pylist()]
    ranks = [int(r["where"].split()[2]) for r in rows]
    assert sorted(ranks) == list(range(1200)) and len({r["id"] for r in rows}) == 1200
    # The first shard is the held-out set evaluation scores; a later one starts at its own window.
    first = [r["prompt"] for r in rows if int(r["where"].split()[2]) < BUILTIN_SHARD]
    assert first == [e.prompt for e in take_examples(CorpusConfig().families, BUILTIN_SHARD, seed=HELDOUT_SEED,
                                                     split="heldout")]
    draws = [int(r["id"].split(":")[1]) for r in rows]
    assert all(d // BUILTIN_WINDOW == rank // BUILTIN_SHARD for d, rank in zip(draws, ranks))
    # Finished shards are not read; a partly finished one is read and filtered.
    done = [r["id"] for r in rows if int(r["where"].split()[2]) < BUILTIN_SHARD + 10]
    resumed = PromptSource(cfg, done_lookup(pa.array(done)))
    assert resumed.num_read_tasks() == 2
    left = [r["id"] for task in resumed.get_read_tasks(1) for t in task() for r in t.to_pylist()]
    assert sorted(left) == sorted(set(r["id"] for r in rows) - set(done))
    everything = PromptSource(cfg, done_lookup(pa.array([r["id"] for r in rows])))
    assert everything.num_read_tasks() == 1
    assert [r for task in everything.get_read_tasks(1) for t in task() for r in t.to_pylist()] == []


@pytest.mark.parametrize("override,fragment", [
    ({"seed": True}, "seed"), ({"steps": True}, "steps"), ({"steps": "8"}, "steps"),
    ({"temperature": float("inf")}, "temperature"), ({"cfg_scale": 1e308}, "cfg_scale"),
    ({"threshold": float("inf")}, "threshold"), ({"steps": 10**7}, "steps"), ({"stop_at_eos": 1}, "stop_at_eos"),
    ({"temperature": 5}, "temperature: Input should be less than or equal to 2"),
    ({"refresh_every": 2}, "refresh_every=2 needs cache 'prefix' or 'dual'"), ({"cache": "blocks"}, "cache"),
])
def test_row_overrides_are_strict_finite_and_bounded(override, fragment):
    from dlm_ray.data.prompts import resolve_row

    defaults = SampleConfig(gen_length=24, steps=24, block_length=24)
    with pytest.raises(ValueError, match=fragment):
        resolve_row(json.dumps(override), defaults)
    ok, seed = resolve_row(json.dumps({"temperature": 1, "seed": 7}), defaults)  # an int for a float is fine
    assert ok.temperature == 1.0 and seed == 7
