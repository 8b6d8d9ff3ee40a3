"""Will a run fit, and how long will it take: figures from the config alone, nothing started.

    model states per GPU   DeepSpeed's own estimators (ZeRO-2 and ZeRO-3; ZeRO-1 and no ZeRO by
                           the same accounting of bytes per parameter, DeepSpeed having no estimator)
    activations per GPU    the tensors autograd keeps for the backward pass, counted per layer and
                           token for this model's block (below), plus the head and loss at their peak
    time                   tokens/s = MFU × peak FLOP/s × GPUs / training FLOPs per token

The activation count, per token and layer, in bytes, for a training dtype of ``e`` bytes (norms
run in float32; attention by a fused kernel that keeps its log-sum-exp, not the L × L scores)::

    2 norms          2 × (4·D + 4 + 2e·D)       float32 input, rsqrt, normalised, weighted
    attention        e·(3·Q + 2·KV) + 4·H       rotated q and k, v, output, out-proj input; LSE
    (q/k norms)      (4 + e)·(Q + KV) + 4·(H+G) Qwen3's per-head norms, when the model has them
    MLP              4e·F                       gate, SiLU(gate), up, their product

and per token outside the layers: the ids (8), the final norm (4·D + 4 + 2e·D) and the rotary
tables (4·K). The head's peak is its logits (e·V per token) with the loss's float32 copy and
log-softmax (8·V per masked token; every token masked at t → 1). With activation checkpointing a
checkpointed block keeps only its input (e·D) and one block at a time is recomputed in full. The
test measures these counts with autograd's saved-tensor hooks on real blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dlm_ray.config.schema import ModelConfig, PretrainConfig
from dlm_ray.core.model_size import flops_per_token, num_params

GIB = 2**30
# Usable memory of one device (what torch reports as total), and its dense bf16 peak FLOP/s.
GPUS: dict[str, tuple[float, float]] = {
    "H100": (79.1 * GIB, 989e12), "H200": (139.8 * GIB, 989e12), "A100": (79.1 * GIB, 312e12),
    "A100-40GB": (39.4 * GIB, 312e12), "L40S": (44.4 * GIB, 362e12),
}
HEADROOM = 0.9  # of the device: the CUDA context, the allocator's fragmentation, communication buffers
ASSUMED_MFU = 0.35  # until benchmarks/gpu_check.py has measured one on the device


def model_state_bytes(n_params: int, largest_layer: int, *, zero_stage: int, gpus: int, gpus_per_node: int,
                      offload_optimizer: bool = False, offload_param: bool = False) -> int:
    """Per-GPU bytes of parameters, gradients and optimizer state under mixed precision."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    nodes = max(1, gpus // gpus_per_node)
    per_node = gpus // nodes
    if zero_stage == 3:
        return estimate_zero3_model_states_mem_needs(n_params, largest_layer, num_gpus_per_node=per_node,
                                                     num_nodes=nodes, cpu_offload=offload_optimizer,
                                                     cpu_offload_params=offload_param)[1]
    if zero_stage == 2:
        return estimate_zero2_model_states_mem_needs(n_params, num_gpus_per_node=per_node, num_nodes=nodes,
                                                     cpu_offload=offload_optimizer)[1]
    # DeepSpeed's accounting per parameter: 2 (bf16 weights) + 2 (bf16 gradients) + 16 (fp32 gradients,
    # master weights and two Adam moments). ZeRO-1 shards the 16, ZeRO-0 nothing.
    if zero_stage == 1:
        return 4 * n_params + (0 if offload_optimizer else int(16 * n_params / gpus))
    return 20 * n_params


def largest_layer(cfg: ModelConfig) -> int:
    """Parameters of the largest single module (what ZeRO-3 gathers at once): the embedding or the
    head (V·D) or one MLP projection (D·F), as DeepSpeed's ``model_to_params`` counts them."""
    q_bias = cfg.n_heads * cfg.head_size if cfg.qkv_bias else 0
    return max(cfg.vocab_size * cfg.d_model, cfg.d_model * cfg.d_mlp,
               cfg.d_model * cfg.n_heads * cfg.head_size + q_bias)


def layer_activation_bytes(cfg: ModelConfig, dtype_bytes: int) -> int:
    """Bytes one block keeps for the backward pass, per token (see the module's table)."""
    e, D, F = dtype_bytes, cfg.d_model, cfg.d_mlp
    Q, KV, H, G = cfg.n_heads * cfg.head_size, cfg.kv_heads * cfg.head_size, cfg.n_heads, cfg.kv_heads
    norms = 2 * (4 * D + 4 + 2 * e * D)
    attention = e * (3 * Q + 2 * KV) + 4 * H
    qk_norm = (4 + e) * (Q + KV) + 4 * (H + G) if cfg.qk_norm else 0
    return norms + attention + qk_norm + 4 * e * F


def outside_layer_bytes(cfg: ModelConfig, dtype_bytes: int) -> int:
    """Per token, outside the blocks: ids, the final norm, the rotary tables."""
    return 8 + 4 * cfg.d_model + 4 + 2 * dtype_bytes * cfg.d_model + 4 * cfg.head_size


def activation_bytes(cfg: ModelConfig, *, micro_batch: int, seq_len: int, dtype_bytes: int,
                     checkpointed: int = 0) -> int:
    """Peak activation bytes of one micro-batch: every block's saved tensors (a checkpointed block's
    input only, with one block recomputed at a time), the rest of the model's, and the head's peak."""
    tokens = micro_batch * seq_len
    layer = layer_activation_bytes(cfg, dtype_bytes)
    kept = (cfg.n_layers - checkpointed) * layer + checkpointed * dtype_bytes * cfg.d_model
    recompute = layer if checkpointed else 0
    head = (dtype_bytes + 8) * cfg.vocab_size
    return tokens * (kept + recompute + outside_layer_bytes(cfg, dtype_bytes) + head)


