"""The GPU benchmark script runs end to end on the CPU in --dry-run mode (no GPU needed)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_gpu_sh_dry_run_writes_its_tables(tmp_path, corpus_file):
    out = tmp_path / "gpu"
    env = dict(os.environ, WANDB_MODE="disabled", PYTHON=sys.executable)  # this interpreter, not the first on PATH
    p = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), str(out), "--dry-run", "--data", str(corpus_file)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    res = json.loads((out / "gpu.json").read_text())
    assert res["dry_run"] is True
    assert {r["size"] for r in res["speed"]} == {"tiny", "small", "medium"}
    assert all(r["tokens_per_s"] > 0 for r in res["speed"])
    assert [(r["size"], r["trials"]) for r in res["packing"]] == [("tiny", 1), ("tiny", 2)]
    assert all(r.get("aggregate_tokens_per_s", 0) > 0 and r["window_s"] > 1 for r in res["packing"]), res["packing"]
    assert "tokens/s" in (out / "gpu_speed.md").read_text() and "aggregate" in (out / "gpu_packing.md").read_text()
    [resume] = res["checks"]  # on the CPU a resumed run is exact
    assert resume["steps"] == 60 and resume["same_count"] and len(resume["val_losses_whole"]) == 3, resume
    assert resume["max_abs_diff"] == 0.0 and resume["noise_floor"] == 0.0, resume


def _fake_search(folder, trials):
    """An experiment folder as run_search leaves it: per trial, params.json and result.json rows."""
    for name, params, rows in trials:
        d = folder / name
        d.mkdir(parents=True)
        (d / "params.json").write_text(json.dumps(params))
        (d / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_search_efficiency_counts_steps_in_arrival_order_and_finds_the_target(tmp_path):
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    import search_efficiency as se

    def row(t, step, loss):
        return {"timestamp": t, "time_total_s": 0.0, "step": step, "val/loss": loss}

    a = {"learning_rate": 1e-3, "batch_size": 8}
    b = {"learning_rate": 3e-3, "batch_size": 32}
    # two trials at once: a reports at t=1, 3, 5; b (stopped early, then its best) at t=2, 4
    exp = _fake_search(tmp_path / "s", [("trial_a", a, [row(1, 10, 3.0), row(3, 20, 2.8), row(5, 30, 2.7)]),
                                        ("trial_b", b, [row(2, 10, 2.9), row(4, 20, 2.5)])])
    c = se.curve(exp)
    assert c["steps"] == [10, 20, 30, 40, 50]  # steps summed over trials, in the order reports came
    assert c["best"] == [3.0, 2.9, 2.8, 2.5, 2.5]
    assert c["best_params"] == b and c["trials"] == 2 and c["learning_rates"] == [1e-3, 3e-3]
    assert se.steps_to_reach(c, 2.9) == 20 and se.steps_to_reach(c, 2.0) == float("inf")

    grid = {"steps": [30, 60, 90], "best": [2.6, 2.5, 2.4], "best_params": a}
    table, figures = se.summarise({"grid/0": grid, "optuna+asha/0": c,
                                   "optuna+asha/1": {**c, "best": [3.0] * 5}}, steps=30)
    # the target is 2.4 * 1.01 = 2.424: neither search gets there
    assert figures["optuna+asha"]["fractions"] == [float("inf"), float("inf")]
    assert "NOT met" in table
    close = {**c, "best": [3.0, 2.9, 2.42, 2.42, 2.42]}  # within 1 % after 30 of the grid's 90 steps
    table, figures = se.summarise({"grid/0": grid, "optuna+asha/0": close, "optuna+asha/1": close,
                                   "optuna+asha/2": c}, steps=30)
    assert figures["optuna+asha"]["median_fraction_to_reach"] == pytest.approx(30 / 90)
    assert "bar" in table and ": met (33%)" in table
    assert "3 learning rates [0.0003, 0.001, 0.003]" in table  # no learning rates recorded: the default grid's
    table, _ = se.summarise({"grid/0": {**grid, "learning_rates": [1e-4, 1e-2]}, "optuna+asha/0": c}, steps=30,
                            lrs=(3e-4, 1e-3, 3e-3))
    assert "2 learning rates [0.0001, 0.01]" in table  # the grid's own trials, whatever the caller passes


def test_search_efficiency_merges_runs_only_when_their_grids_agree(tmp_path):
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    import search_efficiency as se

    grid = {"steps": [30, 60, 90], "best": [2.6, 2.5, 2.4], "best_params": {}, "trials": 3}
    run1 = {"grid/0": grid, "optuna+asha/0": {**grid, "best": [2.7, 2.5, 2.3]}}
    run2 = {"grid/0": dict(grid), "random/0": {**grid, "best": [2.9, 2.8, 2.7]}}
    merged = se.merge_curves(se.merge_curves({}, run1, "a.json"), run2, "b.json")
    assert set(merged) == {"grid/0", "optuna+asha/0", "random/0"}
    other = {"grid/0": {**grid, "best": [2.6, 2.5, 2.2]}}  # a different grid: other settings
    with pytest.raises(SystemExit, match="b.json: its grid ended at 2.2000"):
        se.merge_curves(merged, other, "b.json")
    with pytest.raises(SystemExit, match="c.json: no grid curve"):
        se.merge_curves(merged, {"random/0": grid}, "c.json")
    log_uniform = {"grid/0": grid, "optuna/0": {**grid, "lr_domain": {"loguniform": [1e-4, 1e-2]}}}
    values = {"grid/0": grid, "optuna+asha/0": {**grid, "lr_domain": {"choice": [1e-4, 1e-3, 1e-2]}}}
    with pytest.raises(SystemExit, match="d.json: its searchers drew learning rates from another region"):
        se.merge_curves(log_uniform, values, "d.json")


def test_search_efficiency_grid_values_region_searches_the_grids_own_points(tmp_path):
    import sys

    import yaml

    sys.path.insert(0, str(REPO / "benchmarks"))
    import search_efficiency as se
    from tune_gpt.spaces import load_space

    lrs = (1e-4, 1e-3, 1e-2)
    for method, region, want in [("grid", "grid-values", {"grid": list(lrs)}),
                                 ("optuna+asha", "grid-values", {"choice": list(lrs)}),
                                 ("optuna+asha-pause", "grid-values", {"choice": list(lrs)}),
                                 ("random", "log-uniform", {"loguniform": [1e-4, 1e-2]})]:
        path = se.space_file(method, 30, "corpus.txt", 5, {"grace_period": 1}, tmp_path, lrs, region)
        doc = yaml.safe_load(path.read_text())
        assert doc["space"]["learning_rate"] == want, (method, region)
        assert doc["space"]["batch_size"] == {"grid" if method == "grid" else "choice": list(se.BATCH_SIZES)}
        want_sched = {"type": "asha", "grace_period": 1, "pause": method.endswith("pause")}  # (pause: the default)
        assert doc["scheduler"] == (want_sched if method.startswith("optuna+asha") else {"type": "none"})
        load_space(path)  # the product reads it
    grid = {"steps": [30, 60, 90], "best": [2.6, 2.5, 2.4], "best_params": {}, "learning_rates": list(lrs)}
    table, _ = se.summarise({"grid/0": grid, "optuna+asha/0": {**grid, "lr_domain": {"choice": list(lrs)}}}, steps=30)
    assert 'the searchers\' learning rate: {"choice": [0.0001, 0.001, 0.01]}' in table


def test_train_speed_pairs_each_round_with_its_own_reference_run():
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    import train_speed as ts

    rows = [{"name": "nanogpt-loop", "median_ms": 80.0}, {"name": "tune_gpt", "median_ms": 64.0},
            {"name": "nanogpt-loop", "median_ms": 63.0}, {"name": "tune_gpt", "median_ms": 70.0}]
    # best-of would pair 63 with 64 (0.98x); round by round it is 1.25x then 0.90x
    assert ts.paired_speedups(rows) == [1.25, 0.9]


def test_a_packing_row_whose_workers_fail_says_why_and_keeps_their_stderr(tmp_path):
    """A worker that fails (here: no such corpus) ends the row with its last stderr line, at once rather
    than after the others' wait for it at the common start; its stderr is kept, nothing else is left."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_bench

    row = gpu_bench.packing("tiny", 2, 2.0, True, str(tmp_path / "missing.txt"), tmp_path)
    assert row["size"] == "tiny" and row["trials"] == 2 and "aggregate_tokens_per_s" not in row, row
    [error] = row["error"]
    assert "missing.txt" in error and re.search(r"\(stderr: pack_tiny_2_[01]\.log\)$", error), error
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left and set(left) <= {"pack_tiny_2_0.log", "pack_tiny_2_1.log"}, left
