"""The lm-evaluation-harness adapter, through the harness itself, on tasks the test writes as local
JSON (no downloads): multiple choice by likelihood, and generation until a stop string. Then each
point where it follows LLaDA's evaluation or lm-eval's conventions, against a reference: LLaDA's
suffix greedy decoding (transcribed below), lm-eval's own split of a (context, continuation) pair
over a real byte-level BPE, its rolling windows, and LLaDA's number of Monte Carlo draws."""

from __future__ import annotations

import importlib.util
import inspect
import json
import string
from pathlib import Path

import pytest
import torch

from dlm_ray.io.checkpoint import load_inference, save_inference
from dlm_ray.config.schema import ModelConfig, SampleConfig
from dlm_ray.core.likelihood import estimate_nelbo
from dlm_ray.core.inference import complete_ids
from dlm_ray.core.model import Denoiser

pytestmark = pytest.mark.slow  # the harness's imports and its dataset loading take a while


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models here are tiny: one thread runs them best, and more threads only wait on each other
    on a busy machine. The adapter keeps the count it finds (its ``threads`` default)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

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

    from dlm_ray.eval.lm_eval_adapter import DlmRayLM

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


class Req:
    """A request as the harness hands it over: its arguments."""

    def __init__(self, *args):
        self.args = args


def test_a_diffusion_likelihood_is_the_monte_carlo_elbo_of_the_continuation(tmp_path, tiny_cfg):
    from dlm_ray.eval.lm_eval_adapter import DlmRayLM

    torch.manual_seed(0)
    ckpt = save_inference(Denoiser(tiny_cfg).eval(), {"kind": "byte"}, tmp_path / "mdm")
    lm = DlmRayLM(str(ckpt), mc_samples=8, batch_size=1, seed=5)
    (ll, _), = lm.loglikelihood([Req("s31=", "13")])
    ids = torch.tensor([[lm.tok.eos_id, *lm.tok.encode("s31=13")]])
    answer = torch.zeros_like(ids, dtype=torch.bool)
    answer[0, -2:] = True
    nelbo = estimate_nelbo(lm.model, ids, mask_id=lm.tok.mask_id, num_samples=8, attention_mask=torch.ones_like(ids),
                           generator=torch.Generator().manual_seed(5), maskable=answer)
    assert ll == pytest.approx(-2 * float(nelbo[0]), rel=1e-5) and ll < 0
    with pytest.raises(ValueError, match="encodes to no tokens"):
        lm.loglikelihood([Req("s31=", "")])


# ------------------------------------------------------------------------------------- is_greedy

@torch.no_grad()
def llada_suffix_decode(model, prefix: list[int], n: int, mask_id: int) -> list[int]:
    """LLaDA's evaluation, ``suffix_greedy_prediction``, transcribed: the n positions after the
    prefix start masked; each step runs the model, takes the argmax at every masked position and
    its softmax probability, and commits only the most confident one. ``is_greedy`` is whether the
    result equals the continuation. As in our sampler, the mask token is never proposed."""
    seq = torch.tensor([prefix + [mask_id] * n])
    for _ in range(n):
        masked = seq == mask_id
        logits = model(seq)[masked]
        logits[:, mask_id] = float("-inf")
        x0 = logits.argmax(-1)
        confidence = torch.softmax(logits.float(), -1).gather(-1, x0[:, None])[:, 0]
        best = confidence.argmax()
        commit = torch.full_like(x0, mask_id)
        commit[best] = x0[best]
        seq[masked] = commit
    return seq[0, len(prefix):].tolist()


@torch.no_grad()
def one_pass_argmax(model, prefix: list[int], n: int, mask_id: int) -> list[int]:
    logits = model(torch.tensor([prefix + [mask_id] * n]))[0, len(prefix):]
    logits[:, mask_id] = float("-inf")
    return logits.argmax(-1).tolist()


def test_is_greedy_is_llada_suffix_greedy_decoding(tmp_path, tiny_cfg):
    from dlm_ray.eval.lm_eval_adapter import DlmRayLM

    torch.manual_seed(0)
    model = Denoiser(tiny_cfg.model_copy(update={"init_std": 0.2})).eval()
    with torch.no_grad():  # only ASCII ids ever win the argmax, so every continuation is text again
        model.lm_head.weight[128:] = 0
    lm = DlmRayLM(str(save_inference(model, {"kind": "byte"}, tmp_path / "mdm")), mc_samples=1, batch_size=4)
    g = torch.Generator().manual_seed(1)
    requests, want = [], []
    for k in range(32):
        n_ctx, n = int(torch.randint(4, 24, (), generator=g)), int(torch.randint(1, 7, (), generator=g))
        context = "".join(string.ascii_letters[int(i)] for i in torch.randint(0, 52, (n_ctx,), generator=g))
        prefix = [lm.tok.eos_id, *lm.tok.encode(context)]
        # Half the continuations are what LLaDA's decoding writes, half what one pass predicts.
        decoded = llada_suffix_decode(lm.model, prefix, n, lm.tok.mask_id)
        cont = decoded if k % 2 == 0 else one_pass_argmax(lm.model, prefix, n, lm.tok.mask_id)
        requests.append(Req(context, lm.tok.decode(cont)))
        want.append(decoded == cont)
    assert 0 < sum(want) < len(want)  # both answers occur, so a disagreement either way shows
    assert [greedy for _, greedy in lm.loglikelihood(requests)] == want


