"""The engine's setup with the real DeepSpeed on CPU (gloo): the config merge, the ZeRO stage the engine
runs, and the model built once, ``init_from``'s weights read into it (each rank its own partition
under ZeRO-3).

DeepSpeed's process groups live as long as their process, so every case runs in processes of its
own (one per rank), spawned here; a failed check there fails the test with the rank's traceback.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from dlm_ray.config.schema import PretrainConfig, TrainConfig
from dlm_ray.train.engine import deepspeed_config

SHAPE = {"preset": "tiny", "d_model": 64, "n_layers": 2, "n_heads": 4, "d_mlp": 128, "max_seq_len": 128}


def test_an_override_of_one_setting_keeps_the_rest_of_its_section(tmp_path):
    override = tmp_path / "ds.json"
    override.write_text(json.dumps({"zero_optimization": {"overlap_comm": True}, "gradient_clipping": 0.5}))
    tc = TrainConfig(zero_stage=3, offload_optimizer=True, deepspeed_config=str(override))
    ds = deepspeed_config(tc, use_gpu=True)
    zero = ds["zero_optimization"]
    assert zero.get("stage") == 3, f"the override dropped the stage: {zero}"
    from dlm_ray.train.engine import engine_dtype, zero_stage

    assert zero_stage(ds) == 3
    assert zero["overlap_comm"] is True and zero["offload_optimizer"]["device"] == "cpu"
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": True}
    assert engine_dtype(ds) == torch.bfloat16
    assert engine_dtype(deepspeed_config(TrainConfig(), use_gpu=False)) == torch.float32
    override.write_text(json.dumps({"zero_optimization": {"stage": 1}}))  # a stage set there is the one run
    assert zero_stage(deepspeed_config(tc.model_copy(update={"offload_optimizer": False}), use_gpu=False)) == 1
    override.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"train\.deepspeed_config: .*ds\.json holds a list, not a JSON object"):
        deepspeed_config(tc, use_gpu=False)
    override.write_text("{not json")
    with pytest.raises(ValueError, match=r"train\.deepspeed_config: cannot read .*ds\.json as JSON"):
        deepspeed_config(tc, use_gpu=False)


# ------------------------------------------------------------------------------ DeepSpeed, per rank


def run_ranks(world: int, fn: Callable[..., None], *args: Any) -> None:
    """``fn(rank, *args)`` in ``world`` fresh processes joined in one torch.distributed gloo group."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank_main, args=(world, port, fn, args), nprocs=world, join=True, start_method="spawn")


def _rank_main(rank: int, world: int, port: int, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)  # the ranks share the machine's cores
    # torch's group, not DeepSpeed's: a Ray Train worker starts with torch.distributed set up, and
    # DeepSpeed's own layer joins it only when the engine's setup asks.
    torch.distributed.init_process_group(backend="gloo")
    fn(rank, *args)
    # Every rank done before the group goes: a rank leaving with the group's threads still running
    # aborts at exit.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def run_config(tmp_path: Path, world: int, stage: int, init_from: Path | None) -> PretrainConfig:
    return PretrainConfig.model_validate({
        "model": SHAPE, "init_from": str(init_from) if init_from else None,
        "train": {"num_workers": world, "batch_size": 2 * world, "zero_stage": stage,
                  "deepspeed_config": str(tmp_path / "ds.json")}})


