"""The entropy bound (EB-sampler) and sub-blocks (Fast-dLLM v2): against plain transcriptions of
their rules, at their edges, where commits may land, and the settings refused by name."""

from __future__ import annotations

import math

import pytest
import torch

from dlm_ray.config.schema import SampleConfig
from dlm_ray.core.commit_rules import entropy, num_commits
from dlm_ray.core.kinds import kind_of
from dlm_ray.core.sampling import generate
from tests.conftest import family_model

MASK, EOS, V = 258, 257, 264


def _eb_by_hand(logits_LV: torch.Tensor, candidate_L: list[bool], schedule: int, bound: float) -> int:
    """The EB-sampler's rule as its paper states it: candidates sorted by confidence (softmax of the
    chosen token), most confident first; take the longest run whose summed entropy less its
    largest entropy stays <= bound; at least one, at least the schedule, at most the candidates."""
    probs = [[math.exp(z) for z in row] for row in logits_LV.double().tolist()]
    probs = [[p / sum(row) for p in row] for row in probs]
    picked = sorted((i for i in range(len(probs)) if candidate_L[i]), key=lambda i: -max(probs[i]))
    total, largest, n = 0.0, 0.0, 0
    for i in picked:
        h = -sum(p * math.log(p) for p in probs[i] if p > 0)
        total, largest = total + h, max(largest, h)
        if total - largest > bound:
            break
        n += 1
    return min(max(schedule, n, 1), len(picked))


@pytest.mark.parametrize("bound", [0.0, 0.1, 0.5, 1.0, 2.0, 5.0, 1e9])
def test_entropy_bound_count_equals_the_rule_by_hand(bound):
    torch.manual_seed(0)
    A, L, Vs = 6, 10, 7
    # Sharp and flat rows alike: scales from near-certain to near-uniform.
    logits = torch.randn(A, L, Vs) * torch.linspace(0.2, 6.0, A)[:, None, None]
    candidate = torch.rand(A, L) < 0.7
    candidate[:, 0] = True
    conf = logits.double().softmax(-1).max(-1).values.masked_fill(~candidate, float("-inf"))
    schedule = torch.tensor([0, 1, 2, 0, 3, 1])
    ours = num_commits(conf, schedule, SampleConfig(entropy_bound=bound), entropy(logits))
    by_hand = [_eb_by_hand(logits[a], candidate[a].tolist(), int(schedule[a]), bound) for a in range(A)]
    assert ours.tolist() == by_hand


def test_entropy_is_in_nats_and_ignores_excluded_tokens():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0, float("-inf")], [30.0, 0.0, 0.0, 0.0, float("-inf")]]])
    h = entropy(logits)
    assert h[0, 0].item() == pytest.approx(math.log(4)) and 0 <= h[0, 1].item() < 1e-9


@pytest.fixture
def model(tiny_cfg):
    torch.manual_seed(0)
    return family_model(tiny_cfg, "llada", vocab_size=V).eval()


def _run(model, cfg, ids, **kw):
    stats: dict[str, int] = {}
    out = generate(model, ids, cfg, mask_id=MASK, eos_id=EOS, stats=stats, **kw)
    return out, stats["model_calls"]


def test_entropy_bound_edges(model):
    ids = torch.randint(0, 250, (3, 5))
    base = SampleConfig(gen_length=16, steps=16, block_length=8)
    ref, ref_calls = _run(model, base, ids)
    # γ = 0: no run of positions fits under it (a random model is never certain): the schedule.
    zero, calls = _run(model, base.model_copy(update={"entropy_bound": 0.0}), ids)
    assert torch.equal(zero, ref) and calls == ref_calls == 16
    # A huge γ: every block at once, each position its own argmax given the block all masked.
    huge, calls = _run(model, base.model_copy(update={"entropy_bound": 1e9}), ids)
    assert calls == 2 and not (huge == MASK).any()
    first = model(torch.cat([ids, torch.full((3, 16), MASK)], 1))[:, 5:13, :259]
    first[..., MASK] = float("-inf")
    assert torch.equal(huge[:, 5:13], first.argmax(-1))


class Spy:
    """The model, recording the canvas of each call."""

    def __init__(self, model):
        self.model, self.seen = model, []
        self.max_seq_len = model.max_seq_len

    def __call__(self, x, am=None, **kw):
        self.seen.append(x.clone())
        return self.model(x, am)


