"""Host memory of a training worker building its model from an export (``init_from``): peak resident
memory per worker over the size of the weights in bf16, before and after ``engine.build_model``.

    python benchmarks/init_from_memory.py                 # the 1b preset: a 2.5 GB export, ~10 GB peak
    python benchmarks/init_from_memory.py --preset small  # seconds

Writes an export of the preset (random bf16 weights, ``checkpoint.save_inference``) to a temporary
directory, deleted at the end, then measures each case in fresh processes; a process's peak is its
``ru_maxrss``, taken right after the model is built and loaded (what ``deepspeed.initialize`` adds
next, fp32 master weights and Adam moments, is not counted: it is the same before and after).

- before: what a worker did until ``build_model``: ``Denoiser(cfg.model)`` (fp32, weights drawn),
  then ``load_state_dict(load_inference(export)[0].state_dict())``, a second fp32 model. Nothing
  is communicated before ``deepspeed.initialize``, so a worker's peak depends neither on the ZeRO
  stage nor on the number of workers: one process is measured.
- after: ``build_model`` for ZeRO-2 and ZeRO-3 on two workers (two processes in one gloo group, as
  DeepSpeed runs on CPU), with the weights held in bf16 (bf16 enabled, as on GPU: on a GPU, ZeRO-2's
  copy lives in device memory, not here) and in fp32 (training on a CPU, the default there).

Two ratios: the whole process's peak (interpreter, torch, DeepSpeed included), and the peak less
the process's resident memory right before building (the model's own cost). ZeRO-3 runs again with
glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``): ``zero.Init`` allocates each parameter
whole before keeping its part, and glibc keeps such freed blocks in its heap once it has raised the
threshold; the difference is the allocator's, not the model's (on a GPU those blocks are device
memory). Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, uninstalled

from dlm_ray.config.schema import ModelConfig, PretrainConfig  # noqa: E402
from dlm_ray.core.model import Denoiser, num_params  # noqa: E402

GIB = 2**30
MMAP_THRESHOLD = 128 * 1024  # glibc's default, fixed (no longer raised as large blocks are freed)


def rss_bytes() -> int:
    """This process's resident memory now."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def write_export(preset: str, out: Path) -> None:
    """Random bf16 weights of the preset's shape, allocated once in bf16, written as an export."""
    from dlm_ray.io.checkpoint import save_inference

    model = Denoiser.empty(ModelConfig(preset=preset), device="cpu", dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    save_inference(model, {"kind": "byte"}, out, dtype=torch.bfloat16, shard_bytes=1 << 30)


def worker(args: argparse.Namespace) -> None:
    """One measurement; prints a JSON line: the peak and the resident memory before building (every
    module the build uses already imported, so that figure is the interpreter's and the libraries')."""
    from dlm_ray.io.checkpoint import load_inference

    if args.case == "before":
        start = rss_bytes()
        model = Denoiser(ModelConfig(preset=args.preset))
        model.load_state_dict(load_inference(args.export)[0].state_dict())
    else:
        import deepspeed
        import deepspeed.runtime.zero.partition_parameters  # noqa: F401

        from dlm_ray.train.engine import build_model, deepspeed_config

        deepspeed.init_distributed(dist_backend="gloo")
        cfg = PretrainConfig.model_validate({
            "model": {"preset": args.preset}, "init_from": args.export,
            "train": {"num_workers": args.world, "batch_size": args.world, "zero_stage": args.stage,
                      "bf16": args.dtype == "bf16"}})
        ds_config = deepspeed_config(cfg.train, use_gpu=False)
        start = rss_bytes()
        model = build_model(cfg, ds_config=ds_config, device=torch.device("cpu"), resume=False)
    held = next(model.parameters()).dtype
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    print(json.dumps({"peak": peak, "start": start, "dtype": str(held).removeprefix("torch.")}), flush=True)


def measure(args: argparse.Namespace, export: Path, case: str, stage: int = 0, dtype: str = "fp32",
            world: int = 1, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a case on ``world`` fresh processes; the figures of the worker with the highest peak."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, __file__, "--worker", case, "--preset", args.preset, "--export", str(export),
           "--stage", str(stage), "--dtype", dtype, "--world", str(world)]
    t = time.perf_counter()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={
        **os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(max(1, 2 // world)), **(env or {})})
        for r in range(world)]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"{case} ZeRO-{stage} {dtype}: a worker failed (exit {[p.returncode for p in procs]})")
    figures = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    return {**max(figures, key=lambda f: f["peak"]), "seconds": time.perf_counter() - t}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="1b")
    ap.add_argument("--worker", choices=["before", "after"], help=argparse.SUPPRESS)
    ap.add_argument("--export", help=argparse.SUPPRESS)
    ap.add_argument("--stage", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--write-export", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.write_export:
        write_export(args.preset, Path(args.write_export))
        return []
    if args.worker:
        args.case = args.worker
        worker(args)
        return []
    cfg = ModelConfig(preset=args.preset)
    bf16_bytes = 2 * num_params(cfg)
    tmp = Path(tempfile.mkdtemp(prefix="dlm-init-from-"))
    try:
        t = time.perf_counter()
        # In a process of its own: the measurements start from a machine without the writer's memory.
        subprocess.run([sys.executable, __file__, "--write-export", str(tmp / "export"), "--preset", args.preset],
                       check=True)
        print(f"{args.preset} preset: {num_params(cfg) / 1e9:.2f}B parameters, {bf16_bytes / GIB:.2f} GiB in bf16; "
              f"export written in {time.perf_counter() - t:.0f} s", flush=True)
        cases = [("before", 0, "fp32", 1, {})] + [("after", stage, dtype, 2, {}) for dtype in ("bf16", "fp32")
                                                   for stage in (2, 3)]
        # zero.Init allocates each parameter whole before keeping its part; glibc then raises its mmap
        # threshold and keeps the freed blocks in the heap. With the threshold fixed they go back to the
        # system: these rows tell the allocator's share from the model's.
        cases += [("after", 3, dtype, 2, {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}) for dtype in ("bf16", "fp32")]
        rows = []
        for case, stage, dtype, world, env in cases:
            r = measure(args, tmp / "export", case, stage, dtype, world, env)
            label = case + (f", MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}" if env else "")
            rows.append({"case": label, "zero_stage": stage if case == "after" else "any", "workers": world, **r,
                         "peak_ratio": r["peak"] / bf16_bytes, "model_ratio": (r["peak"] - r["start"]) / bf16_bytes})
            print(f"  {label} ZeRO-{rows[-1]['zero_stage']} {r['dtype']}: {r['seconds']:.0f} s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\npython benchmarks/init_from_memory.py --preset {args.preset}  (torch {torch.__version__}, CPU)\n")
    print("| build | ZeRO | workers | weights held | peak RSS per worker (GiB) | peak / bf16 weights "
          "| (peak - before building) / bf16 weights |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['case']} | {r['zero_stage']} | {r['workers']} | {r['dtype']} | {r['peak'] / GIB:.2f} "
              f"| {r['peak_ratio']:.2f} | {r['model_ratio']:.2f} |")
    return rows


if __name__ == "__main__":
    main()
