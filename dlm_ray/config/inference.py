"""Typed configs of the inference stages: batch generation (``jobs/generate.py``) and the HTTP
service (``dlm_ray.serving.app``), and the one check of the sampler settings a request or a row brings
with it (``SampleOverrides``, ``resolve_overrides``): a batch row and a Serve request with the same
bad setting are refused with the same message. Like ``dlm_ray.config.schema``, whose base and sampler
settings they use, this module imports neither torch nor Ray.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dlm_ray.config.schema import MAX_CFG_SCALE, Config, SampleConfig

# ------------------------------------------------------------------- per-request and per-row settings

MAX_INT = 2**31 - 1  # no integer setting comes near it; larger ones would overflow tensor sizes
# A request's or a row's temperature: OpenAI's range. A job's or server's own default may go up to
# SampleConfig's bound; what one caller asks for stays where sampling is still meaningful.
MAX_REQUEST_TEMPERATURE = 2.0


class SampleOverrides(BaseModel):
    """The sampler settings one Serve request or one batch-generation row may set over the server's
    or job's defaults, with their bounds: both are checked here, so they accept and refuse alike."""

    # Strict types: no "yes" for a flag, no true for a number, no "3" for an integer; numbers finite.
    model_config = ConfigDict(extra="forbid", strict=True)

    steps: int | None = Field(None, gt=0, le=MAX_INT)
    block_length: int | None = Field(None, gt=0, le=MAX_INT)
    temperature: float | None = Field(None, ge=0, le=MAX_REQUEST_TEMPERATURE, allow_inf_nan=False)
    remasking: Literal["low_confidence", "random"] | None = None
    cfg_scale: float | None = Field(None, ge=0, le=MAX_CFG_SCALE, allow_inf_nan=False)
    threshold: float | None = Field(None, gt=0, le=2, allow_inf_nan=False)
    factor: float | None = Field(None, gt=0, le=100, allow_inf_nan=False)
    entropy_bound: float | None = Field(None, ge=0, le=1e6, allow_inf_nan=False)
    sub_block_length: int | None = Field(None, gt=0, le=MAX_INT)
    # "blocks" is not asked for: a block-causal model always samples with it, no other model can.
    cache: Literal["none", "prefix", "dual"] | None = None
    refresh_every: int | None = Field(None, gt=0, le=MAX_INT)
    stop_at_eos: bool | None = None
    logits_eos_inf: bool | None = None
    confidence_eos_eot_inf: bool | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)


class RowOverrides(SampleOverrides):
    """A batch row's settings: Serve's plus ``gen_length`` (a request says ``max_tokens``)."""

    gen_length: int | None = Field(None, gt=0, le=MAX_INT)


def describe_errors(errors: list[Any], *, skip: tuple[str, ...] = ()) -> str:
    """pydantic's errors as one message, each naming its field (``skip``: location parts that are no
    field, like a request's ``body``); an error of the whole config is its message alone."""
    parts = []
    for e in errors[:5]:
        where = ".".join(str(p) for p in e["loc"] if p not in skip)
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)


def check_overrides(given: Mapping[str, Any], kind: type[SampleOverrides] = RowOverrides) -> SampleOverrides:
    """``given`` checked field by field; a ValueError names each bad field."""
    try:
        return kind.model_validate(dict(given))
    except ValidationError as exc:
        raise ValueError(describe_errors(exc.errors())) from None


def resolve_overrides(defaults: SampleConfig, update: Mapping[str, Any]) -> SampleConfig:
    """``defaults`` with the checked settings of ``update`` (None: not given); a ValueError says what
    does not fit together. A fast-decoding rule given replaces the default's other rule, and a cache
    given without ``refresh_every`` drops a refresh the new cache cannot use."""
    new = {k: v for k, v in update.items() if v is not None and k != "seed"}
    rules = ("threshold", "factor", "entropy_bound")
    if any(rule in new for rule in rules):
        new = {**{rule: None for rule in rules}, **new}
    if new.get("cache") not in (None, "prefix", "dual") and "refresh_every" not in new:
        new["refresh_every"] = None
    try:
        return SampleConfig.model_validate({**defaults.to_dict(), **new})
    except ValidationError as exc:
        raise ValueError(describe_errors(exc.errors())) from None


# -------------------------------------------------------------------------------- batch generation


