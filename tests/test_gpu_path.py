"""The GPU path, proven on CPU: block-only logits, no mask tensor without padding, activation
checkpointing, the fused optimizer, peak FLOP/s and the memory check give what the plain path gives."""

from __future__ import annotations

import pytest
import torch

from dlm_ray.config.schema import ModelConfig, SampleConfig
from dlm_ray.core.model import Denoiser
from dlm_ray.core.batching import left_pad
from dlm_ray.core.sampling import generate

MASK, PAD, EOS = 258, 256, 257


class FullLogits:
    """The path before block-only logits: every call computes the whole canvas's logits and the
    sampler cuts the block out."""

    def __init__(self, model: Denoiser) -> None:
        self.model, self.max_seq_len = model, model.max_seq_len

    def __call__(self, x, am=None):
        return self.model(x, am)

    def prefill(self, x, am=None, *, logits_span=None):
        logits, cache = self.model.prefill(x, am)
        return logits[:, logits_span[0]:logits_span[1]], cache

    def forward_window(self, ids, start, cache, *, logits_len=None):
        return self.model.forward_window(ids, start, cache)[:, :logits_len]


@pytest.fixture
def model(tiny_cfg):
    torch.manual_seed(0)
    return Denoiser(tiny_cfg.model_copy(update={"vocab_size": 264})).eval()


@torch.no_grad()
def test_logits_for_a_span_equal_the_full_logits_there(model):
    x = torch.randint(0, 250, (2, 30))
    am = torch.ones_like(x)
    am[0, :4] = 0
    full = model(x, am)
    torch.testing.assert_close(model(x, am, logits_span=(10, 18)), full[:, 10:18], atol=1e-6, rtol=1e-6)
    logits, _ = model.prefill(x, am, logits_span=(20, 30))
    assert logits.shape == (2, 10, 264)


SETTINGS = [
    {}, {"temperature": 1.0}, {"remasking": "random", "temperature": 0.7}, {"threshold": 0.3},
    {"factor": 1.0}, {"cache": "prefix", "threshold": 0.5}, {"cache": "dual"}, {"cache": "dual", "refresh_every": 2},
    {"cfg_scale": 1.5}, {"stop_at_eos": True, "temperature": 1.0}, {"confidence_eos_eot_inf": True},
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "reference")
@pytest.mark.parametrize("padded", [False, True])
def test_every_sampler_setting_gives_the_same_tokens_as_full_logits(model, settings, padded):
    cfg = SampleConfig(gen_length=16, steps=8, block_length=8, **settings)
    prompts = [torch.randint(0, 250, (n,)).tolist() for n in ((5, 9, 7) if padded else (7, 7, 7))]
    ids, am = left_pad(prompts, PAD)
    out = {}
    for name, m in (("block", model), ("full", FullLogits(model))):
        gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
        out[name] = generate(m, ids, cfg, mask_id=MASK, attention_mask=am, eos_id=EOS, generator=gens)
    assert torch.equal(out["block"], out["full"])


def test_an_unpadded_batch_reaches_the_model_without_a_mask(model):
    seen = []

    def spy(x, am=None, **kw):
        seen.append(am)
        return model(x, am, **kw)
    spy.supports_logits_span = True
    ids, am = left_pad([[1, 2, 3], [4, 5, 6]], PAD)
    cfg = SampleConfig(gen_length=8, steps=4, block_length=8)
    with_mask = generate(model, ids, cfg, mask_id=MASK)
    assert torch.equal(generate(spy, ids, cfg, mask_id=MASK, attention_mask=am), with_mask)
    assert seen and all(a is None for a in seen)
    padded_ids, padded_am = left_pad([[1, 2], [4, 5, 6]], PAD)
    generate(spy, padded_ids, cfg, mask_id=MASK, attention_mask=padded_am)
    assert seen[-1] is not None