@pytest.mark.parametrize("rule", [{}, {"threshold": 0.3}, {"entropy_bound": 1.0}])
def test_commits_stay_in_the_first_unfinished_sub_block(model, rule):
    ids = torch.randint(0, 250, (4, 5))
    cfg = SampleConfig(gen_length=16, steps=16, block_length=8, sub_block_length=4, **rule)
    spy = Spy(model)
    out, _ = _run(spy, cfg, ids)
    canvases = [c[:, 5:] for c in spy.seen] + [out[:, 5:]]
    for before, after in zip(canvases, canvases[1:]):
        masked_before = before == MASK
        changed = (before != after)
        # The first sub-block of 4 with a mask, per row: every change lands inside it.
        sub = torch.arange(16) // 4
        current = torch.where(masked_before, sub, 99).min(-1).values
        assert bool((~changed | (sub[None, :] == current[:, None])).all())
        # Sub-blocks finish in order: a later sub-block never fills while an earlier one has a mask.
        done = ~(after == MASK).view(4, 4, 4).any(-1)
        assert bool((done[:, 1:] <= done[:, :-1]).all())
    assert not (out == MASK).any()


@pytest.mark.parametrize("rule", [{}, {"threshold": 0.3}, {"factor": 1.0}, {"entropy_bound": 0.5}])
def test_one_sub_block_per_block_is_todays_sampler(model, rule):
    ids = torch.randint(0, 250, (3, 6))
    cfg = SampleConfig(gen_length=16, steps=8, block_length=8, **rule)
    plain, plain_calls = _run(model, cfg, ids)
    sub, calls = _run(model, cfg.model_copy(update={"sub_block_length": 8}), ids)
    assert torch.equal(plain, sub) and calls == plain_calls


def test_sub_blocks_finish_each_block_within_its_steps(model):
    # 6 steps for 3 sub-blocks of 4 (two each): the reference schedule fills each in its share.
    ids = torch.randint(0, 250, (2, 4))
    out, calls = _run(model, SampleConfig(gen_length=24, steps=12, block_length=12, sub_block_length=4), ids)
    assert not (out == MASK).any() and calls == 12


def test_settings_refused_by_name(tiny_cfg):
    with pytest.raises(ValueError, match="sub_block_length=5 does not divide block_length=8"):
        SampleConfig(gen_length=16, steps=16, block_length=8, sub_block_length=5)
    with pytest.raises(ValueError, match="sub_block_length=2 makes 4 sub-blocks per block, more than the 2 steps"):
        SampleConfig(gen_length=16, steps=4, block_length=8, sub_block_length=2)
    with pytest.raises(ValueError, match="at most one of threshold, factor and entropy_bound"):
        SampleConfig(threshold=0.9, entropy_bound=1.0)
    with pytest.raises(ValueError, match="entropy_bound"):
        SampleConfig(entropy_bound=-1.0)
    # A block-causal model samples in its own blocks (4 here): a sub-block of 8 cannot divide them.
    block = family_model(tiny_cfg, "llada", attention="block_causal", block_size=4, vocab_size=V).eval()
    cfg = kind_of(block.config).resolve(SampleConfig(gen_length=16, steps=16, block_length=16, sub_block_length=8))
    with pytest.raises(ValueError, match="sub_block_length=8 does not divide block_length=4"):
        generate(block, torch.randint(0, 250, (1, 4)), cfg, mask_id=MASK)
    ar = kind_of(tiny_cfg.model_copy(update={"attention": "causal"}))
    for rule in ({"entropy_bound": 1.0}, {"sub_block_length": 8}):
        with pytest.raises(ValueError, match="autoregressive model"):
            ar.check(SampleConfig(gen_length=16, steps=16, block_length=16, **rule))


def test_a_request_or_row_may_choose_the_new_rules():
    from dlm_ray.config.inference import check_overrides, resolve_overrides

    defaults = SampleConfig(gen_length=16, steps=16, block_length=8, threshold=0.9)
    cfg = resolve_overrides(defaults, check_overrides({"entropy_bound": 1.0, "sub_block_length": 4}).model_dump())
    assert cfg.entropy_bound == 1.0 and cfg.threshold is None and cfg.sub_block_length == 4
    with pytest.raises(ValueError, match="at most one of threshold, factor and entropy_bound"):
        resolve_overrides(defaults, {"entropy_bound": 1.0, "factor": 1.0})
    with pytest.raises(ValueError, match="sub_block_length=3 does not divide block_length=8"):
        resolve_overrides(defaults, {"sub_block_length": 3})
