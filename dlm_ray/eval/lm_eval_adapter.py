"""EleutherAI's lm-evaluation-harness for any checkpoint we load (the ``[eval]`` extra).

``DlmRayLM`` is an ``lm_eval`` model (a ``TemplateLM``), registered as ``dlm_ray``, that evaluates
as LLaDA's own evaluation does:

- ``loglikelihood(context, continuation)``: text is split as lm-eval's Hugging Face models split it
  (the harness's own ``_encode_pair``: the context's trailing whitespace belongs to the
  continuation, so a byte-level BPE scores " Paris" as one word, not a lone space then "Paris").
  log p(continuation | context) is the Monte Carlo ELBO over the continuation alone
  (``likelihood.estimate_nelbo(maskable=...)``, ``mc_samples`` draws, 128 by default as LLaDA's),
  a lower bound on the log-likelihood. ``is_greedy`` is LLaDA's suffix greedy decoding: the
  continuation's positions all masked, then filled one per step, the most confident first (our
  ``generate`` at temperature 0 with as many steps as tokens), and compared with the continuation.
  An autoregressive model gives its exact log-likelihood and its greedy decoding; a block diffusion
  model its block bound and its own block-by-block decoding. ``check_greedy=False`` skips the
  decoding (``is_greedy`` is then False), as LLaDA's evaluation allows: multiple-choice
  accuracy never reads it, and it costs a model call per continuation token.
- ``loglikelihood_rolling(text)``: the same bound over a whole text, in the harness's rolling
  windows (``lm_eval.utils.get_rolling_token_windows``, made disjoint): each window's tokens are
  scored given the tokens before them that fit in the model's context, the first window given EOS.
- ``generate_until(context, gen_kwargs)``: our sampler (``sample``, the model's own kind applied),
  ``max_gen_toks`` rounded up to whole blocks, cut at the first ``until`` string.

Contexts are preceded by EOS, the separator the model saw between documents in training. Requests
are scored in batches of ``batch_size``; a seed makes the Monte Carlo estimates reproducible.

    python jobs/evaluate.py --checkpoint runs/tiny/export --tasks arc_easy,hellaswag
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from dlm_ray.core.batching import generate_many
from dlm_ray.io.checkpoint import inference_placement, load_inference
from dlm_ray.config.schema import SampleConfig
from dlm_ray.core.likelihood import estimate_nelbo
from dlm_ray.core.inference import complete_ids
from dlm_ray.core.kinds import kind_of

MC_SAMPLES = 128  # LLaDA's evaluation default (mc_num)
Pair = tuple[list[int], list[int]]  # (context ids, EOS first; continuation ids)


def _flag(value: bool | str) -> bool:
    """A yes/no setting that may arrive as text (lm-eval's --model_args)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(f"DlmRayLM: expected true or false, got {value!r}")
    return text in ("true", "1", "yes")


@register_model("dlm_ray")
class DlmRayLM(TemplateLM):
    """lm-eval's model interface over a checkpoint directory (ours, or LLaDA's)."""

    def __init__(self, checkpoint: str, *, device: str = "cpu", dtype: str = "auto", mc_samples: int = MC_SAMPLES,
                 batch_size: int = 16, seed: int = 0, sample: SampleConfig | dict[str, Any] | None = None,
                 threads: int | str | None = None, check_greedy: bool | str = True) -> None:
        super().__init__()
        # Values may arrive as text (lm-eval's --model_args): numbers are converted here.
        threads = int(threads) if threads else torch.get_num_threads()
        place, torch_dtype = inference_placement(device.startswith("cuda"), dtype, threads)
        self.model, self.tok, self.meta = load_inference(checkpoint, device=place, dtype=torch_dtype)
        self.place = place  # lm-eval's LM has a read-only "device"
        self.mc_samples, self.batch_size, self.seed = int(mc_samples), int(batch_size), int(seed)
        self.check_greedy = _flag(check_greedy)
        self.sample = sample if isinstance(sample, SampleConfig) else SampleConfig.model_validate(sample or {})
        self.max_len = self.model.max_seq_len
        self.kind = kind_of(self.model.config)
        self.pad_to = self.kind.block_size or 1

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> DlmRayLM:
        """``checkpoint=DIR,mc_samples=64,batch_size=8`` from lm-eval's ``--model_args``."""
        kwargs: dict[str, Any] = {}
        for part in filter(None, arg_string.split(",")):
            key, _, value = part.partition("=")
            kwargs[key.strip()] = value.strip()
        extra = {k: v for k, v in (additional_config or {}).items() if k in ("batch_size", "device") and v is not None}
        return cls(**{**kwargs, **extra})

    # ------------------------------------------------------------------------------- encoding
    # TemplateLM's loglikelihood splits each (context, continuation) with these, as lm-eval's
    # Hugging Face models do, and hands the ids to _loglikelihood_tokens.

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tok.encode(string)

    def _fit(self, context: list[int], continuation: list[int]) -> Pair:
        """EOS before the context; a long context loses its start, as lm-eval's models do."""
        keep = self.max_len - len(continuation)
        if keep < 1:
            raise ValueError(f"the continuation is {len(continuation)} tokens, over the model's context of "
                             f"{self.max_len}")
        return [self.tok.eos_id, *context][-keep:], continuation

    # ---------------------------------------------------------------------------- likelihoods

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """(log-likelihood, is_greedy) per ((context, continuation), context ids, continuation ids).
        An empty context arrives as EOS alone (TemplateLM's prefix token), so it gets no second one."""
        pairs = []
        for (context, continuation), ctx, cont in requests:
            if not cont:
                raise ValueError(f"the continuation {continuation!r} encodes to no tokens")
            pairs.append(self._fit(ctx if context else ctx[1:], cont))
        greedy = self._greedy(pairs) if self.check_greedy else [False] * len(pairs)
        return list(zip(self._score(pairs), greedy))

    @torch.no_grad()
    def _score(self, pairs: Sequence[Pair]) -> list[float]:
        """Log-likelihood bound of each continuation given its context (the Monte Carlo ELBO)."""
        out: list[float] = []
        gen = torch.Generator(device=self.place).manual_seed(self.seed)
        for k in range(0, len(pairs), self.batch_size):
            chunk = pairs[k:k + self.batch_size]
            width = max(len(c) + len(a) for c, a in chunk)
            width = -(-width // self.pad_to) * self.pad_to
            ids = torch.full((len(chunk), width), self.tok.pad_id, dtype=torch.long)
            real = torch.zeros_like(ids, dtype=torch.bool)
            answer = torch.zeros_like(real)
            for r, (c, a) in enumerate(chunk):
                ids[r, :len(c) + len(a)] = torch.tensor(c + a)
                real[r, :len(c) + len(a)] = True
                answer[r, len(c):len(c) + len(a)] = True
            ids, real, answer = ids.to(self.place), real.to(self.place), answer.to(self.place)
            nelbo = estimate_nelbo(self.model, ids, mask_id=self.tok.mask_id, num_samples=self.mc_samples,
                                   attention_mask=real.long(), generator=gen, maskable=answer)
            out += [-float(v) * int(n) for v, n in zip(nelbo, answer.sum(-1))]
        return out

    def _greedy(self, pairs: Sequence[Pair]) -> list[bool]:
        """LLaDA's suffix greedy decoding: does the model, filling the continuation's masks one per
        step (most confident first, temperature 0), write exactly the continuation? The model's
        kind applies (``kind.resolve``): an autoregressive model decodes left to right, a block model
        block by block. Proposals range over the model's whole head, as LLaDA's do: nothing here is
        decoded to text, and an id past the tokenizer's is simply not the continuation."""
        settings, prompts = [], []
        for ctx, cont in pairs:
            n = len(cont)
            sc = self.kind.resolve(SampleConfig(gen_length=n, block_length=n, steps=n, temperature=0.0,
                                                             remasking="low_confidence"))
            keep = self.max_len - sc.gen_length  # a block model rounds n up to whole blocks
            if keep < 1:
                raise ValueError(f"is_greedy: a continuation of {n} tokens is decoded in {sc.gen_length} positions, "
                                 f"which leave no room for its context in the model's {self.max_len}")
            settings.append(sc)
            prompts.append(ctx[-keep:])
        rows = generate_many(self.model, prompts, settings, seeds=[self.seed] * len(pairs), batch_size=self.batch_size,
                             pad_id=self.tok.pad_id, mask_id=self.tok.mask_id, eos_id=self.tok.eos_id,
                             device=self.place, end_ids=self.tok.end_ids)
        return [gen[:len(cont)] == cont for (gen, _), (_, cont) in zip(rows, pairs)]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """The whole text's bound, window by window as lm-eval's Hugging Face models cut it. A window
        is scored as context + continuation, so the harness's window length is one under ours."""
        out = []
        for req in requests:
            # The first window's context is EOS (the prefix token), a later one's the tokens before it.
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(req.args[0]), prefix_token=self.tok.eos_id, max_seq_len=self.max_len - 1,
                context_len=1)]
            out.append(float(sum(self._score(windows))))
        return out

    # ----------------------------------------------------------------------------- generation

    def _sample_for(self, max_gen_toks: int, temperature: float) -> SampleConfig:
        base = self.sample
        block = min(base.block_length, max_gen_toks)
        gen = -(-max_gen_toks // block) * block
        per_step = max(1, round(base.gen_length / base.steps))  # the configured tokens per step
        steps = max(1, block // per_step) * (gen // block)
        sc = base.model_copy(update={"gen_length": gen, "block_length": block, "steps": steps,
                                     "temperature": temperature, "stop_at_eos": True})
        return self.kind.resolve(SampleConfig.model_validate(sc.model_dump()))

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Requests with equal settings share batched ``generate`` calls; each row keeps its own seed."""
        out = [""] * len(requests)
        groups: dict[str, list[tuple[int, list[int], list[str]]]] = {}
        settings: dict[str, SampleConfig] = {}
        for k, req in enumerate(requests):
            context, kwargs = req.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            sc = self._sample_for(int(kwargs.get("max_gen_toks", self.sample.gen_length)), temperature)
            ctx = [self.tok.eos_id, *self.tok.encode(context)][-(self.max_len - sc.gen_length):]
            key = sc.model_dump_json()
            settings[key] = sc
            groups.setdefault(key, []).append((k, ctx, until))
        for key, rows in groups.items():
            comps = complete_ids(self.model, self.tok, [ctx for _, ctx, _ in rows], settings[key],
                                 [self.seed + k for k, _, _ in rows], batch_size=self.batch_size, device=self.place)
            for (k, _, until), comp in zip(rows, comps):
                cuts = [comp.text.index(u) for u in until if u and u in comp.text]
                out[k] = comp.text[:min(cuts)] if cuts else comp.text
        return out
