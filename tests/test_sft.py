"""Supervised fine-tuning: rows, masking and loss by LLaDA's recipe, then a real run that learns and resumes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dlm_ray.io.checkpoint import export, load_inference, run_dir, save_inference
from dlm_ray.config.schema import DataConfig, DiffusionConfig, PretrainConfig
from dlm_ray.config.io import load_config
from dlm_ray.data.corpus import HELDOUT_SEED, take_examples
from dlm_ray.core.diffusion import diffusion_loss, mask_rows
from dlm_ray.core.likelihood import estimate_nelbo
from dlm_ray.train.metrics import read_metrics
from dlm_ray.core.model import Denoiser
from dlm_ray.data.sft import ExampleError, build_rows, encode_example
from dlm_ray.core.tokenizer import ByteTokenizer
from tests.llada_dir import EOS, EOT, write_llada_dir

MASK = 258


def rows_for(examples: list[tuple[str, str]], seq_len: int = 32) -> dict[str, np.ndarray]:
    tok, cfg = ByteTokenizer(), DataConfig(task="sft")
    encoded = [encode_example(tok, {"prompt": p, "response": r}, cfg) for p, r in examples]
    rows = build_rows(encoded, seq_len=seq_len, eos_id=tok.eos_id, key="k", first_index=0)
    return {**rows, "epoch": np.zeros(len(encoded), dtype=np.int32)}


def test_rows_keep_the_prompt_and_pad_the_answer_with_eos():
    rows = rows_for([("r123=", "321"), ("s9181=", "1189")])
    tok = ByteTokenizer()
    assert rows["input_ids"][0, :6].tolist() == [tok.eos_id, *b"r123="] and rows["prompt_len"].tolist() == [6, 7]
    assert rows["input_ids"][0, 6:9].tolist() == list(b"321") and (rows["input_ids"][0, 9:] == tok.eos_id).all()
    assert rows["answer_len"].tolist() == [26, 25] and rows["attention_mask"].all()
    for seed in range(20):  # at every noise level: the prompt is never masked, EOS padding may be
        m = mask_rows(rows, DiffusionConfig(), seed=seed, mask_id=MASK, prompt_len_R=rows["prompt_len"])
        for r, p in enumerate(rows["prompt_len"]):
            assert not m["loss_mask"][r, :p].any() and (m["noisy_ids"][r, :p] == rows["input_ids"][r, :p]).all()
        assert m["loss_mask"][:, 10:].any() or seed < 3


def test_sft_loss_is_llada_s_answer_length_normalised_form():
    rows = rows_for([("r123=", "321"), ("s9181=", "1189"), ("q1..=", "12")])
    m = mask_rows(rows, DiffusionConfig(), seed=3, mask_id=MASK, prompt_len_R=rows["prompt_len"])
    logits = torch.randn(3, 32, 264, generator=torch.Generator().manual_seed(0))
    x0, masked, p = (torch.as_tensor(m[k]) for k in ("input_ids", "loss_mask", "p_mask"))
    ours = diffusion_loss(logits, x0.long(), masked, p, 3, mask_id=MASK,
                          row_weight_B=1.0 / torch.as_tensor(m["answer_len"]).float())
    # LLaDA's: sum over masked tokens of CE / p / answer_length, over the batch size.
    lg = logits.clone()
    lg[..., MASK] = float("-inf")
    ce = F.cross_entropy(lg[masked], x0.long()[masked], reduction="none")
    p_tok = p[:, None].expand(3, 32)[masked]
    ans = torch.as_tensor(m["answer_len"])[:, None].expand(3, 32)[masked].float()
    assert torch.allclose(ours, (ce / p_tok / ans).sum() / 3, rtol=1e-5)


def test_chat_examples_end_with_end_of_turn_and_bad_ones_are_named(tmp_path):
    from dlm_ray.core.text import encode_chat

    _, tok, _ = load_inference(write_llada_dir(tmp_path / "d"))
    cfg = DataConfig(task="sft")
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    prompt, response = encode_example(tok, {"messages": msgs}, cfg)
    assert prompt == encode_chat(tok, msgs[:1]) and response == [*tok.encode("hello"), EOT]
    rows = build_rows([(prompt, response)], seq_len=64, eos_id=tok.eos_id, key="k", first_index=0)
    assert (rows["input_ids"][0, len(prompt) + len(response):] == EOS).all()
    for record, reason in [({"messages": msgs[:1]}, "bad_messages"), ({"prompt": "x"}, "missing_response"),
                           ({"response": "y"}, "missing_prompt"),
                           ({"messages": [{"role": "robot", "content": "x"}, msgs[1]]}, "bad_prompt"),
                           ({"prompt": "x", "response": "<|mdm_mask|>"}, None)]:
        if reason is None:  # text that looks like the mask token is text
            assert MASK not in encode_example(tok, record, cfg)[1]
            continue
        with pytest.raises(ExampleError) as err:
            encode_example(tok, record, cfg)
        assert err.value.reason == reason


def answer_bits(model: torch.nn.Module, num: int = 64) -> float:
    """Held-out answer NELBO given the prompt (bits per answer token, EOS padding included)."""
    exs = take_examples(DataConfig().corpus.families, num, seed=HELDOUT_SEED, split="heldout")
    rows = rows_for([(e.prompt, e.answer) for e in exs], seq_len=48)
    ids = torch.as_tensor(rows["input_ids"]).long()
    answer = torch.arange(48)[None, :] >= torch.as_tensor(rows["prompt_len"])[:, None]
    nats = estimate_nelbo(model, ids, mask_id=MASK, num_samples=8, generator=torch.Generator().manual_seed(0),
                          maskable=answer)
    return float(nats.mean()) / np.log(2)


def test_fine_tuning_lowers_the_answer_loss_and_resumes(ray_cluster, tmp_path):
    torch.manual_seed(0)
    base = Denoiser(load_config(PretrainConfig, None, ["--model.d_model=64", "--model.n_layers=2",
                                                        "--model.d_mlp=128", "--model.max_seq_len=64"]).model)
    init = save_inference(base.eval(), {"kind": "byte"}, tmp_path / "init")
    args = [f"--storage_path={tmp_path / 'runs'}", "--run_name=sft", f"--init_from={init}", "--data.task=sft",
            "--data.seq_len=48", "--data.builtin_docs=3000", "--data.builtin_shards=2", "--train.batch_size=16",
            "--train.lr=3e-3", "--train.warmup_steps=2", "--train.log_every=5", "--train.eval_every=15",
            "--train.eval_batches=2", "--train.checkpoint_every=15", "--train.max_failures=0", "--eval.nelbo_samples=2"]
    from dlm_ray.train.fit import fit

    cfg = load_config(PretrainConfig, None, [*args, "--train.max_steps=15"])
    fit(cfg)
    result = fit(load_config(PretrainConfig, None, [*args, "--train.max_steps=30"]))  # resumes at 15
    steps = [h["step"] for h in read_metrics(run_dir(cfg)) if "loss" in h]
    assert steps == [5, 10, 15, 20, 25, 30]
    with result.checkpoint.as_directory() as ckpt:
        out = export(ckpt, tmp_path / "export")
    tuned, _, meta = load_inference(out)
    assert meta["source"]["step"] == 30
    before, after = answer_bits(base.eval()), answer_bits(tuned)
    assert after < 0.8 * before, (before, after)
    run_config = json.loads(next(Path(run_dir(cfg)).glob("checkpoint_*/run_config.json")).read_text())
    assert run_config["model"]["d_model"] == 64 and run_config["init_from"] == str(init)


def test_records_of_a_jsonl_file_each_give_a_row_or_a_reason(tmp_path):
    from dlm_ray.data.sft import iter_records

    lines = [json.dumps({"prompt": "a=", "response": "b"}), "{oops", json.dumps([1, 2]),
             json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}),
             json.dumps({"prompt": "c=", "response": "d", "other": 1})]
    (tmp_path / "ex.jsonl").write_text("\n".join(lines) + "\n")
    item = {"format": "jsonl", "path": str(tmp_path / "ex.jsonl"), "split": "train", "holdout": "none"}
    got = list(iter_records(item, DataConfig(task="sft")))
    assert [(w, r) for w, _, r in got] == [("line 1", None), ("line 2", "bad_json"), ("line 3", "not_an_object"),
                                           ("line 4", None), ("line 5", None)]
    assert got[4][1] == {"prompt": "c=", "response": "d"}  # only the columns fine-tuning reads