def test_an_autoregressive_model_is_greedy_when_each_next_token_is_its_argmax(tmp_path, tiny_cfg):
    from dlm_ray.eval.lm_eval_adapter import DlmRayLM

    torch.manual_seed(0)
    model = Denoiser(tiny_cfg.model_copy(update={"attention": "causal", "init_std": 0.2})).eval()
    with torch.no_grad():
        model.lm_head.weight[128:] = 0
    lm = DlmRayLM(str(save_inference(model, {"kind": "byte"}, tmp_path / "ar")), mc_samples=1, batch_size=4)
    requests, want = [], []
    for k, context in enumerate(["s31=", "r42=", "abc", "The end"]):
        ids = [lm.tok.eos_id, *lm.tok.encode(context)]
        with torch.no_grad():
            for _ in range(3):
                ids.append(int(lm.model(torch.tensor([ids]))[0, -1, :128].argmax()))
        cont = ids[-3:] if k % 2 == 0 else [*ids[-3:-1], (ids[-1] + 1) % 128]
        requests.append(Req(context, lm.tok.decode(cont)))
        want.append(k % 2 == 0)
    assert [greedy for _, greedy in lm.loglikelihood(requests)] == want
    assert [greedy for _, greedy in DlmRayLM(str(tmp_path / "ar"), check_greedy="false").loglikelihood(requests)] \
        == [False] * 4


# --------------------------------------------------------------------- context/continuation split

def byte_level_bpe(path: Path) -> None:
    """A byte-level BPE trained here, offline, on a few sentences: it learns "ĠParis" (with its space)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["The capital of France is Paris.", "Paris is in France.", "The capital of Italy is Rome.",
              "Answer: the river Seine."] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=330, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        special_tokens=["<|endoftext|>", "<|mdm_mask|>", "<|pad|>"]))
    tok.save(str(path))


def test_the_contexts_trailing_whitespace_belongs_to_the_continuation(tmp_path, tiny_cfg):
    from lm_eval.api.model import TemplateLM
    from transformers import PreTrainedTokenizerFast

    from dlm_ray.eval.lm_eval_adapter import DlmRayLM

    byte_level_bpe(tmp_path / "tokenizer.json")

    class HFSplit(TemplateLM):
        """lm-eval's own split of a pair (``_encode_pair``, which its Hugging Face model inherits),
        over transformers' tokenizer of the same tokenizer.json."""

        def __init__(self) -> None:
            super().__init__()
            self.hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))

        @property
        def eot_token_id(self) -> int:
            return self.hf.convert_tokens_to_ids("<|endoftext|>")

        def tok_encode(self, string, add_special_tokens=None, **kwargs):
            return self.hf.encode(string, add_special_tokens=False)

        def _loglikelihood_tokens(self, requests, **kwargs):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def generate_until(self, requests, disable_tqdm=False):
            raise NotImplementedError

    hf = HFSplit()
    assert hf.hf.convert_ids_to_tokens(hf._encode_pair("The capital of France is ", "Paris")[1]) == ["ĠParis"]
    torch.manual_seed(0)
    model = Denoiser(tiny_cfg.model_copy(update={"vocab_size": 320})).eval()
    ckpt = save_inference(model, {"kind": "hf", "path": str(tmp_path / "tokenizer.json")}, tmp_path / "bpe")
    lm = DlmRayLM(str(ckpt), mc_samples=4, batch_size=1, seed=3)
    for context, continuation in [("The capital of France is ", "Paris"), ("The capital of France is", " Paris"),
                                  ("Answer:  ", "the river Seine."), ("Paris is in\n", "France")]:
        ctx, cont = hf._encode_pair(context, continuation)
        ids = torch.tensor([[lm.tok.eos_id, *ctx, *cont]])
        answer = torch.zeros_like(ids, dtype=torch.bool)
        answer[0, -len(cont):] = True
        nelbo = estimate_nelbo(lm.model, ids, mask_id=lm.tok.mask_id, num_samples=4,
                               generator=torch.Generator().manual_seed(3), maskable=answer)
        (ll, _), = lm.loglikelihood([Req(context, continuation)])
        assert ll == pytest.approx(-len(cont) * float(nelbo[0]), rel=1e-5), (context, continuation)


