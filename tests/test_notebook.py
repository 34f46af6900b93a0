"""notebooks/analyze_trials.ipynb: runs headless on an experiment, and is committed clean."""

from __future__ import annotations

import json
import re

import pytest

from conftest import REPO
from fake_experiment import standard_experiment, trial_id

NOTEBOOK = REPO / "notebooks" / "analyze_trials.ipynb"


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


def test_notebook_runs_on_an_experiment(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    exp = standard_experiment(tmp_path)
    # a path relative to where the user runs `jupyter execute` (the kernel itself runs in notebooks/)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PWD", str(tmp_path))
    monkeypatch.setenv("TUNE_GPT_EXPERIMENT", str(exp.relative_to(tmp_path)))
    monkeypatch.setenv("MPLBACKEND", "Agg")  # as on a headless CI machine: the notebook must still show plots
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=180,
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError on any error
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    data = [o.get("data", {}) for o in outputs]
    assert sum("image/png" in d for d in data) >= 3  # heatmap, scatter, curves
    tables = [d["text/html"] for d in data if "<table" in d.get("text/html", "")]
    assert any(trial_id(6) in t and "errored" in t for t in tables)  # the trials DataFrame
    assert any("1e-3..3e-3" in t for t in tables)  # the learning-rate x batch-size pivot
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"python -m tune_gpt.replay {exp}" in text
    assert "best trial has n_layer=6" in text
    assert re.search(r"optuna|variance share", text)
    # running it does not write into the committed file
    assert json.loads(NOTEBOOK.read_text())["cells"][1]["outputs"] == []
