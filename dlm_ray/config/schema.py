"""Typed configs for every stage, YAML loading and dotted command-line overrides.

Configs are pydantic models: unknown keys and out-of-range values fail with a message that names
the field, and every config round-trips through a plain dict, so it can cross process boundaries
(Ray Train's ``train_loop_config``, Serve's ``args``, actor kwargs) unchanged.

This module imports neither torch nor Ray, so a config can be checked anywhere.

Loading them from YAML files and dotted command-line overrides is ``dlm_ray.config.io``.
"""

from __future__ import annotations

import math
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Config(BaseModel):
    """Base for all configs: strict about unknown keys, validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# --------------------------------------------------------------------------------------------- model

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized debug model used by every test and the default job (0.92M parameters).
    "tiny": dict(vocab_size=264, d_model=128, n_layers=4, n_heads=4, d_mlp=384, max_seq_len=256),
    # GPT-2-small scale.
    "small": dict(vocab_size=32768, d_model=768, n_layers=12, n_heads=12, d_mlp=2048, max_seq_len=2048),
    "1b": dict(vocab_size=32768, d_model=2048, n_layers=22, n_heads=16, d_mlp=5632, max_seq_len=2048),
    # LLaDA-8B's shape.
    "8b": dict(
        vocab_size=126464, d_model=4096, n_layers=32, n_heads=32, d_mlp=12288,
        max_seq_len=4096, rope_theta=500000.0,
    ),
}


class RopeScaling(Config):
    """Llama 3.1's rotary scaling (``rope_type: llama3``): wavelengths longer than the original
    context / ``low_freq_factor`` are stretched by ``factor``, those shorter than original context /
    ``high_freq_factor`` kept, and those between blended smoothly."""

    rope_type: Literal["llama3"] = "llama3"
    factor: float = Field(gt=0)
    low_freq_factor: float = Field(gt=0)
    high_freq_factor: float = Field(gt=0)
    original_max_position_embeddings: int = Field(gt=0)

    @model_validator(mode="after")
    def _check_band(self) -> RopeScaling:
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"rope_scaling: high_freq_factor={self.high_freq_factor} must exceed "
                             f"low_freq_factor={self.low_freq_factor}")
        return self


class ModelConfig(Config):
    """Shape of the denoiser. ``preset`` fills every field not given explicitly."""

    preset: str | None = None
    vocab_size: int = Field(264, gt=0)
    d_model: int = Field(128, gt=0)
    n_layers: int = Field(4, gt=0)
    n_heads: int = Field(4, gt=0)
    # Grouped-query attention (Llama 3, Qwen): heads share n_kv_heads key/value heads; None = n_heads.
    n_kv_heads: int | None = Field(None, gt=0)
    # Per-head width; None = d_model / n_heads (Qwen3 sets it independently).
    head_dim: int | None = Field(None, gt=0)
    d_mlp: int = Field(384, gt=0)
    max_seq_len: int = Field(256, gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    rope_scaling: RopeScaling | None = None  # Llama 3.1 / 3.2 checkpoints
    norm_eps: float = Field(1e-5, gt=0)
    # What the Llama/Qwen families add to LLaDA's block: q/k/v projection biases (Qwen2), an RMSNorm
    # over each query and key head before RoPE (Qwen3), the LM head sharing the embedding's matrix.
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = False
    # A model adapted from an autoregressive one keeps its head's alignment (hidden state i predicts
    # token i + 1) and shifts inside: the logits at i come from the hidden state at i - 1, and position
    # 0 keeps its own. The model call's contract (logits at i predict token i) is unchanged.
    shift_logits: bool = False
    init_std: float = Field(0.02, gt=0)
    # torch.compile each block (training, and sampling where the job sets compile): off by default.
    compile: bool = False
    # The attention decides the objective. "full": every position sees every other (LLaDA, masked
    # diffusion). "block_causal": causal across blocks of block_size positions, full within a block
    # (block diffusion): an exact key/value cache. "causal": an autoregressive model (next-token
    # loss, token-by-token sampling with a KV cache), the baseline diffusion is compared against.
    attention: Literal["full", "block_causal", "causal"] = "full"
    block_size: int = Field(16, gt=0)
    # What the forward process corrupts. "mask": tokens replaced by the mask token (masked and block
    # diffusion; an autoregressive model trains on clean rows). "gaussian": Gaussian noise on the
    # normalised token embeddings (embedding diffusion, full attention): z_t = (1 - t)·ε + t·e, the
    # noise level and the model's previous estimate (self-conditioning) as further inputs.
    noise: Literal["mask", "gaussian"] = "mask"
    # Embedding diffusion: training draws noise levels, and sampling visits them, as
    # t = u / (u + s(1 - u)) for u uniform in [0, 1]; s > 1 spends more of both at high noise, where
    # a position must read its context to be told. None: 10 * sqrt(d_model / 128) (the best of 2.8,
    # 10 and 30 on the tiny model; a D-wide embedding's signal-to-noise ratio grows with D, so the
    # same share of levels below a given ratio needs s growing with sqrt(D)).
    time_shift: float | None = Field(None, gt=0, le=1000, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") is not None:
            name = data["preset"]
            if name not in MODEL_PRESETS:
                raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)}")
            data = {**MODEL_PRESETS[name], **data}
        return data

    @model_validator(mode="after")
    def _check_heads(self) -> ModelConfig:
        if self.attention == "block_causal" and self.max_seq_len % self.block_size:
            raise ValueError(f"block_size={self.block_size} does not divide max_seq_len={self.max_seq_len}")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.head_size % 2:
            raise ValueError(f"head dim {self.head_size} must be even for RoPE")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.kv_heads}")
        if self.shift_logits and self.attention == "causal":
            raise ValueError("shift_logits is for diffusion models adapted from an autoregressive one; "
                             "a causal model already predicts the next token")
        if self.noise == "gaussian" and (self.attention != "full" or self.shift_logits):
            raise ValueError("noise: gaussian (embedding diffusion) needs attention: full and no shift_logits, got "
                             f"attention: {self.attention}" + (", shift_logits" if self.shift_logits else ""))
        return self

    @property
    def gaussian_time_shift(self) -> float:
        """Embedding diffusion's time shift s (``time_shift``, or its default for this width)."""
        return self.time_shift if self.time_shift is not None else 10 * math.sqrt(self.d_model / 128)

    @property
    def kv_heads(self) -> int:
        """Key/value heads (n_kv_heads, or n_heads without grouped-query attention)."""
        return self.n_kv_heads or self.n_heads

    @property
    def head_size(self) -> int:
        """Width of one attention head (head_dim, or d_model / n_heads)."""
        return self.head_dim or self.d_model // self.n_heads