# ----------------------------------------------------------------------------------- rolling

def test_rolling_windows_carry_the_tokens_before_them(tmp_path, tiny_cfg):
    """An autoregressive model's exact rolling log-likelihood, as lm-eval's Hugging Face model
    computes it with a context one token shorter than ours (a window is scored as context +
    continuation): its windows, each input run whole and its last len(pred) logits read."""
    from lm_eval.utils import get_rolling_token_windows

    from dlm_ray.eval.lm_eval_adapter import DlmRayLM

    torch.manual_seed(0)
    model = Denoiser(tiny_cfg.model_copy(update={"attention": "causal", "init_std": 0.2})).eval()
    lm = DlmRayLM(str(save_inference(model, {"kind": "byte"}, tmp_path / "ar")), batch_size=2)
    text = " ".join(f"{a}+{b}={a + b}" for a in range(20) for b in range(0, 60, 7))[:300]
    tokens = lm.tok.encode(text)
    assert len(tokens) > 2 * lm.max_len  # three windows, the last with a long context
    want = 0.0
    with torch.no_grad():
        for inputs, pred in get_rolling_token_windows(tokens, lm.tok.eos_id, lm.max_len - 1, 1):
            logits = lm.model(torch.tensor([inputs]))[0, -len(pred):]
            logits[:, lm.tok.mask_id] = float("-inf")
            want += float(logits.log_softmax(-1).gather(-1, torch.tensor(pred)[:, None]).sum())
    got, short = lm.loglikelihood_rolling([Req(text), Req(text[:40])])
    assert got == pytest.approx(want, rel=1e-4)
    assert short == pytest.approx(lm.loglikelihood([Req("", text[:40])])[0][0], rel=1e-5)  # one window, after EOS


# -------------------------------------------------------------------------------- Monte Carlo draws

def test_likelihoods_take_llada_s_128_monte_carlo_draws_by_default(tmp_path, tiny_cfg):
    from dlm_ray.eval.lm_eval_adapter import DlmRayLM

    torch.manual_seed(0)
    lm = DlmRayLM(str(save_inference(Denoiser(tiny_cfg).eval(), {"kind": "byte"}, tmp_path / "mdm")))
    (ll, _), = lm.loglikelihood([Req("s31=", "13")])
    ids = torch.tensor([[lm.tok.eos_id, *lm.tok.encode("s31=13")]])
    answer = torch.zeros_like(ids, dtype=torch.bool)
    answer[0, -2:] = True
    nelbo = estimate_nelbo(lm.model, ids, mask_id=lm.tok.mask_id, num_samples=128, maskable=answer,
                           generator=torch.Generator().manual_seed(0))
    assert ll == pytest.approx(-2 * float(nelbo[0]), rel=1e-5)
    spec = importlib.util.spec_from_file_location("evaluate_job", Path(__file__).parents[1] / "jobs" / "evaluate.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    default = inspect.signature(DlmRayLM).parameters["mc_samples"].default
    assert job.parser().parse_args(["--checkpoint", "x", "--tasks", "y"]).mc_samples == default == 128


def test_a_checkpoints_evaluation_reports_the_harness_figures(tmp_path, tiny_cfg, monkeypatch):
    """eval.lm_eval_tasks: what a checkpoint's evaluation task (dlm_ray.eval.checkpoints) records is
    the harness's own figure for the export, stderrs left out."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from dlm_ray.config.schema import PretrainConfig
    from dlm_ray.eval.checkpoints import lm_eval_figures
    from dlm_ray.eval.lm_eval_adapter import DlmRayLM

    torch.manual_seed(0)
    ar = save_inference(Denoiser(ModelConfig.model_validate({**tiny_cfg.model_dump(), "attention": "causal",
                                                             "init_std": 0.2})).eval(), {"kind": "byte"}, tmp_path / "ar")
    write_tasks(tmp_path / "tasks", ["x"] * len(PROMPTS))
    run = PretrainConfig(eval={"lm_eval_tasks": ["tiny_mc"], "lm_eval_include_path": str(tmp_path / "tasks")})
    figures = lm_eval_figures(str(ar), run, torch.device("cpu"))
    direct = simple_evaluate(model=DlmRayLM(str(ar), check_greedy=False), tasks=["tiny_mc"], log_samples=False,
                             task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False))
    assert figures == {"lm_eval/tiny_mc/acc": pytest.approx(direct["results"]["tiny_mc"]["acc,none"])}
