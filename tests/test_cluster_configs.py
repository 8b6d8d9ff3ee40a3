"""Every YAML in cluster/ and jobs/ is checked, not just written: it parses, validates against the
schema that consumes it (our configs, Ray's cluster-launcher schema, Serve's deploy schema,
Kubernetes' pod schema for KubeRay pod templates), names scripts and configs that exist, and asks
for resources that fit what the config's workers and actors need."""

from __future__ import annotations

import importlib
import math
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

from dlm_ray.config.schema import Config, PretrainConfig
from dlm_ray.config.inference import GenerateConfig, ServeConfig
from dlm_ray.config.io import load_config

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = sorted((ROOT / "cluster" / "kuberay").glob("*.yaml"))
JOB_CLASSES = {"pretrain.py": PretrainConfig, "generate.py": GenerateConfig}


def config_class(path: Path) -> type[Config]:
    return GenerateConfig if path.name.startswith("generate") else PretrainConfig


def test_every_yaml_parses():
    files = [p for d in ("cluster", "jobs") for p in (ROOT / d).rglob("*.yaml")]
    assert len(files) >= 12
    for path in files:
        docs = list(yaml.safe_load_all(path.read_text()))
        assert docs and all(isinstance(d, dict) for d in docs), path


@pytest.mark.parametrize("path", sorted((ROOT / "jobs" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_job_configs_validate(path):
    cfg = load_config(config_class(path), path)
    if isinstance(cfg, PretrainConfig) and cfg.train.use_gpu:
        assert cfg.train.batch_size % (cfg.train.num_workers * cfg.train.grad_accum) == 0


def build_serve_apps(serve_config: dict[str, Any]) -> list[Any]:
    """Validate with Serve's own deploy schema, import each app and build it from its args."""
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(serve_config)
    apps = []
    for app in serve_config["applications"]:
        module, _, attr = app["import_path"].partition(":")
        builder = getattr(importlib.import_module(module), attr)
        ServeConfig.model_validate(app["args"])
        apps.append(builder(app["args"]))
    return apps


def test_serve_yaml_builds_and_binds_localhost():
    from ray.serve import Application

    conf = yaml.safe_load((ROOT / "jobs" / "serve.yaml").read_text())
    assert all(isinstance(a, Application) for a in build_serve_apps(conf))
    assert conf["http_options"]["host"] == "127.0.0.1"


def test_cluster_launcher_config_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    conf = yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text())
    validate_config(prepare_config(conf))
    types = conf["available_node_types"]
    assert types[conf["head_node_type"]]["resources"] == {"CPU": 0}  # nothing heavy on the head
    assert any(t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot" for t in types.values())
    assert conf["docker"]["image"] == image_of_manifests()


def image_of_manifests() -> str:
    images = {c["image"] for path in KUBERAY for t in pod_templates(yaml.safe_load(path.read_text()))
              for c in t["spec"]["containers"]}
    assert len(images) == 1, images
    return images.pop()


def cluster_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    spec = manifest["spec"]
    return {"RayCluster": lambda: spec, "RayJob": lambda: spec["rayClusterSpec"],
            "RayService": lambda: spec["rayClusterConfig"]}[manifest["kind"]]()


def pod_templates(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    cs = cluster_spec(manifest)
    return [cs["headGroupSpec"]["template"]] + [g["template"] for g in cs["workerGroupSpecs"]]


def worker_pods(manifest: dict[str, Any]) -> list[tuple[int, float, float, set[str]]]:
    """(max replicas, CPUs, GPUs, mount paths) of each worker group."""
    out = []
    for g in cluster_spec(manifest)["workerGroupSpecs"]:
        c = g["template"]["spec"]["containers"][0]
        limits = c["resources"]["limits"]
        mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
        out.append((g.get("maxReplicas", g["replicas"]), cpu(limits["cpu"]), float(limits.get("nvidia.com/gpu", 0)),
                    mounts))
    return out


def cpu(q: str) -> float:
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifest(path):
    import kubernetes_validate

    m = yaml.safe_load(path.read_text())
    assert m["apiVersion"] == "ray.io/v1" and m["kind"] in ("RayCluster", "RayJob", "RayService")
    assert cluster_spec(m)["rayVersion"] == ray.__version__  # the image's Ray is the one we test
    for t in pod_templates(m):  # every pod template is a valid Kubernetes pod template
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                      "template": t}, kubernetes_validate.latest_version(), strict=True)
    pods = worker_pods(m)
    if m["kind"] == "RayJob":
        check_rayjob(m, pods)
    if m["kind"] == "RayService":
        conf = yaml.safe_load(m["spec"]["serveConfigV2"])
        build_serve_apps(conf)
        for app in conf["applications"]:
            args = ServeConfig.model_validate(app["args"])
            assert any(args.num_gpus <= gpus and args.num_cpus <= cpus for _, cpus, gpus, _ in pods)
            assert args.autoscaling.max_replicas * args.num_gpus <= sum(n * g for n, _, g, _ in pods)
            assert on_shared_storage(args.checkpoint, pods)


def on_shared_storage(path: str, pods: list[tuple[int, float, float, set[str]]]) -> bool:
    return "://" in path or all(any(path.startswith(mp + "/") for mp in mounts) for *_, mounts in pods)


def check_rayjob(m: dict[str, Any], pods: list[tuple[int, float, float, set[str]]]) -> None:
    argv = shlex.split(m["spec"]["entrypoint"])
    assert argv[0] == "python" and (ROOT / argv[1]).is_file(), argv
    cls = JOB_CLASSES[Path(argv[1]).name]
    i = argv.index("--config")
    cfg = load_config(cls, ROOT / argv[i + 1], argv[2:i] + argv[i + 2:])
    assert m["spec"]["backoffLimit"] >= 1 and m["spec"]["shutdownAfterJobFinishes"] is True
    if isinstance(cfg, PretrainConfig):
        # Same run name on every retry: a retried job resumes from storage_path, which must be shared.
        assert "--run_name=" in m["spec"]["entrypoint"] and re.match(r"^(s3|gs)://", cfg.storage_path)
        t = cfg.train
        gpus = sum(n * g for n, _, g, _ in pods)
        assert t.use_gpu and t.num_workers * t.gpus_per_worker <= gpus, (t.num_workers, gpus)
        for _, cpus, g, _ in pods:  # the workers one pod holds fit its CPUs
            assert math.floor(g / t.gpus_per_worker) * t.cpus_per_worker <= cpus
    else:
        assert any(cfg.gpus_per_actor <= g and cfg.cpus_per_actor <= c for _, c, g, _ in pods)
        assert cfg.actors[1] * cfg.gpus_per_actor <= sum(n * g for n, _, g, _ in pods)
        assert on_shared_storage(cfg.checkpoint, pods)


def test_runtime_env_is_a_valid_ray_runtime_env():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)
    assert env["working_dir"] == "."


def test_dockerfile_pins_the_tested_ray():
    text = (ROOT / "cluster" / "Dockerfile").read_text()
    assert re.search(rf"FROM rayproject/ray:{re.escape(ray.__version__)}-", text)
    import deepspeed

    assert f"deepspeed=={deepspeed.__version__}" in text
