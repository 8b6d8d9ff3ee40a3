"""The docs as written: README.md, cluster/README.md and every page of docs/.

Every job command line parses and its config validates (a dotted override that names no field, or a
combination the config refuses, fails here rather than in a user's terminal); every config file or
path they name exists; every HTTP request body they show is one the service accepts; every Python
example runs. The README stays a front page (at most 200 lines, a link to every docs page), every
relative link and anchor resolves, and each signature docs/design.md states is the code's."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from dlm_ray.config.schema import PretrainConfig
from dlm_ray.config.inference import GenerateConfig
from dlm_ray.config.io import parse_job_args

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "cluster" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 200
JOB_CONFIGS = {"pretrain.py": PretrainConfig, "prepare_data.py": PretrainConfig, "generate.py": GenerateConfig,
               "sft.py": PretrainConfig, "compare.py": PretrainConfig, "plan.py": PretrainConfig}


def code_blocks(path: Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", path.read_text(), flags=re.S)


def shell_commands(path: Path) -> list[str]:
    """Each command of the ```bash blocks, continuation lines joined and comments dropped."""
    out = []
    for block in code_blocks(path, "bash"):
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
                        found.append((f"{doc.relative_to(ROOT)}: {part.strip()}", w.split("/")[-1], words[i + 1:]))
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
    for flag in ("--objectives", "--block_size", "--fast_threshold", "--entropy_bounds", "--gen_batches"):  # jobs/compare.py
        ap.add_argument(flag)
    for flag in ("--gpus", "--gpu", "--gpus_per_node", "--mfu"):  # jobs/plan.py
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
                assert (ROOT / path).is_file(), f"{doc.relative_to(ROOT)}: {path}"


def test_example_prompts_in_the_docs_have_valid_answers():
    import itertools

    from dlm_ray.data.corpus import check_answer

    texts = [d.read_text() for d in DOCS] + [(ROOT / "dlm_ray" / n).read_text() for n in ("data/corpus.py", "core/inference.py")]
    prompts = {m for t in texts for m in re.findall(r"\b[rsq][0-9.]{6,16}=", t)}
    assert any(p.startswith("q") for p in prompts)
    grids = ["".join("".join(r) for r in rows) for rows in itertools.product(itertools.permutations("1234"), repeat=4)]
    for p in prompts:
        if p.startswith("q"):
            assert any(check_answer(p, g) for g in grids), f"no valid answer to the example {p}"
        else:
            body = p[1:-1]
            assert check_answer(p, body[::-1] if p[0] == "r" else "".join(sorted(body))), p


def test_paths_in_the_docs_prose_exist():
    # Repository paths quoted in the text (not only in commands): a renamed file leaves no stale name.
    for doc in DOCS:
        for path in re.findall(r"`((?:jobs|cluster|benchmarks|dlm_ray|tests)/[\w/.-]+\.(?:py|ya?ml|md))`",
                               doc.read_text()):
            assert (ROOT / path).is_file(), f"{doc.relative_to(ROOT)}: {path}"


# ------------------------------------------------------------------------------- front page and links


def test_the_readme_is_a_front_page_linking_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES, f"README.md has {len(readme.splitlines())} lines"
    linked = {target.split("#")[0] for target in re.findall(r"\]\(([^)\s]+)\)", readme)}
    pages = {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}
    assert len(pages) >= 12
    assert not pages - linked, f"docs pages the README does not link: {sorted(pages - linked)}"
    assert "cluster/README.md" in linked


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # a "# comment" in a block is no heading
    return {github_anchor(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_every_relative_link_and_anchor_resolves():
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            file, _, anchor = target.partition("#")
            dest = (doc.parent / file).resolve() if file else doc
            where = f"{doc.relative_to(ROOT)}: ({target})"
            assert dest.exists(), where
            if anchor:
                assert anchor in anchors(dest), where


def test_the_github_anchor_rule():
    assert github_anchor("What resume restores") == "what-resume-restores"
    assert github_anchor("Real models: LLaDA-8B and GPUs") == "real-models-llada-8b-and-gpus"
    assert github_anchor("`cache: blocks` and caches") == "cache-blocks-and-caches"


# ------------------------------------------------------------------------------ examples and requests


def python_examples() -> list:
    # design.md's python blocks are signatures, checked against the code below; every other one runs.
    return [pytest.param(block, id=f"{doc.relative_to(ROOT)} #{i}") for doc in DOCS if doc.name != "design.md"
            for i, block in enumerate(code_blocks(doc, "python"))]


def test_the_docs_have_python_examples():
    assert python_examples()


@pytest.mark.parametrize("code", python_examples())
def test_every_python_example_runs(code, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # an example writes nothing into the repository
    exec(compile(code, "<docs example>", "exec"), {"__name__": "__doc_example__"})


def http_requests() -> list:
    """(route, JSON body) of every curl command in the docs, each with its page as the test id."""
    found = []
    for doc in DOCS:
        for cmd in shell_commands(doc):
            words = shlex.split(cmd)
            if words[0] != "curl":
                continue
            url = next(w for w in words if "localhost" in w or "127.0.0.1" in w)
            route = "/" + url.split("/", 1)[1]
            body = json.loads(words[words.index("-d") + 1])
            found.append(pytest.param(route, body, id=f"{doc.relative_to(ROOT)}: {route}"))
    return found


def test_the_docs_show_requests_of_both_routes():
    assert {p.values[0] for p in http_requests()} == {"/v1/completions", "/v1/chat/completions"}


@pytest.mark.parametrize("route,body", http_requests())
def test_every_documented_request_is_accepted(route, body):
    """Validated as the service validates it, against the settings of jobs/serve.yaml."""
    import yaml

    from dlm_ray.config.inference import ServeConfig
    from dlm_ray.serving.api import ChatCompletionRequest, CompletionRequest, resolve_sample

    args = yaml.safe_load((ROOT / "jobs" / "serve.yaml").read_text())["applications"][0]["args"]
    kind = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest}[route]
    req = kind.model_validate(body)
    resolve_sample(req, ServeConfig.model_validate(args).sample)


# ------------------------------------------------------------------------------- design.md signatures


def documented_signatures() -> list[tuple[str, str]]:
    """(dotted name, parameter list) of each ``dlm_ray.x.f(...) -> ...`` in design.md's python blocks."""
    out = []
    for block in code_blocks(ROOT / "docs" / "design.md", "python"):
        for name, params in re.findall(r"^(dlm_ray(?:\.\w+)+)\((.*?)\)\s*->", block, flags=re.S | re.M):
            out.append((name, " ".join(params.split())))
    return out


def resolve(dotted: str):
    import importlib

    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise AssertionError(f"{dotted} names nothing")


def test_design_states_the_core_contracts():
    names = {name for name, _ in documented_signatures()}
    assert {"dlm_ray.core.model.Denoiser.forward", "dlm_ray.core.sampling.generate", "dlm_ray.core.likelihood.estimate_nelbo",
            "dlm_ray.io.checkpoint.load_inference", "dlm_ray.config.io.load_config"} <= names


@pytest.mark.parametrize("name,params", documented_signatures(), ids=lambda v: v if v.startswith("dlm_ray") else "")
def test_every_signature_in_design_is_the_codes(name, params):
    """Names, order, positional or keyword-only, and defaults, as ``inspect.signature`` sees them."""
    import ast
    import inspect

    import torch

    args = ast.parse(f"def f({params}): pass").body[0].args
    positional = [(a.arg, "positional") for a in args.args]
    keyword = [(a.arg, "keyword") for a in args.kwonlyargs]
    required = "(no default)"
    defaults = [None] * (len(args.args) - len(args.defaults)) + list(args.defaults) + list(args.kw_defaults)
    documented = [(n, kind, required if d is None else eval(ast.unparse(d), {"torch": torch}))
                  for (n, kind), d in zip(positional + keyword, defaults)]
    actual = [(p.name, "keyword" if p.kind is p.KEYWORD_ONLY else "positional",
               required if p.default is inspect.Parameter.empty else p.default)
              for p in inspect.signature(resolve(name)).parameters.values()]
    assert documented == actual, f"docs/design.md: {name}"