class GenerateConfig(Config):
    """Everything ``jobs/generate.py`` needs: a checkpoint and prompts in, Parquet out.

    ``input``: Parquet or JSONL files (a path, directory, glob, ``s3://``/``gs://`` URI), or
    ``builtin:N`` for N held-out prompts of the built-in corpus. Rows may carry their own sampler
    settings in columns named like ``sample``'s fields (and ``seed``).
    """

    checkpoint: str = "runs/tiny/export"
    # The checkpoint's kind where its config.json cannot say it (an A2D directory, a diffusion model
    # in a plain Qwen3 directory): "full", "block_causal:32", "+shift" appended for shifted logits.
    model_kind: str | None = None
    input: str = "builtin:1000"
    output: str = "runs/tiny/generations"
    format: Literal["auto", "parquet", "jsonl"] = "auto"
    prompt_column: str = "prompt"
    # A row may instead hold a conversation (OpenAI's [{"role", "content"}, ...]) in this column,
    # rendered with the model's chat template.
    messages_column: str = "messages"
    # Text that comes after the completion (infilling: the completion is inserted between prompt
    # and suffix; full-attention models only).
    suffix_column: str = "suffix"
    # Unique per row; without it a row's id is "<file relative to the input root>:<row number>".
    id_column: str | None = None
    sample: SampleConfig = Field(default_factory=lambda: SampleConfig(gen_length=24, steps=24, block_length=24))
    seed: int = Field(0, ge=0, lt=2**63)
    # Precede each prompt with EOS, the document separator the model saw in training.
    prepend_eos: bool = True
    batch_size: int = Field(32, gt=0)  # prompts per generate() call
    # An actor takes this many batches' worth of rows at once and groups them by length and settings.
    group_batches: int = Field(4, gt=0)
    actors: tuple[int, int] = (1, 2)  # ActorPoolStrategy(min_size, max_size)
    cpus_per_actor: float = Field(1.0, ge=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    torch_threads: int | None = Field(None, gt=0)  # per actor; None = one per CPU it holds
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    compile: bool = False  # torch.compile the model's blocks (worth it on GPUs, for long jobs)
    rows_per_file: int = Field(100_000, gt=0)
    # Rows gathered into one output file (and one checkpoint of finished ids) before it is written, so
    # the files grow with the rows / this, not one per actor call; rows a kill catches unwritten are
    # generated again on resume (never twice in the output).
    min_rows_per_file: int = Field(1024, gt=0)
    strict: bool = False  # fail on the first bad row instead of writing an error row
    progress_bars: bool = True
    pacing: Literal["auto", "on", "off"] = "auto"  # see DataConfig.pacing
    # Tests only: the first actor call that finds this path missing creates it and kills its process.
    fail_once_marker: str | None = None

    @model_validator(mode="after")
    def _check_actors(self) -> GenerateConfig:
        lo, hi = self.actors
        if lo < 1 or hi < lo:
            raise ValueError(f"actors must be (min, max) with 1 <= min <= max, got {self.actors}")
        if self.output.rstrip("/") in (self.input.rstrip("/"), ""):
            raise ValueError("output must be a directory of its own, not the input")
        return self


# ------------------------------------------------------------------------------------------- serving


class AutoscalingConfig(Config):
    """Ray Serve's replica autoscaling, passed through as ``autoscaling_config``."""

    min_replicas: int = Field(1, ge=0)
    initial_replicas: int | None = Field(None, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(16, gt=0)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)

    @model_validator(mode="after")
    def _check_range(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas={self.min_replicas} > max_replicas={self.max_replicas}")
        return self


class ServeConfig(Config):
    """The HTTP service (``dlm_ray.serving.app.build_app``): model, batching, back-pressure, replicas."""

    checkpoint: str = "runs/tiny/export"
    model_kind: str | None = None  # as GenerateConfig's: only where the checkpoint cannot say it
    model_name: str = "dlm-tiny"  # what clients pass as "model"
    # Defaults for fields a request leaves out; max_tokens sets gen_length.
    sample: SampleConfig = Field(default_factory=lambda: SampleConfig(gen_length=24, steps=24, block_length=24))
    max_batch_size: int = Field(16, gt=0)
    # How long a batch waits for more requests once one arrives. On 2 CPU cores 0.01 s fired before the
    # replica had parsed the next requests (mean batch 3.5 of 16 at 32 clients); 0.05 s gave 15.3.
    batch_wait_timeout_s: float = Field(0.05, ge=0)
    max_n: int = Field(8, gt=0)  # completions per prompt
    max_prompts: int = Field(32, gt=0)  # prompts per request
    max_ongoing_requests: int = Field(64, gt=0)  # per replica; beyond it requests queue
    max_queued_requests: int = Field(256, ge=-1)  # beyond it: 503 at once (-1: unbounded)
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig)
    num_cpus: float = Field(1.0, ge=0)  # per replica
    num_gpus: float = Field(0.0, ge=0)
    torch_threads: int | None = Field(None, gt=0)  # None: one per CPU the replica holds
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    compile: bool = False  # torch.compile the model's blocks (worth it on GPUs, for long jobs)
