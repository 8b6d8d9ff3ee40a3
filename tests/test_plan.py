"""The plan (jobs/plan.py): DeepSpeed's own estimators for the model states, activation counts
that match hand arithmetic and what autograd really keeps, and a pick that fits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dlm_ray.config.schema import ModelConfig, PretrainConfig
from dlm_ray.core.model import Denoiser
from dlm_ray.train.plan import (GIB, GPUS, HEADROOM, activation_bytes, layer_activation_bytes, make_plan,
                                model_state_bytes, outside_layer_bytes)

os.environ.setdefault("DS_ACCELERATOR", "cpu")
ROOT = Path(__file__).resolve().parents[1]


def saved_bytes(cfg: ModelConfig, batch: int, seq_len: int, dtype: torch.dtype) -> int:
    """Bytes of the distinct tensors autograd keeps for backward in one training forward, parameters
    left out: what activation memory is."""
    torch.manual_seed(0)
    model = Denoiser(cfg).to(dtype).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randint(0, cfg.vocab_size - 8, (batch, seq_len)))
    return sum(kept.values())


@pytest.mark.parametrize("dtype,e", [(torch.float32, 4), (torch.bfloat16, 2)])
@pytest.mark.parametrize("shape", [dict(preset="tiny"), dict(preset="tiny", n_heads=8, d_mlp=512),
                                   dict(preset="tiny", n_kv_heads=2, qk_norm=True, qkv_bias=True)],
                         ids=["tiny", "wider", "qwen3-like"])
def test_activation_count_is_what_autograd_keeps(shape, dtype, e):
    cfg1, cfg3 = ModelConfig(**shape, n_layers=1), ModelConfig(**shape, n_layers=3)
    one, three = saved_bytes(cfg1, 2, 48, dtype), saved_bytes(cfg3, 2, 48, dtype)
    assert (three - one) / 2 / (2 * 48) == layer_activation_bytes(cfg1, e)
    assert one - (three - one) / 2 == 2 * 48 * outside_layer_bytes(cfg1, e)


def test_activation_count_of_a_1b_block_is_what_autograd_keeps():
    # Two of the 1b preset's blocks (its real widths) at a short sequence, in bf16.
    cfg = lambda n: ModelConfig(preset="1b", n_layers=n, vocab_size=512)  # noqa: E731
    one, two = saved_bytes(cfg(1), 1, 16, torch.bfloat16), saved_bytes(cfg(2), 1, 16, torch.bfloat16)
    assert (two - one) / 16 == layer_activation_bytes(cfg(1), 2)


def test_activation_figures_by_hand():
    # tiny, bf16: D = Q = KV = 128, H = 4, F = 384, per token and layer:
    #   norms 2(4·128 + 4 + 4·128) = 2056; attention 2(3·128 + 2·128) + 16 = 1296; MLP 8·384 = 3072
    assert layer_activation_bytes(ModelConfig(preset="tiny"), 2) == 2056 + 1296 + 3072
    # 1b, bf16: D = Q = KV = 2048, H = 16, F = 5632:
    #   norms 2(8192 + 4 + 8192) = 32776; attention 2(6144 + 4096) + 64 = 20544; MLP 8·5632 = 45056
    one_b = ModelConfig(preset="1b")
    assert layer_activation_bytes(one_b, 2) == 32776 + 20544 + 45056
    # Outside the layers, 1b: ids 8 + final norm (8192 + 4 + 8192) + rotary 4·128 = 16908; head (2 + 8)·32768.
    # Micro-batch 8 × 2048 tokens, no checkpointing: 22 layers of 98376.
    tokens = 8 * 2048
    assert activation_bytes(one_b, micro_batch=8, seq_len=2048, dtype_bytes=2) == \
        tokens * (22 * 98376 + 16908 + 327680)
    # Every block checkpointed: each keeps its bf16 input (4096), one is recomputed in full.
    assert activation_bytes(one_b, micro_batch=8, seq_len=2048, dtype_bytes=2, checkpointed=22) == \
        tokens * (22 * 4096 + 98376 + 16908 + 327680)


@pytest.mark.parametrize("preset,stage,gpus", [("tiny", 2, 2), ("tiny", 3, 2), ("1b", 2, 16), ("1b", 3, 16),
                                               ("1b", 3, 64)])
def test_model_states_are_deepspeeds_estimates(preset, stage, gpus):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs, model_to_params
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cfg = ModelConfig(preset=preset)
    # DeepSpeed counts the parameters of the real module (its largest layer too); allocated, not drawn.
    total, largest = model_to_params(Denoiser.empty(cfg, device="cpu", dtype=torch.bfloat16))
    nodes = max(1, gpus // 8)
    if stage == 2:
        _, expected = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=gpus // nodes, num_nodes=nodes,
                                                            cpu_offload=False)
    else:
        _, expected, _ = estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node=gpus // nodes,
                                                               num_nodes=nodes, cpu_offload=False,
                                                               cpu_offload_params=False)
    train = dict(zero_stage=stage, num_workers=gpus, batch_size=gpus * 4)
    plan = make_plan(PretrainConfig(model=cfg, train=train), gpus=gpus, gpu="H100")
    assert plan.params == total and plan.model_states == expected


def test_zero1_and_offload_by_the_same_accounting():
    n = 10**9
    assert model_state_bytes(n, 0, zero_stage=1, gpus=8, gpus_per_node=8) == 4 * n + 2 * n
    assert model_state_bytes(n, 0, zero_stage=0, gpus=8, gpus_per_node=8) == 20 * n
    # Offloading the optimizer leaves the bf16 weights (ZeRO-2), or the largest layer (ZeRO-3, params offloaded).
    assert model_state_bytes(n, 10**8, zero_stage=2, gpus=8, gpus_per_node=8, offload_optimizer=True) == 2 * n
    assert model_state_bytes(n, 10**8, zero_stage=3, gpus=8, gpus_per_node=8, offload_optimizer=True,
                             offload_param=True) == 4 * 10**8


def test_the_8b_plan_picks_what_fits_and_says_how_long():
    from dlm_ray.config.io import load_config

    cfg = load_config(PretrainConfig, str(ROOT / "jobs/configs/8b.yaml"), ["--train.num_workers=16"])
    plan = make_plan(cfg, gpus=16, gpu="H100")
    budget = HEADROOM * GPUS["H100"][0]
    assert not plan.fits  # 16 rows of 4096 tokens: the head alone, at 126,464 words, is ~80 GiB
    micro, how = plan.pick
    per_gpu = 1024 // 16
    acts = lambda b, h: activation_bytes(cfg.model, micro_batch=b, seq_len=4096, dtype_bytes=2,  # noqa: E731
                                         checkpointed=32 if h == "full" else 0)
    assert per_gpu % micro == 0 and plan.model_states + acts(micro, how) <= budget
    bigger = [b for b in range(micro + 1, per_gpu + 1) if per_gpu % b == 0]
    assert all(plan.model_states + acts(b, how) > budget for b in bigger)
    # 6N + attention FLOPs per token, at the assumed MFU on 16 × 989 TFLOP/s.
    n_matmul = plan.params - 126464 * 4096
    per_token = 6 * n_matmul + 12 * 32 * 4096 * 4096
    assert plan.tokens_per_s == pytest.approx(0.35 * 989e12 * 16 / per_token)
    assert plan.days == pytest.approx(200_000 * 1024 * 4096 / plan.tokens_per_s / 86400)
    assert plan.model_states < 16 * GIB


def test_plan_command_prints_every_figure():
    def plan(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "jobs" / "plan.py"), *args], capture_output=True, text=True,
                              cwd=ROOT, timeout=120)

    out = plan("--config", "jobs/configs/1b.yaml", "--gpus", "16", "--gpu", "H100", "--mfu", "0.4")
    assert out.returncode == 0, out.stderr
    for fragment in ("1.26B parameters", "ZeRO-2", "DeepSpeed's estimate", "without checkpointing",
                     "with every block checkpointed", "would pick", "MFU 40% (given)", "days for 100,000 steps"):
        assert fragment in out.stdout
    bad = plan("--config", "jobs/configs/1b.yaml", "--gpus", "3")
    assert bad.returncode != 0 and "plan: on 3 GPUs: batch_size=512 is not divisible" in bad.stderr
    # What training would refuse is refused: 4 rows per GPU cannot make 8 micro-batches.
    bad = plan("--config", "jobs/configs/8b.yaml", "--gpus", "256")
    assert bad.returncode != 0 and "num_workers x grad_accum = 2048" in bad.stderr
