"""tune_gpt.report on hand-written experiment folders (fast) and one real Ray run (slow)."""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from conftest import REPO
from fake_experiment import (RAY_TRACEBACK, STANDARD, FakeTrial, lr_dominant_experiment, make_experiment,
                             standard_experiment, trial_id)
from tune_gpt import report
from tune_gpt.errors import DataError

pd = pytest.importorskip("pandas")

IMG = '<img src="data:image/png;base64,'


@pytest.fixture(scope="module")
def standard(tmp_path_factory) -> Path:
    return standard_experiment(tmp_path_factory.mktemp("exp"))


@pytest.fixture(scope="module")
def df(standard):
    return report.load_results(standard)


def by_id(df, i: int):
    return df.set_index("trial_id").loc[trial_id(i)]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "tune_gpt.report", *args], capture_output=True, text=True,
                          env=env, timeout=120, cwd=cwd)


# ----------------------------------------------------------------- reading


def test_import_does_not_load_heavy_modules():
    code = ("import sys, tune_gpt.report; "
            "print([m for m in ('pandas', 'matplotlib', 'optuna', 'ray', 'torch') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_statuses(df):
    expected = {0: "finished", 1: "finished", 2: "finished", 3: "finished", 4: "early-stopped",
                5: "diverged", 6: "errored", 7: "oom", 8: "running"}
    got = {i: by_id(df, i)["status"] for i in expected}
    assert got == expected
    assert len(df) == 9  # the pending trial has no folder yet
    assert df.attrs["pending"] == 1


def test_error_lines(df):
    # Ray's error.txt: the exception line, not the traceback, not the second line of the message
    assert by_id(df, 6)["error"] == "RuntimeError: boom in trial: bad shape"
    assert by_id(df, 5)["error"] == "loss became nan at step 20 (lr too high?)"
    assert "CUDA out of memory" in by_id(df, 7)["error"]
    assert (df[df["status"].isin(["finished", "early-stopped", "running"])]["error"] == "").all()


def test_metrics(df):
    t3 = by_id(df, 3)  # losses 2.4, 1.75, 1.78
    assert t3["best_val_loss"] == pytest.approx(1.75)
    assert t3["final_val_loss"] == pytest.approx(1.78)
    assert t3["best_val_bpc"] == pytest.approx(1.75 / math.log(2))
    assert (t3["steps"], t3["total_steps"], t3["tokens"], t3["wall_s"]) == (30, 30, 30 * 32 * 32, 6.0)
    assert t3["tokens_per_s"] == pytest.approx(32000.0)
    t4 = by_id(df, 4)
    assert (t4["steps"], t4["total_steps"]) == (10, 30)
    t5 = by_id(df, 5)  # diverged: final inf, best before divergence
    assert math.isinf(t5["final_val_loss"]) and t5["best_val_loss"] == pytest.approx(2.7)
    assert math.isnan(by_id(df, 6)["best_val_loss"])


def test_ranks(df):
    ranks = {i: by_id(df, i)["rank"] for i in range(9)}
    assert {i: r for i, r in ranks.items() if not pd.isna(r)} == {0: 1, 1: 2, 3: 3, 2: 4, 8: 5, 4: 6}
    # failed trials are not ranked, even with a loss (t5 2.7, t7 2.8 would beat t4's 2.9)
    assert all(pd.isna(ranks[i]) for i in (5, 6, 7))
    assert list(df["trial_id"][:3]) == [trial_id(0), trial_id(1), trial_id(3)]  # sorted best first


def test_config_columns(df):
    cols = set(df.columns)
    assert {"learning_rate", "batch_size", "n_layer", "model_size", "seed", "max_steps"} <= cols
    assert not {c for c in cols if c.startswith("wandb") or c.startswith("model.")}
    assert not cols & {"output_dir", "progress", "checkpoint", "tensorboard", "cache_dir", "num_threads", "device"}
    assert df.attrs["searched"] == ["learning_rate", "batch_size", "n_layer"]
    assert df.attrs["space"]["n_layer"] == {"type": "choice", "values": [2, 4, 6]}
    assert all(Path(p).is_dir() for p in df["trial_dir"])


def test_load_curves(standard):
    c = report.load_curves(standard)
    assert list(c.columns[:5]) == ["trial_id", "training_iteration", "step", "val/loss", "train/loss"]
    assert len(c) == sum(len(t.val_losses) for t in STANDARD)
    t0 = c[c["trial_id"] == trial_id(0)]
    assert list(t0["step"]) == [10, 20, 30] and list(t0["val/loss"]) == [2.5, 2.0, 1.6]


def test_the_curves_draw_the_searchs_objective_where_trials_reported_it(standard):
    df, curves = report.load_results(standard), report.load_curves(standard)
    assert report.curve_metric(df, curves) == "val/loss"
    df.attrs["metric"] = "train/loss"  # a search that ranked by another metric, reported at each evaluation
    assert report.curve_metric(df, curves) == "train/loss"
    fig = report.curves_figure(df, curves, metric=report.curve_metric(df, curves))
    assert fig.axes[0].get_ylabel() == "train/loss" and fig.axes[0].get_title().startswith("train/loss of the")
    df.attrs["metric"] = "gpu/util"  # not in the curves: val/loss, as before
    assert report.curve_metric(df, curves) == "val/loss"
    # a table cell of such an objective (tokens_per_s) reads as the number, not to 4 decimals
    assert report._cell("best", 9167.9078) == "9168" and report._cell("mean", 1.23456) == "1.2346"


def test_load_curves_keeps_latest_of_a_re_reported_step(tmp_path):
    exp = make_experiment(tmp_path, [FakeTrial(1e-3, 8, "finished", [2.0, 1.8, 1.6])])
    rj = next(exp.glob("trainable_*/result.json"))
    lines = rj.read_text().splitlines()
    again = json.loads(lines[1])
    again["val/loss"] = 1.7  # restored from checkpoint_000001 and evaluated step 20 again
    rj.write_text("\n".join(lines[:2] + [json.dumps(again)] + lines[2:]) + "\n")
    c = report.load_curves(exp)
    assert list(c["step"]) == [10, 20, 30]
    assert c.set_index("step").loc[20, "val/loss"] == 1.7


def test_error_line_of_real_ray_text():
    text = RAY_TRACEBACK.format(error="ValueError: bad value\nmore detail")
    assert report.error_line(text) == "ValueError: bad value"
    assert report.error_line("Failure # 1 (occurred at x)\nray.exceptions.RayTaskError(OSError): disk full\n") == \
        "ray.exceptions.RayTaskError(OSError): disk full"
    assert report.error_line("\x1b[36msomething odd happened\x1b[39m") == "something odd happened"


@pytest.mark.parametrize("status", ["finished", "early-stopped"])
def test_status_file_beats_error_txt_after_a_retry(tmp_path, status):
    # A trial that failed once (error.txt) and, retried by Ray or by --resume --retry-errored, finished or was
    # stopped by ASHA (the error.txt of the failed attempt stays; the report called such a trial errored).
    exp = make_experiment(tmp_path, [FakeTrial(1e-3, 8, status, [2.0, 1.6], status_file=True)])
    d = next(exp.glob("trainable_*"))
    (d / "error.txt").write_text(RAY_TRACEBACK.format(error="RuntimeError: node died"))
    os.utime(d / "error.txt", (1, 1))  # older than the status file the later attempt wrote
    assert report.load_results(exp)["status"].tolist() == [status]


@pytest.mark.parametrize("losses,ray_status,expected", [
    ([2.0, 1.8, 1.6], "TERMINATED", "finished"),  # the retry reached its last step; ASHA ended it in that report
    ([2.0, 1.8], "TERMINATED", "early-stopped"),  # the retry was cut by the scheduler
    ([2.0, 1.8], "ERROR", "errored"),  # the retry's actor died: Ray's ERROR stands
])
def test_retried_trial_whose_last_attempt_wrote_only_running(tmp_path, losses, ray_status, expected):
    # Each attempt writes {"status": "running"} first; Tune may end the actor before the attempt writes more.
    status = {"TERMINATED": "finished", "ERROR": "errored"}[ray_status]
    exp = make_experiment(tmp_path, [FakeTrial(1e-3, 8, status, losses, error="RuntimeError: node died")])
    d = next(exp.glob("trainable_*"))
    (d / "error.txt").write_text(RAY_TRACEBACK.format(error="RuntimeError: node died"))
    (d / "tune_gpt_status.json").write_text('{"status": "running", "device": "cpu"}')
    row = report.load_results(exp).iloc[0]
    assert row["status"] == expected
    if expected == "errored":
        assert row["error"] == "RuntimeError: node died"


@pytest.mark.parametrize("after_failure_s,recorded,expected", [
    (3.25, True, "running"),  # began after the failure: a retry, still running
    (-20.0, True, "errored"),  # the attempt that failed
    (3.25, False, "errored"),  # no failure time recorded (a search before tune_gpt kept it): the files' times decide
])
def test_a_retry_of_a_running_search_is_told_by_its_start_not_by_file_times(tmp_path, after_failure_s, recorded,
                                                                             expected):
    """Ray copies error.txt to storage again at every sync, so it always looked newer than the retry's status
    file: a retried trial of a running or interrupted search read as errored, unranked, and replay skipped it.
    The search's driver records each failure's Unix time; each attempt, when it began."""
    from tune_gpt.report import FAILURES_FILE

    exp = make_experiment(tmp_path, [FakeTrial(2e-3, 16, "running", [2.0, 1.5]),
                                     FakeTrial(1e-3, 8, "finished", [2.1, 1.9, 1.8], status_file=True)])
    d = next(exp.glob(f"trainable_*_{0:05d}_*"))
    failed = 1_767_322_000.0
    (d / "error.txt").write_text(RAY_TRACEBACK.format(error="RuntimeError: node died"))
    if recorded:
        (d / FAILURES_FILE).write_text(json.dumps([failed - 100, failed]))
    (d / "tune_gpt_status.json").write_text(json.dumps({"status": "running", "attempt_started_s": failed + after_failure_s}))
    os.utime(d / "tune_gpt_status.json", (1, 1))  # error.txt, copied again, is newer
    df = report.load_results(exp)
    first = df[df["trial_id"].str.endswith("_00000")].iloc[0]
    assert first["status"] == expected
    # its best (1.5) leads when it is not errored; an errored trial is not ranked
    assert first["rank"] == 1 if expected == "running" else pd.isna(first["rank"])


def test_errored_status_file_message_is_used(tmp_path):
    # search.py writes {"status": "errored", "message": ...} and Ray writes error.txt.
    exp = make_experiment(tmp_path, [FakeTrial(1e-3, 8, "errored", [], error="KeyError: 'x'", status_file=True)])
    row = report.load_results(exp).iloc[0]
    assert (row["status"], row["error"]) == ("errored", "KeyError: 'x'")


def test_scheduler_stopped_trial_with_running_status_file(tmp_path):
    # Ray stops a trial by SystemExit inside tune.report: a `finally` may leave {"status": "running"}.
    exp = make_experiment(tmp_path, [FakeTrial(1e-3, 8, "early-stopped", [2.0])])
    (next(exp.glob("trainable_*")) / "tune_gpt_status.json").write_text('{"status": "running"}')
    assert report.load_results(exp)["status"].tolist() == ["early-stopped"]


def test_oom_without_status_file_is_oom(tmp_path):
    exp = make_experiment(tmp_path, [FakeTrial(1e-3, 8, "oom", [], status_file=False,
                                               error="torch.OutOfMemoryError: CUDA out of memory.")])
    row = report.load_results(exp).iloc[0]
    assert row["status"] == "oom" and row["error"].startswith("torch.OutOfMemoryError")


def test_without_state_or_info_degrades(tmp_path):
    exp = standard_experiment(tmp_path, info=False, state=False)
    d = report.load_results(exp)
    st = d.set_index("trial_id")["status"]
    # status files and error.txt still decide; without Ray's state an unfinished trial reads as running
    assert st[trial_id(0)] == "finished" and st[trial_id(6)] == "errored" and st[trial_id(5)] == "diverged"
    assert st[trial_id(4)] == "running" and st[trial_id(8)] == "running"
    assert d.attrs["mode"] == "min" and d.attrs["space"] == {}
    assert set(d.attrs["searched"]) == {"learning_rate", "batch_size", "n_layer"}
    assert report.lr_is_continuous(d) is True  # 9 distinct learning rates
    assert by_id(d, 0)["rank"] == 1


def test_mode_max_ranks_highest_first(tmp_path):
    trials = [FakeTrial(1e-3, 8, "finished", [1.0]), FakeTrial(2e-3, 8, "finished", [3.0])]
    exp = make_experiment(tmp_path, trials, metric="val/loss", mode="max")
    d = report.load_results(exp)
    assert d.attrs["rank_by"] == "best_val_loss" and d.iloc[0]["trial_id"] == trial_id(1)
    assert d.iloc[0]["best_val_loss"] == 3.0 and d.iloc[0]["rank"] == 1


def test_moved_folder(standard, tmp_path):
    moved = tmp_path / "elsewhere" / "renamed"
    shutil.copytree(standard, tmp_path / "copy")
    moved.parent.mkdir()
    shutil.move(str(tmp_path / "copy"), str(moved))
    d = report.load_results(moved)
    original = report.load_results(standard)
    assert d["status"].tolist() == original["status"].tolist()
    assert d["rank"].tolist() == original["rank"].tolist()
    assert all(Path(p).parent == moved.resolve() for p in d["trial_dir"])
    out = report.write_report(moved)
    assert out == moved / "report"
    assert f"python -m tune_gpt.replay {moved}" in (out / "report.md").read_text()


def test_path_errors(tmp_path):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "nope"))):
        report.load_results(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no trials"):
        report.load_results(tmp_path / "empty")
    storage = tmp_path / "storage"
    make_experiment(storage, [FakeTrial(1e-3, 8, "finished", [2.0])], name="one")
    assert report.find_experiment(storage) == storage / "one"  # a storage folder with one experiment
    make_experiment(storage, [FakeTrial(1e-3, 8, "finished", [2.0])], name="two")
    with pytest.raises(DataError, match="2 experiments .*one, two"):
        report.load_results(storage)
    trial = next((storage / "one").glob("trainable_*"))
    with pytest.raises(DataError, match="one trial's folder"):
        report.load_results(trial)


# ----------------------------------------------------------------- comparisons


def test_pivot_values_by_hand(df):
    p = report.lr_batch_pivot(df)
    bins = ["3e-4..1e-3", "1e-3..3e-3", "3e-3..1e-2"]
    assert list(p["best"].columns) == bins and list(p.index) == [8, 16, 32]
    assert p.attrs["binned"] is True
    best = p["best"]
    # bs 8:  t2 5e-4 -> 1.80; t8 1e-3 (running) -> 2.2; t5 8e-3 diverged: left out
    # bs 16: t0 2e-3 -> 1.60 and t1 1.5e-3 -> 1.70 share a cell; t6 errored: left out
    # bs 32: t4 4e-4 -> 2.9; t7 3e-3 oom: left out; t3 6e-3 -> 1.75
    assert best.loc[8, bins[0]] == pytest.approx(1.80) and best.loc[8, bins[1]] == pytest.approx(2.2)
    assert math.isnan(best.loc[8, bins[2]])
    assert best.loc[16, bins[1]] == pytest.approx(1.60) and math.isnan(best.loc[16, bins[0]])
    assert best.loc[32, bins[0]] == pytest.approx(2.9) and best.loc[32, bins[2]] == pytest.approx(1.75)
    assert p["mean"].loc[16, bins[1]] == pytest.approx(1.65)
    assert p["std"].loc[16, bins[1]] == pytest.approx(math.sqrt(((1.6 - 1.65) ** 2 + (1.7 - 1.65) ** 2) / 1))
    assert p["count"].loc[16, bins[1]] == 2 and p["count"].loc[16, bins[0]] == 0
    assert int(p["count"].to_numpy().sum()) == 6


def test_lr_bins():
    assert report.lr_bin_label(2e-3) == "1e-3..3e-3"
    assert report.lr_bin_label(1e-3) == "1e-3..3e-3"  # lower edge included
    assert report.lr_bin_label(2.99e-3) == "1e-3..3e-3"
    assert report.lr_bin_label(3e-3) == "3e-3..1e-2"  # the edges are those the labels name
    assert report.lr_bin_label(3.05e-3) == "3e-3..1e-2"  # (at 10**-2.5 = 3.16e-3 it sat under "1e-3..3e-3")
    assert report.lr_bin_label(3.2e-3) == "3e-3..1e-2"
    assert report.lr_bin_label(1e-2) == "1e-2..3e-2" and report.lr_bin_label(9.99e-3) == "3e-3..1e-2"
    assert report.lr_bin_label(9.99e-5) == "3e-5..1e-4"
    assert report.lr_bin_label(0.5) == "3e-1..1e0"


def test_pivot_keeps_discrete_learning_rates(tmp_path):
    space = {"learning_rate": {"type": "choice", "values": [1e-3, 3e-3]}, "batch_size": {"type": "grid", "values": [8, 16]}}
    trials = [FakeTrial(lr, bs, "finished", [v]) for (lr, bs), v in
              zip([(1e-3, 8), (3e-3, 8), (1e-3, 16), (3e-3, 16)], [2.0, 1.9, 1.8, 1.7])]
    d = report.load_results(make_experiment(tmp_path, trials, space=space))
    p = report.lr_batch_pivot(d)
    assert p.attrs["binned"] is False
    assert list(p["best"].columns) == [1e-3, 3e-3]
    assert p["best"].loc[16, 3e-3] == pytest.approx(1.7) and p["best"].loc[8, 1e-3] == pytest.approx(2.0)


def test_best_lr_per_batch(df):
    b = report.best_lr_per_batch(df)
    assert list(b.index) == [8, 16, 32]
    assert b["learning_rate"].tolist() == [5e-4, 2e-3, 6e-3]
    assert b["best_val_loss"].tolist() == pytest.approx([1.80, 1.60, 1.75])
    assert b["trial_id"].tolist() == [trial_id(2), trial_id(0), trial_id(3)]
    assert b["trials"].tolist() == [2, 2, 2]  # ranked trials only: t5, t6, t7 left out
    assert b["status"].tolist() == ["finished"] * 3 and b["steps"].tolist() == [30, 30, 30]
    only_stopped = df[df["trial_id"] != trial_id(3)].copy()  # batch 32 keeps only its ASHA-stopped trial
    only_stopped.attrs = dict(df.attrs)
    row = report.best_lr_per_batch(only_stopped).loc[32]
    assert row["status"] == "early-stopped" and row["steps"] == 10  # shown as the shorter run it is



def test_pivot_spread_is_over_full_runs_and_cells_of_stopped_trials_say_so(tmp_path):
    """A loss after 10 steps and one after 30 differ by their lengths: the mean and spread of a cell are
    over the trials that ran their whole budget, and a cell holding only stopped trials is marked."""
    space = {"learning_rate": {"type": "choice", "values": [1e-3, 3e-3]}, "batch_size": {"type": "choice", "values": [16, 32]}}
    trials = [FakeTrial(1e-3, 16, "finished", [2.0, 1.8, 1.6]), FakeTrial(1e-3, 16, "early-stopped", [2.9], status_file=False),
              FakeTrial(3e-3, 32, "early-stopped", [2.85], status_file=False), FakeTrial(1e-3, 32, "finished", [2.1, 2.0, 1.95])]
    exp = make_experiment(tmp_path, trials, space=space)
    d = report.load_results(exp)
    p = report.lr_batch_pivot(d)
    assert p["best"].loc[16, 1e-3] == pytest.approx(1.6) and p["count"].loc[16, 1e-3] == 2
    assert p["full"].loc[16, 1e-3] == 1 and p["mean"].loc[16, 1e-3] == pytest.approx(1.6)  # not (1.6 + 2.9) / 2
    assert math.isnan(p["std"].loc[16, 1e-3])  # one full run: no spread (it was 0.92 from the two lengths)
    assert p["full"].loc[32, 3e-3] == 0 and math.isnan(p["mean"].loc[32, 3e-3])
    fig = report.heatmap_figure(d, p)
    texts = {t.get_text() for t in fig.axes[0].texts}
    assert "2.850\nshorter run" in texts and "1.950" in texts and "1.600\nn=2" in texts
    md = (Path(report.write_report(exp, tmp_path / "rep")) / "report.md").read_text()
    assert "shorter run" in md and "over the trials that ran their whole budget" in md


def test_batches_are_compared_as_effective_batches_when_accumulation_differs(tmp_path):
    """batch_size 16 with 4 accumulation steps trains on batches of 64: when the trials accumulated over
    different numbers of steps, the learning rate x batch tables group by the effective batch."""
    space = {"learning_rate": {"type": "choice", "values": [1e-3, 3e-3]}, "batch_size": {"type": "choice", "values": [16, 32]},
             "gradient_accumulation_steps": {"type": "choice", "values": [1, 4]}}
    trials = [FakeTrial(1e-3, 16, "finished", [1.6], extra={"gradient_accumulation_steps": 1}),
              FakeTrial(3e-3, 16, "finished", [1.5], extra={"gradient_accumulation_steps": 4}),
              FakeTrial(1e-3, 32, "finished", [1.7], extra={"gradient_accumulation_steps": 1})]
    exp = make_experiment(tmp_path, trials, space=space)
    d = report.load_results(exp)
    assert report.batch_column(d) == "effective_batch"
    assert sorted(d["effective_batch"]) == [16, 32, 64]
    b = report.best_lr_per_batch(d)
    assert list(b.index) == [16, 32, 64] and b.loc[16, "learning_rate"] == 1e-3 and b.loc[64, "learning_rate"] == 3e-3
    assert b.loc[64, "batch_size"] == 16 and b.loc[64, "gradient_accumulation_steps"] == 4
    assert report.lr_batch_pivot(d).index.name == "effective_batch"
    md = (Path(report.write_report(exp, tmp_path / "rep")) / "report.md").read_text()
    assert "effective batches" in md and "| effective_batch | 64 |" not in md  # a grouping, not a setting
    fig = report.heatmap_figure(d)
    assert fig.axes[0].get_ylabel().startswith("effective_batch")
    assert report.heatmap_figure(d, report.lr_batch_pivot(d, batch="batch_size")).axes[0].get_ylabel() == "batch_size"

    same = [FakeTrial(lr, bs, "finished", [v], extra={"gradient_accumulation_steps": 4})
            for lr, bs, v in [(1e-3, 16, 1.6), (3e-3, 16, 1.5), (1e-3, 32, 1.7)]]
    d = report.load_results(make_experiment(tmp_path, same, name="same", space=space))
    assert report.batch_column(d) == "batch_size"  # one accumulation for all: the batch size the user set
    assert list(report.best_lr_per_batch(d).index) == [16, 32] and "effective_batch" not in d.columns


def test_importance_explains_the_ranking_column_by_default(tmp_path):
    d = report.load_results(lr_dominant_experiment(tmp_path))
    assert report.importance(d).index[0] == "learning_rate"  # ranked by best_val_loss, which the lr decides
    d["final_val_loss"] = 2.0 + d["batch_size"] / 10  # a ranking column that the batch size decides
    d.attrs["rank_by"] = "final_val_loss"  # (a search ranked by another metric)
    assert report.importance(d).index[0] == "batch_size"
    pd.testing.assert_series_equal(report.importance(d), report.importance(d, "final_val_loss"))

def small_df(rows: list[tuple[float, int, float]], space: dict, status: str = "finished"):
    d = pd.DataFrame([{"trial_id": f"t{i}", "status": status, "learning_rate": lr, "batch_size": bs,
                       "best_val_loss": v, "error": ""} for i, (lr, bs, v) in enumerate(rows)])
    d.attrs.update({"rank_by": "best_val_loss", "mode": "min", "space": space, "searched": list(space)})
    return d


LOG_SPACE = {"learning_rate": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
             "batch_size": {"type": "choice", "values": [8, 16, 32]}}


def test_edge_warnings():
    # log range [1e-4, 1e-2]: 10% of it is below 1e-4 * 10**0.2 = 1.58e-4
    low = report.warnings_for(small_df([(1.5e-4, 16, 1.0), (1e-3, 16, 2.0), (3e-3, 16, 3.0)], LOG_SPACE))
    assert len(low) == 1 and "learning_rate=0.00015" in low[0] and "lowest 10%" in low[0] and "log range" in low[0]
    assert not report.warnings_for(small_df([(1.7e-4, 16, 1.0), (1e-3, 16, 2.0), (3e-3, 16, 3.0)], LOG_SPACE))
    high = report.warnings_for(small_df([(9e-3, 32, 1.0), (1e-3, 16, 2.0), (3e-3, 8, 3.0)], LOG_SPACE))
    assert any("highest 10%" in w and "learning_rate" in w for w in high)
    assert any("batch_size=32, the largest value searched" in w for w in high)
    smallest = report.warnings_for(small_df([(1e-3, 8, 1.0), (1e-3, 16, 2.0), (3e-3, 32, 3.0)], LOG_SPACE))
    assert smallest == [w for w in smallest if "batch_size=8, the smallest value searched" in w] and smallest
    linear = {"learning_rate": {"type": "uniform", "low": 0.0, "high": 1.0}}
    assert "lowest 10%" in report.warnings_for(small_df([(0.05, 8, 1.0), (0.5, 8, 2.0), (0.7, 8, 3.0)], linear))[0]
    assert not report.warnings_for(small_df([(0.15, 8, 1.0), (0.5, 8, 2.0), (0.7, 8, 3.0)], linear))
    # a seed grid: the best trial at the largest seed asks for no larger seeds
    seeded = small_df([(1e-3, 16, 1.0), (1e-3, 16, 2.0), (1e-3, 16, 3.0)],
                      {**LOG_SPACE, "seed": {"type": "grid", "values": [1, 2, 3]}})
    seeded["seed"] = [3, 2, 1]
    assert not [w for w in report.warnings_for(seeded) if "seed" in w]


def test_too_few_and_failed_warnings(df):
    few = report.warnings_for(small_df([(1e-3, 16, 1.0), (2e-3, 16, 2.0)], LOG_SPACE))
    assert any("only 2 trial(s) finished" in w for w in few)
    ws = report.warnings_for(df)
    assert ws[0] == "best trial has n_layer=6, the largest value searched (6); try larger values"
    joined = "\n".join(ws)
    assert f"1 trial(s) errored: {trial_id(6)}: RuntimeError: boom in trial: bad shape" in joined
    assert f"1 trial(s) diverged (loss became NaN/inf): {trial_id(5)}" in joined
    assert "ran out of memory" in joined and "still running" in joined and "not started" in joined
    assert "too few" not in joined  # 5 finished or early-stopped trials


def test_importance_finds_the_dominant_parameter(tmp_path):
    d = report.load_results(lr_dominant_experiment(tmp_path))
    imp = report.importance(d)
    assert set(imp.index) == {"learning_rate", "batch_size", "n_layer"}
    assert imp.index[0] == "learning_rate" and imp["learning_rate"] > 0.6
    assert imp.sum() == pytest.approx(1.0)
    assert imp.attrs["evaluator"].startswith("optuna") and imp.attrs["trials"] == 16


def test_importance_on_a_three_by_three_grid_finds_the_learning_rate(tmp_path):
    from fake_experiment import FakeTrial, make_experiment

    base, extra = {1e-5: 8.55, 5e-5: 8.30, 1e-4: 8.11}, {8: 0.0, 16: 0.01, 32: 0.03}  # the guide's sweep, as it ran
    trials = [FakeTrial(lr, bs, "finished", [v + 1, v + extra[bs]]) for lr, v in base.items() for bs in extra]
    space = {"learning_rate": {"type": "grid", "values": list(base)}, "batch_size": {"type": "grid", "values": list(extra)}}
    imp = report.importance(report.load_results(make_experiment(tmp_path, trials, name="grid", space=space)))
    assert imp.attrs["trials"] == 9
    assert imp.index[0] == "learning_rate" and imp["learning_rate"] > 0.75, imp  # not 0.5 / 0.5


def test_importance_falls_back_without_optuna_evaluators(tmp_path, monkeypatch):
    import optuna

    def broken(*a, **k):
        raise ImportError("Tried to import 'sklearn' but failed")

    monkeypatch.setattr(optuna.importance, "FanovaImportanceEvaluator", broken)
    monkeypatch.setattr(optuna.importance, "PedAnovaImportanceEvaluator", broken)
    imp = report.importance(report.load_results(lr_dominant_experiment(tmp_path)))
    assert imp.attrs["evaluator"] == "variance share"
    assert imp.index[0] == "learning_rate" and imp["learning_rate"] > 0.6


def test_importance_needs_four_finished_trials(df):
    few = df[df["status"] != "early-stopped"].copy()  # 4 finished -> enough
    few.attrs = dict(df.attrs)
    assert not report.importance(few).empty
    three = df[df["trial_id"].isin([trial_id(i) for i in (0, 1, 2, 4, 5, 6)])].copy()
    three.attrs = dict(df.attrs)
    three.loc[three["trial_id"] == trial_id(4), "status"] = "running"
    with pytest.warns(UserWarning, match="at least 4 finished trials"):
        assert report.importance(three).empty


def test_markdown_table_escapes_and_formats():
    t = pd.DataFrame({"a|b": ["x|y"], "best_val_loss": [1.23456], "steps": [30.0], "lr": [0.000316]})
    assert report.markdown_table(t).splitlines() == [
        "| a\\|b | best_val_loss | steps | lr |", "|---|---|---|---|", "| x\\|y | 1.2346 | 30 | 0.000316 |"]


# ----------------------------------------------------------------- report files


def test_write_report_files(standard, tmp_path):
    out = report.write_report(standard, tmp_path / "rep")
    assert out == tmp_path / "rep"
    for name in ("trials.csv", "report.md", "report.html", "heatmap.png", "lr_scatter.png", "curves.png"):
        assert (out / name).stat().st_size > 0, name
    page = (out / "report.html").read_text()
    images = re.findall(re.escape(IMG) + r'([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 3
    for b64 in images:
        assert base64.b64decode(b64).startswith(b"\x89PNG\r\n\x1a\n")
    for alt in report.PLOTS:
        assert f'alt="{alt}"' in page
    for i, status in ((5, "diverged"), (6, "errored"), (7, "oom")):
        row = by_id(report.load_results(standard), i)
        assert f"<code>{trial_id(i)}</code> <span class=\"status-{status}\">{status}</span>: {html.escape(row['error'])}" in page
    assert "RuntimeError: boom in trial: bad shape" in page
    assert "python -m tune_gpt.replay" in page and "data-images-ok" not in page.split("<script>")[0]
    md = (out / "report.md").read_text()
    assert f"python -m tune_gpt.replay {standard}" in md
    assert "- best trial has n_layer=6" in md and "| 16 |  | 1.6000 |  |" in md
    assert f"| {trial_id(6)} | errored | 0.009 | 16 |  | RuntimeError: boom in trial: bad shape |" in md
    assert "## Parameter importance" in md and "| learning_rate |" in md
    csv = pd.read_csv(out / "trials.csv")
    assert len(csv) == 9 and csv["trial_dir"].str.startswith("trainable_").all()
    assert csv.loc[0, "trial_id"] == trial_id(0) and csv.loc[0, "rank"] == 1


def test_write_report_default_folder(tmp_path):
    exp = make_experiment(tmp_path, [FakeTrial(1e-3, 8, "finished", [2.0, 1.5])])
    assert report.write_report(exp) == exp / "report"
    assert report.load_results(exp)["trial_id"].tolist() == [trial_id(0)]  # report/ is not a trial


@pytest.mark.parametrize("case", ["single", "batch_fixed", "none_finished"])
def test_write_report_edge_cases(case, tmp_path):
    if case == "single":
        exp = make_experiment(tmp_path, [FakeTrial(1e-3, 16, "finished", [2.0, 1.5])], space=LOG_SPACE)
        n_images = 1  # the curves; one point needs neither a heatmap nor a scatter
        notes = ["no heatmap: only one batch_size tried; only one learning_rate tried",
                 "no learning-rate plot: only one learning_rate tried", "only 1 trial(s) finished",
                 "python -m tune_gpt.replay"]
    elif case == "batch_fixed":
        trials = [FakeTrial(lr, 16, "finished", [v + 0.5, v]) for lr, v in ((3e-4, 2.0), (1e-3, 1.7), (3e-3, 1.9))]
        exp = make_experiment(tmp_path, trials, space={"learning_rate": LOG_SPACE["learning_rate"]})
        n_images, notes = 2, ["no heatmap: batch_size not searched", 'alt="lr_scatter"', 'alt="curves"']
    else:
        trials = [FakeTrial(1e-3, 8, "errored", [], error="RuntimeError: a"),
                  FakeTrial(2e-3, 16, "errored", [], error="RuntimeError: b")]
        exp = make_experiment(tmp_path, trials, space=LOG_SPACE)
        n_images = 0
        notes = ["Every trial failed (see the warnings above): nothing to replay.", "RuntimeError: a",
                 "RuntimeError: b", "only 0 trial(s) finished",
                 "no curves plot: every trial failed", "needs at least 4 finished trials"]
    out = report.write_report(exp)
    page = (out / "report.html").read_text()
    assert page.count(IMG) == n_images
    for note in notes:
        assert note in page, note
    assert len(list(out.glob("*.png"))) == n_images
    if case == "none_finished":
        assert "Every trial failed (see the warnings above): nothing to replay." in (out / "report.md").read_text()
        assert "No trial has a result yet" not in page


def test_no_replay_reason(tmp_path):
    failed = [FakeTrial(1e-3, 8, "errored", [], error="RuntimeError: a"),
              FakeTrial(2e-3, 8, "diverged", [2.5, math.inf], error="loss became nan"),
              FakeTrial(3e-3, 8, "oom", [], error="CUDA out of memory")]
    d = report.load_results(make_experiment(tmp_path, failed, name="failed"))
    assert report.no_replay_reason(d) == "every trial failed (see the warnings above): nothing to replay"
    # a trial not started yet may still give a result; so may one still running
    waiting = report.load_results(make_experiment(tmp_path, [*failed, FakeTrial(1e-3, 8, "pending")], name="waiting"))
    running = report.load_results(make_experiment(tmp_path, [*failed, FakeTrial(1e-3, 8, "running")], name="running"))
    for d in (waiting, running):
        assert report.no_replay_reason(d) == "no trial has a result yet: nothing to replay"


def test_replay_command_names_the_trial_only_when_asked():
    assert report.replay_command("/exp/a b") == "python -m tune_gpt.replay '/exp/a b'"
    assert report.replay_command("/exp", trial="a1b2c_00003") == "python -m tune_gpt.replay /exp --trial a1b2c_00003"
    assert report.replay_command("s3://b/exp", "https://***@host/c.txt", trial="a1b2c_00003") == (
        "python -m tune_gpt.replay s3://b/exp --trial a1b2c_00003 --data 'https://***@host/c.txt'"
        "  # the corpus URL with its secret in place of ***")


def test_skip_reason_is_public_and_is_the_reports(tmp_path):
    trials = [FakeTrial(lr, 16, "finished", [v + 0.5, v]) for lr, v in ((3e-4, 2.0), (1e-3, 1.7), (3e-3, 1.9))]
    d = report.load_results(make_experiment(tmp_path, trials, space={"learning_rate": LOG_SPACE["learning_rate"]}))
    assert report.heatmap_figure(d) is None
    assert report.skip_reason("heatmap", d) == "no heatmap: batch_size not searched"


def _failed_marks(fig):
    [marks] = [c for c in fig.axes[0].collections if c.get_label() == "diverged / oom"]
    return [float(y) for _, y in marks.get_offsets()]


@pytest.mark.parametrize("mode", ["min", "max"])
def test_scatter_puts_failed_trials_beyond_the_worst_value(mode, tmp_path):
    """Red crosses above the highest loss in mode min; below the lowest value in mode max (above the best before)."""
    trials = [FakeTrial(1e-3, 8, "finished", [2.0, 1.8]), FakeTrial(2e-3, 16, "finished", [2.0, 1.5]),
              FakeTrial(3e-3, 32, "finished", [2.0, 1.6]),
              FakeTrial(8e-3, 8, "diverged", [2.7, math.inf], error="loss became nan"),
              FakeTrial(5e-3, 32, "oom", [2.8], error="CUDA out of memory")]
    metric = "val/loss" if mode == "min" else "tokens_per_s"  # tokens_per_s: 1000 x batch size
    d = report.load_results(make_experiment(tmp_path, trials, metric=metric, mode=mode, space=LOG_SPACE))
    col = d.attrs["rank_by"]
    ok = d[d["status"] == "finished"][col]
    ys = _failed_marks(report.lr_scatter_figure(d))
    assert len(ys) == 2
    if mode == "min":
        assert all(y > ok.max() for y in ys)
    else:
        assert col == "best_tokens_per_s" and ok.max() == 32000.0
        assert all(y < ok.min() for y in ys)


def test_cli_missing_path_is_one_line(tmp_path):
    p = run_cli(str(tmp_path / "missing"))
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr
    assert lines[0].startswith("tune_gpt.report: error:") and str(tmp_path / "missing") in lines[0]
    usage = run_cli()
    assert usage.returncode == 2 and len(usage.stderr.strip().splitlines()) == 1


def test_cli_writes_report(standard, tmp_path):
    p = run_cli(str(standard), "--out", str(tmp_path / "r"))
    assert p.returncode == 0, p.stderr
    assert str(tmp_path / "r") in p.stdout
    assert (tmp_path / "r" / "report.html").is_file()
    empty = run_cli(str(standard), "--out", "", cwd=tmp_path)  # Path("") was the working folder
    assert empty.returncode == 2 and empty.stderr.strip() == (
        "tune_gpt.report: error: --out: empty; give the folder the report goes to, or leave --out out")
    assert not (tmp_path / "report.html").exists()


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")
def test_report_html_renders_in_chromium(standard, tmp_path):
    from PIL import Image

    out = report.write_report(standard, tmp_path / "rep")
    url = (out / "report.html").resolve().as_uri()
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run"]
    shot = tmp_path / "shot.png"
    subprocess.run(flags + [f"--user-data-dir={tmp_path / 'ud1'}", f"--screenshot={shot}", "--window-size=1200,2400",
                            url], capture_output=True, timeout=120, check=False)
    assert shot.is_file()
    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 2400)
    colours = img.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # text, tables and plots, not a blank page
    dom = subprocess.run(flags + [f"--user-data-dir={tmp_path / 'ud2'}", "--virtual-time-budget=5000", "--dump-dom",
                                  url], capture_output=True, text=True, timeout=120).stdout
    body = re.search(r"<body[^>]*>", dom)
    assert body, dom[:500]
    assert 'data-images-ok="3"' in body.group(0) and 'data-images-total="3"' in body.group(0)


# ----------------------------------------------------------------- a real Ray experiment


def _ray_trainable(config):
    import tempfile

    from ray import tune

    trial_dir = Path(tune.get_context().get_trial_dir())
    lr, bs = config["learning_rate"], config["batch_size"]
    if bs == 32 and lr > 3e-3:
        raise RuntimeError("boom: this trial fails\nwith a second line")
    diverge = bs == 16 and lr > 3e-3
    for i in range(3):
        loss = float("inf") if diverge and i == 2 else 2.0 - 0.1 * i + lr
        d = tempfile.mkdtemp()
        (Path(d) / "ckpt.pt").write_bytes(b"x")
        tune.report({"val/loss": loss, "val/bpc": loss / math.log(2), "train/loss": loss, "step": 10 * (i + 1),
                     "total_steps": 30, "tokens": 1000 * (i + 1), "tokens_per_s": 500.0},
                    checkpoint=tune.Checkpoint.from_directory(d))
        if diverge and i == 2:
            break
    status = {"status": "diverged", "message": "loss became inf at step 30"} if diverge else {"status": "finished", "message": ""}
    (trial_dir / "tune_gpt_status.json").write_text(json.dumps({**status, "total_steps": 30}))


@pytest.mark.slow
def test_real_ray_experiment(tmp_path, ray_session):
    from ray import cloudpickle, tune

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/ modules
    tuner = tune.Tuner(  # on the session's Ray (conftest.ray_session): one ray.init per test session
        _ray_trainable,
        param_space={"learning_rate": tune.grid_search([1e-3, 5e-3]), "batch_size": tune.grid_search([16, 32]),
                     "model.n_layer": 2, "wandb.project": "p", "output_dir": "/nowhere"},
        tune_config=tune.TuneConfig(metric="val/loss", mode="min"),
        run_config=tune.RunConfig(name="real", storage_path=str(tmp_path / "storage"), verbose=0),
    )
    tuner.fit()
    exp = tmp_path / "storage" / "real"
    for where in (exp, tmp_path / "moved" / "real"):
        if where != exp:
            where.parent.mkdir()
            shutil.move(str(exp), str(where))
        d = report.load_results(where)
        st = {(r.learning_rate, r.batch_size): (r.status, r.error, r.rank) for r in d.itertuples()}
        assert st[(1e-3, 16)][0] == st[(1e-3, 32)][0] == "finished"
        assert st[(5e-3, 16)][:2] == ("diverged", "loss became inf at step 30")
        assert st[(5e-3, 32)][:2] == ("errored", "RuntimeError: boom: this trial fails")
        assert sorted(r for _, _, r in st.values() if not pd.isna(r)) == [1, 2]
        assert {"n_layer", "learning_rate", "batch_size"} <= set(d.columns) and "output_dir" not in d.columns
        assert all(Path(p).parent == where.resolve() for p in d["trial_dir"])
        assert set(d.attrs["searched"]) == {"learning_rate", "batch_size"}  # no tune_gpt_experiment.json here
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = report.write_report(where)
        assert (out / "report.html").read_text().count(IMG) == 3


def test_search_summary_counts_trials_as_the_report_classifies_them(tmp_path):
    """A trial ASHA stopped as the search ended has no status file; the summary still calls it early-stopped."""
    from fake_experiment import FakeTrial, make_experiment

    from tune_gpt.search import _status_counts

    exp = make_experiment(tmp_path, [
        FakeTrial(1e-3, 8, "finished", [3.0, 2.5, 2.2]),
        FakeTrial(3e-3, 8, "early-stopped", [3.1], status_file=False),
        FakeTrial(3e-4, 16, "diverged", [3.2, float("nan")], error="loss is nan at step 20"),
        FakeTrial(2e-3, 16, "errored", [3.0], error="RuntimeError: boom"),
    ])
    assert _status_counts(exp) == "1 finished, 1 early-stopped, 1 diverged, 1 errored"
    # at the end of a search the report is written first, and the summary counts from its trials.csv
    from tune_gpt.report import write_report
    from tune_gpt.search import _read_table

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = write_report(exp)
    statuses = list(_read_table(out / "trials.csv")["status"])
    assert _status_counts(None, statuses) == "1 finished, 1 early-stopped, 1 diverged, 1 errored"
    assert _read_table(tmp_path / "missing.csv") is None


def test_the_search_names_as_best_the_trial_the_report_ranks_first_and_replay_replays(tmp_path):
    """Tune's own pick (the best value over each trial's reports) named a trial that reported 1.45 and then
    diverged, while the report, and so `replay`, took the finished trial: the search's "best" line and its
    returned config now come from the report's ranking."""
    from types import SimpleNamespace

    from tune_gpt.replay import pick_trial
    from tune_gpt.search import _best_from_table, _best_from_tune, _read_table

    exp = make_experiment(tmp_path, [
        FakeTrial(3e-3, 8, "diverged", [2.5, 1.45, float("inf")], error="loss became inf at step 30"),
        FakeTrial(1e-3, 8, "finished", [2.0, 1.6, 1.7]),
        FakeTrial(2e-3, 16, "errored", [1.2], error="RuntimeError: boom"),
        FakeTrial(3e-4, 16, "early-stopped", [2.4], status_file=False),
    ])
    table = _read_table(exp)
    ids = dict(zip(table["learning_rate"], table["trial_id"]))
    grid = [SimpleNamespace(metrics={"trial_id": ids[lr]}, config={"learning_rate": lr}) for lr in ids]
    plan = SimpleNamespace(metric="val/loss", mode="min")
    best_cfg, best_val, top = _best_from_table(plan, grid, table)
    assert best_cfg == {"learning_rate": 1e-3} and best_val == 1.6  # its best report, as the report ranks by
    assert [t[0] for t in top] == [ids[1e-3], ids[3e-4]] and [t[3] for t in top] == ["finished", "early-stopped"]
    _, row, params = pick_trial(exp)
    assert params["learning_rate"] == best_cfg["learning_rate"] and row["trial_id"] == top[0][0]
    others = [g for g in grid if g.metrics["trial_id"] != top[0][0]]  # e.g. a folder an earlier start left
    cfg, value, _ = _best_from_table(plan, others, table)
    assert cfg == params and value == 1.6  # its params.json, as replay reads it

    # without the report's table, Tune's results: the diverged and the errored trial are left out as well
    def result(lr, losses, error=None):
        import pandas as pd

        return SimpleNamespace(metrics={"val/loss": losses[-1]}, config={"learning_rate": lr}, error=error,
                               metrics_dataframe=pd.DataFrame({"val/loss": losses}))

    tune_grid = [result(3e-3, [2.5, 1.45, float("inf")]), result(1e-3, [2.0, 1.6, 1.7]),
                 result(2e-3, [1.2], error=RuntimeError("boom")), result(3e-4, [2.4])]
    assert _best_from_tune(plan, tune_grid) == ({"learning_rate": 1e-3}, 1.6, [])
    assert _best_from_tune(plan, tune_grid[:1]) == (None, None, [])
    assert _best_from_table(plan, grid, table[table["status"] == "diverged"])[:2] == (None, None)
