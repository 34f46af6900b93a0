"""notebooks/analyze_trials.ipynb: runs headless on an experiment, and is committed clean."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO
from fake_experiment import FakeTrial, make_experiment, standard_experiment, trial_id

NOTEBOOK = REPO / "notebooks" / "analyze_trials.ipynb"
LOG_SPACE = {"learning_rate": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
             "batch_size": {"type": "choice", "values": [8, 16, 32]}}


def test_committed_notebook_is_clean():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and re.search(r'^experiment = "tune_results/default"', params[0].source, re.M)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    text = NOTEBOOK.read_text(encoding="utf-8")
    machine_paths = re.findall(r"(/(?:home|root|tmp|work|Users|private|var|mnt)/[^\s\"']*|[A-Z]:\\\\[^\s\"']*)", text)
    assert machine_paths == []
    assert "TUNE_GPT_EXPERIMENT" in text


def test_markdown_names_the_objective_column_not_best_val_loss():
    """The ranking, the pivot, the scatter and the importance are of df.attrs['rank_by'] (best_tokens_per_s for
    another metric): only the advice to compare best_val_loss with final_val_loss names the val loss columns."""
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    md = [c.source for c in nb.cells if c.cell_type == "markdown"]
    lines = [line for s in md for line in s.splitlines() if "final_val_loss" not in line]
    assert not [line for line in lines if re.search(r"best_val_loss|best (validation )?loss", line)
                and "by default" not in line]
    for heading in ("## Every trial", "## Learning rate × batch size", "## Plots", "## Which parameters matter"):
        assert any(s.startswith(heading) and "objective's" in s for s in md), heading


def _execute(nb_path: Path, env: dict[str, str], monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if "TUNE_GPT_EXPERIMENT" not in env:
        monkeypatch.delenv("TUNE_GPT_EXPERIMENT", raising=False)
    monkeypatch.setenv("MPLBACKEND", "Agg")  # as on a headless CI machine: the notebook must still show plots
    nb = nbformat.read(nb_path, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=180,
                                     resources={"metadata": {"path": str(nb_path.parent)}})
    client.execute()  # raises CellExecutionError on any error
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    data = [o.get("data", {}) for o in outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    return data, text


def test_notebook_runs_on_an_experiment(tmp_path, monkeypatch):
    exp = standard_experiment(tmp_path)
    # a path relative to where the user runs `jupyter execute` (the kernel itself runs in notebooks/)
    monkeypatch.chdir(tmp_path)
    data, text = _execute(NOTEBOOK, {"PWD": str(tmp_path), "TUNE_GPT_EXPERIMENT": str(exp.relative_to(tmp_path))},
                          monkeypatch)
    assert sum("image/png" in d for d in data) >= 3  # heatmap, scatter, curves
    tables = [d["text/html"] for d in data if "<table" in d.get("text/html", "")]
    trials = [t for t in tables if trial_id(6) in t and "errored" in t]  # the trials DataFrame
    assert len(trials) == 1
    # every column, none behind pandas' "..." (a notebook shows 20; the markdown compares with final_val_loss)
    from tune_gpt import report

    columns = report.load_results(exp).columns
    assert len(columns) > 20
    assert [c for c in columns if f"<th>{c}</th>" not in trials[0]] == []
    assert any("1e-3..3e-3" in t for t in tables)  # the learning-rate x batch-size pivot
    assert "ranked by best_val_loss" in text
    # the trial shown, by id: a running search may have another best by the time the command runs
    assert f"python -m tune_gpt.replay {exp.resolve()} --trial {trial_id(0)}\n" in text
    assert "best trial has n_layer=6" in text
    assert re.search(r"optuna|variance share", text)
    # running it does not write into the committed file
    assert json.loads(NOTEBOOK.read_text())["cells"][1]["outputs"] == []


def _checkout(tmp_path: Path) -> Path:
    """A copy of the notebook in <tmp>/notebooks, as in a checkout whose tune_results/ holds the experiment."""
    (tmp_path / "notebooks").mkdir()
    shutil.copy(NOTEBOOK, tmp_path / "notebooks" / NOTEBOOK.name)
    return tmp_path / "notebooks" / NOTEBOOK.name


@pytest.mark.parametrize("case", ["batch_fixed", "all_failed"])
def test_notebook_says_why_a_figure_or_the_replay_is_missing(case, tmp_path, monkeypatch):
    nb_path = _checkout(tmp_path)
    if case == "batch_fixed":
        trials = [FakeTrial(lr, 16, "finished", [v + 0.5, v]) for lr, v in ((3e-4, 2.0), (1e-3, 1.7), (3e-3, 1.9))]
        space = {"learning_rate": LOG_SPACE["learning_rate"]}
    else:
        trials = [FakeTrial(1e-3, 8, "errored", [], error="RuntimeError: a"),
                  FakeTrial(3e-3, 16, "diverged", [2.5, math.inf], error="loss became nan"),
                  FakeTrial(2e-3, 32, "oom", [], error="torch.OutOfMemoryError: CUDA out of memory")]
        space = LOG_SPACE
    exp = make_experiment(tmp_path / "tune_results", trials, name="default", space=space)
    # the notebook's own default, tune_results/default, found from notebooks/ (..): the Jupyter server started
    # in another folder
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    data, text = _execute(nb_path, {"PWD": str(elsewhere)}, monkeypatch)
    assert f"{exp.resolve()}: {len(trials)} trials" in text
    assert "../tune_results" not in text  # the path is absolute: the replay command runs from any folder
    images = sum("image/png" in d for d in data)
    if case == "batch_fixed":
        assert images == 2  # the scatter and the curves
        assert "no heatmap: batch_size not searched\n" in text
        assert f"python -m tune_gpt.replay {exp.resolve()} --trial {trial_id(1)}\n" in text
    else:
        assert images == 0
        assert "no heatmap plot: every trial failed\n" in text
        assert "no lr scatter plot: every trial failed\n" in text
        assert "every trial failed (see the warnings above): nothing to replay\n" in text
        assert "no trial has a result yet" not in text


def _documented_commands() -> list[str]:
    nbformat = pytest.importorskip("nbformat")
    first = nbformat.read(NOTEBOOK, as_version=4).cells[0].source
    block = re.search(r"```bash\n(.*?)```", first, re.S).group(1)
    return [line for line in block.replace("\\\n", " ").splitlines() if line.strip() and not line.startswith("#")]


def test_documented_headless_commands_write_a_file_and_leave_the_notebook(tmp_path):
    """`jupyter execute notebook.ipynb` alone writes nothing (nbclient needs --output or --inplace; --inplace
    would commit outputs): each documented command, run from a checkout, writes a new file with the outputs."""
    commands = _documented_commands()
    assert len(commands) >= 2 and not [c for c in commands if "--inplace" in c]
    assert any("jupyter nbconvert" in c for c in commands) and any("jupyter execute" in c for c in commands)
    nb_path = _checkout(tmp_path)
    committed = nb_path.read_bytes()
    exp = standard_experiment(tmp_path / "tune_results", name="my_search")
    env = dict(os.environ, PYTHONPATH=str(REPO), MPLBACKEND="Agg")
    env.pop("TUNE_GPT_EXPERIMENT", None)
    for command in commands:
        tool = "nbconvert" if "jupyter nbconvert" in command else "nbclient"
        pytest.importorskip(tool)
        pytest.importorskip("ipykernel")
        if shutil.which("jupyter") is None:
            pytest.skip("no jupyter command")
        before = {p for p in tmp_path.rglob("*") if p.is_file()}
        p = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, f"{command}\n{p.stderr[-3000:]}"
        new = [f for f in {p for p in tmp_path.rglob("*") if p.is_file()} - before
               if f.suffix in (".html", ".ipynb")]
        assert new, f"{command} wrote nothing"
        assert any(f"python -m tune_gpt.replay {exp.resolve()} --trial {trial_id(0)}" in f.read_text() for f in new)
        assert nb_path.read_bytes() == committed, command