@pytest.mark.parametrize("blocks", [frozenset({0, 1, 2, 3}), frozenset({1, 3})])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(tiny_cfg, blocks):
    torch.manual_seed(0)
    x = torch.randint(0, 256, (4, 32))
    grads = []
    for checkpointed in (frozenset(), blocks):
        torch.manual_seed(1)
        m = Denoiser(tiny_cfg).train()
        m.checkpointed = checkpointed
        loss = m(x).logsumexp(-1).mean()
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in m.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=0, rtol=0)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_activation_checkpointing_setting_picks_blocks():
    from dlm_ray.config.schema import TrainConfig
    from dlm_ray.train.engine import checkpointed_blocks

    assert checkpointed_blocks(TrainConfig(), 8) == frozenset()
    assert checkpointed_blocks(TrainConfig(activation_checkpointing="full"), 4) == frozenset(range(4))
    every = TrainConfig(activation_checkpointing="every_k", activation_checkpointing_k=3)
    assert checkpointed_blocks(every, 8) == frozenset({0, 3, 6})


def test_the_optimizer_is_torch_fused_adamw_on_gpu_and_deepspeed_s_on_cpu():
    from dlm_ray.config.schema import TrainConfig
    from dlm_ray.train.engine import deepspeed_config, make_optimizer

    tc = TrainConfig()
    params = [torch.nn.Parameter(torch.zeros(3))]
    gpu = make_optimizer(params, tc, use_gpu=True)
    assert isinstance(gpu, torch.optim.AdamW) and gpu.defaults["fused"] is True
    assert "optimizer" not in deepspeed_config(tc, use_gpu=True)
    assert make_optimizer(params, tc, use_gpu=False) is None and "optimizer" in deepspeed_config(tc, use_gpu=False)


def test_peak_flops_by_device_and_none_on_cpu():
    from dlm_ray.config.schema import TrainConfig
    from dlm_ray.train.engine import peak_flops

    assert peak_flops("NVIDIA H100 80GB HBM3", TrainConfig()) == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", TrainConfig()) == 312e12
    assert peak_flops("cpu", TrainConfig()) is None
    assert peak_flops("NVIDIA H100 80GB HBM3", TrainConfig(peak_flops=1e12)) == 1e12  # the setting wins
    assert peak_flops("Some Future GPU", TrainConfig()) is None


def test_a_configuration_that_cannot_fit_is_refused_with_the_numbers():
    from dlm_ray.config.schema import TrainConfig
    from dlm_ray.train.engine import check_memory

    eight_b = ModelConfig(preset="8b")
    line = check_memory(eight_b, TrainConfig(zero_stage=3, num_workers=8), device_bytes=80 * 2**30)
    assert "ZeRO-3" in line and "GiB" in line
    with pytest.raises(ValueError, match=r"needs .* GiB .* has 80.0 GiB"):
        check_memory(eight_b, TrainConfig(zero_stage=2, num_workers=1), device_bytes=80 * 2**30)
    assert "no device memory to check" in check_memory(eight_b, TrainConfig(zero_stage=2, num_workers=1), None)
    on_cpu = check_memory(eight_b, TrainConfig(zero_stage=2, num_workers=1), None, on_gpu=False)
    assert "CPU workers" in on_cpu and "GPU" not in on_cpu  # a CPU run is not described in GPUs


@pytest.mark.slow
def test_compiled_blocks_match_eager_within_dtype_tolerance(tiny_cfg):
    from dlm_ray.core.model import compile_blocks

    torch.manual_seed(0)
    eager = Denoiser(tiny_cfg).eval()
    compiled = compile_blocks(Denoiser(tiny_cfg).eval())
    compiled.load_state_dict(eager.state_dict())
    assert set(compiled.state_dict()) == set(eager.state_dict())  # names unchanged: checkpoints still load
    x = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), atol=1e-4, rtol=1e-4)
    cfg = SampleConfig(gen_length=16, steps=8, block_length=8, cache="dual")
    outs = []
    for m in (eager, compiled):
        outs.append(generate(m, x[:, :6], cfg, mask_id=MASK, generator=torch.Generator().manual_seed(0)))
    assert (outs[0] == outs[1]).float().mean() > 0.9  # ties aside, the same tokens
    compiled.train()
    compiled.checkpointed = frozenset({0, 2})
    eager.train()
    a, b = compiled(x).logsumexp(-1).mean(), eager(x).logsumexp(-1).mean()
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    for p, q in zip(compiled.parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-3)


