"""Faults, modelled on how Ray tests its own fault tolerance: inject them, then check what survived.

- inside trials (in-process searches on the session's Ray): exceptions at random steps,
  persistent exceptions, NaN losses, CUDA out-of-memory (raised on the CPU);
- around the search (the CLI in a subprocess): SIGINT / SIGKILL / SIGTERM at random moments, then
  ``--resume``; W&B pointed at a closed port on 127.0.0.1.

Faults reach the trials through `run_search(..., trainable=wrapper)`: the wrapper patches
`tune_gpt.train` inside the worker, decides from marker files in a tmp folder where to fail, and
hands over to `tune_gpt.search.trainable`. Workers cannot import tests/ modules, so this module
is pickled by value (`ray.cloudpickle.register_pickle_by_value`), and the wrappers use only the
standard library, torch and tune_gpt.
"""

from __future__ import annotations

import json
import math
import os
import re
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import psutil
import pytest

from conftest import REPO, TINY_MODEL, closed_port, tiny_space, write_space
from tune_gpt.report import FAILURES_FILE
from tune_gpt.search import STATUS_FILE, SearchOptions, plan_search, run_search
from wandb_offline import offline_runs

SEED = int(os.environ.get("TUNE_GPT_FAULT_SEED", "20240611"))  # the random fault steps and kill moments
# In-process searches run their trials at half a CPU each: all of a test's trials at once on the
# session's 2 CPUs, so a retried trial's restart overlaps the others instead of queueing behind them.


# ------------------------------------------------------------------ helpers


def _pickle_by_value() -> None:
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


def trial_dirs(exp: Path) -> list[Path]:
    return sorted(p for p in exp.iterdir() if p.is_dir() and (p / "params.json").is_file())


def rows(d: Path) -> list[dict]:
    """The trial's results in storage. Ray rewrites that file at each sync (and a SIGKILL may cut such a
    rewrite short): a last line without its newline is one being written, left out as the report leaves it
    out; any other line must parse."""
    *whole, last = _read(d / "result.json").split("\n")
    out = [json.loads(line) for line in whole if line.strip()]
    try:
        out += [json.loads(last)] if last.strip() else []
    except ValueError:
        pass
    return out


def _read(f: Path) -> str:
    try:
        return f.read_text()
    except FileNotFoundError:
        return ""


def _nonempty(f: Path) -> bool:
    try:
        return f.stat().st_size > 0
    except FileNotFoundError:
        return False


def status(d: Path) -> dict:
    """The trial's status file; {} where there is none yet or it is being replaced."""
    try:
        return json.loads(_read(d / STATUS_FILE) or "{}")
    except ValueError:
        return {}


def params(d: Path) -> dict:
    return json.loads((d / "params.json").read_text())


def calls(marks: Path, key: str) -> int:
    f = marks / f"{key}.calls"
    return len(f.read_text().split()) if f.is_file() else 0


def _record_call(marks: str, key: str) -> None:
    with open(Path(marks) / f"{key}.calls", "a") as f:
        f.write("call\n")


FAULT_SPACE = """
name: {name}
method: grid
scheduler: none
fixed:
""" + TINY_MODEL + """\
  max_steps: 20
  eval_interval: 5
  eval_iters: 1
  sample_tokens: 0
  learning_rate: 3.0e-3
{extra}space:
  {axis}: {{grid: {values}}}
"""


def fault_space(tmp: Path, name: str, axis: str, values: list, extra: str = "") -> Path:
    return write_space(tmp / f"{name}.yaml", FAULT_SPACE.format(name=name, axis=axis, values=values, extra=extra))


# ------------------------------------------------- 1. exceptions inside trials


def make_faulty(marks: str):
    """A trainable that raises where ``seed<N>.json`` in `marks` says: ``fail_at`` (each step once,
    in order; a marker file records each fault) or ``always_at`` (every attempt)."""

    def faulty(config, **kwargs):
        import tune_gpt.search as search
        import tune_gpt.train as train_mod

        key = f"seed{config['seed']}"
        _record_call(marks, key)
        plan_file = Path(marks) / f"{key}.json"
        plan = json.loads(plan_file.read_text()) if plan_file.is_file() else {}
        real_lr_at = train_mod.lr_at

        def lr_at(step, *args, **kwargs):  # called once per optimizer step, with the steps done so far
            for i, at in enumerate(plan.get("fail_at", [])):
                marker = Path(marks) / f"{key}.failed-{i}"
                if step == at and not marker.exists():
                    marker.write_text(str(step))
                    raise RuntimeError(f"injected fault at step {step}")
            if plan.get("always_at") == step:
                raise RuntimeError(f"persistent fault at step {step}")
            return real_lr_at(step, *args, **kwargs)

        train_mod.lr_at = lr_at
        try:
            return search.trainable(config, **kwargs)
        finally:
            train_mod.lr_at = real_lr_at

    return faulty


def test_trial_files_go_to_storage_not_to_the_local_folder_ray_uploads(tmp_path, monkeypatch):
    """Ray uploads the driver's local folder of a trial to storage about once a second, and a retry run in a
    reused actor writes to another local folder: a status an earlier attempt left in the first one was uploaded
    over the retry's (seen: a retried trial that finished, reported as errored). Storage only; local if it fails."""
    import types

    import pyarrow.fs
    from ray import tune

    from tune_gpt.search import _save_trial_file

    local, remote = tmp_path / "staged", tmp_path / "storage" / "trial_x"
    local.mkdir()
    storage = types.SimpleNamespace(storage_filesystem=pyarrow.fs.LocalFileSystem(), trial_fs_path=str(remote))
    monkeypatch.setattr(tune, "get_context", lambda: types.SimpleNamespace(get_storage=lambda: storage))
    _save_trial_file(local, STATUS_FILE, '{"status": "finished"}')
    assert (remote / STATUS_FILE).read_text() == '{"status": "finished"}'
    assert not (local / STATUS_FILE).exists()
    fs, storage.storage_filesystem = storage.storage_filesystem, None  # unreachable: the local copy is all there is
    _save_trial_file(local, STATUS_FILE, '{"status": "errored"}')
    assert (local / STATUS_FILE).read_text() == '{"status": "errored"}'
    assert (remote / STATUS_FILE).read_text() == '{"status": "finished"}'
    # storage back (given as the trainable keeps it: the session is gone once Tune stops the trial): the local
    # copy goes, or Ray would upload it over the newer file
    monkeypatch.setattr(tune, "get_context", lambda: types.SimpleNamespace(get_storage=lambda: None))
    _save_trial_file(local, STATUS_FILE, '{"status": "early-stopped"}', types.SimpleNamespace(
        storage_filesystem=fs, trial_fs_path=str(remote)))
    assert (remote / STATUS_FILE).read_text() == '{"status": "early-stopped"}' and not (local / STATUS_FILE).exists()


def test_a_trial_that_failed_before_its_first_report_is_counted_without_the_report(ray_session, tmp_path,
                                                                                   corpus_file, capsys):
    """--no-report: the outcome and the summary still count a trial that errored before reporting anything
    (Tune's results DataFrame, which they used to count, leaves it out)."""
    _pickle_by_value()
    marks = tmp_path / "marks"
    marks.mkdir()
    (marks / "seed2.json").write_text(json.dumps({"always_at": 0}))  # before its first step
    space = write_space(tmp_path / "early.yaml", FAULT_SPACE.format(name="early", axis="seed", values=[1, 2], extra=""))
    out = run_search(SearchOptions(space=str(space), storage_path=str(tmp_path / "r"), max_failures=0, wandb=False,
                                   report=False, cpus_per_trial=0.5, overrides={"data": str(corpus_file)}, verbose=0),
                     trainable=make_faulty(str(marks)))
    assert (out.num_trials, out.num_errors) == (2, 1)
    assert "2 trials in" in capsys.readouterr().out


