"""The commands in README.md and cluster/README.md, as written: every job command line parses and
its config validates (a dotted override that names no field, or a combination the config refuses,
fails here rather than in a user's terminal), and every config file or path they name exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from dlm_ray.config import PretrainConfig
from dlm_ray.config_inference import GenerateConfig
from dlm_ray.config_io import parse_job_args

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "cluster" / "README.md"]
JOB_CONFIGS = {"pretrain.py": PretrainConfig, "prepare_data.py": PretrainConfig, "generate.py": GenerateConfig,
               "sft.py": PretrainConfig, "compare.py": PretrainConfig}


def shell_commands(path: Path) -> list[str]:
    """Each command of the ```bash blocks, continuation lines joined and comments dropped."""
    text = path.read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for cmd in block.replace("\\\n", " ").splitlines():
            cmd = re.sub(r"\s+#\s.*$", "", cmd).strip()
            if cmd and not cmd.startswith("#"):
                out.append(cmd)
    return out


def job_invocations() -> list[tuple[str, str, list[str]]]:
    """(where, job script, arguments) of every `python jobs/<job>.py ...` in the docs."""
    found = []
    for doc in DOCS:
        for cmd in shell_commands(doc):
            for part in cmd.split("&&"):
                words = shlex.split(part.replace("<", "_").replace(">", "_"))
                for i, w in enumerate(words):
                    if w.startswith("jobs/") and w.endswith(".py") and i and words[i - 1] in ("python", "python3"):
                        found.append((f"{doc.name}: {part.strip()}", w.split("/")[-1], words[i + 1:]))
    return found


def test_the_docs_hold_the_quickstart_commands():
    cmds = shell_commands(ROOT / "README.md")
    assert 'pip install -e . && python jobs/pretrain.py' in cmds
    assert 'pip install -e ".[test]" && pytest' in cmds
    assert len(job_invocations()) >= 8


def _job_args(ap) -> None:
    # The job-specific flags the jobs add besides --config (see jobs/*.py).
    ap.add_argument("--output")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--export-dir")
    for flag in ("--objectives", "--block_size", "--fast_threshold", "--gen_batch"):  # jobs/compare.py
        ap.add_argument(flag)


@pytest.mark.parametrize("where,job,args", job_invocations(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_documented_job_command_validates(where, job, args, monkeypatch):
    monkeypatch.chdir(ROOT)
    if job in ("export.py", "evaluate.py"):  # plain argparse jobs: no config
        import importlib.util

        spec = importlib.util.spec_from_file_location("plain_job", ROOT / "jobs" / job)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.parser().parse_args(args)  # a checkpoint, an output, and valid options
        return
    cls = JOB_CONFIGS[job]
    cfg, ns = parse_job_args(cls, args, job, _job_args)  # raises ConfigError naming the bad field
    if ns.config:
        assert (ROOT / ns.config).is_file(), where
    if job == "prepare_data.py":
        assert ns.output, where


def test_paths_named_in_the_docs_exist():
    for doc in DOCS:
        for cmd in shell_commands(doc):
            for path in re.findall(r"(?:jobs|cluster|benchmarks)/[\w/.-]+\.(?:py|ya?ml)", cmd):
                assert (ROOT / path).is_file(), f"{doc.name}: {path}"


def test_example_prompts_in_the_docs_have_valid_answers():
    import itertools

    from dlm_ray.corpus import check_answer

    texts = [d.read_text() for d in DOCS] + [(ROOT / "dlm_ray" / n).read_text() for n in ("corpus.py", "inference.py")]
    prompts = {m for t in texts for m in re.findall(r"\b[rsq][0-9.]{6,16}=", t)}
    assert any(p.startswith("q") for p in prompts)
    grids = ["".join("".join(r) for r in rows) for rows in itertools.product(itertools.permutations("1234"), repeat=4)]
    for p in prompts:
        if p.startswith("q"):
            assert any(check_answer(p, g) for g in grids), f"no valid answer to the example {p}"
        else:
            body = p[1:-1]
            assert check_answer(p, body[::-1] if p[0] == "r" else "".join(sorted(body))), p