# ----------------------------------------------------------------------------------------- diffusion


class DiffusionConfig(Config):
    """The forward (masking) process and how training draws its noise level."""

    eps: float = Field(1e-3, gt=0, lt=1)
    # "linear": p(t) = (1 - eps) t + eps (LLaDA); "loglinear": p(t) = (1 - eps) t (MDLM).
    schedule: Literal["linear", "loglinear"] = "linear"
    # "low_discrepancy" spreads t evenly over a batch (MDLM): lower-variance gradients.
    time_sampling: Literal["uniform", "low_discrepancy"] = "low_discrepancy"
    # Complementary masks (Fast-dLLM v2): each training row is trained twice in its step, masked by
    # its draw and by the draw's complement (at p(t) and 1 - p(t)), so every maskable token is
    # predicted once per pair; a step then costs twice the compute.
    complementary: bool = False
    # Confidence-aware parallel training (LLaDA 2.0): the objective adds cap_weight times the entropy
    # of the prediction at each masked position whose argmax is already the clean token (summed and
    # divided as the bound is), so confident predictions sharpen and a sampler's threshold fires
    # more often. 0: the plain bound. The logged loss and NELBO stay the bound; the term is logged
    # as "cap_entropy".
    cap_weight: float = Field(0.0, ge=0, le=100.0, allow_inf_nan=False)


