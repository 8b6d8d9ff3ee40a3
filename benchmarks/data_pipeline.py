"""Tokens/s through read → tokenize → pack → mask on local Ray, next to a ``datasets`` baseline.

    python benchmarks/data_pipeline.py [--megabytes 32] [--files 8] [--tokenizer byte|bpe]

The corpus is English text from the Python standard library's own documentation (docstrings and
``pydoc_data``), written as JSONL shards, so nothing is downloaded. The baseline does the same
tokenize + pack with the same tokenizer through ``datasets.Dataset.map`` (2 processes). The tiny
model's training consumption rate (tokens/s of forward + backward in one process) is printed
for reference: the pipeline should never be the bottleneck. Asserts nothing.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pydoc_data.topics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def english_docs(megabytes: float) -> list[str]:
    """Standard-library docstrings and pydoc topics, repeated (numbered) up to the asked size."""
    docs = [t for t in pydoc_data.topics.topics.values() if t.strip()]
    skip = {"this", "antigravity", "idlelib", "tkinter", "turtle", "turtledemo", "__main__"}
    for name in sorted(sys.stdlib_module_names - skip):
        try:
            mod = importlib.import_module(name)
            docs += [d for a in dir(mod) if isinstance(d := getattr(getattr(mod, a, None), "__doc__", None), str)]
        except Exception:  # noqa: BLE001 - platform-specific modules do not import here
            continue
    docs = [d for d in dict.fromkeys(docs) if d.strip()]
    out, size, rep = [], 0, 0
    while size < megabytes * 1e6:
        for d in docs:
            out.append(f"{rep} {d}")
            size += len(d)
        rep += 1
    return out


def write_shards(docs: list[str], root: Path, num_files: int) -> list[str]:
    paths = []
    for k in range(num_files):
        p = root / f"shard{k:03d}.jsonl"
        p.write_text("\n".join(json.dumps({"text": d}) for d in docs[k::num_files]))
        paths.append(str(p))
    return paths


def tokenizer_spec(kind: str, docs: list[str], root: Path) -> str:
    if kind == "byte":
        return "byte"
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(docs[:2000], trainers.BpeTrainer(vocab_size=4096, special_tokens=["[UNK]"]))
    tok.save(str(root / "tokenizer.json"))
    return str(root / "tokenizer.json")


def run_pipeline(paths: list[str], spec: str, seq_len: int) -> tuple[int, float]:
    import ray

    from dlm_ray.config.schema import DataConfig, DiffusionConfig
    from dlm_ray.data.pipeline import PipelineStats, masked_dataset

    cfg = DataConfig(source=str(Path(paths[0]).parent / "*.jsonl"), seq_len=seq_len, val_fraction=0.0,
                     tokenizer_actors=(2, 2))
    stats = PipelineStats.remote()
    t0 = time.perf_counter()
    tokens = 0
    for batch in masked_dataset(cfg, spec, DiffusionConfig(), "train", stats=stats).iter_batches(batch_size=1024):
        tokens += int(batch["attention_mask"].sum())
    dt = time.perf_counter() - t0
    assert tokens == ray.get(stats.get.remote())["tokens"]
    return tokens, dt


def run_baseline(paths: list[str], spec: str, seq_len: int) -> tuple[int, float]:
    import datasets

    from dlm_ray.core.tokenizer import load_tokenizer

    tok = load_tokenizer(spec)

    def tokenize_pack(batch):
        flat = [t for text in batch["text"] for t in (*tok.encode(text), tok.eos_id)]
        n = -(-len(flat) // seq_len)
        flat += [tok.pad_id] * (n * seq_len - len(flat))
        return {"input_ids": [flat[i * seq_len:(i + 1) * seq_len] for i in range(n)]}

    datasets.disable_caching()
    t0 = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=paths, split="train")
    ds = ds.map(tokenize_pack, batched=True, batch_size=1024, remove_columns=ds.column_names, num_proc=2)
    tokens = int(sum(np.count_nonzero(np.asarray(r) != tok.pad_id) for r in ds["input_ids"]))
    return tokens, time.perf_counter() - t0


def training_rate(seq_len: int, batch: int = 64, steps: int = 10) -> float:
    import torch

    from dlm_ray.config.schema import ModelConfig
    from dlm_ray.core.model import Denoiser

    model = Denoiser(ModelConfig(preset="tiny"))
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randint(0, 256, (batch, seq_len))
    t0 = time.perf_counter()
    for _ in range(steps):
        model(x).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    return batch * seq_len * steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--megabytes", type=float, default=32)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--tokenizer", choices=["byte", "bpe"], default="byte")
    args = ap.parse_args()
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        docs = english_docs(args.megabytes)
        paths = write_shards(docs, root, args.files)
        spec = tokenizer_spec(args.tokenizer, docs, root)
        mb = sum(Path(p).stat().st_size for p in paths) / 1e6
        print(f"corpus: {len(docs)} documents, {mb:.1f} MB in {args.files} JSONL files; tokenizer {args.tokenizer}; "
              f"seq_len {args.seq_len}")
        base_tokens, base_s = run_baseline(paths, spec, args.seq_len)
        # The first pass pays for starting the actor pool and task workers (imports); the second
        # is the steady state a long job sees.
        cold_tokens, cold_s = run_pipeline(paths, spec, args.seq_len)
        pipe_tokens, pipe_s = run_pipeline(paths, spec, args.seq_len)
    train = training_rate(args.seq_len)
    print(f"{'path':<44} {'tokens':>10} {'seconds':>8} {'tokens/s':>10}")
    print(f"{'datasets.map tokenize+pack (2 procs)':<44} {base_tokens:>10} {base_s:>8.1f} {base_tokens / base_s:>10.0f}")
    print(f"{'ray data read+tokenize+pack+mask, cold':<44} {cold_tokens:>10} {cold_s:>8.1f} {cold_tokens / cold_s:>10.0f}")
    print(f"{'ray data read+tokenize+pack+mask, warm':<44} {pipe_tokens:>10} {pipe_s:>8.1f} {pipe_tokens / pipe_s:>10.0f}")
    print(f"pipeline / baseline: {pipe_tokens / pipe_s / (base_tokens / base_s):.2f}x; "
          f"tiny model trains at {train:.0f} tokens/s (one process): pipeline / training = "
          f"{pipe_tokens / pipe_s / train:.1f}x")
    ray.shutdown()


if __name__ == "__main__":
    main()