@dataclass(frozen=True)
class Plan:
    params: int
    gpus: int
    gpu: str
    device_bytes: float
    zero_stage: int
    model_states: int
    micro_batch: int  # the config's
    activations: int
    activations_checkpointed: int
    fits: bool
    fits_checkpointed: bool
    pick: tuple[int, Literal["none", "full"]] | None  # the largest micro-batch that fits, and how
    tokens_per_s: float
    days: float
    mfu: float
    mfu_source: str


def make_plan(cfg: PretrainConfig, *, gpus: int, gpu: str, gpus_per_node: int = 8, mfu: float | None = None) -> Plan:
    """The figures for ``cfg`` trained on ``gpus`` devices of kind ``gpu`` (a key of ``GPUS``)."""
    if gpu not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r}; choose one of {sorted(GPUS)}")
    tc, m = cfg.train, cfg.model
    device_bytes, peak = GPUS[gpu]
    per_gpu = tc.batch_size // gpus
    if per_gpu * gpus != tc.batch_size:
        raise ValueError(f"train.batch_size={tc.batch_size} is not divisible by {gpus} GPUs")
    micro = max(1, per_gpu // tc.grad_accum)
    n, largest = num_params(m), largest_layer(m)
    states = model_state_bytes(n, largest, zero_stage=tc.zero_stage, gpus=gpus, gpus_per_node=min(gpus, gpus_per_node),
                               offload_optimizer=tc.offload_optimizer, offload_param=tc.offload_param)
    e = 2 if tc.bf16 is not False else 4
    acts = {how: activation_bytes(m, micro_batch=micro, seq_len=cfg.data.seq_len, dtype_bytes=e,
                                  checkpointed=m.n_layers if how == "full" else 0) for how in ("none", "full")}
    budget = HEADROOM * device_bytes
    pick = None
    for how in ("none", "full"):  # no recomputation if any micro-batch fits without it
        fitting = [b for b in _divisors(per_gpu) if states + activation_bytes(
            m, micro_batch=b, seq_len=cfg.data.seq_len, dtype_bytes=e,
            checkpointed=m.n_layers if how == "full" else 0) <= budget]
        if fitting:
            pick = (max(fitting), how)
            break
    used_mfu, source = (mfu, "given") if mfu is not None else (ASSUMED_MFU, "assumed: no device run has measured it")
    tokens_per_s = used_mfu * peak * gpus / flops_per_token(m, cfg.data.seq_len)
    days = tc.max_steps * tc.batch_size * cfg.data.seq_len / tokens_per_s / 86400
    return Plan(params=n, gpus=gpus, gpu=gpu, device_bytes=device_bytes, zero_stage=tc.zero_stage, model_states=states,
                micro_batch=micro, activations=acts["none"], activations_checkpointed=acts["full"],
                fits=states + acts["none"] <= budget, fits_checkpointed=states + acts["full"] <= budget,
                pick=pick, tokens_per_s=tokens_per_s, days=days, mfu=used_mfu, mfu_source=source)


def _divisors(n: int) -> list[int]:
    return [b for b in range(1, n + 1) if n % b == 0]


def describe(plan: Plan, cfg: PretrainConfig) -> str:
    """The plan as the lines ``jobs/plan.py`` prints."""
    g = lambda b: f"{b / GIB:.1f} GiB" if b >= GIB else f"{b / 2**20:.1f} MiB"  # noqa: E731
    budget = HEADROOM * plan.device_bytes
    yes = lambda ok: "fits" if ok else "does not fit"  # noqa: E731
    how = {"none": "without activation checkpointing", "full": "with train.activation_checkpointing=full"}
    pick = ("nothing fits, even one row with every block recomputed: raise zero_stage or GPUs, or offload"
            if plan.pick is None else f"micro-batch {plan.pick[0]} {how[plan.pick[1]]} "
            f"(grad_accum {cfg.train.batch_size // plan.gpus // plan.pick[0]})")
    duration = f"{plan.days:.1f} days" if plan.days >= 1 else f"{plan.days * 24:.2f} hours"
    size = f"{plan.params / 1e9:.2f}B" if plan.params >= 1e9 else f"{plan.params / 1e6:.2f}M"
    return "\n".join([
        f"model        {size} parameters, {cfg.model.n_layers} layers, d_model {cfg.model.d_model}",
        f"hardware     {plan.gpus} × {plan.gpu} ({g(plan.device_bytes)} each; {g(budget)} usable at {HEADROOM:.0%})",
        f"ZeRO-{plan.zero_stage}       model states {g(plan.model_states)} per GPU (DeepSpeed's estimate)",
        f"activations  micro-batch {plan.micro_batch} × {cfg.data.seq_len} tokens: {g(plan.activations)} without "
        f"checkpointing ({yes(plan.fits)}), {g(plan.activations_checkpointed)} with every block checkpointed "
        f"({yes(plan.fits_checkpointed)})",
        f"would pick   {pick}",
        f"throughput   {plan.tokens_per_s:,.0f} tokens/s at MFU {plan.mfu:.0%} ({plan.mfu_source})",
        f"duration     {duration} for {cfg.train.max_steps:,} steps of {cfg.train.batch_size} × {cfg.data.seq_len} tokens",
    ])