# ------------------------------------------------------------------------------------------ sampling


MAX_TEMPERATURE = 10.0
MAX_CFG_SCALE = 10.0


class SampleConfig(Config):
    """Sampler settings; ``generate`` reads nothing else."""

    gen_length: int = Field(32, gt=0)
    steps: int = Field(32, gt=0)  # at most gen_length: the reference schedule commits >= 1 token a step
    block_length: int = Field(32, gt=0)
    # Numbers are finite and bounded: a temperature or guidance of 1e308 overflows the logits.
    temperature: float = Field(0.0, ge=0, le=MAX_TEMPERATURE, allow_inf_nan=False)
    remasking: Literal["low_confidence", "random"] = "low_confidence"
    cfg_scale: float = Field(0.0, ge=0, le=MAX_CFG_SCALE, allow_inf_nan=False)
    # Fast decoding. A step commits at least the reference schedule's count and, with a threshold,
    # every masked position of the block with confidence >= threshold; with a factor f, the longest
    # run of most-confident positions whose k-th has confidence >= 1 - f / (k + 1). A block ends when
    # it has no mask left, so calls adapt to the model's certainty (never more than ``steps``).
    threshold: float | None = Field(None, gt=0, le=2.0, allow_inf_nan=False)  # > 1: the reference schedule
    factor: float | None = Field(None, gt=0, le=100.0, allow_inf_nan=False)
    # Entropy-bounded decoding (the EB-sampler), instead of a threshold or factor: the longest run
    # of most-confident masked positions whose summed entropy less its largest (nats, of each
    # position's predictive distribution) stays <= entropy_bound. 0: the reference schedule; large:
    # whole blocks at once.
    entropy_bound: float | None = Field(None, ge=0, allow_inf_nan=False)
    # Sub-blocks (Fast-dLLM v2): within a block only the first sub-block that still has masks may
    # commit; the block's steps are shared out among its sub-blocks (the reference schedule of each
    # over its share), and the threshold, factor or entropy rule applies inside it.
    sub_block_length: int | None = Field(None, gt=0)
    # Block KV cache: "prefix" recomputes the current block and everything after it each step, with
    # the keys/values before it from the block's first call; "dual" recomputes only the block.
    # "blocks": a block-causal model's exact cache (finished blocks' keys/values, computed once).
    cache: Literal["none", "prefix", "dual", "blocks"] = "none"
    # With a cache: a full forward (refreshing it) every this many steps within a block; None = only
    # at the block's first step.
    refresh_every: int | None = Field(None, gt=0)
    # Stop once every row has committed an EOS with nothing masked before it; fill the rest with EOS.
    stop_at_eos: bool = False
    # LLaDA's instruct options (its Appendix B.4): EOS never proposed; EOS / end-of-turn proposals
    # committed only after every other position of the block.
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False

    @model_validator(mode="after")
    def _check_blocks(self) -> SampleConfig:
        if self.gen_length % self.block_length:
            raise ValueError(
                f"gen_length={self.gen_length} is not divisible by block_length={self.block_length}"
            )
        num_blocks = self.gen_length // self.block_length
        if self.steps > self.gen_length:
            raise ValueError(f"steps={self.steps} exceeds gen_length={self.gen_length}: the reference schedule "
                             "commits at least one token per step, so more steps than tokens cannot be used")
        if self.steps % num_blocks:
            raise ValueError(f"steps={self.steps} is not divisible by the number of blocks ({num_blocks})")
        rules = [name for name in ("threshold", "factor", "entropy_bound") if getattr(self, name) is not None]
        if len(rules) > 1:
            raise ValueError(f"set at most one of threshold, factor and entropy_bound (got {' and '.join(rules)})")
        problem = sub_block_problem(self.block_length, self.steps // num_blocks, self.sub_block_length)
        if problem:
            raise ValueError(problem)
        # Only the approximate caches go stale: without one (or with the exact block cache) a
        # refresh would do nothing, and a setting that does nothing is refused, not ignored.
        if self.refresh_every is not None and self.cache not in ("prefix", "dual"):
            raise ValueError(f"refresh_every={self.refresh_every} needs cache 'prefix' or 'dual' (cache is "
                             f"{self.cache!r}, which has no cached keys/values to refresh)")
        return self

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length


def sub_block_problem(block_length: int, steps_per_block: int, sub_block_length: int | None) -> str | None:
    """What is wrong with a sub-block length for these blocks (None when it fits): it must divide
    the block, and each sub-block needs at least one of the block's steps."""
    if sub_block_length is None:
        return None
    if block_length % sub_block_length:
        return f"sub_block_length={sub_block_length} does not divide block_length={block_length}"
    if steps_per_block < block_length // sub_block_length:
        return (f"sub_block_length={sub_block_length} makes {block_length // sub_block_length} sub-blocks per block, "
                f"more than the {steps_per_block} steps per block: each sub-block needs a step")
    return None


# ------------------------------------------------------------------------------------- training job


# The built-in corpus's task families (dlm_ray.data.corpus generates and checks each): named here so
# a config is checked without importing the data layer.
CORPUS_FAMILIES = ("reverse", "sort", "sudoku", "translate")


class CorpusConfig(Config):
    """The built-in corpus: structured task families with an exact checker."""

    # Document shares; a Sudoku document is about twice as long as a reverse or sort one, and a
    # translate one (not in the default mix: docs/data.md) about six times.
    families: dict[str, float] = Field(default_factory=lambda: {"reverse": 0.3, "sort": 0.4, "sudoku": 0.3})
    seed: int = 0

    @model_validator(mode="after")
    def _check_families(self) -> CorpusConfig:
        unknown = set(self.families) - set(CORPUS_FAMILIES)
        if unknown:
            raise ValueError(f"unknown corpus families {sorted(unknown)}; known: {sorted(CORPUS_FAMILIES)}")
        if not self.families or any(w <= 0 or not math.isfinite(w) for w in self.families.values()):
            raise ValueError("corpus family weights must be positive")
        return self


class DataConfig(Config):
    """Where the corpus comes from and how it becomes masked, packed rows (``dlm_ray.data.pipeline``).

    ``source``: ``"builtin"``; a local path, directory, glob or pyarrow filesystem URI (``s3://``,
    ``gs://``) of Parquet / JSONL / text files; ``"hf:<name or saved path>"`` for a Hugging Face
    dataset (offline: from its cache or a ``save_to_disk`` directory); or the output directory of
    ``jobs/prepare_data.py``.
    """

    source: str = "builtin"
    # "pretrain": documents packed into rows; "sft": one (prompt, response) example per row, the
    # prompt never masked (dlm_ray.data.sft), from messages or prompt/response columns.
    task: Literal["pretrain", "sft"] = "pretrain"
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    format: Literal["auto", "parquet", "jsonl", "text", "hf", "prepared"] = "auto"
    text_column: str = "text"
    prompt_column: str = "prompt"  # fine-tuning examples: prompt and response, or messages
    response_column: str = "response"
    messages_column: str = "messages"
    # Plain text: one document per line, or one per file.
    text_unit: Literal["line", "file"] = "line"
    # Held-out data: a separate source, else documents whose content hash falls in this fraction.
    val_source: str | None = None
    val_fraction: float = Field(0.01, ge=0, lt=1)
    seq_len: int = Field(64, gt=1)
    # Conditional pretraining: in this fraction of the training documents that have a prompt (the
    # built-in corpus: up to its "="), the prompt is never masked, so the model also learns the
    # answer given the whole prompt, which is what sampling asks of it (SFT trains only that form).
    # Drawn per document and epoch from data.seed; held-out documents are always unconditional.
    # None: 0.5 on the built-in corpus (without it reverse and sort are not learned), else 0.
    conditional_fraction: float | None = Field(None, ge=0, le=1)
    # LLaDA trains ~1% of rows at a random shorter length; the cut-off tokens start the next row.
    random_length_fraction: float = Field(0.0, ge=0, le=1)
    # Built-in corpus size (documents drawn, train and held-out together).
    builtin_docs: int = Field(200_000, gt=0)
    builtin_shards: int = Field(8, gt=0)
    tokenizer_actors: tuple[int, int] = (1, 1)
    docs_per_batch: int = Field(1024, gt=0)
    # Object store the training feed may fill ahead of the trainer: beyond it the pipeline waits
    # instead of taking CPU the workers need.
    prefetch_mb: int = Field(32, gt=0)
    # Ray Data's progress bars; on a 2-core machine redrawing them costs the trainer CPU.
    progress_bars: bool = False
    # "files": the item order is drawn afresh each epoch; "rows" also shuffles each item's rows in
    # windows of shuffle_window rows (drawn from seed, epoch and item, so a resume lands exactly:
    # dlm_ray.data.packing.shuffle_in_windows). local_shuffle_buffer mixes rows across items in each
    # worker, but its draw is not part of the data position: a resume draws it afresh.
    shuffle: Literal["none", "files", "rows"] = "files"
    shuffle_window: int = Field(4096, gt=1)
    local_shuffle_buffer: int = Field(0, ge=0)
    seed: int = 0
    # Bad rows (null/empty text, bad JSON, non-UTF-8, text that encodes to the mask or pad token) and
    # unreadable files: counted and skipped, or with strict=True an error naming the file and row.
    strict: bool = False
    # Backing Ray Data's scheduling loop off while the feed is stalled (dlm_ray.runtime); "auto": on
    # for a local CPU-only cluster, where the spinning loop takes CPU from the trainer.
    pacing: Literal["auto", "on", "off"] = "auto"

    @model_validator(mode="after")
    def _check_actors(self) -> DataConfig:
        lo, hi = self.tokenizer_actors
        if not 1 <= lo <= hi:
            raise ValueError(f"tokenizer_actors must be (min, max) with 1 <= min <= max, got {self.tokenizer_actors}")
        if self.conditional_fraction and (self.source != "builtin" or self.task != "pretrain"):
            raise ValueError("conditional_fraction needs pretraining documents with a prompt: the built-in corpus "
                             "(fine-tuning, data.task: sft, is conditional already)")
        return self

    @property
    def conditional_share(self) -> float:
        """The fraction of training documents pretrained conditionally (``conditional_fraction`` resolved)."""
        if self.conditional_fraction is not None:
            return self.conditional_fraction
        return 0.5 if self.source == "builtin" and self.task == "pretrain" else 0.0


class TrainConfig(Config):
    """Optimisation, parallelism and checkpointing for the Ray Train + DeepSpeed loop."""

    seed: int = 0
    batch_size: int = Field(64, gt=0)  # global rows per optimizer step
    grad_accum: int = Field(1, gt=0)
    max_steps: int = Field(1500, gt=0)
    max_epochs: int = Field(100, gt=0)
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(50, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = Field(1.0, gt=0)
    log_every: int = Field(50, gt=0)
    eval_every: int = Field(400, gt=0)
    eval_batches: int = Field(4, gt=0)
    # Parallelism (Ray Train ScalingConfig) and DeepSpeed.
    num_workers: int = Field(2, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0)
    gpus_per_worker: float = Field(1.0, ge=0)
    # Extra Ray resources each worker needs, e.g. {"trainer_node": 1} to pin workers to a node type.
    worker_resources: dict[str, float] = Field(default_factory=dict)
    zero_stage: int = Field(2, ge=0, le=3)
    offload_optimizer: bool = False
    offload_param: bool = False
    bf16: bool | None = None  # None: on GPU, off on CPU
    # A DeepSpeed JSON whose keys override the generated config.
    deepspeed_config: str | None = None
    # Checkpoints and fault tolerance.
    checkpoint_every: int = Field(400, gt=0)
    num_to_keep: int = Field(2, gt=0)
    max_failures: int = Field(2, ge=-1)
    # Recompute activations in the backward pass instead of keeping them: every block, or every k-th.
    activation_checkpointing: Literal["none", "full", "every_k"] = "none"
    activation_checkpointing_k: int = Field(2, gt=0)
    # For MFU: peak FLOP/s of one worker's device; unset, it comes from the GPU's name (H100, H200,
    # A100, L40S in dense bf16), and on a CPU or an unknown device no MFU is reported.
    peak_flops: float | None = Field(None, gt=0)
    # TensorBoard event files under <run dir>/tensorboard as well as metrics.jsonl (the [tensorboard] extra).
    tensorboard: bool = False
    # Checkpoints are written to a local staging directory (default: the system's temporary one) and
    # uploaded to storage_path by a background thread ("async": the next step does not wait; the
    # staged copy is deleted once uploaded) or before the step returns ("sync"). An upload is tried
    # upload_attempts times; one that still fails stops the workers, which restart (max_failures)
    # from the last committed checkpoint.
    checkpoint_upload: Literal["async", "sync"] = "async"
    checkpoint_staging: str | None = None
    upload_attempts: int = Field(3, gt=0)
    # Fault drill: every worker raises once right after this step (a marker file in the run
    # directory makes it once per run), to exercise restarts and resume.
    fail_once_at_step: int | None = Field(None, gt=0)
    # Upload drills (tests and benchmarks/checkpoint_upload.py): each upload first sleeps this long, as
    # a slow object store would; the upload of this step fails every attempt, once per run.
    upload_delay_s: float = Field(0.0, ge=0)
    fail_upload_at_step: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check_batch(self) -> TrainConfig:
        per_step = self.num_workers * self.grad_accum
        if self.batch_size % per_step:
            raise ValueError(
                f"batch_size={self.batch_size} is not divisible by num_workers x grad_accum = {per_step}"
            )
        if self.offload_param and self.zero_stage != 3:
            raise ValueError("offload_param needs zero_stage=3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage >= 1")
        return self

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // (self.num_workers * self.grad_accum)


class EvalConfig(Config):
    """What the job measures before and after training."""

    num_nelbo_docs: int = Field(256, gt=0)
    nelbo_samples: int = Field(16, gt=0)
    num_prompts_per_family: int = Field(100, gt=0)
    sample: SampleConfig = Field(
        default_factory=lambda: SampleConfig(gen_length=24, steps=24, block_length=24)
    )
    # Off the training path (dlm_ray.eval.checkpoints): each reported checkpoint is evaluated by a Ray
    # task of its own, on these resources, instead of the trainers every train.eval_every steps.
    on_checkpoints: bool = False
    cpus: float = Field(1.0, ge=0)
    gpus: float = Field(0.0, ge=0)
    checkpoint_prompts_per_family: int = Field(20, ge=0)  # validity prompts per family (built-in corpus)
    # lm-evaluation-harness tasks for each checkpoint (the [eval] extra), scored as jobs/evaluate.py scores them.
    lm_eval_tasks: list[str] = Field(default_factory=list)
    lm_eval_include_path: str | None = None
    lm_eval_limit: float | None = None
    lm_eval_mc_samples: int = Field(32, gt=0)


class AdaptConfig(Config):
    """The recipe for adapting an autoregressive checkpoint (``init_from`` with causal attention)
    into a diffusion model: the run names the diffusion kind (``model.attention: full`` or
    ``block_causal``) and the driver (``dlm_ray.train.fit.with_init_from``) turns the recipe on.
    The shift (``model.shift_logits``) is on unless given, so is ``diffusion.complementary`` for
    block diffusion, and ``lr`` / ``warmup_steps`` stand in for ``train``'s unless those are given.
    A run that adapts nothing refuses a setting of this section that differs from its default."""

    # Set by the driver, never by hand: this run adapts a causal checkpoint (the schedules below run).
    from_causal: bool = False
    # DiffuLLaMA's attention annealing (full attention): at step s every key after a query is also
    # visible with probability min(1, s / anneal_steps), one draw per step shared by the batch, so
    # the first step sees the checkpoint's causal mask and step anneal_steps on sees everything.
    # 0: full attention from the first step.
    anneal_steps: int = Field(100, ge=0)
    # LLaDA 2.0's block-size warm-up (block diffusion): train first in blocks of 1 (the causal
    # model itself), then 4, 16, ... (each dividing the model's block_size), each for this many
    # steps, then in the model's own blocks. 0: the model's blocks from the first step.
    block_warmup_steps: int = Field(0, ge=0)
    # The optimiser of an adaptation (docs/comparison.md sets them beside the papers'): a fresh
    # optimizer state on trained weights warms up again, to the peak the tiny model was pretrained at.
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(50, ge=0)


class PretrainConfig(Config):
    """Everything ``jobs/pretrain.py`` needs."""

    run_name: str = "tiny"
    # Where runs live: a local directory or a pyarrow URI (s3://bucket/runs, gs://...).
    storage_path: str = "runs"
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(preset="tiny"))
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    # "byte", a tokenizer.json path, or a tokenizer config (set from init_from).
    tokenizer: str | dict[str, Any] = "byte"
    # Start from an inference checkpoint (ours or a LLaDA directory): its weights, shape and tokenizer.
    init_from: str | None = None
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    # Adapting an autoregressive init_from into a diffusion model (applied by the driver).
    adapt: AdaptConfig = Field(default_factory=AdaptConfig)

    @model_validator(mode="after")
    def _check_lengths(self) -> PretrainConfig:
        # With init_from the model's shape is the checkpoint's, checked once it is read (with_init_from).
        if self.model.attention == "block_causal" and self.data.seq_len % self.model.block_size:
            raise ValueError(f"data.seq_len={self.data.seq_len} is not a multiple of model.block_size="
                             f"{self.model.block_size}: every row must hold whole blocks")
        if self.init_from is None and self.data.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}"
            )
        if self.diffusion.cap_weight and self.model.attention == "causal":
            raise ValueError(f"diffusion.cap_weight={self.diffusion.cap_weight} is for diffusion models; this run's "
                             "model.attention is 'causal' (an autoregressive model has no masked positions)")
        if self.model.noise == "gaussian" and (self.diffusion.cap_weight or self.diffusion.complementary):
            raise ValueError("diffusion.cap_weight and diffusion.complementary are for masked diffusion; this run's "
                             "model.noise is 'gaussian' (embedding diffusion has no masked positions)")
        if self.adapt.from_causal and self.model.noise == "gaussian":
            raise ValueError("adapting an autoregressive init_from into embedding diffusion (model.noise: gaussian) "
                             "is not supported: adapt into model.noise: mask, or train embedding diffusion from scratch")
        if self.adapt.from_causal and (self.init_from is None or self.model.attention == "causal"):
            raise ValueError("adapt.from_causal is set by the driver for a diffusion run from an autoregressive "
                             "init_from; this run has " + ("no init_from" if self.init_from is None
                                                             else "model.attention: causal"))
        return self

    def with_absolute_paths(self) -> PretrainConfig:
        """This config with its local paths made absolute from this process's working directory.

        The driver calls it once, before the config crosses to the workers: Ray Train runs each
        worker in a directory of its own, where a relative ``runs`` names a folder inside Ray's
        session directory (the run's metrics would land there, not where the user looks)."""
        def absolute(path: str | None) -> str | None:
            return path if path is None or "://" in path else os.path.abspath(path)

        tokenizer = self.tokenizer
        if isinstance(tokenizer, str) and tokenizer != "byte":
            tokenizer = absolute(tokenizer)
        elif isinstance(tokenizer, dict) and tokenizer.get("path"):
            tokenizer = {**tokenizer, "path": absolute(tokenizer["path"])}
        return self.model_copy(update={
            "storage_path": absolute(self.storage_path), "init_from": absolute(self.init_from), "tokenizer": tokenizer,
            "train": self.train.model_copy(update={"deepspeed_config": absolute(self.train.deepspeed_config)})})
