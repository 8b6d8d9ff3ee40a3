"""Multi-node on one machine: a node lost mid-run, and both jobs through `ray job submit` on 3 nodes.

These start clusters of their own: the ``own_ray`` fixture shuts the session's local Ray down
first, and the next test that needs it starts it again, so file order does not matter.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dlm_ray.io.checkpoint import latest_checkpoint
from dlm_ray.train.fit import fit
from tests.test_train import losses, tiny_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def own_ray():
    import ray

    ray.shutdown()  # the session's local Ray, if a test before started it
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_node_loss_restarts_from_last_checkpoint(own_ray, tmp_path):
    from ray.cluster_utils import Cluster

    # Head: the data pipeline and the controller. Each worker node fits one Train worker.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1, resources={"trainer_slot": 1}) for _ in range(2)]
    own_ray.init(address=cluster.address, log_to_driver=False)
    own_ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = tiny_run(tmp_path, "nodeloss", "--train.max_steps=40", "--train.max_failures=3",
                   "--train.log_every=5", "--train.cpus_per_worker=1", "--train.worker_resources={trainer_slot: 1}")
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(result=fit(cfg)), daemon=True)
    try:
        thread.start()
        deadline = time.time() + 300
        while time.time() < deadline and latest_checkpoint(cfg) is None:
            time.sleep(0.5)
        assert latest_checkpoint(cfg) is not None, "no checkpoint within 5 minutes"
        cluster.add_node(num_cpus=1, resources={"trainer_slot": 1})  # a replacement, then a worker's node dies
        cluster.remove_node(nodes[1])
        thread.join(timeout=600)
        assert "result" in outcome, "training did not finish after the node loss"
        result = outcome["result"]
        assert result.metrics["step"] == 40
        assert sorted(losses(cfg)) == list(range(5, 41, 5))
    finally:
        own_ray.shutdown()
        cluster.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_job_submit_on_three_nodes_pretrain_then_generate(own_ray, tmp_path):
    """`ray start --head` plus two `ray start --address` nodes on this machine; the pretraining
    job's two workers need a `trainer_slot` each, which only the two added nodes have."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    gcs, dash = _free_port(), _free_port()
    # The head enables token authentication; the CLI then sends the token from ~/.ray.
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "token"}
    start = lambda *args: subprocess.run([ray_bin, "start", *args, "--disable-usage-stats"],  # noqa: E731
                                         check=True, env=env, capture_output=True, timeout=120)
    start("--head", f"--port={gcs}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--num-cpus=2",
          "--include-dashboard=true")
    try:
        for _ in range(2):
            start(f"--address=127.0.0.1:{gcs}", "--num-cpus=1", '--resources={"trainer_slot": 1}')

        def submit(*argv: str) -> str:
            cmd = [ray_bin, "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir", str(ROOT),
                   "--", sys.executable, *argv]
            for _ in range(12):
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
                out = proc.stdout + proc.stderr
                # A loaded head may answer before its job agent registered: nothing was submitted,
                # and the server says to try again later.
                if "No available agent to submit job" not in out:
                    break
                time.sleep(5)
            assert proc.returncode == 0 and "succeeded" in out.lower(), out[-4000:]
            return out

        storage = tmp_path / "runs"
        console = submit("jobs/pretrain.py", "--run_name=submitted", f"--storage_path={storage}", "--train.max_steps=10",
               "--train.checkpoint_every=10", "--train.eval_every=10", "--train.cpus_per_worker=1",
               "--train.worker_resources={trainer_slot: 1}", "--data.builtin_docs=2000",
               "--eval.num_prompts_per_family=4", "--eval.num_nelbo_docs=16")
        # What the job's console shows a user: no compiler notices repeated per rank, and a CPU run
        # described as one.
        assert "built successfully" not in console and "per GPU" not in console, console[-4000:]
        assert "CPU workers" in console and "stopped by max_steps" in console, console[-4000:]
        summary = json.loads((storage / "submitted" / "summary.json").read_text())
        assert summary["steps"] == 10 and Path(summary["export"], "model.safetensors").is_file()
        assert any((storage / "submitted").glob("checkpoint_*"))

        out = tmp_path / "generations"
        submit("jobs/generate.py", f"--checkpoint={summary['export']}", "--input=builtin:60", f"--output={out}",
               "--actors=[2, 2]", "--cpus_per_actor=0.5", "--batch_size=16", "--progress_bars=false")
        gen = json.loads((out / "_summary.json").read_text())
        assert gen["rows"] == gen["unique_ids"] == 60 and gen["duplicate_ids"] == 0 and gen["rows_errored"] == 0

        # Where the Train workers ran (Ray's state API, through the CLI with the cluster's token):
        # two distinct nodes, neither of them the head.
        def state(*args: str) -> list[dict]:
            proc = subprocess.run([ray_bin, "list", *args, f"--address=http://127.0.0.1:{dash}", "--format=json",
                                   "--limit=200"], env=env, capture_output=True, text=True, timeout=120, check=True)
            return json.loads(proc.stdout)

        head = {n["node_id"] for n in state("nodes") if n["is_head_node"]}
        nodes = {a["node_id"] for a in state("actors", "--filter", "class_name=RayTrainWorker")}
        assert len(nodes) == 2 and not nodes & head, nodes
    finally:
        own_ray.shutdown()
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)
