"""The DeepSpeed engine's setup, without Ray: what the training workers and the GPU check share.

``deepspeed_config`` (ZeRO stage, offload, bf16 on GPU, clipping; a JSON file's keys override it),
``make_optimizer`` (torch's fused AdamW on GPU), ``checkpointed_blocks`` (activation
checkpointing), ``check_memory`` (DeepSpeed's estimate of the model states per GPU, refusing what
cannot fit) and ``peak_flops`` (by GPU name, for MFU). With ``train.py`` the only modules that
import DeepSpeed, and only inside the functions that need it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import torch

from dlm_ray.config import ModelConfig, TrainConfig

# Dense bf16 tensor-core peaks (FLOP/s) by a substring of the GPU's name; the first match wins.
PEAK_FLOPS = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12))


def peak_flops(device_name: str, tc: TrainConfig) -> float | None:
    """One device's peak FLOP/s for MFU: ``train.peak_flops`` if set, else by the GPU's name; None on
    a CPU or a device not in the table (no MFU rather than a made-up one)."""
    if tc.peak_flops:
        return tc.peak_flops
    return next((f for key, f in PEAK_FLOPS if key in device_name), None)


def checkpointed_blocks(tc: TrainConfig, n_layers: int) -> frozenset[int]:
    """The blocks whose activations are recomputed in the backward pass."""
    if tc.activation_checkpointing == "full":
        return frozenset(range(n_layers))
    if tc.activation_checkpointing == "every_k":
        return frozenset(range(0, n_layers, tc.activation_checkpointing_k))
    return frozenset()


def check_memory(model_cfg: ModelConfig, tc: TrainConfig, device_bytes: int | None) -> str:
    """DeepSpeed's estimate of the per-GPU memory of the model states (parameters, gradients,
    optimizer; activations come on top) for this model, ZeRO stage and worker count, as a line to
    print; a configuration that cannot fit in ``device_bytes`` is refused with the numbers."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from dlm_ray.model import num_params

    n, workers = num_params(model_cfg), tc.num_workers
    if tc.zero_stage == 3:
        largest = model_cfg.vocab_size * model_cfg.d_model  # the embedding (and the head) is the largest layer
        _, need, _ = estimate_zero3_model_states_mem_needs(n, largest, num_gpus_per_node=workers,
                                                           cpu_offload=tc.offload_optimizer,
                                                           cpu_offload_params=tc.offload_param)
    elif tc.zero_stage in (1, 2):
        _, need = estimate_zero2_model_states_mem_needs(n, num_gpus_per_node=workers, cpu_offload=tc.offload_optimizer)
    else:
        need = 20 * n  # nothing partitioned: bf16 params and grads, fp32 master, two Adam moments
    gib = 2**30
    line = (f"[memory] DeepSpeed ZeRO-{tc.zero_stage} estimate: {need / gib:.1f} GiB per GPU for the model states "
            f"of {n / 1e9:.2f}B parameters on {workers} GPUs (activations come on top)")
    if device_bytes is None:
        return line + "; no device memory to check against"
    if need > device_bytes:
        raise ValueError(f"this configuration cannot fit: ZeRO-{tc.zero_stage} needs {need / gib:.1f} GiB per GPU "
                         f"for the model states of {n / 1e9:.2f}B parameters on {workers} GPUs, and the device "
                         f"has {device_bytes / gib:.1f} GiB; raise zero_stage or num_workers, or offload")
    return line + f" of {device_bytes / gib:.1f} GiB"


def make_optimizer(params: Iterable[torch.nn.Parameter], tc: TrainConfig, *, use_gpu: bool) -> Any:
    """On GPU, torch's fused AdamW (one kernel for every parameter's update), handed to DeepSpeed;
    on CPU None: DeepSpeed builds its own from the config."""
    if not use_gpu:
        return None
    return torch.optim.AdamW(params, lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay, fused=True)


def deepspeed_config(tc: TrainConfig, *, use_gpu: bool) -> dict[str, Any]:
    """The generated DeepSpeed config; keys of ``train.deepspeed_config`` (a JSON file) override it."""
    bf16 = use_gpu if tc.bf16 is None else tc.bf16
    zero: dict[str, Any] = {"stage": tc.zero_stage}
    if tc.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if tc.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    cfg: dict[str, Any] = {
        "train_batch_size": tc.batch_size,
        "train_micro_batch_size_per_gpu": tc.micro_batch_size,
        "gradient_accumulation_steps": tc.grad_accum,
        "gradient_clipping": tc.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        # The learning rate is set each step by lr_at, so resumes follow the same schedule.
        "optimizer": {"type": "AdamW", "params": {"lr": tc.lr, "betas": list(tc.betas),
                                                  "weight_decay": tc.weight_decay}},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if use_gpu:
        del cfg["optimizer"]  # make_optimizer's fused AdamW
    if tc.deepspeed_config:
        override = json.loads(Path(tc.deepspeed_config).read_text())
        cfg = {**cfg, **override}
    return cfg


