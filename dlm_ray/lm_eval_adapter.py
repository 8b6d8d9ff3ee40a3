"""EleutherAI's lm-evaluation-harness for any checkpoint we load (the ``[eval]`` extra).

``DlmRayLM`` is an ``lm_eval`` model, registered as ``dlm_ray``:

- ``loglikelihood(context, continuation)``: log p(continuation | context) as LLaDA evaluates it, by
  the Monte Carlo ELBO over the continuation alone (``diffusion.estimate_nelbo(maskable=...)``,
  ``mc_samples`` draws): a lower bound on the log-likelihood. ``is_greedy`` is whether one pass with
  the whole continuation masked predicts every token of it. An autoregressive model gives its exact
  log-likelihood and the usual greedy check; a block diffusion model its block bound.
- ``loglikelihood_rolling(text)``: the same for a whole text after the document separator (EOS),
  in windows of the model's context.
- ``generate_until(context, gen_kwargs)``: our sampler (``sample``, the model's own kind applied),
  ``max_gen_toks`` rounded up to whole blocks, cut at the first ``until`` string.

Contexts are preceded by EOS, the separator the model saw between documents in training. Requests
are scored in batches of ``batch_size``; a seed makes the Monte Carlo estimates reproducible.

    python jobs/evaluate.py --checkpoint runs/tiny/export --tasks arc_easy,hellaswag
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from dlm_ray.checkpoint import inference_placement, load_inference
from dlm_ray.config import SampleConfig
from dlm_ray.diffusion import estimate_nelbo
from dlm_ray.inference import complete_ids, sampler_for


@register_model("dlm_ray")
class DlmRayLM(LM):
    """lm-eval's model interface over a checkpoint directory (ours, or LLaDA's)."""

    def __init__(self, checkpoint: str, *, device: str = "cpu", dtype: str = "auto", mc_samples: int = 32,
                 batch_size: int = 16, seed: int = 0, sample: SampleConfig | dict[str, Any] | None = None,
                 threads: int | str | None = None) -> None:
        super().__init__()
        # Values may arrive as text (lm-eval's --model_args): numbers are converted here.
        threads = int(threads) if threads else torch.get_num_threads()
        place, torch_dtype = inference_placement(device.startswith("cuda"), dtype, threads)
        self.model, self.tok, self.meta = load_inference(checkpoint, device=place, dtype=torch_dtype)
        self.place = place  # lm-eval's LM has a read-only "device"
        self.mc_samples, self.batch_size, self.seed = int(mc_samples), int(batch_size), int(seed)
        self.sample = sample if isinstance(sample, SampleConfig) else SampleConfig.model_validate(sample or {})
        self.max_len = self.model.max_seq_len
        self.pad_to = self.model.config.block_size if self.model.config.attention == "block_causal" else 1

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

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context ids (EOS first) and continuation ids, split as the whole text tokenizes."""
        ctx = self.tok.encode(context)
        whole = self.tok.encode(context + continuation)
        cont = whole[len(ctx):] if whole[:len(ctx)] == ctx else self.tok.encode(continuation)
        if not cont:
            raise ValueError(f"the continuation {continuation!r} encodes to no tokens")
        ctx = [self.tok.eos_id, *ctx]
        keep = self.max_len - len(cont)
        if keep < 1:
            raise ValueError(f"the continuation is {len(cont)} tokens, over the model's context of {self.max_len}")
        return ctx[-keep:], cont  # a long context loses its start, as lm-eval's models do

    # ---------------------------------------------------------------------------- likelihoods

    @torch.no_grad()
    def _score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        out: list[tuple[float, bool]] = []
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
            am = real.long()
            nelbo = estimate_nelbo(self.model, ids, mask_id=self.tok.mask_id, num_samples=self.mc_samples,
                                   attention_mask=am, generator=gen, maskable=answer)
            greedy = self._greedy(ids, am, answer)
            n = answer.sum(-1)
            out += [(-float(v) * int(m), bool(g)) for v, m, g in zip(nelbo, n, greedy)]
        return out

    def _greedy(self, ids: torch.Tensor, am: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
        """Bool [B]: the model's most likely token is the continuation's at every position of it."""
        kind = self.model.config.attention
        if kind == "causal":
            pred = self.model(ids, am)[:, :-1].argmax(-1)
            return ((pred == ids[:, 1:]) | ~answer[:, 1:]).all(-1)
        noisy = ids.masked_fill(answer, self.tok.mask_id)
        extra = {"clean_ids": ids} if kind == "block_causal" else {}
        logits = self.model(noisy, am, **extra)
        logits[..., self.tok.mask_id] = float("-inf")
        return ((logits.argmax(-1) == ids) | ~answer).all(-1)

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self._score([self._pair(*req.args) for req in requests])

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            ids = self.tok.encode(req.args[0])
            if not ids:
                out.append(0.0)
                continue
            span = self.max_len - 1
            windows = [([self.tok.eos_id], ids[i:i + span]) for i in range(0, len(ids), span)]
            out.append(sum(ll for ll, _ in self._score(windows)))
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
        return sampler_for(self.model.config, SampleConfig.model_validate(sc.model_dump()))

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
