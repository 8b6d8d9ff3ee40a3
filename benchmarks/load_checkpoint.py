"""Loading a ~1B-parameter checkpoint in LLaDA's layout: time and peak host memory against the size
of its weights, next to the plain way (build the model in fp32, read every tensor, load_state_dict).

    python benchmarks/load_checkpoint.py [--preset 1b] [--shard-gb 1] [--dir /tmp/llada-1b]

Writes a synthetic checkpoint (random bf16 weights of the preset's shape, LLaDA's names, shards
with an index) unless ``--dir`` already holds one, then loads it in a fresh process per method and
reports wall time and peak resident memory (``ru_maxrss``) above the process's memory right
before loading. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from dlm_ray.config.schema import DiffusionConfig, ModelConfig
from dlm_ray.io.llada_layout import CONFIG_FILE, llada_config, save_weights, to_llada_name
from dlm_ray.core.model import Denoiser


def write_checkpoint(directory: Path, preset: str, shard_bytes: int) -> int:
    """A checkpoint of random bf16 weights, generated one tensor at a time; returns its weight bytes."""
    cfg = ModelConfig(preset=preset)
    with torch.device("meta"):
        shapes = [(n, p.shape) for n, p in Denoiser(cfg).named_parameters()]
    gen = torch.Generator().manual_seed(0)
    tensors = ((to_llada_name(n), torch.randn(*s, generator=gen, dtype=torch.bfloat16) * 0.02) for n, s in shapes)
    directory.mkdir(parents=True, exist_ok=True)
    save_weights(tensors, directory, dtype=torch.bfloat16, shard_bytes=shard_bytes)
    ours = {"model": cfg.to_dict(), "diffusion": DiffusionConfig().to_dict(), "tokenizer": {"kind": "byte"},
            "source": {"synthetic": preset}}
    config = llada_config(cfg, mask_id=258, eos_id=257, pad_id=256, dtype=torch.bfloat16, ours=ours)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return sum(s.numel() for _, s in shapes) * 2


def rss_mb() -> float:
    """This process's resident memory now (MB), from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load_once(directory: str, method: str) -> dict[str, float]:
    """In this (fresh) process: load with ``method``; seconds, memory before, peak during (MB)."""
    from dlm_ray.io.checkpoint import load_inference, read_inference_config

    before = rss_mb()
    t = time.perf_counter()
    if method == "ours":
        model, _, _ = load_inference(directory, dtype=torch.bfloat16)
    else:  # the plain way: an fp32 model, every tensor read, then copied in and cast
        from safetensors.torch import load_file

        from dlm_ray.io.llada_layout import from_llada_name, weight_files

        meta, _ = read_inference_config(directory)
        model = Denoiser(ModelConfig.model_validate(meta["model"]))
        state = {}
        for f in weight_files(Path(directory)):
            state.update({from_llada_name(k): v for k, v in load_file(str(f)).items()})
        model.load_state_dict(state)
        del state
        model = model.to(torch.bfloat16)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "before_mb": before, "peak_mb": peak,
            "params": sum(p.numel() for p in model.parameters())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="1b")
    ap.add_argument("--shard-gb", type=float, default=1.0)
    ap.add_argument("--dir", default="/tmp/dlm-llada-1b")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(load_once(*args.child)))
        return
    directory = Path(args.dir)
    if not (directory / CONFIG_FILE).is_file():
        t = time.perf_counter()
        write_checkpoint(directory, args.preset, int(args.shard_gb * 2**30))
        print(f"wrote {directory} in {time.perf_counter() - t:.1f} s")
    weight_mb = sum(f.stat().st_size for f in directory.glob("*.safetensors")) / 2**20
    print(f"\n{args.preset}: {weight_mb:,.0f} MB of bf16 weights in {len(list(directory.glob('*.safetensors')))} "
          f"files; loaded into bf16 on CPU, each method in a fresh process\n")
    print("| method | seconds | RSS before (MB) | peak RSS (MB) | peak above before / weights | peak / weights |")
    print("| --- | --- | --- | --- | --- | --- |")
    for method in ("ours", "plain"):
        out = subprocess.run([sys.executable, __file__, "--child", str(directory), method],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {method} | {r['seconds']:.1f} | {r['before_mb']:,.0f} | {r['peak_mb']:,.0f} | "
              f"{(r['peak_mb'] - r['before_mb']) / weight_mb:.2f} | {r['peak_mb'] / weight_mb:.2f} |")


if __name__ == "__main__":
    main()
