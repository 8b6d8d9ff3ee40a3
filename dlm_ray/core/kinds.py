"""What each kind of model is and can do, decided in one place.

A model's kind follows from its attention (``ModelConfig.attention``):

    full          masked diffusion (LLaDA): every position sees every other
    block_causal  block diffusion (BD3-LM): a position sees its own block and the blocks before it
    causal        the autoregressive baseline: position i sees positions <= i and predicts i + 1

and, with ``ModelConfig.noise: gaussian`` (full attention), embedding diffusion: Gaussian noise
on the token embeddings, an ODE to sample (``embedding_diffusion``).

A ``ModelKind`` holds everything that differs between them: the training loss on a batch of the
data pipeline, the likelihood bound, how a sampling request resolves (``resolve``) and runs
(``generate``), what a request may ask of it (infilling, caches, guidance), what the data pipeline
must do for it (masking, block-wise noise), its FLOPs per trained token and its export
``model_type``. Training, generation, Serve and evaluation resolve the kind once (``kind_of``) and
ask it; nothing else branches on the attention. Model callables without a config (test stubs) are
full-attention models.

Shape legend:  B batch, L sequence length, V vocab, P prompt length.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from dlm_ray.config.schema import ModelConfig, SampleConfig
from dlm_ray.core import autoregressive, denoise, diffusion, embedding_diffusion
from dlm_ray.core.model import flops_per_token

Batch = dict[str, torch.Tensor]


class ModelKind:
    """Masked diffusion with full attention (LLaDA's): the base every kind starts from."""

    attention = "full"
    noun = "a full-attention"  # "<noun> model" in messages
    model_type = "llada"  # config.json of an export: LLaDA's own type, loadable by LLaDA's tools
    masked_training = True  # the data pipeline applies the forward process to training rows
    can_infill = True  # every position sees what follows it
    reads_given = False  # the loss reads the pipeline's ``given`` (prompt) positions itself
    caches: tuple[str, ...] = ("none", "prefix", "dual")

    def __init__(self, config: ModelConfig | None = None) -> None:
        self.config = config

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.attention})"

    @property
    def block_size(self) -> int | None:
        """Blocks the data pipeline noises one by one (block diffusion), else None."""
        return None

    # ------------------------------------------------------------------------------- training

    def loss(self, model: Any, batch: Batch, *, mask_id: int, cap_weight: float = 0.0,
             figures: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The step's loss on a batch of the pipeline: the 1/t-weighted masked cross-entropy over the
        real tokens. Fine-tuning rows (LLaDA) score their answer only, each over its length. With
        ``cap_weight`` > 0 the objective adds that times ``diffusion.cap_term`` (confidence-aware
        training); ``figures``, if given, receives the bound alone ("loss") and the term ("cap_entropy")."""
        x0, am = batch["input_ids"].long(), batch["attention_mask"].long()
        logits = model(batch["noisy_ids"].long(), am, **self._clean(x0))
        weight, n = _row_weights(batch, denominator=am.sum().clamp_min(1))
        bound = diffusion.diffusion_loss(logits, x0, batch["loss_mask"], batch["p_mask"], n, mask_id=mask_id,
                                         row_weight_B=weight)
        if figures is not None:
            figures["loss"] = bound
        if not cap_weight:
            return bound  # the bound itself: no term computed, the plain objective bit for bit
        cap = diffusion.cap_term(logits, x0, batch["loss_mask"], n, mask_id=mask_id, row_weight_B=weight)
        if figures is not None:
            figures["cap_entropy"] = cap
        return bound + cap_weight * cap

    def _clean(self, x0_BL: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per trained token (forward and backward)."""
        return flops_per_token(self.config, seq_len)

    # ----------------------------------------------------------------------------- likelihood

    def nelbo(self, model: Any, input_ids_BL: torch.Tensor, *, mask_id: int, num_samples: int,
              attention_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
              maskable: torch.Tensor | None = None) -> torch.Tensor:
        """The negative ELBO in nats per scored token, per row [B]."""
        return diffusion.masked_nelbo(model, input_ids_BL, mask_id=mask_id, num_samples=num_samples,
                                      attention_mask=attention_mask, generator=generator, maskable=maskable)

    # ------------------------------------------------------------------------------- sampling

    def resolve(self, cfg: SampleConfig) -> SampleConfig:
        """``cfg`` as this kind runs it; a setting it cannot use is refused by name (ValueError)."""
        if cfg.cache not in self.caches:
            raise ValueError(f"cache={cfg.cache!r} needs a block-causal model (model.attention: block_causal); "
                             f"{self.noun} model uses {' or '.join(repr(c) for c in self.caches)}")
        return cfg

    def probe(self, model: Any, ids_BL: torch.Tensor) -> torch.Tensor:
        """Logits of one plain call on ``ids_BL``: whether the model answers at all (Serve's health
        check)."""
        return model(ids_BL)

    def check_infill(self) -> None:
        if not self.can_infill:
            raise ValueError(f"infilling needs a full-attention model: {self.noun} model never sees what comes "
                             "after the position it writes")

    def check(self, cfg: SampleConfig) -> None:
        """Refuse settings this kind cannot run as given (``generate`` runs what it is handed;
        ``resolve`` is what adapts a request)."""
        if cfg.cache not in self.caches:
            self.resolve(cfg)

    def generate(self, model: Any, prompt_ids_BP: torch.Tensor, cfg: SampleConfig, **kwargs: Any) -> torch.Tensor:
        """This kind's sampler, with ``sampling.generate``'s arguments and result."""
        if kwargs.get("suffix_ids") is not None:
            self.check_infill()
        self.check(cfg)
        return denoise.generate(model, prompt_ids_BP, cfg, **kwargs)

    def _run_own_sampler(self, sampler: Any, model: Any, prompt_ids_BP: torch.Tensor, cfg: SampleConfig, *,
                         mask_id: int, attention_mask: torch.Tensor | None = None, generator: Any = None,
                         eos_id: int | None = None, max_length: int | None = None, on_step: Any = None,
                         stats: dict[str, int] | None = None, vocab_size: int | None = None,
                         end_ids: Sequence[int] | None = None, suffix_ids: torch.Tensor | None = None,
                         suffix_mask: torch.Tensor | None = None) -> torch.Tensor:
        """A kind's own sampler (not the unmasking engine) behind the front door's checks: the
        request's prompt, settings, end tokens, callback and counters handed on."""
        if suffix_ids is not None:
            self.check_infill()
        self.check(cfg)
        denoise.check_request(model, prompt_ids_BP, cfg, mask_id=mask_id, attention_mask=attention_mask,
                              max_length=max_length, eos_id=eos_id)
        return sampler(model, prompt_ids_BP, cfg, mask_id=mask_id, attention_mask=attention_mask, generator=generator,
                       ends=denoise.end_tokens(eos_id, end_ids, prompt_ids_BP.device), eos_id=eos_id,
                       vocab_size=vocab_size, on_step=on_step, stats=stats)


class BlockDiffusion(ModelKind):
    """Block diffusion (BD3-LM): each block is noised at its own level, the noisy and clean rows run
    in one forward; sampling runs block by block against an exact cache of the finished blocks."""

    attention = "block_causal"
    noun = "a block-causal"
    model_type = "dlm_ray_block_diffusion"
    can_infill = False
    caches = ("none", "blocks")

    @property
    def block_size(self) -> int | None:
        return self.config.block_size if self.config is not None else None

    def _clean(self, x0_BL: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"clean_ids": x0_BL}

    def flops_per_token(self, seq_len: int) -> float:
        """The blocks run the noisy and the clean copy together (twice the tokens, over a sequence
        twice as long); only the noisy copy reaches the LM head."""
        head = 6.0 * self.config.d_model * self.config.vocab_size
        return 2 * (flops_per_token(self.config, 2 * seq_len) - head) + head

    def nelbo(self, model: Any, input_ids_BL: torch.Tensor, *, mask_id: int, num_samples: int,
              attention_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
              maskable: torch.Tensor | None = None) -> torch.Tensor:
        return diffusion.block_nelbo(model, input_ids_BL, block_size=self.config.block_size, mask_id=mask_id,
                                     num_samples=num_samples, attention_mask=attention_mask, generator=generator,
                                     maskable=maskable)

    def resolve(self, cfg: SampleConfig) -> SampleConfig:
        """The model's own blocks (the length rounded up to whole blocks, about the same tokens per
        step) with its exact cache; guidance needs a second, uncached pass."""
        if cfg.cache in ("prefix", "dual"):
            raise ValueError(f"cache={cfg.cache!r} is for full-attention models; this block-causal model uses its "
                             "exact block cache")
        size = self.config.block_size
        gen = -(-cfg.gen_length // size) * size
        per_step = max(1, round(cfg.gen_length / cfg.steps))
        steps = max(1, size // per_step) * (gen // size)
        cache = "none" if cfg.cfg_scale else "blocks"
        return cfg.model_copy(update={"gen_length": gen, "block_length": size, "steps": steps, "cache": cache,
                                      "refresh_every": None})

    def check(self, cfg: SampleConfig) -> None:
        size = self.config.block_size
        if cfg.block_length != size:
            raise ValueError(f"a block-causal model samples in its own blocks: block_length must be {size}, "
                             f"got {cfg.block_length}")
        if cfg.cache in ("prefix", "dual"):
            raise ValueError(f"cache={cfg.cache!r} is for full-attention models; a block-causal model's cache "
                             "is cache='blocks' (exact)")


class Autoregressive(ModelKind):
    """The autoregressive baseline: next-token loss on clean rows, exact likelihood, one token per
    call against a KV cache."""

    attention = "causal"
    noun = "an autoregressive"
    model_type = "dlm_ray_autoregressive"
    masked_training = False
    can_infill = False
    caches = ("none",)

    def loss(self, model: Any, batch: Batch, *, mask_id: int, cap_weight: float = 0.0,
             figures: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        if cap_weight:
            raise ValueError("diffusion.cap_weight is for diffusion models: an autoregressive model has no masked "
                             "positions to make confident")
        x0, am = batch["input_ids"].long(), batch["attention_mask"].long()
        answer = None
        if "answer_len" in batch:  # fine-tuning: the answer's tokens only
            answer = torch.arange(x0.shape[1], device=x0.device)[None, :] >= batch["prompt_len"][:, None]
        weight, n = _row_weights(batch, denominator=(am[:, :-1] & am[:, 1:]).sum().clamp_min(1))
        return autoregressive.next_token_loss(model(x0, am), x0, am, n, mask_id=mask_id, maskable_BL=answer,
                                              row_weight_B=weight)

    def nelbo(self, model: Any, input_ids_BL: torch.Tensor, *, mask_id: int, num_samples: int,
              attention_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
              maskable: torch.Tensor | None = None) -> torch.Tensor:
        """The exact NLL (a row's first token, with no context, is not scored)."""
        return autoregressive.nll_per_token(model, input_ids_BL, mask_id=mask_id, attention_mask=attention_mask,
                                            maskable=maskable)

    def resolve(self, cfg: SampleConfig) -> SampleConfig:
        autoregressive.check_settings(cfg)
        return cfg.model_copy(update={"steps": cfg.gen_length, "block_length": cfg.gen_length, "refresh_every": None})

    def check(self, cfg: SampleConfig) -> None:
        autoregressive.check_settings(cfg)

    def generate(self, model: Any, prompt_ids_BP: torch.Tensor, cfg: SampleConfig, **kwargs: Any) -> torch.Tensor:
        return self._run_own_sampler(autoregressive.generate_ar, model, prompt_ids_BP, cfg, **kwargs)


class EmbeddingDiffusion(ModelKind):
    """Embedding diffusion (``noise: gaussian``): the clean tokens' embeddings noised along the flow
    line, a cross-entropy loss with self-conditioning, VDM's bound, and an ODE sampler over the whole
    answer (``embedding_diffusion``)."""

    noun = "an embedding-diffusion"
    model_type = "dlm_ray_embedding_diffusion"
    masked_training = False  # the noise is drawn in the loss: it needs the model's own embeddings
    reads_given = True  # a conditional document's prompt stays clean
    can_infill = False
    caches = ("none",)

    def loss(self, model: Any, batch: Batch, *, mask_id: int, cap_weight: float = 0.0,
             figures: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        if cap_weight:
            raise ValueError("diffusion.cap_weight is for masked diffusion: an embedding-diffusion model has no "
                             "masked positions to make confident")
        x0, am = batch["input_ids"].long(), batch["attention_mask"].long()
        noised = embedding_diffusion.noised_positions(batch)
        noise = embedding_diffusion.training_inputs(noised, d_model=self.config.d_model,
                                                    time_shift=self.config.gaussian_time_shift)
        weight, n = _row_weights(batch, denominator=noised.sum().clamp_min(1))
        return embedding_diffusion.token_loss(model(x0, am, **noise), x0, noised, n, mask_id=mask_id,
                                              row_weight_B=weight)

    def flops_per_token(self, seq_len: int) -> float:
        """Every step also runs the self-conditioning pass without gradients: one more forward."""
        return flops_per_token(self.config, seq_len) * 4 / 3

    def nelbo(self, model: Any, input_ids_BL: torch.Tensor, *, mask_id: int, num_samples: int,
              attention_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
              maskable: torch.Tensor | None = None) -> torch.Tensor:
        return embedding_diffusion.gaussian_nelbo(model, input_ids_BL, mask_id=mask_id, num_samples=num_samples,
                                                  attention_mask=attention_mask, generator=generator,
                                                  maskable=maskable)

    def resolve(self, cfg: SampleConfig) -> SampleConfig:
        """The whole answer as one block; the steps are the ODE's (model calls), as given."""
        resolved = cfg.model_copy(update={"block_length": cfg.gen_length})
        embedding_diffusion.check_settings(resolved)
        return resolved

    def check(self, cfg: SampleConfig) -> None:
        embedding_diffusion.check_settings(cfg)

    def probe(self, model: Any, ids_BL: torch.Tensor) -> torch.Tensor:
        """The first call of a sampler: the given ids as positions at pure noise."""
        z_BLD = torch.zeros(*ids_BL.shape, self.config.d_model, device=ids_BL.device)
        return model(ids_BL, None, noise_level=torch.zeros(ids_BL.shape, device=ids_BL.device), latent=z_BLD)

    def check_infill(self) -> None:
        raise ValueError(f"infilling is not built for {self.noun} model: its sampler fills the positions after the "
                         "prompt")

    def generate(self, model: Any, prompt_ids_BP: torch.Tensor, cfg: SampleConfig, **kwargs: Any) -> torch.Tensor:
        return self._run_own_sampler(embedding_diffusion.generate_embedding, model, prompt_ids_BP, cfg, **kwargs)


KINDS: dict[str, type[ModelKind]] = {k.attention: k for k in (ModelKind, BlockDiffusion, Autoregressive)}
MODEL_TYPES = {k.model_type: k.attention for k in (*KINDS.values(), EmbeddingDiffusion)}


def kind_of(config: ModelConfig | None) -> ModelKind:
    """The kind of a model of this shape (None: a full-attention model)."""
    if config is not None and config.noise == "gaussian":
        return EmbeddingDiffusion(config)
    attention = "full" if config is None else config.attention
    return KINDS[attention](config)


def kind_of_model(model: Any) -> ModelKind:
    """The kind of a model in hand: from its config (a ``Denoiser``), else full attention."""
    return kind_of(getattr(model, "config", None))


def _row_weights(batch: Batch, *, denominator: torch.Tensor) -> tuple[torch.Tensor | None, Any]:
    """(per-row weights, denominator) of the loss: fine-tuning rows (``answer_len``) each count over
    their answer's length and then equally; pretraining rows over ``denominator`` tokens."""
    if "answer_len" in batch:
        return 1.0 / batch["answer_len"].float(), len(batch["answer_len"])
    return None, denominator
