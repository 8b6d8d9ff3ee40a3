"""The lm-evaluation-harness adapter, through the harness itself, on tasks the test writes as local
JSON (no downloads): multiple choice by likelihood, and generation until a stop string."""

from __future__ import annotations

import json

import pytest
import torch

from dlm_ray.checkpoint import load_inference, save_inference
from dlm_ray.config import ModelConfig, SampleConfig
from dlm_ray.diffusion import estimate_nelbo
from dlm_ray.inference import complete_ids
from dlm_ray.model import Denoiser

pytestmark = pytest.mark.slow  # the harness's imports and its dataset loading take a while

CHOICES = [("s31=", ["13", "31", "11"], 0), ("r42=", ["24", "42", "44"], 0), ("s951=", ["159", "915", "555"], 0),
           ("r87=", ["78", "87", "77"], 0), ("s22=", ["22", "12", "21"], 0), ("r123=", ["321", "123", "312"], 0)]
PROMPTS = ["s31=", "r42=", "s951=", "r87=", "s22=", "r123="]


def write_tasks(root, gen_targets: list[str]) -> None:
    data = root / "data"
    data.mkdir(parents=True)
    (data / "mc.jsonl").write_text("".join(json.dumps({"q": q, "choices": c, "label": lab}) + "\n"
                                           for q, c, lab in CHOICES))
    (data / "gen.jsonl").write_text("".join(json.dumps({"q": q, "answer": a}) + "\n"
                                            for q, a in zip(PROMPTS, gen_targets)))
    for name, body in {
        "tiny_mc": f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{q}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
""",
        "tiny_gen": f"""task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data / 'gen.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "{{{{q}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
metric_list:
  - metric: exact_match
""",
    }.items():
        (root / f"{name}.yaml").write_text(body)


def test_the_harness_scores_choices_and_generations_as_we_do(tmp_path, tiny_cfg, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from dlm_ray.lm_eval_adapter import DlmRayLM

    torch.manual_seed(0)
    ar = save_inference(Denoiser(ModelConfig.model_validate({**tiny_cfg.model_dump(), "attention": "causal",
                                                             "init_std": 0.2})).eval(), {"kind": "byte"}, tmp_path / "ar")
    model, tok, _ = load_inference(ar)
    sample = SampleConfig(gen_length=8, steps=8, block_length=8, stop_at_eos=True)
    # Generation targets: what the model itself writes for half the prompts, something else for the rest.
    own = [c.text.split("\n")[0] for c in complete_ids(model, tok, [[tok.eos_id, *tok.encode(p)] for p in PROMPTS],
                                                         sample, list(range(len(PROMPTS))))]
    targets = [t if k % 2 == 0 else t + "x" for k, t in enumerate(own)]
    write_tasks(tmp_path / "tasks", targets)

    # Exact log-likelihoods of each choice, computed here from the logits.
    @torch.no_grad()
    def loglik(prompt: str, choice: str) -> float:
        ids = torch.tensor([[tok.eos_id, *tok.encode(prompt + choice)]])
        logits = model(ids)[0, :-1].index_fill(-1, torch.tensor([tok.mask_id]), float("-inf"))
        logp = logits.log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
        return float(logp[-len(tok.encode(choice)):].sum())

    want_acc = sum(max(range(3), key=lambda j: loglik(q, c[j])) == lab for q, c, lab in CHOICES) / len(CHOICES)
    lm = DlmRayLM(str(ar), mc_samples=4, batch_size=4, sample={"gen_length": 8, "steps": 8, "block_length": 8})
    out = simple_evaluate(model=lm, tasks=["tiny_mc", "tiny_gen"], log_samples=False,
                          task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False))
    assert 0 < want_acc < 1  # neither all right nor all wrong: a mismatch would show
    assert out["results"]["tiny_mc"]["acc,none"] == pytest.approx(want_acc)
    assert out["results"]["tiny_gen"]["exact_match,none"] == pytest.approx(0.5)


def test_a_diffusion_likelihood_is_the_monte_carlo_elbo_of_the_continuation(tmp_path, tiny_cfg):
    from dlm_ray.lm_eval_adapter import DlmRayLM

    torch.manual_seed(0)
    ckpt = save_inference(Denoiser(tiny_cfg).eval(), {"kind": "byte"}, tmp_path / "mdm")
    lm = DlmRayLM(str(ckpt), mc_samples=8, batch_size=1, seed=5)

    class Req:
        def __init__(self, *args):
            self.args = args

    (ll, greedy), = lm.loglikelihood([Req("s31=", "13")])
    ids = torch.tensor([[lm.tok.eos_id, *lm.tok.encode("s31=13")]])
    answer = torch.zeros_like(ids, dtype=torch.bool)
    answer[0, -2:] = True
    nelbo = estimate_nelbo(lm.model, ids, mask_id=lm.tok.mask_id, num_samples=8, attention_mask=torch.ones_like(ids),
                           generator=torch.Generator().manual_seed(5), maskable=answer)
    assert ll == pytest.approx(-2 * float(nelbo[0]), rel=1e-5) and ll < 0
    # is_greedy: one pass with the continuation masked predicts it.
    logits = lm.model(ids.masked_fill(answer, lm.tok.mask_id))[0, -2:]
    logits[:, lm.tok.mask_id] = float("-inf")
    assert greedy == bool((logits.argmax(-1) == ids[0, -2:]).all())
    with pytest.raises(ValueError, match="encodes to no tokens"):
        lm.loglikelihood([Req("s31=", "")])