@pytest.mark.slow
def test_the_gpu_check_runs_on_cpu_in_smoke_mode(tmp_path):
    """benchmarks/gpu_check.py cannot rot: its smoke mode (tiny preset, CPU) runs every section, in
    a process of its own (it starts its own one-process DeepSpeed group)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from dlm_ray.core.model import num_params

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    train = {(r["engine"], r["activation_checkpointing"]): r for r in result["training"]}
    assert set(train) == {("deepspeed", "none"), ("plain", "none"), ("deepspeed", "full"), ("plain", "full")}
    assert all(r["tokens_per_s"] > 0 and r["mfu"] is None for r in train.values())  # no MFU on a CPU
    calls = {(r["model"], r["sampler"], r["batch"]): r["model_calls"] for r in result["sampling"]}
    for model in ("tiny", "qwen2.5-0.5b shape"):  # the Qwen shape: GQA 14/2, biases, tied, shifted head
        assert calls[(model, "reference", 1)] == calls[(model, "dual cache", 4)] == 32 // 4  # same commits per call
    assert calls[("tiny", "autoregressive (1 token/call, KV cache)", 1)] == 32 + 1
    assert calls[("qwen2.5-0.5b shape", "autoregressive (generate, KV cache)", 4)] == 32  # prefill + 31 steps
    # Block diffusion at 4 tokens per call costs its decoding steps and nothing more (the prompt's and
    # each finished block's keys/values are written by the next block's steps).
    assert calls[("tiny", "block diffusion (exact cache, 4 tokens/call)", 4)] == 32 // 4
    assert calls[("tiny", "autoregressive (generate, KV cache)", 1)] == 32
    assert all(0 <= r["outside_model"] < 1 for r in result["sampling"] if "outside_model" in r)
    assert result["8b"]["params"] == num_params(ModelConfig(preset="8b")) and "ZeRO-3" in result["8b"]["zero3_8gpu"]
    assert "| training |" in proc.stdout and "| sampling |" in proc.stdout


def test_fused_adamw_updates_the_weights_as_the_unfused_one_does(tiny_cfg):
    from dlm_ray.config.schema import TrainConfig
    from dlm_ray.train.engine import make_optimizer

    x = torch.randint(0, 256, (2, 16))
    weights = []
    for fused in (True, False):
        torch.manual_seed(0)
        m = Denoiser(tiny_cfg)
        opt = make_optimizer(m.parameters(), TrainConfig(), use_gpu=True) if fused else \
            torch.optim.AdamW(m.parameters(), lr=TrainConfig().lr, betas=TrainConfig().betas,
                              weight_decay=TrainConfig().weight_decay)
        for _ in range(3):
            m(x).logsumexp(-1).mean().backward()
            opt.step()
            opt.zero_grad()
        weights.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*weights):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("attention,cache", [("full", "dual"), ("block_causal", "blocks"), ("causal", "none")])
def test_the_step_profile_times_every_model_call_once_and_restores_the_model(attention, cache, monkeypatch):
    """benchmarks/sampler_step.py's timer sees each of the sampler's model calls once (prefill may
    run forward inside it) and leaves the model as it found it."""
    import importlib
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    bench = importlib.import_module("sampler_step")
    model = Denoiser(ModelConfig(preset="tiny", d_model=32, n_layers=1, n_heads=2, d_mlp=64, attention=attention,
                                 block_size=4)).eval()
    cfg = SampleConfig(gen_length=8, steps=8 if attention == "causal" else 4, block_length=8 if attention == "causal" else 4,
                       cache=cache, threshold=None if attention == "causal" else 0.9)
    prompts = torch.randint(4, 200, (3, 5))
    stats: dict[str, int] = {}
    generate(model, prompts, cfg, mask_id=3, eos_id=1, stats=stats)
    p = bench.profile(model, prompts, cfg, mask_id=3, eos_id=1, repeats=1)
    assert p.calls == stats["model_calls"] > 0
    assert 0 < p.forward_seconds <= p.seconds and 0 <= p.outside_share < 1
    assert not set(bench.ENTRY_POINTS) & set(vars(model))  # the class's own methods again