def prepare(tmp_path: Path) -> None:
    """Before the ranks start: a DeepSpeed override the stage must survive, and a bf16 export (in
    several safetensors shards) of weights no seed in these tests draws."""
    from dlm_ray.io.checkpoint import save_inference
    from dlm_ray.config.schema import ModelConfig
    from dlm_ray.core.model import Denoiser

    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"overlap_comm": True}}))
    torch.manual_seed(1234)
    model = Denoiser(ModelConfig(**SHAPE))
    save_inference(model, {"kind": "byte"}, tmp_path / "export", dtype=torch.bfloat16, shard_bytes=40_000)


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's whole value, gathered from the ranks' partitions under ZeRO-3."""
    import deepspeed

    params = dict(model.named_parameters())
    partitioned = [p for p in params.values() if hasattr(p, "ds_tensor")]
    with deepspeed.zero.GatheredParameters(partitioned):
        return {name: p.detach().clone() for name, p in params.items()}


def _built_once_with_the_export_s_weights(rank: int, tmp_path: Path, stage: int) -> None:
    from dlm_ray.io.checkpoint import load_inference
    from dlm_ray.train.engine import build_model, start_engine
    from dlm_ray.core.model import Denoiser

    init = tmp_path / "export"
    cfg = run_config(tmp_path, 1, stage, init)
    constructed = []
    plain_init = Denoiser.__init__

    def counted(self: Denoiser, *args: Any) -> None:
        constructed.append(self)
        plain_init(self, *args)

    Denoiser.__init__ = counted  # type: ignore[method-assign]
    rng = torch.get_rng_state()
    model = build_model(cfg, ds_config=deepspeed_config(cfg.train, use_gpu=False), device=torch.device("cpu"),
                        resume=False)
    assert len(constructed) == 1, f"{len(constructed)} models built"
    assert torch.equal(torch.get_rng_state(), rng), "initial weights were drawn that the export replaces"
    Denoiser.__init__ = plain_init  # type: ignore[method-assign]

    want = load_inference(init)[0].state_dict()  # fp32, as training on a CPU holds them
    got = full_weights(model)
    assert set(got) == set(want)
    for name, w in want.items():
        assert got[name].dtype == torch.float32 and torch.equal(got[name], w), name

    engine, startup = start_engine(cfg, device=torch.device("cpu"), resume=False)
    assert engine.zero_optimization_stage() == stage and f"ZeRO-{stage}," in startup.splitlines()[-1]
    got = full_weights(engine.module)  # the engine starts from the export's weights too
    assert all(torch.equal(got[name], w) for name, w in want.items())


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage", [2, 3])
def test_init_from_reads_the_export_into_the_one_model_and_the_engine_runs_the_configured_stage(tmp_path, stage):
    prepare(tmp_path)
    run_ranks(1, _built_once_with_the_export_s_weights, tmp_path, stage)


def _partitions_over_ranks(rank: int, tmp_path: Path) -> None:
    from dlm_ray.io.checkpoint import load_inference
    from dlm_ray.config.schema import ModelConfig
    from dlm_ray.train.engine import build_model
    from dlm_ray.core.model import Denoiser, num_params

    world = torch.distributed.get_world_size()
    cpu = torch.device("cpu")
    cfg = run_config(tmp_path, world, 3, tmp_path / "export")
    model = build_model(cfg, ds_config=deepspeed_config(cfg.train, use_gpu=False), device=cpu, resume=False)
    # No rank holds a parameter whole: each holds its part (a third, the last padded) and nothing else.
    assert all(p.numel() == 0 for p in model.parameters())
    held = sum(p.ds_tensor.numel() for p in model.parameters())
    assert held < num_params(cfg.model) / world + len(list(model.parameters()))
    want = load_inference(tmp_path / "export")[0].state_dict()
    for name, w in full_weights(model).items():
        assert torch.equal(w, want[name]), name

    # Without init_from the weights are drawn as the plain model draws them (with the same seed).
    torch.manual_seed(7)
    drawn = full_weights(build_model(cfg.model_copy(update={"init_from": None}), resume=False, device=cpu,
                                     ds_config=deepspeed_config(cfg.train, use_gpu=False)))
    torch.manual_seed(7)
    plain = Denoiser(ModelConfig(**SHAPE)).state_dict()
    for name, w in plain.items():
        assert torch.equal(drawn[name], w), name


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_zero3_ranks_read_only_their_partitions(tmp_path):
    """Three ranks: parameter sizes are not multiples of three, so the last partition is padded."""
    prepare(tmp_path)
    run_ranks(3, _partitions_over_ranks, tmp_path)