@pytest.mark.slow
def test_trials_that_raise_resume_from_their_checkpoint_and_a_persistent_failure_is_reported(
        ray_session, tmp_path, corpus_file):
    """Optuna search (sqlite study) over three seeds: two trials raise twice each and resume from their last
    checkpoint; one always raises and ends errored. Then, the cause fixed, --resume --retry-errored runs only
    that one again, and the study learns its result (OptunaSearch alone drops what a FAILed trial reports)."""
    import optuna

    _pickle_by_value()
    rng = random.Random(SEED)
    marks = tmp_path / "marks"
    marks.mkdir()
    # Two faults each, at random steps after the first checkpoint (step 5). Trial 1's first fault
    # comes right after an evaluation: Tune restores the trial's history from storage on a retry,
    # and that row is not uploaded yet (tune_gpt._tune_callbacks.KeepTrialResults keeps it).
    first = rng.choice([10, 15])
    faults = {1: [first, rng.randint(first + 1, 19)], 2: sorted(rng.sample(range(6, 20), 2))}
    for seed in (1, 2):
        (marks / f"seed{seed}.json").write_text(json.dumps({"fail_at": faults[seed]}))
    (marks / "seed3.json").write_text(json.dumps({"always_at": 3}))
    space = write_space(tmp_path / "faults.yaml", FAULT_SPACE.replace("method: grid", "method: optuna\nnum_samples: 3")
                        .replace("{{grid: {values}}}", "{{choice: {values}}}").format(name="faults", axis="seed",
                                                                                     values=[1, 2, 3], extra=""))
    db = f"sqlite:///{tmp_path / 'study.db'}"
    opts = dict(space=str(space), storage_path=str(tmp_path / "r"), max_failures=2, optuna_storage=db, wandb=False,
                cpus_per_trial=0.5, overrides={"data": str(corpus_file)}, verbose=0)
    out = run_search(SearchOptions(**opts), trainable=make_faulty(str(marks)))
    exp = out.experiment_dir
    by_seed = {params(d)["seed"]: d for d in trial_dirs(exp)}
    assert sorted(by_seed) == [1, 2, 3]
    for seed in (1, 2):
        d, (f1, f2) = by_seed[seed], faults[seed]
        assert all((marks / f"seed{seed}.failed-{i}").is_file() for i in (0, 1)), f"faults {f1}, {f2} not hit"
        assert calls(marks, f"seed{seed}") == 3  # the first run and two retries
        st = status(d)
        assert st["status"] == "finished", st
        assert st["start_step"] == 5 * (f2 // 5)  # the last retry started at the last checkpoint, not at 0
        # the report tells a retry from the attempt that failed by when it began: the driver records each failure
        failed = json.loads((d / FAILURES_FILE).read_text())
        assert len(failed) == 2 and failed[0] < failed[1] < st["attempt_started_s"] < failed[1] + 600, (st, failed)
        steps = [r["step"] for r in rows(d)]
        assert steps == [5, 10, 15, 20], (faults[seed], steps)  # no step reported twice, none from 0 again
        its = [r["training_iteration"] for r in rows(d)]
        assert its == sorted(set(its))
    d3 = by_seed[3]
    assert calls(marks, "seed3") == 3  # 1 + max_failures, then Tune gives up on it
    assert status(d3)["status"] == "errored"
    assert status(d3)["message"] == "RuntimeError: persistent fault at step 3"
    assert rows(d3) == []

    from tune_gpt.report import load_results, write_report

    df = load_results(exp).set_index("trial_id")
    got = {seed: df.loc[d.name.removeprefix("trial_"), "status"] for seed, d in by_seed.items()}
    assert got == {1: "finished", 2: "finished", 3: "errored"}
    err = df.loc[d3.name.removeprefix("trial_"), "error"]
    assert err == "RuntimeError: persistent fault at step 3"
    report_dir = write_report(exp)
    md = (Path(report_dir) / "report.md").read_text()
    assert "errored" in md and "persistent fault at step 3" in md

    (marks / "seed3.json").unlink()  # the cause is fixed
    again = run_search(SearchOptions(resume=True, retry_errored=True, **opts), trainable=make_faulty(str(marks)))
    assert [calls(marks, f"seed{seed}") for seed in (1, 2, 3)] == [3, 3, 4]  # only the errored trial ran again
    assert status(d3)["status"] == "finished" and [r["step"] for r in rows(d3)] == [5, 10, 15, 20]
    assert set(load_results(again.experiment_dir)["status"]) == {"finished"}
    study = optuna.load_study(study_name="faults", storage=db)
    tried = [t for t in study.trials if t.user_attrs.get("tune_trial_id") == d3.name.removeprefix("trial_")]
    assert [t.state.name for t in tried] == ["FAIL", "COMPLETE"], [t.state.name for t in tried]
    assert not [t for t in study.trials if t.state.name in ("WAITING", "RUNNING")]
    assert tried[1].user_attrs["retry_of"] == tried[0].number
    assert tried[1].value == pytest.approx(rows(d3)[-1]["val/loss"])


def test_a_failed_trial_uploads_its_history_before_tune_restores_it(tmp_path):
    """Tune restores a retried trial's result.json from storage; a row reported less than a
    second before the failure is not there yet, unless KeepTrialResults uploads it first."""
    from types import SimpleNamespace

    import pyarrow.fs

    from tune_gpt._tune_callbacks import KeepTrialResults

    staging, stored = tmp_path / "staging" / "trial_1", tmp_path / "storage" / "exp" / "trial_1"
    staging.mkdir(parents=True)
    stored.mkdir(parents=True)
    rows_text = "".join(json.dumps({"step": s}) + "\n" for s in (5, 10))
    (staging / "result.json").write_text(rows_text)
    (staging / "progress.csv").write_text("step\n5\n10\n")
    (stored / "result.json").write_text(json.dumps({"step": 5}) + "\n")  # the last periodic upload
    trial = SimpleNamespace(local_path=str(staging), storage=SimpleNamespace(
        storage_filesystem=pyarrow.fs.LocalFileSystem(), trial_fs_path=str(stored)))
    before = time.time()
    KeepTrialResults().on_trial_recover(iteration=3, trials=[trial], trial=trial)
    assert (stored / "result.json").read_text() == rows_text
    assert (stored / "progress.csv").read_text() == "step\n5\n10\n"
    (failed,) = json.loads((stored / FAILURES_FILE).read_text())  # when it failed, for the report
    assert before <= failed <= time.time()


def test_a_trial_that_starts_again_keeps_the_drivers_result_rows(tmp_path):
    """Tune's result.json writer copies the stored file back over the driver's each time a trial with a
    checkpoint starts (ASHA sending it on from a rung); storage gets the driver's copy about once a second,
    so the row at the rung was lost. TrialResultsJson keeps the driver's copy of a trial it has written in
    this process, and copies from storage as Tune does at a trial's first start in the process (a resumed
    search: the staging folder may hold an older run's copy, on a long-lived cluster)."""
    from types import SimpleNamespace

    import pyarrow.fs

    from tune_gpt._tune_callbacks import TrialResultsJson

    staging, stored = tmp_path / "staging" / "trial_1", tmp_path / "storage" / "exp" / "trial_1"
    staging.mkdir(parents=True)
    stored.mkdir(parents=True)

    def rows(*steps):
        return "".join(json.dumps({"step": s}) + "\n" for s in steps)

    (staging / "result.json").write_text(rows(10))  # an earlier run's, left in the same Ray session
    (stored / "result.json").write_text(rows(10, 20))  # storage went on since (a resume elsewhere)
    trial = SimpleNamespace(trial_id="t1", local_path=str(staging), checkpoint=object(), storage=SimpleNamespace(
        storage_filesystem=pyarrow.fs.LocalFileSystem(), trial_fs_path=str(stored)))
    writer = TrialResultsJson()
    writer._restore_from_remote("result.json", trial)  # its first start here: storage's, as Tune does
    assert (staging / "result.json").read_text() == rows(10, 20)
    (staging / "result.json").write_text(rows(10, 20, 30))  # it reports, pauses at a rung, goes on at once
    writer._restore_from_remote("result.json", trial)
    assert (staging / "result.json").read_text() == rows(10, 20, 30)  # the row at 30 is kept
    (staging / "result.json").unlink()  # a new session's staging folder: the stored rows come back
    TrialResultsJson()._restore_from_remote("result.json", trial)
    assert (staging / "result.json").read_text() == rows(10, 20)


# ------------------------------------------------------------ 2. divergence


def make_counting(marks: str, by: str):
    """The real trainable, counting how often Tune starts each trial (by the value of config[`by`])."""

    def counting(config, **kwargs):
        import tune_gpt.search as search

        _record_call(marks, f"{by}={config[by]}")
        return search.trainable(config, **kwargs)

    return counting


DIVERGE_SPACE = """
name: diverge
method: optuna
num_samples: 4
scheduler: {type: asha, grace_period: 1, reduction_factor: 2}
fixed:
""" + TINY_MODEL + """\
  max_steps: 20
  eval_interval: 5
  eval_iters: 1
  sample_tokens: 0
  grad_clip: 0
  warmup_steps: 0
space:
  learning_rate: {choice: [1.0e+6, 3.0e-3]}   # the first value is the baseline Optuna runs first
  batch_size: {choice: [4, 8]}
"""


@pytest.mark.parametrize(("ended", "restored_step", "rows"), [
    ("diverged", None, []), ("oom", None, []), ("finished", None, [10]), ("finished", 10, [10]),
    ("finished", 20, [10, 20]),  # recorded: Tune restores that report's checkpoint, and result.json has its row
    ("finished", 20, [10]),  # the state reached storage, the row did not (a crash during the copy)
])
def test_a_resumed_trial_that_had_ended_trains_nothing_and_repeats_a_failure(tmp_path, monkeypatch, ended,
                                                                              restored_step, rows):
    """A resumed search restarts a trial whose status file says it ended: it trains nothing, and reports its
    last evaluation again, which an interruption can keep from being recorded: a diverged or oom trial its
    worst value (written before that report), a finished one the report its status file keeps (written
    after the report returned, which does not mean the driver recorded it: seen with Ctrl+C and SIGKILL),
    unless Tune restores the trial from the checkpoint of that very report and result.json has its row."""
    import types

    import pyarrow.fs
    from ray import tune

    import tune_gpt.search as search
    import tune_gpt.train as train_mod

    trial = tmp_path / "trial_x"
    trial.mkdir()
    last_report = {"val/loss": 2.5, "step": 20, "total_steps": 20}
    (trial / STATUS_FILE).write_text(json.dumps({"status": ended, "steps": 15, "total_steps": 20,
                                                 **({"last_report": last_report} if ended == "finished" else {})}))
    (trial / "result.json").write_text("".join(json.dumps({"val/loss": 3.0, "step": r}) + "\n" for r in rows))
    storage = types.SimpleNamespace(storage_filesystem=pyarrow.fs.LocalFileSystem(), trial_fs_path=str(trial))
    context = types.SimpleNamespace(get_trial_dir=lambda: str(tmp_path / "staged"), get_storage=lambda: storage)
    reported = []
    monkeypatch.setattr(tune, "get_context", lambda: context)
    monkeypatch.setattr(tune, "report", lambda metrics, **kw: reported.append(metrics))
    checkpoint = None
    if restored_step is not None:  # what TuneReporter.evaluate leaves with each checkpoint it reports
        (tmp_path / "ckpt").mkdir()
        checkpoint = tune.Checkpoint.from_directory(str(tmp_path / "ckpt"))
        checkpoint.set_metadata({"step": restored_step})
    monkeypatch.setattr(tune, "get_checkpoint", lambda: checkpoint)
    monkeypatch.setattr(train_mod, "train", lambda *a, **k: pytest.fail("a trial that had ended trained again"))
    assert search.trainable({"learning_rate": 1e-3}, objective=("val/loss", "min")) is None
    if ended == "finished":
        assert reported == ([] if restored_step == 20 and 20 in rows else [last_report])
    else:
        (last,) = reported
        assert last["val/loss"] == math.inf and last[ended] == 1 and last["step"] == 15 and last["total_steps"] == 20
    after = json.loads((trial / STATUS_FILE).read_text())
    assert after["status"] == ended and after["steps"] == 15  # left as it was, but for when this attempt began:
    assert time.time() - 60 < after["attempt_started_s"] <= time.time()  # a failure recorded before is not this one


def test_the_rows_at_the_end_of_a_long_result_file_are_read_whole(tmp_path):
    """`_recorded` reads only the end of a trial's result.json (it can be megabytes): whole rows only."""
    import types

    import pyarrow.fs

    from tune_gpt.search import _last_result_rows

    (tmp_path / "result.json").write_text("".join(json.dumps({"step": i, "pad": "x" * 100}) + "\n" for i in range(2000)))
    storage = types.SimpleNamespace(storage_filesystem=pyarrow.fs.LocalFileSystem(), trial_fs_path=str(tmp_path))
    rows = _last_result_rows(storage, tail=10_000)
    assert 50 < len(rows) < 100 and [r["step"] for r in rows] == list(range(2000 - len(rows), 2000))


@pytest.mark.slow
def test_a_diverging_trial_ends_diverged_is_not_retried_and_ranks_last(ray_session, tmp_path, corpus_file):
    import optuna

    _pickle_by_value()
    marks = tmp_path / "marks"
    marks.mkdir()
    db = f"sqlite:///{tmp_path / 'study.db'}"
    out = run_search(SearchOptions(space=str(write_space(tmp_path / "diverge.yaml", DIVERGE_SPACE)),
                                   storage_path=str(tmp_path / "r"), max_failures=2, optuna_storage=db, cpus_per_trial=0.5,
                                   wandb=False, overrides={"data": str(corpus_file)}, verbose=0),
                     trainable=make_counting(str(marks), "learning_rate"))
    exp = out.experiment_dir
    dirs = trial_dirs(exp)
    assert len(dirs) == 4 and out.num_errors == 0
    diverged = [d for d in dirs if params(d)["learning_rate"] == 1e6]
    trained = [d for d in dirs if params(d)["learning_rate"] != 1e6]
    assert diverged, "the baseline (learning_rate 1e6) runs first"
    assert calls(marks, "learning_rate=1000000.0") == len(diverged)  # each started once: not retried
    for d in diverged:
        st, rs = status(d), rows(d)
        assert st["status"] == "diverged" and "loss became" in st["message"], st
        assert not (d / "error.txt").exists()
        assert rs[-1]["diverged"] == 1 and rs[-1]["val/loss"] == math.inf
        assert all(math.isfinite(r["val/loss"]) for r in rs[:-1])
        before = rs[-2]["step"] if len(rs) > 1 else 0
        assert rs[-1]["step"] <= before + 5  # caught within one evaluation interval
    for d in trained:  # (a trial ASHA stopped may have no status file, or one still saying running, when Ray
        # ended its actor before the trainable's last write: the report reads Ray's state, asserted below)
        assert status(d).get("status", "running") in ("finished", "early-stopped", "running")
        assert all(math.isfinite(r["val/loss"]) for r in rows(d))

    # Optuna took inf as a (worst) value and went on sampling; the best trial is a finite one
    study = optuna.load_study(study_name="diverge", storage=db)
    # proposals of trained points are marked, and so is a trial that went on from a rung (ASHA's promotions)
    real = [t for t in study.trials if not {"repeat_of", "resumed_from"} & set(t.user_attrs)]
    done = [t for t in real if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(real) == 4 and len({(t.params["learning_rate"], t.params["batch_size"]) for t in real}) == 4
    by_number = {t.number: t for t in study.trials}
    for t in study.trials:
        if "resumed_from" in t.user_attrs:
            assert t.params == by_number[t.user_attrs["resumed_from"]].params
    assert any(t.params["learning_rate"] == 1e6 and t.value == math.inf for t in done)
    assert out.best_config["learning_rate"] == 3e-3 and math.isfinite(out.best_metric)

    from tune_gpt.report import load_results, write_report

    df = load_results(exp)
    bad = df[df["learning_rate"] == 1e6]
    assert set(bad["status"]) == {"diverged"} and bad["rank"].isna().all()
    assert set(df[df["learning_rate"] != 1e6]["status"]) <= {"finished", "early-stopped"}
    assert all(e.startswith("loss became") for e in bad["error"])
    md = (Path(write_report(exp)) / "report.md").read_text()
    assert "diverged" in md


# ------------------------------------------------------------ 3. out of memory


def make_oom(marks: str, limits: dict, from_step: int):
    """Raise torch.cuda.OutOfMemoryError (on the CPU) when a training micro-batch is larger than
    ``limits[batch_size]`` from optimizer step `from_step` on: the trial's memory need grows."""

    def oom(config, **kwargs):
        import torch

        import tune_gpt.model as model_mod
        import tune_gpt.search as search
        import tune_gpt.train as train_mod

        limit = limits.get(int(config["batch_size"]))
        _record_call(marks, f"bs{config['batch_size']}")
        now = {"step": 0}
        real_forward, real_lr_at = model_mod.GPT.forward, train_mod.lr_at

        def lr_at(step, *args, **kwargs):
            now["step"] = step
            return real_lr_at(step, *args, **kwargs)

        def forward(self, idx, targets=None):
            if limit is not None and self.training and now["step"] >= from_step and idx.shape[0] > limit:
                raise torch.cuda.OutOfMemoryError(
                    f"CUDA out of memory. Tried to allocate 2.00 GiB (injected: micro-batch {idx.shape[0]} > {limit})")
            return real_forward(self, idx, targets)

        model_mod.GPT.forward, train_mod.lr_at = forward, lr_at
        try:
            return search.trainable(config, **kwargs)
        finally:
            model_mod.GPT.forward, train_mod.lr_at = real_forward, real_lr_at

    return oom


def test_smaller_micro_batch_keeps_the_effective_batch(tiny_cfg):
    from tune_gpt.train import smaller_micro_batch

    chain, cfg = [], tiny_cfg(batch_size=12, gradient_accumulation_steps=2)
    while cfg is not None:
        chain.append((cfg.batch_size, cfg.gradient_accumulation_steps))
        cfg = smaller_micro_batch(cfg)
    assert chain == [(12, 2), (6, 4), (3, 8), (1, 24)]
    assert {b * g for b, g in chain} == {24}
    odd = smaller_micro_batch(tiny_cfg(batch_size=7))
    assert (odd.batch_size, odd.gradient_accumulation_steps) == (1, 7)


@pytest.mark.slow
def test_out_of_memory_with_oom_retry_halves_the_micro_batch_inside_the_trial(ray_session, tmp_path, corpus_file):
    _pickle_by_value()
    marks = tmp_path / "marks"
    marks.mkdir()
    limits = {16: 4, 8: 0}  # 16 fits after two halvings; 8 never fits; 4 is never limited
    out = run_search(SearchOptions(space=str(fault_space(tmp_path, "oom", "batch_size", [16, 8, 4])),
                                   storage_path=str(tmp_path / "r"), oom_retry=True, max_failures=1, wandb=False, cpus_per_trial=0.5,
                                   overrides={"data": str(corpus_file)}, verbose=0),
                     trainable=make_oom(str(marks), limits, from_step=7))
    by_bs = {params(d)["batch_size"]: d for d in trial_dirs(out.experiment_dir)}
    assert sorted(by_bs) == [4, 8, 16]
    assert [calls(marks, f"bs{b}") for b in (16, 8, 4)] == [1, 1, 1]  # retried inside the trial, not by Tune

    st = status(by_bs[16])
    assert st["status"] == "finished", st
    assert [(r["batch_size"], r["gradient_accumulation_steps"]) for r in st["oom_retries"]] == [(16, 1), (8, 2)]
    assert [r["resumed_from_step"] for r in st["oom_retries"]] == [5, 5]  # from the checkpoint, not from 0
    assert (st["batch_size"], st["gradient_accumulation_steps"]) == (4, 4)  # effective batch still 16
    rs = rows(by_bs[16])
    assert [r["step"] for r in rs] == [5, 10, 15, 20]
    assert all(r["tokens"] == r["step"] * 16 * 16 for r in rs)  # 16 sequences of 16 tokens per step throughout

    st = status(by_bs[8])
    assert st["status"] == "oom" and "CUDA out of memory" in st["message"] and "already 1" in st["message"]
    assert [r["batch_size"] for r in st["oom_retries"]] == [8, 4, 2]
    assert (st["batch_size"], st["gradient_accumulation_steps"]) == (1, 8)  # stopped at batch_size 1
    rs = rows(by_bs[8])
    assert [r["step"] for r in rs[:-1]] == [5] and rs[-1]["oom"] == 1 and rs[-1]["val/loss"] == math.inf

    st = status(by_bs[4])
    assert st["status"] == "finished" and "oom_retries" not in st

    from tune_gpt.report import load_results

    df = load_results(out.experiment_dir).set_index("batch_size")
    assert df.loc[8, "status"] == "oom" and "out of memory" in df.loc[8, "error"]
    assert df.loc[16, "status"] == "finished" and df.loc[4, "status"] == "finished"


@pytest.mark.slow
def test_out_of_memory_without_oom_retry_ends_the_trial_oom_and_tune_does_not_retry_it(
        ray_session, tmp_path, corpus_file):
    _pickle_by_value()
    marks = tmp_path / "marks"
    marks.mkdir()
    out = run_search(SearchOptions(space=str(fault_space(tmp_path, "oom_plain", "batch_size", [16, 4])),
                                   storage_path=str(tmp_path / "r"), max_failures=2, wandb=False, cpus_per_trial=0.5,
                                   overrides={"data": str(corpus_file)}, verbose=0),
                     trainable=make_oom(str(marks), {16: 4}, from_step=0))
    by_bs = {params(d)["batch_size"]: d for d in trial_dirs(out.experiment_dir)}
    assert calls(marks, "bs16") == 1  # max_failures does not retry an OOM: it would run out again
    st = status(by_bs[16])
    assert st["status"] == "oom" and "CUDA out of memory" in st["message"] and st["oom_retries"] == []
    assert not (by_bs[16] / "error.txt").exists()
    assert status(by_bs[4])["status"] == "finished"
    from tune_gpt.report import load_results

    df = load_results(out.experiment_dir).set_index("batch_size")
    assert df.loc[16, "status"] == "oom" and df.loc[4, "status"] == "finished"


def test_oom_retry_flag_reaches_the_search_options():
    from tune_gpt.search import build_parser, options_from_args

    assert options_from_args(build_parser().parse_args(["--oom-retry"])).oom_retry is True
    assert options_from_args(build_parser().parse_args([])).oom_retry is False
    assert "--oom-retry" in build_parser().format_help()


# ------------------------------------------------- 4. the driver interrupted


def cli_env(**extra: str) -> dict:
    env = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=str(REPO))
    env.update(extra)
    return env


def search_cmd(space: Path, storage: Path, corpus: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tune_gpt.search", "--space", str(space), "--storage-path", str(storage),
            "--data", str(corpus), *extra]


def sigterm_once_reported(args: list[str], exp: Path, n: int, sig: int = signal.SIGTERM) -> tuple[subprocess.Popen, str]:
    """Start a search, send its driver `sig` once `n` trials have reported; the process and its stderr."""
    proc = subprocess.Popen(args, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # Tune copies each trial's result.json from its staging folder into storage by rewriting it: a reader
    # may find it empty or half-written for a moment, so a trial counts as reported once it was seen so.
    seen: set[str] = set()
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and len(seen) < n:
            if exp.is_dir():
                seen.update(d.name for d in trial_dirs(exp) if _nonempty(d / "result.json"))
            time.sleep(0.2)
        assert proc.poll() is None, "the search ended before it could be interrupted"
        assert len(seen) == n, f"{len(seen)} trials reported, not {n}"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc, err


def test_sigusr1_is_an_interruption_too(tmp_path, corpus_file):
    """Ray stops a search gracefully on SIGUSR1 (SLURM's --signal=USR1 sends it before a job's time limit).
    Only SIGINT/SIGTERM went through tune_gpt's handler, so this stop was reported as the search's end: a
    summary, exit 0, its Optuna trials closed. Tune's saved state (trials still RUNNING) now says otherwise."""
    space = tiny_space(tmp_path, n=2, steps=100000, every=10)
    proc, err = sigterm_once_reported(search_cmd(space, tmp_path / "r", corpus_file, "--no-wandb", "--no-report",
                                                 "--scheduler", "none"), tmp_path / "r" / "tiny", 2, signal.SIGUSR1)
    last = [ln for ln in err.strip().splitlines() if ln.strip()][-1]
    assert proc.returncode == 128 + signal.SIGUSR1, err[-3000:]
    assert "interrupted" in last and "--resume" in last, last


def test_a_signal_once_every_trial_exists_still_interrupts(tmp_path, corpus_file):
    """Two trials, both started at once: `docker stop` (SIGTERM to the driver alone) after their first
    reports is an interruption (exit 143, the --resume line), not the search's end. Tune hands back every
    trial TERMINATED after the stop a signal asks for, so with every planned trial created this used to
    exit 0 (or 1: "nothing to replay"). (Signals to the driver's whole group: the test after the next.)"""
    space = tiny_space(tmp_path, n=2, steps=100000, every=10)
    exp = tmp_path / "r" / "tiny"
    proc, err = sigterm_once_reported(search_cmd(space, tmp_path / "r", corpus_file, "--no-wandb", "--no-report",
                                                 "--scheduler", "none"), exp, 2)
    last = [ln for ln in err.strip().splitlines() if ln.strip()][-1]
    assert proc.returncode == 143, err[-3000:]
    assert "interrupted" in last and "--resume" in last, last
    assert "Tuner.restore" not in err, err[-3000:]  # Tune's own resume hint, for its Python API: left out


@pytest.mark.slow
def test_a_resumed_search_logs_to_w_and_b_as_the_resuming_command_says(tmp_path, corpus_file):
    """`Tuner.restore` brought back the W&B callback pickled when the search began, with that session's
    mode, folder and W&B at all: `--resume --no-wandb` still logged (and, begun online, a resume without
    key or network went on online). The resuming command's choices hold now."""
    space = tiny_space(tmp_path, n=2, steps=3000, every=100)
    exp = tmp_path / "r" / "tiny"
    args = search_cmd(space, tmp_path / "r", corpus_file, "--no-report", "--scheduler", "none")
    proc, err = sigterm_once_reported(args, exp, 2)
    assert proc.returncode == 143, err[-3000:]
    runs = sorted(p.name for p in (exp / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, runs  # one W&B run per trial, offline
    sizes = {p: p.stat().st_size for p in (exp / "wandb").rglob("*.wandb")}
    p = subprocess.run([*args, "--resume", "--no-wandb"], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert [status(d)["status"] for d in trial_dirs(exp)] == ["finished", "finished"]
    assert sorted(p.name for p in (exp / "wandb").glob("offline-run-*")) == runs  # no run, no piece, added
    assert {p: p.stat().st_size for p in (exp / "wandb").rglob("*.wandb")} == sizes


def finished_trials(exp: Path) -> dict[str, str]:
    """trial folder -> its result.json text, for the trials whose status file says finished."""
    if not exp.is_dir():
        return {}
    return {d.name: (d / "result.json").read_text() for d in trial_dirs(exp)
            if status(d).get("status") == "finished"}


def n_reports(exp: Path) -> int:
    """Evaluations reported so far, over all trials (result.json lines)."""
    if not exp.is_dir():
        return 0
    return sum(len((d / "result.json").read_bytes().splitlines()) for d in exp.glob("trial_*")
               if (d / "result.json").is_file())


def assert_not_run_again(name: str, before: str, after: str | None, last_report: dict) -> None:
    """A finished trial's result.json is kept as it was, but for one more copy of its last evaluation
    (``last_report`` in its status file): a trial Ray's saved state did not yet count as ended is
    restarted, trains nothing and reports that evaluation again. The driver may not have recorded it:
    Ctrl+C ends trials inside their report, and a trial's report returns before the driver writes it
    to result.json, so a SIGKILL in between loses that row until the resume."""
    assert after is not None and after.startswith(before), f"finished trial {name} was rewritten"
    added = [json.loads(x) for x in after[len(before):].splitlines() if x.strip()]
    assert len(added) <= 1, f"finished trial {name} ran again: {len(added)} new reports"
    for row in added:
        assert (row["step"], row["val/loss"]) == (last_report["step"], last_report["val/loss"]), \
            f"finished trial {name} ran again"


def process_tree(pid: int) -> list[psutil.Process]:
    """The process and everything under it: a driver, its local Ray's daemons and their workers."""
    root = psutil.Process(pid)
    return [root] + root.children(recursive=True)


def ray_agent(p: psutil.Process) -> bool:
    """raylet's dashboard and runtime-env agents (their process titles)."""
    try:
        return bool(p.cmdline()) and p.cmdline()[0] in ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
    except psutil.Error:
        return False


def still_alive(procs: list[psutil.Process]) -> list[str]:
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:  # is_running: not a reused PID
                alive.append(f"{p.pid} {p.name()}")
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.mark.slow
def test_driver_interrupted_at_random_moments_resumes_to_the_end(tmp_path, corpus_file):
    """SIGINT (Ctrl+C), SIGKILL (a crash) and SIGTERM at random moments, each followed by
    ``--resume``: every trial runs once to its end, progress never goes back, and a resumed trial
    continues from its last checkpoint: it repeats at most the few evaluations reported after the
    experiment state was last saved (every second), never its whole history. W&B (offline) logs every
    trial: Ctrl+C and SIGTERM finish the trials' runs (as ``interrupted``) without holding the exit up,
    and each run the last search makes says its trial finished."""
    STEPS, EVERY, SLACK = 1200, 100, 4  # 12 evaluations a trial; SLACK: evaluations one interruption may repeat
    rng = random.Random(SEED)
    space = tiny_space(tmp_path, n=4, steps=STEPS, every=EVERY)  # without ASHA: --scheduler none
    exp = tmp_path / "r" / "drv"
    cmd = search_cmd(space, tmp_path / "r", corpus_file, "--name", "drv", "--max-concurrent", "1",
                     "--no-report", "--scheduler", "none", "-q")
    # Ctrl+C, a crash and `docker stop`, in a random order; the crash while trials train. When: after a
    # random number of new evaluations (one of them late enough that a trial finishes before it), plus a
    # random fraction, or during a resumed run's start-up (a random second).
    polite = [signal.SIGINT, signal.SIGTERM]
    rng.shuffle(polite)
    progress = [rng.randint(2, 9), rng.randint(13, 18)]
    rng.shuffle(progress)
    plan = [(signal.SIGKILL, "progress", progress[0]), (polite[0], "progress", progress[1]),
            (polite[1], "start-up", rng.uniform(2, 8))]
    rng.shuffle(plan)
    if plan[0][1] == "start-up":  # the first run must create the experiment before it can be resumed
        plan[0], plan[1] = plan[1], plan[0]
    interruptions, history, seen, durations = [], [], {}, []
    lingering: list[tuple[float, list[psutil.Process]]] = []  # (killed at, raylet's agents of that search)
    runs_by: list[tuple[str, signal.Signals | None]] = []  # each search's start (as W&B names its runs), how it ended
    # Each resume as the README says (the same --name; here also the same --storage-path): the flags the
    # search was started with come from its experiment file.
    resume_cmd = [sys.executable, "-m", "tune_gpt.search", "--storage-path", str(tmp_path / "r"), "--name", "drv",
                  "--resume", "-q"]
    resume = False
    while True:
        if runs_by:
            time.sleep(1.1)  # W&B names a run by the second it started: no second shared by two searches
        t = time.perf_counter()
        runs_by.append((time.strftime("%Y%m%d_%H%M%S"), None))
        reports_before = n_reports(exp)
        proc = subprocess.Popen(resume_cmd if resume else cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        if len(interruptions) < len(plan):
            sig, kind, amount = plan[len(interruptions)]
            if kind == "start-up":
                while proc.poll() is None and time.perf_counter() < t + amount:
                    time.sleep(0.05)
            else:
                while proc.poll() is None and n_reports(exp) < reports_before + amount:
                    time.sleep(0.1)
                time.sleep(rng.uniform(0, 1.0))
            if proc.poll() is None:
                tree = process_tree(proc.pid)
                sent = time.perf_counter()
                # To the driver's whole process group, as a terminal sends Ctrl+C and `timeout` its SIGTERM:
                # the local Ray's daemons live in a session of their own and must die with the driver.
                os.killpg(proc.pid, sig)
                _, err = proc.communicate(timeout=180)
                quit_s = time.perf_counter() - sent
                interruptions.append((sig.name, kind, round(sent - t, 1), proc.returncode))
                runs_by[-1] = (runs_by[-1][0], sig)
                if sig != signal.SIGKILL:
                    last = [ln for ln in err.strip().splitlines() if ln.strip()][-1]
                    assert proc.returncode == 128 + sig, err[-3000:]  # 130 / 143, as a shell reports them
                    assert "interrupted" in last and "--resume" in last, last
                    # the search's line, without Tune's ERROR listing the trials, or Ray's token notice
                    assert "Trials did not complete" not in err and "Token authentication is enabled" not in err, err
                    # (Tune's graceful stop, the W&B actors' bounded wait, Ray's shutdown, on a loaded machine)
                    assert quit_s < 75, f"{sig.name} took {quit_s:.0f} s to end the search"
                else:
                    assert proc.returncode == -signal.SIGKILL
                    # The local Ray dies with its driver (kernel fate-sharing), all but raylet's two agents: they
                    # see their raylet gone and exit on their own after trying to tell the dead GCS (about a minute;
                    # Ray's behaviour whenever a driver is killed), checked at the end.
                    agents = [p for p in tree if ray_agent(p)]
                    rest = [p for p in tree if p not in agents]
                    deadline = time.time() + 30
                    while still_alive(rest) and time.time() < deadline:
                        time.sleep(0.2)
                    assert not still_alive(rest), f"Ray processes outlived the killed driver: {still_alive(rest)}"
                    lingering.append((time.time(), agents))
        _, err = proc.communicate(timeout=600)
        durations.append(round(time.perf_counter() - t, 1))
        now = finished_trials(exp)
        history.append(len(now))
        for name, text in seen.items():
            assert_not_run_again(name, text, now.get(name), status(exp / name)["last_report"])
        seen.update(now)
        if proc.returncode == 0:
            assert "Exception ignored" not in err, err[-3000:]  # e.g. in a restored W&B callback's __del__
            break
        assert proc.returncode in (130, 143, -signal.SIGKILL), (proc.returncode, err[-3000:])
        resume = True
        assert len(history) < 12, f"no end in sight: {interruptions}, finished {history}"

    for killed_at, agents in lingering:
        while still_alive(agents) and time.time() < killed_at + 150:
            time.sleep(1)
        assert not still_alive(agents), f"Ray's agents outlived their killed raylet: {still_alive(agents)}"

    # result.json keeps every attempt's reports: a resumed trial's steps go back only to its checkpoint
    steps = {d.name: [r["step"] for r in rows(d)] for d in trial_dirs(exp)}
    print(f"runs {durations} s; {interruptions}; finished after each run {history}; steps reported {steps}")
    assert len(interruptions) >= 3, f"the search ended before three interruptions: {interruptions}"
    assert {i[0] for i in interruptions} == {"SIGINT", "SIGKILL", "SIGTERM"}
    assert max(history[:-1]) >= 1, f"no trial finished before an interruption: {history}"
    assert history == sorted(history), f"progress went backwards: {history}"
    assert len(steps) == 4 and len(seen) == 4 == history[-1]
    for name, seq in steps.items():
        assert seq[-1] == STEPS, f"{name} did not run to its end: {seq}"  # every trial ran to its end
        assert set(seq) == set(range(EVERY, STEPS + 1, EVERY)), f"{name} skipped an evaluation: {seq}"
        for before, after in zip(seq, seq[1:]):
            assert after > before - SLACK * EVERY, f"{name} went back from step {before} to {after}: {seq}"
    repeated = sum(map(len, steps.values())) - 4 * (STEPS // EVERY)
    assert repeated <= SLACK * len(interruptions), f"{repeated} evaluations were repeated: {steps}"

    def made_by(run) -> tuple[int, signal.Signals | None]:  # offline-run-YYYYMMDD_HHMMSS-<trial id>
        started = run.path.parent.name.split("-")[2]
        i = max(i for i, (since, _) in enumerate(runs_by) if since <= started)
        return i, runs_by[i][1]

    runs = offline_runs(exp / "wandb")
    for run in runs:
        i, sig = made_by(run)
        if sig == signal.SIGKILL:
            continue  # killed with the search: never finished
        how = sig.name if sig else "ran to its end"
        assert run.exit_code == 0, f"run {run.path.parent.name} of search {i} ({how}) was not finished"
        expected = "finished" if sig is None else ("interrupted", "finished")
        assert run.summary.get("trial_status") in expected, (run.path.parent.name, sig, run.summary)
    assert {run.path.parent.name.rsplit("-", 1)[1] for run in runs} == {d.name.split("_", 1)[1] for d in trial_dirs(exp)}


def test_report_shows_a_trial_an_interrupted_search_stopped_as_running(tmp_path):
    """Ctrl+C stops trials the way ASHA does (their status file says early-stopped), but Ray's saved
    state still says RUNNING: the report must not call them early-stopped (--resume continues them)."""
    from fake_experiment import FakeTrial, make_experiment, trial_id

    from tune_gpt.report import load_results

    exp = make_experiment(tmp_path, [FakeTrial(1e-3, 8, "running", [2.5, 2.2]),
                                     FakeTrial(2e-3, 8, "early-stopped", [2.9])], name="interrupted")
    for i in (0, 1):
        d = next(p for p in exp.iterdir() if trial_id(i) in p.name)
        (d / STATUS_FILE).write_text(json.dumps({"status": "early-stopped", "steps": 10 * (2 - i), "total_steps": 30}))
    st = load_results(exp).set_index("trial_id")["status"]
    assert st[trial_id(0)] == "running" and st[trial_id(1)] == "early-stopped"


def test_report_tells_trials_the_time_budget_stopped_from_those_asha_stopped(tmp_path):
    """Both end TERMINATED short of their steps; the search marks the first kind (tune_gpt_stopped.json)."""
    from fake_experiment import FakeTrial, make_experiment, trial_id

    from tune_gpt.report import STOPPED_FILE, load_results, warnings_for

    exp = make_experiment(tmp_path, [FakeTrial(1e-3, 8, "early-stopped", [2.5, 2.2]),
                                     FakeTrial(2e-3, 8, "early-stopped", [2.9]),
                                     FakeTrial(3e-3, 8, "early-stopped", [2.6, 2.4]),
                                     FakeTrial(4e-3, 8, "finished", [2.7, 2.3, 2.1])], name="budget")
    dirs = [next(p for p in exp.iterdir() if trial_id(i) in p.name) for i in range(4)]
    for d in (dirs[0], dirs[2], dirs[3]):
        (d / STOPPED_FILE).write_text(json.dumps({"stopped_by": "time budget", "time_budget_s": 60}))
    (dirs[2] / STATUS_FILE).write_text(json.dumps({"status": "early-stopped", "steps": 20, "total_steps": 30}))
    # trained to its end, but the budget ended the search before Tune recorded its step-30 evaluation
    (dirs[3] / STATUS_FILE).write_text(json.dumps({"status": "finished", "steps": 30, "total_steps": 30}))
    result = dirs[3] / "result.json"
    result.write_text("".join(result.read_text().splitlines(keepends=True)[:2]))
    df = load_results(exp).set_index("trial_id")
    assert [df["status"][trial_id(i)] for i in range(4)] == ["out-of-time", "early-stopped", "out-of-time",
                                                             "out-of-time"]
    assert df["steps"][trial_id(3)] == 20  # what Tune recorded, which everything is ranked on
    assert df["rank"][trial_id(0)] == 1  # ranked like any trial with a result
    assert any(w.startswith("3 trial(s) were still training when the search's --time-budget ran out")
               and "the best trial is one of them" in w for w in warnings_for(df.reset_index()))


def test_a_trial_waiting_at_a_rung_when_the_time_budget_ended_the_search_is_out_of_time(tmp_path):
    """With `pause: true` a trial may wait (PAUSED) at a rung when the budget runs out; Ray saves it PAUSED.
    The budget callback marked it: the report calls it out-of-time, not running (which --resume would continue)."""
    from fake_experiment import FakeTrial, make_experiment, trial_id

    from tune_gpt.report import STOPPED_FILE, load_results

    exp = make_experiment(tmp_path, [FakeTrial(1e-3, 8, "paused", [2.5]), FakeTrial(2e-3, 8, "paused", [2.6])],
                          name="waiting")
    marked = next(p for p in exp.iterdir() if trial_id(0) in p.name)
    (marked / STOPPED_FILE).write_text(json.dumps({"stopped_by": "time budget", "time_budget_s": 60}))
    df = load_results(exp).set_index("trial_id")
    assert [df["status"][trial_id(i)] for i in range(2)] == ["out-of-time", "running"]  # unmarked: interrupted


@pytest.mark.slow
def test_resume_before_ray_saved_any_state_starts_the_search_afresh(ray_session, tmp_path, corpus_file, capsys):
    """A driver killed after writing its experiment file but before Ray's first save leaves only that file."""
    from dataclasses import replace

    from tune_gpt.report import STOPPED_FILE
    from tune_gpt.search import _write_experiment_file, plan_search

    opts = SearchOptions(space=str(tiny_space(tmp_path, steps=5, every=5)),
                         storage_path=str(tmp_path / "r"), num_samples=2, scheduler="none", wandb=False,
                         report=False, overrides={"data": str(corpus_file)}, verbose=0)
    plan = plan_search(opts)
    _write_experiment_file(plan)
    assert [p.name for p in plan.experiment_dir.iterdir()] == ["tune_gpt_experiment.json"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = run_search(replace(opts, resume=True, time_budget=600))  # a fresh start: this budget applies
    assert not [w for w in seen if "--time-budget" in str(w.message)]
    assert "starting the search from its beginning" in capsys.readouterr().err
    assert out.num_trials == 2 and out.num_errors == 0
    assert [status(d)["status"] for d in trial_dirs(out.experiment_dir)] == ["finished", "finished"]
    assert not (out.experiment_dir / STOPPED_FILE).exists()  # it ended within its budget


# ------------------------------------------------------------ 5. W&B unreachable


def wandb_env(tmp: Path, port: int, key: str | None) -> dict:
    """No W&B settings from this machine: no WANDB_MODE, no ~/.netrc, the host on a closed local port."""
    env = cli_env(WANDB_BASE_URL=f"http://127.0.0.1:{port}", NETRC=str(tmp / "no-netrc"),
                  WANDB_CONFIG_DIR=str(tmp / "wandb-config"), WANDB_CACHE_DIR=str(tmp / "wandb-cache"))
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DISABLED", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy",
                "https_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(var, None)
    if key:
        env["WANDB_API_KEY"] = key
    return env


@pytest.mark.slow
def test_unreachable_wandb_host_costs_little_and_says_how_to_sync(tmp_path, corpus_file):
    space = tiny_space(tmp_path, n=2, steps=10, every=5)
    port = closed_port()

    def run(name: str, env: dict, *extra: str) -> tuple[float, subprocess.CompletedProcess]:
        t = time.perf_counter()
        p = subprocess.run(search_cmd(space, tmp_path / "r", corpus_file, "--name", name, "--no-report",
                                      "--scheduler", "none", *extra),
                           env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        return time.perf_counter() - t, p

    plain_s, _ = run("plain", cli_env(), "--no-wandb")
    for variant, key in (("nokey", None), ("key", "k" * 40)):
        for attempt in range(2):  # timing on a shared 2-core machine is noisy: a second chance, same checks
            name = f"{variant}{attempt}"
            if attempt:  # the machine's speed moves: the plain search timed again beside the retry
                plain_s, _ = run(f"plain-{name}", cli_env(), "--no-wandb")
            took, p = run(name, wandb_env(tmp_path, port, key))
            exp = tmp_path / "r" / name
            out = p.stdout + p.stderr
            assert f"wandb sync {exp / 'wandb'}/offline-run-*" in out, out[-3000:]
            assert len(list((exp / "wandb").glob("offline-run-*"))) == 2  # one offline run per trial
            if key:  # a key but no host: detected at once, said, and offline
                assert f"cannot reach http://127.0.0.1:{port}" in p.stderr and "offline" in p.stderr, p.stderr[-3000:]
            print(f"W&B {name}: {took:.0f} s, without W&B {plain_s:.0f} s")
            if took - plain_s <= 15:
                break
        assert took - plain_s <= 15, f"W&B ({variant}) added {took - plain_s:.0f} s to a {plain_s:.0f} s search"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only: where Ray has kernel fate-sharing")
def test_the_local_rays_daemons_start_in_sessions_of_their_own_and_still_die_with_the_driver(tmp_path):
    """What keeps a signal to the driver's process group (`timeout`, a cancelled CI job) from killing the
    local Ray under the search: each process Ray starts while ray.init runs gets a session of its own, and
    still Ray's kernel fate-sharing (it dies with its parent, PR_SET_PDEATHSIG). Ray's Popen is put back."""
    import ray._private.services as services

    from tune_gpt.search import _ray_daemons_in_their_own_session

    probe = ("import ctypes, os; sig = ctypes.c_int(); ctypes.CDLL(None).prctl(2, ctypes.byref(sig))"  # PR_GET_PDEATHSIG
             "; print(os.getsid(0), os.getpgrp(), sig.value)")
    before = services.ConsolePopen
    with open(tmp_path / "out", "w") as out:
        with _ray_daemons_in_their_own_session():  # as Ray starts its daemons in ray.init
            info = services.start_ray_process([sys.executable, "-c", probe], "probe", fate_share=True, stdout_file=out)
        info.process.wait(timeout=60)
    sid, pgid, death_signal = map(int, (tmp_path / "out").read_text().split())
    assert sid == pgid == info.process.pid != os.getsid(0)
    assert death_signal == signal.SIGKILL
    assert services.ConsolePopen is before


def test_a_signal_during_ray_start_up_waits_for_it_then_stops_the_search(tmp_path):
    """ray.init puts in its own SIGTERM handler (``sys.exit(15)``), and a signal raised inside it leaves
    Ray half started (the process then aborts at exit): a SIGTERM or Ctrl+C there must wait until
    ray.init returns and then stop the search like one a moment later (exit 143 / 130, the resume hint);
    a second one while it waits quits at once."""
    import ray._private.utils as ray_utils

    from tune_gpt.search import _signals_held_during_ray_start, _stop_on_signals, _StopRequest

    plan = plan_search(SearchOptions(space=str(tiny_space(tmp_path)), storage_path=str(tmp_path / "r")))
    default = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for signum in (signal.SIGTERM, signal.SIGINT):
        stop, got_through = _StopRequest(), []
        with _stop_on_signals(stop, plan):
            ours = {s: signal.getsignal(s) for s in default}
            with pytest.raises(KeyboardInterrupt):
                with _signals_held_during_ray_start():  # what ray.init does, and a signal while it runs
                    ray_utils.set_sigterm_handler(lambda s, f: sys.exit(s))
                    os.kill(os.getpid(), signum)
                    time.sleep(0.2)
                    got_through.append(True)  # ray.init was not cut short
            assert got_through and stop.signum == signum
            assert {s: signal.getsignal(s) for s in default} == ours  # Ray's sys.exit handler was kept out
        assert {s: signal.getsignal(s) for s in default} == default
    stop = _StopRequest()
    with _stop_on_signals(stop, plan), pytest.raises(KeyboardInterrupt):
        with _signals_held_during_ray_start():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGTERM)  # the user insists
            time.sleep(5)
            pytest.fail("a second signal while ray.init runs must quit at once")
    assert stop.signum == signal.SIGTERM  # exit 143, as for one SIGTERM
    stop = _StopRequest()
    with _stop_on_signals(stop, plan), pytest.raises(KeyboardInterrupt):  # the stop wins over ray.init's error
        with _signals_held_during_ray_start():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            raise ConnectionError("cannot join the Ray cluster")
    assert stop.signum == signal.SIGTERM


def test_the_driver_starts_ray_without_its_failure_signal_handler(tmp_path, monkeypatch):
    """Abseil's failure-signal handler in the driver's core worker took a SIGTERM late in ray.init and the
    process then aborted at exit (-6) after stopping cleanly: the search starts Ray without it in the driver
    (Ray's RAY_DISABLE_FAILURE_SIGNAL_HANDLER, read when the core worker is made)."""
    import ray
    from ray._private import ray_constants

    from tune_gpt.search import _init_ray

    seen, kwargs = [], []
    monkeypatch.setattr(ray_constants, "RAY_DISABLE_FAILURE_SIGNAL_HANDLER", False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.append(ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER)
                        or kwargs.append(kw))
    _init_ray(SearchOptions(space=str(tiny_space(tmp_path))))
    assert seen == [True]
    # a cluster the search starts runs its trials at niceness 0 (Ray's default nices workers to 15, below its
    # own daemons and the driver, whose wake-ups then preempt training); one it joins keeps its own setting
    assert kwargs[-1]["_system_config"] == {"worker_niceness": 0}
    _init_ray(SearchOptions(space=str(tiny_space(tmp_path)), address="local"))
    assert kwargs[-1]["_system_config"] == {"worker_niceness": 0}
    monkeypatch.setattr("tune_gpt.search._check_address_answers", lambda address: None)
    _init_ray(SearchOptions(space=str(tiny_space(tmp_path)), address="10.0.0.9:6379"))
    assert "_system_config" not in kwargs[-1]
    # no --address, but RAY_ADDRESS names a running cluster: ray.init joins it, and refuses a _system_config
    # there ("When connecting to an existing cluster, _system_config must not be provided")
    for there in ("10.0.0.9:6379", "ray://10.0.0.9:10001"):
        monkeypatch.setenv("RAY_ADDRESS", there)
        _init_ray(SearchOptions(space=str(tiny_space(tmp_path))))
        assert "_system_config" not in kwargs[-1], there


@pytest.mark.parametrize("with_auth_error", [True, False])
def test_joining_a_cluster_that_fails_is_one_line_on_any_ray(tmp_path, monkeypatch, with_auth_error):
    """--address where ray.init fails: one line naming the address, a refused token told apart. Ray before
    2.52 has no ray.exceptions.AuthenticationError (pyproject allows 2.44): naming it in the except clause
    turned that line into an AttributeError traceback."""
    import ray

    from tune_gpt.errors import ConfigError
    from tune_gpt.search import _init_ray

    class Refused(Exception):
        pass

    if with_auth_error:
        monkeypatch.setattr(ray.exceptions, "AuthenticationError", Refused, raising=False)
    else:
        monkeypatch.delattr(ray.exceptions, "AuthenticationError", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr("tune_gpt.search._check_address_answers", lambda address: None)
    opts = SearchOptions(space=str(tiny_space(tmp_path)), address="10.0.0.9:6379")
    for raised, said in [(ConnectionError("no GCS at 10.0.0.9:6379"), "cannot join the Ray cluster (ConnectionError: no GCS"),
                         (ConnectionError("RpcError: InvalidAuthToken"), "refused this driver's token")]:
        def fail(*a, raised=raised, **kw):
            raise raised
        monkeypatch.setattr(ray, "init", fail)
        with pytest.raises(ConfigError, match=re.escape(said)):
            _init_ray(opts)
    if with_auth_error:
        monkeypatch.setattr(ray, "init", lambda *a, **kw: (_ for _ in ()).throw(Refused("bad token")))
        with pytest.raises(ConfigError, match="refused this driver's token"):
            _init_ray(opts)


def test_trials_in_a_cluster_started_here_get_no_runtime_env_and_tune_is_put_back():
    """Tune hands each trial actor a runtime env (PL_DISABLE_FORK, and AWS keys where set), which Ray's
    runtime-env agent logs; in a cluster the search started, the workers have the environment already."""
    from ray.tune.execution import class_cache

    from tune_gpt.search import _trials_inherit_the_environment

    before = dict(class_cache.DEFAULT_ENV_VARS), set(class_cache.ENV_VARS_TO_PROPAGATE)
    assert "AWS_SECRET_ACCESS_KEY" in before[1]
    with _trials_inherit_the_environment():
        assert class_cache.DEFAULT_ENV_VARS == {} and class_cache.ENV_VARS_TO_PROPAGATE == set()
    assert (dict(class_cache.DEFAULT_ENV_VARS), set(class_cache.ENV_VARS_TO_PROPAGATE)) == before


def test_the_search_stops_its_ray_without_waiting_for_the_autoscalers_monitor():
    """Ray stops the GCS before the autoscaler's monitor, whose SIGTERM handler then tries to reach the GCS
    and is killed a second later: the search's shutdown kills the monitor of a cluster it started first, and
    everything else of that Ray still goes."""
    code = """
import json, ray
from ray._private import node as ray_node
from tune_gpt.search import _shutdown_ray
seen = {}
impl = ray_node.Node._kill_process_impl
def kill(self, process_type, **kw):
    for info in self.all_processes.get(process_type, []):
        seen[process_type] = info.process.poll()  # None: still running when Ray's turn came
    return impl(self, process_type, **kw)
ray_node.Node._kill_process_impl = kill
ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
node = ray._private.worker._global_node
procs = [i.process for infos in node.all_processes.values() for i in infos]
_shutdown_ray()
print(json.dumps({"seen": seen, "alive": [p.pid for p in procs if p.poll() is None],
                  "up": ray.is_initialized()}))
"""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["seen"]["monitor"] == -signal.SIGKILL, out  # gone before Ray's turn, by the search's SIGKILL
    assert out["seen"]["raylet"] is None and out["seen"]["gcs_server"] is None, out  # the rest: Ray's own way
    assert out["alive"] == [] and out["up"] is False, out
