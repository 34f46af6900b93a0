"""The Dockerfile and .dockerignore, checked by reading them (no Docker engine, no image pulls)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from conftest import REPO

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    out, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        word, _, rest = current.partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    return out


@pytest.fixture(scope="module")
def docker():
    return instructions(DOCKERFILE.read_text())


def args_of(docker, kind: str) -> list[str]:
    return [a for k, a in docker if k == kind]


def test_one_stage_on_a_cuda_pytorch_base_that_a_build_arg_switches_to_rocm(docker):
    first_from = next(i for i, (k, _) in enumerate(docker) if k == "FROM")
    global_args = dict(a.split("=", 1) for k, a in docker[:first_from] if k == "ARG")
    base = global_args["BASE_IMAGE"]
    assert re.fullmatch(r"pytorch/pytorch:2\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-(runtime|devel)", base), base
    assert tuple(int(x) for x in base.split(":")[1].split("-")[0].split(".")[:2]) >= (2, 4)  # pyproject: torch>=2.4
    assert args_of(docker, "FROM") == ["${BASE_IMAGE}"]
    text = DOCKERFILE.read_text()
    assert "--build-arg BASE_IMAGE=rocm/pytorch:" in text and "gpt-train-rocm" in text


def test_it_installs_this_project_with_extras_and_keeps_the_base_torch(docker):
    runs = " && ".join(args_of(docker, "RUN"))
    installs = [shlex.split(c) for c in runs.split("&&") if re.search(r"\bpip\b.*\binstall\b", c)]
    assert len(installs) == 1, installs
    cmd = installs[0]
    (target,) = [a for a in cmd if a.startswith(".")]
    default = dict(a.split("=", 1) for k, a in docker if k == "ARG" and "=" in a).get("EXTRAS", "")
    pyproject = (REPO / "pyproject.toml").read_text()
    for extras in (default, ""):  # the default, and `--build-arg EXTRAS=` (".[]" is no requirement pip takes)
        spec = subprocess.run(["sh", "-c", f'printf %s "{target}"'], env={"EXTRAS": extras, "PATH": os.environ["PATH"]},
                              capture_output=True, text=True, check=True).stdout
        assert spec == (f".[{extras}]" if extras else "."), (extras, spec)
        for extra in filter(None, extras.split(",")):
            assert re.search(rf"^{extra}\s*=", pyproject, re.M), f"extra {extra!r} is not in pyproject.toml"
    assert "--no-deps" not in cmd
    flag = "--constraint" if "--constraint" in cmd else "-c"
    constraint_file = cmd[cmd.index(flag) + 1]
    # The constraint is written by the RUN step before the install: run that command here.
    writer = next(c for c in runs.split("&&") if constraint_file in c and ">" in c)
    program = shlex.split(writer.split(">")[0])
    assert program[:2] == ["python", "-c"]
    line = subprocess.run([sys.executable, "-c", program[2]], capture_output=True, text=True, check=True).stdout
    from packaging.requirements import Requirement

    req = Requirement(line.strip())
    assert req.name == "torch" and req.specifier.contains(version("torch"), prereleases=True)
    assert str(req.specifier) == f"=={version('torch')}"  # exactly the installed torch, nothing newer


def test_the_entry_point_runs_the_search(docker):
    entry = args_of(docker, "ENTRYPOINT")
    assert len(entry) == 1
    argv = json.loads(entry[0]) + sum((json.loads(c) for c in args_of(docker, "CMD")), [])
    assert argv[:3] == ["python", "-m", "tune_gpt.search"]
    p = subprocess.run([sys.executable, *argv[1:], "--help"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "--storage-path" in p.stdout


def test_no_wandb_credentials_in_the_image(docker):
    for kind, arg in docker:
        if kind in ("ENV", "ARG", "LABEL"):
            assert "WANDB_API_KEY" not in arg.upper() and "NETRC" not in arg.upper(), (kind, arg)
        if kind in ("COPY", "ADD"):
            assert not re.search(r"netrc|\.config/wandb|\.env\b|\bwandb\b", arg), (kind, arg)
        if kind == "RUN":
            assert "WANDB_API_KEY" not in arg and "wandb login" not in arg, arg


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: a path is left out when a pattern matches it or one of its parent folders."""
    def rx(p: str) -> re.Pattern:
        out, i = "", 0
        while i < len(p):
            if p.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif p.startswith("**", i):
                out, i = out + ".*", i + 2
            elif p[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif p[i] == "?":
                out, i = out + "[^/]", i + 1
            elif p[i] == "[":
                j = p.index("]", i)
                out, i = out + p[i:j + 1], j + 1
            else:
                out, i = out + re.escape(p[i]), i + 1
        return re.compile(out + r"\Z")

    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    for pat in patterns:
        negate = pat.startswith("!")
        r = rx(pat.lstrip("!").strip("/"))
        if any(r.match(p) for p in prefixes):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_results_caches_and_environments_out(docker):
    patterns = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    out = ["tune_results/tiny/trial_0/params.json", "output_single/checkpoint/ckpt.pt", "wandb/run-1/files/x.txt",
           "tune_reports/tiny/report.html", "runs/exp/wandb/offline-run-1/run.wandb", ".git/HEAD",
           ".venv/bin/python", "venv/lib/site.py", "tune_gpt/__pycache__/search.cpython-311.pyc",
           "tests/__pycache__/conftest.cpython-311.pyc", ".pytest_cache/v/cache/lastfailed",
           "tune_gpt.egg-info/PKG-INFO", ".netrc", ".env", "benchmarks/out/result.json"]
    for path in out:
        assert _ignored(path, patterns), f"{path} would be sent into the build context"
    copied = [src for kind, a in docker if kind == "COPY" for src in shlex.split(a)[:-1] if not src.startswith("--")]
    assert copied
    for src in copied + ["tune_gpt/search.py", "search_spaces/default.yaml"]:
        assert (REPO / src).exists(), f"COPY {src}: not in the repository"
        assert not _ignored(src, patterns), f"{src} is needed by the build but .dockerignore drops it"


def test_the_ignore_matcher_can_tell_in_from_out():
    assert _ignored("a/b/c.txt", ["a"]) and _ignored("x/__pycache__/y.pyc", ["**/__pycache__"])
    assert not _ignored("tune_gpt/search.py", ["tune_results", "**/*.pt"]) and _ignored("m/w.pt", ["**/*.pt"])
    assert not _ignored("a/keep.txt", ["a", "!a/keep.txt"])


def _doc_commands(doc: Path) -> list[list[str]]:
    """Every shell command in the doc's code blocks and inline code, continuations joined."""
    text = doc.read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = []
    for block in blocks:
        lines += [ln.split("  #")[0] for ln in block.replace("\\\n", " ").splitlines()]
    lines += re.findall(r"`((?:docker|ray|python) [^`]+)`", text)
    return [shlex.split(ln.replace("...", "")) for ln in lines if ln.strip()]


def test_scaling_doc_commands_use_real_flags():
    from tune_gpt.report import main as report_main
    from tune_gpt.search import build_parser

    commands = _doc_commands(REPO / "README.md")
    checked = {"search": 0, "report": 0, "ray start": 0, "docker run": 0}
    ray_help = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "start", "--help"], capture_output=True,
                              text=True, timeout=120).stdout
    for argv in commands:
        argv = [a for a in argv if "=" not in a or a.startswith("-")]  # drop leading VAR=value
        if "--help" in argv:
            continue
        if argv[:3] == ["python", "-m", "tune_gpt.search"] or (argv[:1] == ["docker"] and "run" in argv):
            if argv[0] == "docker":
                image = next(i for i, a in enumerate(argv) if a.startswith("gpt-train"))
                if "--entrypoint" in argv:  # `ray start` in the image
                    argv = ["ray", *argv[image + 1:]]
                else:
                    checked["docker run"] += 1
                    argv = ["python", "-m", "tune_gpt.search", *argv[image + 1:]]
            if argv[0] == "python":
                build_parser().parse_args(argv[3:])  # an unknown flag exits with code 2
                checked["search"] += 1
        if argv[:3] == ["python", "-m", "tune_gpt.report"]:
            with pytest.raises(SystemExit) as e:
                report_main([*argv[3:], "--help"])
            assert e.value.code == 0
            checked["report"] += 1
        if argv[:2] == ["ray", "start"]:
            for a in argv[2:]:
                assert a.split("=")[0] in ray_help, f"ray start has no {a}"
            checked["ray start"] += 1
    assert all(checked.values()), checked
