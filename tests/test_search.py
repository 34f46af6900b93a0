"""The search end to end on tiny settings, plus planning checks that need no Ray."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, TINY_MODEL, tiny_space, write_space
from tune_gpt.errors import ConfigError, TuneGPTError
from tune_gpt.search import STATUS_FILE, SearchOptions, plan_search, run_search
from wandb_offline import offline_runs


def trial_dirs(exp: Path) -> list[Path]:
    return sorted(p for p in exp.iterdir() if p.is_dir() and (p / "params.json").is_file())


def statuses(exp: Path) -> dict[str, dict]:
    out = {}
    for d in trial_dirs(exp):
        f = d / STATUS_FILE
        out[d.name] = json.loads(f.read_text()) if f.is_file() else {}
    return out


# ------------------------------------------------------------ planning only


def test_seed_sweep_file_plans_nine_grid_points_on_chinese():
    plan = plan_search(SearchOptions(space=str(REPO / "search_spaces" / "seed_sweep.yaml"),
                                     overrides={"max_steps": 50}))
    assert plan.searcher == "grid" and plan.n_trials == 9 and plan.num_samples == 1
    assert plan.base_cfg.use_chinese and plan.base_cfg.max_steps == 50 and plan.base_cfg.epochs == 3
    assert plan.base_cfg.wandb.project == "gpt-sweep"
    assert plan.scheduler["type"] == "none"  # the W&B file asks for no early termination


GRID_CAP = """method: grid
run_cap: 3
parameters:
  batch_size: {values: [4, 8]}
  learning_rate: {values: [1.0e-3, 2.0e-3]}
"""


def test_a_grid_sweeps_run_cap_below_its_size_runs_that_many_points(tmp_path):
    """W&B stops a grid sweep after run_cap runs; Tune's generator ran every point (run_cap was ignored)."""
    sweep = write_space(tmp_path / "grid.yaml", GRID_CAP)
    plan = plan_search(SearchOptions(space=str(sweep)))
    assert plan.searcher == "grid" and plan.num_samples == 1 and plan.grid_cap == 3 and plan.n_trials == 3
    text = plan.describe()
    assert "trials       3 (the first 3 of the grid's 4 points)" in text
    assert "run_cap 3: the first 3 of the grid's 4 points (in Tune's grid order)" in text
    whole = plan_search(SearchOptions(space=str(sweep), num_samples=9))  # more than the grid: each point once
    assert whole.grid_cap is None and whole.n_trials == 4
    assert "a grid runs each point once: run_cap 9 is more than its 4 points" in whole.describe()
    exact = plan_search(SearchOptions(space=str(sweep), num_samples=4))
    assert exact.grid_cap is None and "each point once" not in exact.describe()
    assert plan_search(SearchOptions(space=str(sweep), num_samples=2)).n_trials == 2  # the flag wins over the file
    assert plan_search(SearchOptions(space=str(sweep), num_samples=1)).n_trials == 1  # W&B's run_cap: 1, one run
    # a native file's num_samples keeps Tune's meaning: a grid runs each point once (the benchmarks' grid says 1)
    native = write_space(tmp_path / "native.yaml", "method: grid\nnum_samples: 1\nspace:\n"
                         "  batch_size: {grid: [4, 8]}\n  learning_rate: {grid: [1.0e-3, 2.0e-3]}\n")
    for n in (None, 1, 3):
        plan = plan_search(SearchOptions(space=str(native), num_samples=n))
        assert plan.grid_cap is None and plan.n_trials == 4, n
    assert "num_samples is ignored" in plan.describe()


def test_resuming_a_grid_search_started_before_run_cap_capped_grids_runs_every_point(tmp_path):
    """Ray restores the uncapped generator it pickled then: the plan must not claim a cap it will not apply."""
    from tune_gpt.search import _check_same_search, _search_info

    sweep = write_space(tmp_path / "grid.yaml", GRID_CAP)
    started = plan_search(SearchOptions(space=str(sweep)))
    old = {k: v for k, v in _search_info(started).items() if k != "grid_cap"}  # an experiment file from before
    resumed = plan_search(SearchOptions(space=str(sweep), resume=True))
    _check_same_search(resumed, old)
    assert resumed.grid_cap is None and resumed.n_trials == 4
    assert "run_cap 3: not applied; the search was started before run_cap capped a grid" in resumed.describe()
    assert "the first 3" not in resumed.describe()
    again = plan_search(SearchOptions(space=str(sweep), resume=True))
    _check_same_search(again, _search_info(started))  # started with the cap: kept
    assert again.grid_cap == 3


def test_a_capped_grid_search_runs_its_first_points_only(ray_session, tmp_path, corpus_file):
    fixed = {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16, "max_steps": 2, "eval_interval": 1,
             "eval_iters": 1, "sample_tokens": 0}
    space = write_space(tmp_path / "capped.yaml", GRID_CAP.replace("parameters:\n", "parameters:\n" + "".join(
        f"  {k}: {{value: {v}}}\n" for k, v in fixed.items())))
    out = run_search(SearchOptions(space=str(space), storage_path=str(tmp_path / "r"), wandb=False,
                                   overrides={"data": str(corpus_file)}, verbose=0))
    params = [json.loads((d / "params.json").read_text()) for d in trial_dirs(out.experiment_dir)]
    assert out.num_trials == 3 and len({(p["learning_rate"], p["batch_size"]) for p in params}) == 3


def test_the_capped_generator_stops_after_its_cap_and_keeps_the_count_in_its_state():
    from ray.tune.search import BasicVariantGenerator

    from tune_gpt._searchers import CappedVariantGenerator

    class Stub(BasicVariantGenerator):  # stands for Tune's generator: one trial per call, never finished
        def next_trial(self):
            return object()

    class Capped(CappedVariantGenerator, Stub):
        pass

    gen = Capped(cap=3)
    made = [gen.next_trial() for _ in range(5)]
    assert sum(t is not None for t in made) == 3 and made[3:] == [None, None] and gen.is_finished()
    state = gen.get_state()
    again = Capped(cap=None)
    again.set_state(state)
    assert again.next_trial() is None  # restored: the same cap, already reached
    assert Capped(cap=None).next_trial() is not None  # no cap: Tune's own behaviour


def test_default_plan_is_optuna_with_asha():
    plan = plan_search(SearchOptions())
    assert plan.searcher == "optuna" and plan.scheduler["type"] == "asha" and plan.metric == "val/loss"
    assert plan.scheduler["pause"] is True  # ASHA's promotion form (tests/test_schedulers.py)
    assert plan.fixed["num_threads"] == 1 and plan.fixed["wandb.enabled"] is False


# the guide's W&B grid sweep turned into `method: bayes`: 9 points, 12 runs asked for
BAYES_SWEEP = """method: bayes
run_cap: 12
metric: {name: val/loss, goal: minimize}
parameters:
  batch_size: {values: [8, 16, 32]}
  learning_rate: {values: [1e-5, 5e-5, 1e-4]}
"""


def test_plan_says_when_a_discrete_space_holds_fewer_configurations_than_samples(tmp_path):
    """A W&B grid sweep turned into `method: bayes`: 9 points, 12 runs asked for; Optuna runs each point once."""
    sweep = write_space(tmp_path / "bayes.yaml", BAYES_SWEEP)
    plan = plan_search(SearchOptions(space=str(sweep)))
    assert plan.searcher == "optuna" and plan.n_trials == 12
    assert "trials       12 at most: the space holds 9 distinct configurations" in plan.describe()
    assert "at most" not in plan_search(SearchOptions(space=str(sweep), search="random")).describe()  # random repeats
    assert "at most" not in plan_search(SearchOptions()).describe()  # the default space's learning rate is continuous


def test_a_signal_as_a_discrete_optuna_search_ends_is_not_an_interruption(tmp_path):
    """9 points, 12 samples: 9 ended trials are the whole search, not an interrupted one."""
    from types import SimpleNamespace

    from tune_gpt.search import _all_trials_ended

    sweep = write_space(tmp_path / "bayes.yaml", BAYES_SWEEP)
    plan = plan_search(SearchOptions(space=str(sweep)))

    def results(*kinds):  # Results of Tune's grid: its last result ``done``, or an error
        return [SimpleNamespace(error=RuntimeError() if k == "error" else None,
                                metrics={"done": True} if k == "done" else ({"done": False} if k == "stopped" else {}))
                for k in kinds]

    assert _all_trials_ended(results(*["done"] * 9), plan)
    assert _all_trials_ended(results(*["done"] * 8, "error"), plan)
    assert not _all_trials_ended(results(*["done"] * 8), plan)
    # what Tune hands back after the signal's stop: every trial TERMINATED, a running one not done, one never started
    assert not _all_trials_ended(results(*["done"] * 8, "stopped"), plan)
    assert not _all_trials_ended(results(*["done"] * 8, "unstarted"), plan)
    assert _all_trials_ended(results(*["done"] * 5), plan, SimpleNamespace(exhausted=True))  # the searcher ended it
    assert not _all_trials_ended(results(*["done"] * 5), plan, SimpleNamespace(exhausted=False))
    # Tune's saved state decides where there is one: a trial restored by --resume may lack the done flag
    grid = results(*["done"] * 7, "stopped", "unstarted")
    for i, r in enumerate(grid):
        r.path = f"/x/exp/trial_{i}"
    saved = {f"dir:trial_{i}": {"status": "TERMINATED"} for i in range(9)}
    assert _all_trials_ended(grid, plan, None, saved)
    saved.update({"dir:trial_7": {"status": "RUNNING"}, "dir:trial_8": {"status": "PENDING"}})
    assert not _all_trials_ended(grid, plan, None, saved)
    grid[0].metrics = {"done": False}  # saved TERMINATED, its flag lost
    saved.update({"dir:trial_7": {"status": "TERMINATED"}, "dir:trial_8": {"status": "ERROR"}})
    assert _all_trials_ended(grid, plan, None, saved)


def test_the_plan_says_what_the_command_line_changed_in_the_file():
    """--dry-run prints the file's fixed values: the plan's notes say which ones the command line replaced, and
    a resumed search does not claim a --time-budget Ray will not apply."""
    text = plan_search(SearchOptions(num_samples=2, overrides={"max_steps": 20, "model.dropout": 0.1})).describe()
    assert "note: max_steps: 20 from the command line, not the file's 150" in text
    assert "note: num_samples: 2 from the command line, not the file's 8" in text
    assert "note: model.dropout: 0.1 from the command line" in text and "trials       2" in text
    assert "time budget  30 s" in plan_search(SearchOptions(time_budget=30)).describe()
    resumed = plan_search(SearchOptions(time_budget=30, resume=True))
    assert "time budget  30 s" not in resumed.describe()
    assert "time budget  the one the search was started with" in resumed.describe()
    assert "time budget  30 s" in resumed.describe(restoring=False)  # --resume, but Ray had saved nothing: a new start


def test_a_restored_plan_shows_the_limit_and_budget_ray_restores():
    """Ray restores a resumed search's own --max-concurrent and --time-budget: the printed plan shows those,
    from the experiment file, not the flags given now."""
    resumed = plan_search(SearchOptions(time_budget=30, max_concurrent=4, resume=True, search="random"))
    resumed.saved = {"max_concurrent": 2, "time_budget_s": 600}
    text = resumed.describe()
    assert "concurrency 2 (the search's own: --max-concurrent is not applied to a resumed search)" in text
    assert "time budget  600 s, the search's own, counted afresh in this run (--time-budget is not applied" in text
    assert "concurrency 4" in resumed.describe(restoring=False) and "time budget  30 s" in resumed.describe(restoring=False)
    resumed.saved = {"max_concurrent": None, "time_budget_s": None}  # started with neither
    text = resumed.describe()
    assert "concurrency as resources allow (the search's own" in text
    assert "time budget  none, as the search was started (--time-budget is not applied" in text
    same = plan_search(SearchOptions(max_concurrent=2, resume=True, search="random"))
    same.saved = {"max_concurrent": 2, "time_budget_s": 600}  # the same limit given again: nothing to point out
    assert "concurrency 2\n" in same.describe() + "\n" and "not applied" not in same.describe()
    assert "time budget  600 s, the search's own" in same.describe()  # the restored budget, though no flag asked


def test_bundled_spaces_are_found_by_name_or_the_readmes_path_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository: the README's `--space search_spaces/...` must still work
    assert plan_search(SearchOptions(space="search_spaces/seed_sweep.yaml")).space.name == "seed_sweep"
    assert plan_search(SearchOptions(space="lr_batch")).space.name == "lr_batch"
    write_space(tmp_path / "lr_batch.yaml", "name: mine\nfixed: {max_steps: 10}\nspace: {lr: {choice: [0.001]}}\n")
    assert plan_search(SearchOptions(space="lr_batch.yaml")).space.name == "mine"  # a file here comes first
    assert plan_search(SearchOptions(space="lr_batch")).space.name == "mine"  # also by name
    with pytest.raises(TuneGPTError, match=r"^elsewhere/lr_batch.yaml: no such file \(bundled spaces, by name: "
                                           r"default, lr_batch, seed_sweep\)$"):
        plan_search(SearchOptions(space="elsewhere/lr_batch.yaml"))  # another folder's file is not ours

def test_dry_run_checks_what_it_can_without_ray(tmp_path, corpus_file):
    """--dry-run answers what a run would refuse at once and can know without Ray, tokenizing or a download:
    an unreadable corpus, --resume of nothing, an --address where nothing listens. An existing experiment
    is a note under the plan (the plan is what a dry run is for)."""
    from conftest import closed_port

    def dry(**kw):
        base = dict(space=str(tiny_space(tmp_path)), storage_path=str(tmp_path / "r"), dry_run=True,
                    overrides={"data": str(corpus_file)})
        return run_search(SearchOptions(**{**base, **kw}))

    (tmp_path / "empty.txt").write_text("")
    for kw, words in ((dict(overrides={"data": str(tmp_path / "missing.txt")}), "missing.txt: no such file"),
                      (dict(overrides={"data": str(tmp_path / "empty.txt")}), "empty.txt: file is empty"),
                      (dict(resume=True), "--resume: no experiment to resume at"),
                      (dict(address=f"127.0.0.1:{closed_port()}"), "nothing answers there")):
        with pytest.raises(TuneGPTError, match=re.escape(words)):
            dry(**kw)
    assert dry().experiment_dir == tmp_path / "r" / "tiny"
    (tmp_path / "r" / "tiny").mkdir(parents=True)
    (tmp_path / "r" / "tiny" / "trial_x").mkdir()
    assert any("already exists; pass --resume" in n for n in dry().notes)


def test_scheduler_settings_nothing_would_use_are_refused(tmp_path):
    """--grace-period / --reduction-factor where the scheduler is none (a W&B sweep without early_terminate
    defaults to none) or median: the plan printed them and nothing stopped early."""
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("method: random\nrun_cap: 2\nparameters:\n  lr: {values: [0.001, 0.002]}\n")

    def plan(**kw):
        return plan_search(SearchOptions(space=str(sweep), storage_path=str(tmp_path / "r"), **kw))

    with pytest.raises(ConfigError, match=r"^--grace-period: the scheduler is none \(a W&B sweep without "
                                          r"early_terminate runs every trial to its end\); add --scheduler asha"):
        plan(grace_period=3)
    with pytest.raises(ConfigError, match=r"^--reduction-factor: an ASHA setting, and the scheduler is median; "):
        plan(scheduler="median", reduction_factor=4)
    assert plan(scheduler="median", grace_period=2).scheduler["grace_period"] == 2  # the median rule uses it
    assert plan(scheduler="asha", grace_period=2, reduction_factor=3).scheduler["reduction_factor"] == 3
    # a search started before this was refused saved it so, and --resume gives its flags again: a note
    resumed = plan(grace_period=3, resume=True)
    assert resumed.scheduler == {"type": "none", "grace_period": 3} and any("not used" in n for n in resumed.notes)


@pytest.mark.parametrize("hyperband, key", [("min_iter: 1, eta: 2.5", "whole_rungs"),
                                            ("max_iter: 50, s: 3, eta: 3", "rungs")])
def test_a_search_started_before_w_and_b_s_whole_brackets_resumes(tmp_path, hyperband, key):
    """A W&B sweep's min_iter with a fractional eta, or a max_iter no multiple of eta^s, now gives ASHA W&B's
    brackets (whole_rungs, rungs). A search started before keeps the rungs Ray restores, and resumes: the
    plan's scheduler differed from the saved one."""
    from tune_gpt.search import _check_same_search, _search_info

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("method: random\nrun_cap: 2\nparameters:\n  lr: {values: [0.001, 0.002]}\n"
                     f"early_terminate: {{type: hyperband, {hyperband}}}\n")
    began = plan_search(SearchOptions(space=str(sweep), storage_path=str(tmp_path / "r")))
    assert began.scheduler[key]
    began.scheduler.pop(key)
    resumed = plan_search(SearchOptions(space=str(sweep), storage_path=str(tmp_path / "r"), resume=True))
    _check_same_search(resumed, _search_info(began))
    assert key not in resumed.scheduler and any("not W&B's whole brackets" in n for n in resumed.notes)


def test_search_flag_over_a_w_and_b_sweep_reads_its_values_as_that_method_would(tmp_path):
    """A W&B sweep's `values` are grid axes under method: grid and choices otherwise. --search random over the
    guide's grid sweep walked the whole grid once per sample (72 trials: 9 points, each 8 times, one seed);
    --search grid over a random sweep refused its `values` as "not grid axes"."""
    from tune_gpt.spaces import Choice, Grid

    rnd = plan_search(SearchOptions(space="seed_sweep", search="random"))
    assert rnd.searcher == "random" and rnd.num_samples == 8
    assert all(isinstance(d, Choice) for d in rnd.space.domains.values())
    assert plan_search(SearchOptions(space="seed_sweep", search="optuna")).searcher == "optuna"
    grid = plan_search(SearchOptions(space="seed_sweep"))
    assert grid.searcher == "grid" and all(isinstance(d, Grid) for d in grid.space.domains.values())
    assert grid.num_samples == 1 and grid.space.grid_size() == 9  # every point once
    # a search begun before (--search random then walked the grid 8 times, as Ray restores it) still resumes
    from tune_gpt.search import _check_same_search, _search_info

    began = plan_search(SearchOptions(space="seed_sweep", search="random"))
    began.space = grid.space
    saved = _search_info(began)
    resumed = plan_search(SearchOptions(space="seed_sweep", search="random", resume=True))
    _check_same_search(resumed, saved)
    assert all(isinstance(d, Grid) for d in resumed.space.domains.values()) and resumed.n_trials == 72
    assert any("read as its own method (grid), as when this search began" in n for n in resumed.notes)
    ranged = tmp_path / "ranged.yaml"  # a range cannot be walked: the error names the flag that asked for a grid
    ranged.write_text("method: random\nparameters:\n  lr: {min: 0.0001, max: 0.01}\n")
    with pytest.raises(TuneGPTError, match=r"^--search grid: .*ranged.yaml.*; use --search optuna or random$"):
        plan_search(SearchOptions(space=str(ranged), search="grid"))


def test_dry_run_plans_the_evaluations_a_run_would_and_says_when_asha_can_stop_nothing(tmp_path, corpus_file):
    def dry(**overrides):
        return run_search(SearchOptions(space=str(tiny_space(tmp_path, steps=40, every=10)), dry_run=True,
                                        storage_path=str(tmp_path / "r"),
                                        overrides={"data": str(corpus_file), **overrides}))

    plan = dry()
    assert plan.max_evals == 4 and "up to 4 evaluations a trial" in plan.describe()
    assert "can stop no trial" not in plan.describe()
    once = dry(eval_interval=1000)  # the run's only evaluation is its last: ASHA has no rung to stop at
    assert once.max_evals == 1 and "up to 1 evaluation a trial" in once.describe()
    assert "asha can stop no trial: each reports at most 1 evaluation(s)" in once.describe()


def test_a_wheel_ships_the_bundled_spaces_and_its_search_finds_them(tmp_path):
    """`pip install .` or a wheel (not editable): the spaces travel inside the package, and the
    installed search uses them from any directory."""
    src = tmp_path / "src"  # a copy: pip builds in the source tree and would leave build/ in the repository
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for folder in ("tune_gpt", "search_spaces"):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    # Built with the installed setuptools (the test extra asks for one that builds wheels), not a download.
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w",
                            str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("tune_gpt-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(tmp_path / "site")  # what pip install puts in site-packages (pure Python)
    assert {n for n in names if n.startswith("tune_gpt/search_spaces/")} == \
        {f"tune_gpt/search_spaces/{p.name}" for p in (REPO / "search_spaces").glob("*.yaml")}
    # pyproject.toml lists the packages: a new subpackage must be added there, or the wheel goes without it
    sources = {p.relative_to(REPO).as_posix() for p in (REPO / "tune_gpt").rglob("*.py") if "__pycache__" not in p.parts}
    assert sources <= names, f"missing from the wheel: {sorted(sources - names)}"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    for space, name in ((None, "default"), ("lr_batch", "lr_batch")):
        p = subprocess.run([sys.executable, "-m", "tune_gpt.search", "--dry-run"] + (["--space", space] if space else []),
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        assert f"search space '{name}' from {tmp_path / 'site' / 'tune_gpt' / 'search_spaces' / name}.yaml" in p.stdout



@pytest.mark.parametrize(
    "opts, needle",
    [
        (dict(scheduler="pbt"), "pbt"),
        (dict(scheduler="bohb"), "bohb"),
        (dict(search="grid"), "grid"),
        (dict(cpus_per_trial=0), "--cpus-per-trial"),
        (dict(gpus_per_trial=-1), "--gpus-per-trial"),
        (dict(num_samples=0), "--num-samples"),
        (dict(max_concurrent=0), "--max-concurrent"),
        (dict(mode="max"), r"--mode max: val/loss is lower for better models"),
        (dict(mode="max", metric="val_bpc"), r"--mode max: val/bpc"),
    ],
)
def test_impossible_requests_are_refused_before_ray_starts(opts, needle):
    with pytest.raises(TuneGPTError, match=needle):
        plan_search(SearchOptions(**opts))


def test_a_native_grid_with_a_model_based_sampler_is_refused(tmp_path):
    """A native file's `grid:` axes cannot be sampled by TPE. (A W&B sweep's `values` under --search optuna are
    read as W&B's bayes method reads them: choices.)"""
    grid = write_space(tmp_path / "g.yaml", "space:\n  learning_rate: {grid: [0.001, 0.01]}\n")
    with pytest.raises(TuneGPTError, match=r"^--search optuna: .*g.yaml has grid axes; a grid cannot be sampled by "
                                          r"a model-based sampler"):
        plan_search(SearchOptions(space=str(grid), search="optuna"))


def test_maximizing_a_loss_is_refused_where_the_space_asks_for_it_too(tmp_path):
    sweep = write_space(tmp_path / "sweep.yaml", "method: random\nmetric: {name: val_loss, goal: maximize}\n"
                                                 "parameters: {learning_rate: {values: [0.001, 0.01]}}\n")
    with pytest.raises(TuneGPTError, match=r"sweep.yaml: its metric's goal is to maximize: val/loss"):
        plan_search(SearchOptions(space=str(sweep)))
    assert plan_search(SearchOptions(mode="max", metric="tokens_per_s")).mode == "max"  # higher is better there


def test_cli_dry_run_and_gpu_refusal_exit_cleanly(tmp_path):
    env = dict(os.environ, WANDB_MODE="offline", CUDA_VISIBLE_DEVICES="")
    p = subprocess.run([sys.executable, "-m", "tune_gpt.search", "--dry-run", "--storage-path", str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "learning_rate" in p.stdout and "asha" in p.stdout
    assert not any(tmp_path.iterdir())
    for extra in ([], ["--address", "local"]):  # local: a new cluster of this machine's CPUs and GPUs only
        p = subprocess.run([sys.executable, "-m", "tune_gpt.search", "--gpus-per-trial", "0.25", "--storage-path",
                            str(tmp_path), *extra], env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2, p.stderr
        assert p.stderr.strip().count("\n") == 0 and "no CUDA GPU is visible" in p.stderr, p.stderr
        assert not any(tmp_path.iterdir())


# ------------------------------------------------------------- end to end


def test_search_runs_every_trial_and_finds_a_best(finished_search):
    exp = finished_search.experiment_dir
    assert finished_search.num_trials == 4 and finished_search.num_errors == 0
    assert set(finished_search.best_config) >= {"learning_rate", "batch_size"}
    assert finished_search.best_metric is not None and finished_search.best_metric < 4.0
    from tune_gpt.report import load_results

    df = load_results(exp)
    st = df["status"].tolist()  # status files, or Ray's state for trials ASHA stopped
    assert len(st) == 4 and set(st) <= {"finished", "early-stopped"} and "finished" in st
    for trial_dir, status in zip(df["trial_dir"], st):
        # ASHA ends a trial that reaches its last step inside that report, and Tune does not wait for the
        # trial's thread: the sample is written before that report. The status file may still say running.
        said = json.loads((Path(trial_dir) / "tune_gpt_status.json").read_text())["status"]
        assert said in (status, "running")
        assert (Path(trial_dir) / "sample.txt").is_file() == (status == "finished")
    assert finished_search.trials_csv.is_file()
    for d in trial_dirs(exp):
        params = json.loads((d / "params.json").read_text())
        assert params["num_threads"] == 1 and params["model.n_embd"] == 16
        rows = [json.loads(x) for x in (d / "result.json").read_text().splitlines()]
        assert all("val/loss" in r and "total_steps" in r for r in rows)
        assert [r["step"] for r in rows] == [5 * (i + 1) for i in range(len(rows))]


def test_resume_with_a_cut_tuner_pkl_is_one_line(finished_search, tmp_path, corpus_file):
    """Ray's saved Tuner cut short (a full disk, a partial copy): --resume said so in a traceback."""
    exp = finished_search.experiment_dir
    copy = tmp_path / "results" / exp.name
    shutil.copytree(exp, copy)
    with open(copy / "tuner.pkl", "r+b") as f:
        f.truncate(100)
    opts = SearchOptions(space=str(exp.parent.parent / "tiny.yaml"), storage_path=str(tmp_path / "results"),
                         resume=True, overrides={"data": str(corpus_file)}, verbose=0)
    with pytest.raises(ConfigError, match=rf"^--resume: {re.escape(str(copy))}/tuner.pkl cannot be read \(Unpickling"
                                          r"Error: pickle data was truncated\): .* --name NEW$"):
        run_search(opts)


def test_baseline_point_is_evaluated_first(finished_search):
    from tune_gpt.report import saved_trial_states

    exp = finished_search.experiment_dir
    # the first trial Tune created (its saved trials are in creation order), not the first to report: two run at
    # once, and the other one may report first
    first = exp / next(key for key in saved_trial_states(exp) if key.startswith("dir:"))[len("dir:"):]
    params = json.loads((first / "params.json").read_text())
    assert params["learning_rate"] == pytest.approx((1e-3 * 2e-2) ** 0.5, rel=1e-6) or params["learning_rate"] == 1e-3
    assert params["batch_size"] in (4, 8)


def test_every_trial_has_tensorboard_events_and_an_offline_wandb_run(finished_search):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    exp = finished_search.experiment_dir
    for d in trial_dirs(exp):
        acc = EventAccumulator(str(d))
        acc.Reload()
        tags = acc.Tags()["scalars"]
        assert {"val/loss", "val/bpc", "train/loss", "lr"} <= set(tags), tags  # the names train() uses
        reported = [json.loads(line) for line in (d / "result.json").read_text().splitlines()]
        events = acc.Scalars("val/loss")
        # one point per evaluation, on the training-step axis (not Tune's iteration count)
        assert [e.step for e in events] == [r["step"] for r in reported]
        assert [e.value for e in events] == pytest.approx([r["val/loss"] for r in reported], rel=1e-6)
        # the HParams dashboard's records: the trial's searched values and its final metrics
        plugin_tags = acc.PluginTagToContent("hparams")
        assert {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"} <= set(plugin_tags)
        from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

        start = HParamsPluginData.FromString(plugin_tags["_hparams_/session_start_info"]).session_start_info
        params = json.loads((d / "params.json").read_text())
        assert start.hparams["learning_rate"].number_value == pytest.approx(params["learning_rate"])
        assert start.hparams["batch_size"].number_value == params["batch_size"]
    runs = offline_runs(exp)
    assert len(runs) == 4
    from tune_gpt.report import load_results

    status = load_results(exp).set_index("trial_id")["status"]
    for run in runs:
        assert run.group == exp.name and set(run.tags) >= {"tiny", "single-gpu"}
        assert "learning_rate" in run.config and "batch_size" in run.config
        # the whole training config, as a single run has it (Tune's holds the searched and fixed values only),
        # without the keys the callback leaves out (they came back with every result)
        assert {"weight_decay", "beta2", "warmup_steps", "min_lr", "seed", "model.dropout"} <= set(run.config)
        assert not {"tensorboard", "progress", "checkpoint", "wandb.enabled"} & set(run.config), sorted(run.config)
        assert {"val/loss", "val/bpc", "train/loss", "step"} <= run.history_keys
        assert run.step_metrics["val/*"] == run.step_metrics["train/*"] == "step"  # the final run's x-axis too
        # how the trial ended, in the report's words (ASHA cuts some), and the run was finished
        trial_id = run.path.parent.name.rsplit("-", 1)[1]
        assert run.summary["trial_status"] == status[trial_id]
        assert run.exit_code == 0
        rows = (next(d for d in trial_dirs(exp) if d.name.endswith(trial_id)) / "result.json").read_text().splitlines()
        assert [h.get("step") for h in run.history] == [json.loads(r)["step"] for r in rows]  # one row per report


def test_fractional_gpu_trials_share_one_logical_gpu(ray_session, tmp_path, corpus_file):
    out = run_search(SearchOptions(space=str(tiny_space(tmp_path, n=4, steps=10)), storage_path=str(tmp_path / "r"),
                                   cpus_per_trial=0.5, gpus_per_trial=0.25, scheduler="none", wandb=False,
                                   report=False, overrides={"data": str(corpus_file)}, verbose=0))
    st = statuses(out.experiment_dir)
    assert len(st) == 4
    for name, s in st.items():
        assert s["resources"]["GPU"] == pytest.approx(0.25) and s["resources"]["CPU"] == pytest.approx(0.5)
        assert s["status"] == "finished" and s["device"] == "cpu"  # logical GPU: trains on the CPU here
        assert s["last_report"]["step"] == 10 and s["last_report"]["val/loss"] > 0  # a resume may report it again
        # ... unless Tune restores the trial from that report's checkpoint, which says its step
        latest = max((out.experiment_dir / name).glob("checkpoint_*"), key=lambda p: p.name)
        assert json.loads((latest / ".metadata.json").read_text()) == {"step": 10}


def test_resume_takes_the_flags_the_search_was_started_with(tmp_path, monkeypatch):
    """`--resume --name NAME` (the README's words) continues the search as it was started: the saved
    flags, then the ones given now; flags of one run (--resume, --retry-errored, --dry-run, -q) are not
    taken from the saved command. Without saved flags (run_search(), older experiments) nothing is added."""
    from tune_gpt.search import EXPERIMENT_FILE, _argv_for_resume

    monkeypatch.chdir(tmp_path)
    started = ["--data", "corpus.txt", "--max-steps", "300", "--num-samples", "4", "--name", "s", "-q", "--no-wandb",
               "--resume", "--retry-errored"]
    (tmp_path / "tune_results" / "s").mkdir(parents=True)
    saved = tmp_path / "tune_results" / "s" / EXPERIMENT_FILE
    saved.write_text(json.dumps({"name": "s", "argv": started}))
    now = ["--resume", "--name", "s", "--max-concurrent", "1"]
    assert _argv_for_resume(now) == [
        "--data", "corpus.txt", "--max-steps", "300", "--num-samples", "4", "--name", "s", "--no-wandb", *now]
    assert _argv_for_resume(["--name", "s"]) == ["--name", "s"]  # not a resume
    assert _argv_for_resume(["--resume", "--name", "other"]) == ["--resume", "--name", "other"]  # nothing saved there
    # a switch the search was started with can be turned off again for the resumed run
    from tune_gpt.search import build_parser

    saved.write_text(json.dumps({"name": "s", "argv": ["--name", "s", "--no-report", "--oom-retry", "--no-wandb"]}))
    args = build_parser().parse_args(_argv_for_resume(["--resume", "--name", "s", "--report", "--no-oom-retry"]))
    assert (args.report, args.oom_retry, args.use_wandb) == (True, False, False)
    args = build_parser().parse_args(_argv_for_resume(["--resume", "--name", "s", "--wandb"]))
    assert args.use_wandb  # --wandb turns a saved --no-wandb off again
    saved.write_text(json.dumps({"name": "s", "command": "python -m tune_gpt.search --name s"}))
    assert _argv_for_resume(now) == now


def test_the_saved_command_names_the_same_files_from_any_directory(tmp_path, monkeypatch):
    """The flags a search saves for --resume hold absolute paths (a bundled space by name: its file), leave
    URLs, URIs and the bundled corpora's names alone, and leave out the flags of one run; abbreviated flags
    are refused, so a saved command always means the same flags."""
    from tune_gpt.search import REPO_SPACES, _absolute_paths, _without_run_flags, build_parser

    monkeypatch.chdir(tmp_path)
    argv = ["--data", "c.txt", "--space=lr_batch", "--optuna-storage", "sqlite:///s.db", "--cache_dir", "~/cache",
            "--storage-path", "s3://b/x", "--max-steps", "5", "-qq", "--resume", "--retry-errored", "--dry-run"]
    assert _without_run_flags(_absolute_paths(argv)) == [
        "--data", str(tmp_path / "c.txt"), "--space", str(REPO_SPACES / "lr_batch.yaml"),
        "--optuna-storage", f"sqlite:///{tmp_path / 's.db'}", "--cache_dir", str(Path("~/cache").expanduser()),
        "--storage-path", "s3://b/x", "--max-steps", "5"]
    assert _absolute_paths(["--data", "python-docs", "--data", "https://x/y.txt"]) == \
        ["--data", "python-docs", "--data", "https://x/y.txt"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--res"])  # no abbreviations


def test_a_relative_cache_dir_is_kept_absolute_as_the_corpus_path_is(tmp_path, monkeypatch):
    """Only `data` was made absolute: `--cache_dir cache` reached params.json as "cache", so trials (run in
    their own folders) and a replay started elsewhere each used a cache of their own."""
    monkeypatch.chdir(tmp_path)
    plan = plan_search(SearchOptions(overrides={"data": "c.txt", "cache_dir": "cache"}))
    assert plan.fixed["cache_dir"] == str(tmp_path / "cache") == plan.base_cfg.cache_dir
    assert plan.fixed["data"] == str(tmp_path / "c.txt")
    home = plan_search(SearchOptions(overrides={"cache_dir": "~/c"})).fixed["cache_dir"]
    assert home == str(Path("~/c").expanduser())
    with pytest.raises(ConfigError, match="cache_dir: empty"):  # still the config's one line
        plan_search(SearchOptions(overrides={"cache_dir": " "}))


def test_resume_refuses_flags_that_change_what_the_search_trains(tmp_path):
    """Ray restores the trials and the searcher, while the corpus and the plan come from the flags given: a
    resume on another corpus failed every resumed trial on its checkpoint and ended with exit 0. What trains
    differently is refused in one line with the command the search was started with; how trials run is not."""
    from dataclasses import replace

    from tune_gpt.search import _check_same_search, _search_info

    space = str(tiny_space(tmp_path))
    opts = SearchOptions(space=space, storage_path=str(tmp_path / "r"), overrides={"data": "a.txt", "max_steps": 300})
    saved = {**_search_info(plan_search(opts)), "argv": ["--data", "a.txt", "--max-steps", "300"]}
    for same in (opts, replace(opts, wandb=False, max_concurrent=1, resume=True)):
        _check_same_search(plan_search(same), saved)
    with pytest.raises(ConfigError, match=r"^--resume: --cpus-per-trial 1.4 \(started with 1\)"):
        _check_same_search(plan_search(replace(opts, cpus_per_trial=1.4)), saved)  # one thread too, another request
    older = {**saved}  # an experiment file from before the requests were recorded: the thread count decides
    del older["cpus_per_trial"], older["gpus_per_trial"]
    _check_same_search(plan_search(replace(opts, cpus_per_trial=1.4)), older)
    # the trials' resources: Ray restores each trial's request, so a trial that asked for a GPU would wait for ever
    # on a machine without one
    with pytest.raises(ConfigError, match=r"^--resume: --cpus-per-trial 2 \(started with 1\): a search resumes as"):
        _check_same_search(plan_search(replace(opts, cpus_per_trial=2)), saved)
    gpu_saved = {**_search_info(plan_search(replace(opts, gpus_per_trial=0.5))), "argv": saved["argv"]}
    with pytest.raises(ConfigError, match=r"^--resume: --gpus-per-trial 0 \(started with 0.5\)"):
        _check_same_search(plan_search(opts), gpu_saved)
    with pytest.raises(ConfigError, match=r"^--resume: data '\S+/b.txt' \(started with '\S+/a.txt'\); max_steps 100 \(started "
                                          r"with 300\): a search resumes as it was started \(python -m tune_gpt.search "
                                          r"--data a.txt --max-steps 300 --resume\); give the same flags, or start another"):
        _check_same_search(plan_search(replace(opts, overrides={"data": "b.txt", "max_steps": 100})), saved)
    with pytest.raises(ConfigError, match=r"^--resume: num_samples 3 \(started with 4\)"):
        _check_same_search(plan_search(replace(opts, num_samples=3)), saved)
    # --dry-run of such a resume says the same (it reads the experiment file; nothing starts)
    exp = tmp_path / "r" / "tiny"
    exp.mkdir(parents=True)
    (exp / "tune_gpt_experiment.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match=r"^--resume: max_steps 100 \(started with 300\)"):
        run_search(replace(opts, resume=True, dry_run=True, overrides={"data": "a.txt", "max_steps": 100}))


def test_existing_experiment_needs_resume(finished_search):
    exp = finished_search.experiment_dir
    with pytest.raises(ConfigError, match="--resume"):
        run_search(SearchOptions(space=str(exp.parent.parent / "tiny.yaml"), storage_path=str(exp.parent)))


# SIGKILL / SIGINT of the driver and --resume: tests/test_faults.py (test_driver_interrupted_...)


def test_random_search_repeats_with_its_seed(ray_session, tmp_path, corpus_file):
    """--search random --seed N draws the same trials again (and another seed draws others)."""
    def drawn(seed: int, name: str) -> list[tuple]:
        out = run_search(SearchOptions(space=str(tiny_space(tmp_path, n=3, steps=1, every=1)), name=name, search="random",
                                       seed=seed, scheduler="none", storage_path=str(tmp_path / "r"), wandb=False,
                                       report=False, overrides={"data": str(corpus_file)}, verbose=0))
        params = [json.loads((d / "params.json").read_text()) for d in trial_dirs(out.experiment_dir)]
        return sorted((p["learning_rate"], p["batch_size"]) for p in params)

    first = drawn(7, "a")
    assert len(first) == 3
    assert drawn(7, "b") == first
    assert drawn(8, "c") != first


def test_optuna_trains_each_configuration_of_a_discrete_space_once(ray_session, tmp_path, corpus_file, capsys):
    """Trials share their training seed, so a repeat would reproduce a known result: two points, five samples -> two trials."""
    space = write_space(tmp_path / "two.yaml", "name: two\nmethod: optuna\nnum_samples: 5\nscheduler: {type: none}\nfixed:\n"
                        + TINY_MODEL + "  max_steps: 2\n  eval_interval: 1\n  eval_iters: 1\n  sample_tokens: 0\n"
                        "space:\n  learning_rate: {choice: [1.0e-3, 2.0e-3]}\n  batch_size: {choice: [4]}\n")
    out = run_search(SearchOptions(space=str(space), storage_path=str(tmp_path / "r"), wandb=False,
                                   overrides={"data": str(corpus_file)}, verbose=0))
    params = [json.loads((d / "params.json").read_text()) for d in trial_dirs(out.experiment_dir)]
    assert sorted(p["learning_rate"] for p in params) == [1e-3, 2e-3]
    assert out.num_trials == 2 and out.best_config is not None
    printed = capsys.readouterr()
    assert "proposed only configurations already trained (2 distinct ones)" in printed.err
    # the summary: its status counts come from the report's trials.csv, written just before
    assert "best val/loss" in printed.out and "2 trials in" in printed.out and "(2 finished)" in printed.out


def test_library_search_can_leave_out_the_summary(ray_session, tmp_path, corpus_file, capsys):
    """run_search(summary=False) prints no end-of-search table; the outcome still carries the best trial."""
    opts = dict(space=str(tiny_space(tmp_path, n=1, steps=1, every=1)), scheduler="none", storage_path=str(tmp_path / "r"),
                wandb=False, overrides={"data": str(corpus_file)}, verbose=0)
    quiet = run_search(SearchOptions(name="quiet", summary=False, **opts))
    assert quiet.best_config is not None and quiet.num_trials == 1
    assert "best val/loss" not in capsys.readouterr().out  # with the summary: the test above


def test_resume_says_what_it_cannot_do_with_a_time_budget(tmp_path, corpus_file, capsys):
    """Ray restores a resumed search's own settings: a different --time-budget is said to be unused; a search
    the budget ended (a trial, or the search, holds its marker) is refused, as Ray saved it finished (the end-to-end
    case: below)."""
    import warnings

    from tune_gpt.cli import run_main
    from tune_gpt.report import STOPPED_FILE
    from tune_gpt.search import EXPERIMENT_FILE, _check_resumable, _warn_budget_not_applied, plan_search

    def plan(**kw):
        return plan_search(SearchOptions(space=str(tiny_space(tmp_path)), name="b", storage_path=str(tmp_path / "r"),
                                         resume=True, overrides={"data": str(corpus_file)}, **kw))

    def check(**kw):  # what run_search does when Ray saved a state to restore
        p = plan(**kw)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            _warn_budget_not_applied(p, _check_resumable(p))
        return [str(w.message) for w in seen]

    exp = tmp_path / "r" / "b"
    (exp / "trial_1").mkdir(parents=True)
    (exp / EXPERIMENT_FILE).write_text(json.dumps({"name": "b", "time_budget_s": 600.0}))
    assert check(time_budget=600) == [] and check() == []
    (said,) = check(time_budget=60)
    assert "--time-budget 60 is not applied" in said and "(600 s)" in said
    p = plan(time_budget=60)
    assert run_main(lambda: _warn_budget_not_applied(p, _check_resumable(p)) or 0, "tune_gpt.search") == 0
    assert capsys.readouterr().err == f"tune_gpt.search: warning: {said}\n"  # the CLI's warnings: one line each
    assert check(max_concurrent=3) == []  # an experiment file from before the limit was recorded: nothing to say
    (exp / EXPERIMENT_FILE).write_text(json.dumps({"name": "b", "time_budget_s": 600.0, "max_concurrent": 2}))
    assert check(max_concurrent=2) == []
    (said,) = check(max_concurrent=3)
    assert said.startswith("--max-concurrent 3 is not applied to a resumed search") and said.endswith("(2)")
    assert check() == []  # none asked for (a search run from Python keeps no command line to take it from)
    (exp / EXPERIMENT_FILE).write_text(json.dumps({"name": "b", "time_budget_s": 600.0, "max_concurrent": None}))
    assert check() == [] and check(max_concurrent=1)[0].endswith("with the limit it was started with (none)")
    (exp / "trial_1" / STOPPED_FILE).write_text("{}")
    with pytest.raises(ConfigError, match="time budget ran out .1 trial.s. out-of-time.*--retry-errored"):
        check()
    assert check(retry_errored=True) == []  # errored trials can still be re-run
    (exp / "trial_1" / STOPPED_FILE).unlink()
    (exp / STOPPED_FILE).write_text("{}")  # the budget ran out between two trials: only the search's marker
    with pytest.raises(ConfigError, match=r"time budget ran out and Ray cannot reopen it"):
        check()


@pytest.mark.slow
def test_trials_the_time_budget_stops_are_out_of_time_everywhere(ray_session, tmp_path, corpus_file, capsys):
    """--time-budget stops the trials still running without telling Tune's callbacks or the searcher: the
    report must not call them early-stopped (ASHA's word), TensorBoard's HParams tab must list them, and the
    Optuna study kept in a database must not show them running for ever."""
    import optuna
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tune_gpt.report import STOPPED_FILE, load_results, warnings_for

    db = f"sqlite:///{tmp_path / 'study.db'}"
    earlier = optuna.create_study(study_name="budget", storage=db, direction="minimize")  # an earlier search's
    earlier.ask().set_user_attr("tune_experiment", str(tmp_path / "elsewhere" / "budget"))
    opts = SearchOptions(space=str(tiny_space(tmp_path, n=4, steps=100_000, every=10)), name="budget",
                         time_budget=25, scheduler="none", optuna_storage=db, storage_path=str(tmp_path / "r"),
                         overrides={"data": str(corpus_file)}, verbose=0)  # W&B offline
    with pytest.raises(ConfigError, match=r"study 'budget' already holds 1 trial.*another --name"):
        run_search(opts)  # its trials would steer TPE and be proposed again as this search's
    assert not (tmp_path / "r" / "budget").exists()
    optuna.delete_study(study_name="budget", storage=db)
    out = run_search(opts)
    df = load_results(out.experiment_dir)
    assert len(df) >= 1 and set(df["status"]) == {"out-of-time"}, df[["trial_id", "status"]]
    assert (df["steps"].dropna() < 100_000).all()  # (a trial can be stopped before its first report)
    assert any("--time-budget ran out" in w for w in warnings_for(df))
    for d in trial_dirs(out.experiment_dir):
        assert (d / STOPPED_FILE).is_file()
        if not (d / "result.json").is_file() or not (d / "result.json").read_text().strip():
            continue  # stopped before its first report: no metrics for the HParams tab
        acc = EventAccumulator(str(d))
        acc.Reload()
        assert "_hparams_/session_end_info" in acc.PluginTagToContent("hparams")
    runs = offline_runs(out.experiment_dir)  # W&B: a finished run that says so, for each trial that reported
    assert runs and {r.summary.get("trial_status") for r in runs} == {"out-of-time"}
    assert all(r.exit_code == 0 for r in runs)
    ours = optuna.load_study(study_name="budget", storage=db).trials
    states = [t.state.name for t in ours]
    assert "RUNNING" not in states and "COMPLETE" not in states, states
    assert set(df["trial_id"]) <= {t.user_attrs["tune_trial_id"] for t in ours}
    pruned = sorted(t.value for t in ours if t.state.name == "PRUNED")
    assert pruned == pytest.approx(sorted(df["final_val_loss"].dropna()))  # each at its last reported value
    assert f"{len(df)} trials in" in (printed := capsys.readouterr().out)  # also those stopped before their first report
    # trials Tune made that the budget ended before they started (no params.json): counted apart, as Ray's table
    # has them and the report does not
    never = sum(1 for d in (out.experiment_dir).glob("trial_*") if not (d / "params.json").is_file())
    assert (f"({len(df)} out-of-time; {never} more never started, the time budget ran out first)" if never
            else f"({len(df)} out-of-time)") in printed, printed
    assert json.loads((out.experiment_dir / STOPPED_FILE).read_text())["time_budget_s"] == 25  # the search's own
    # Ray saved the search as finished: --resume would start nothing, so it says so instead (before Ray starts)
    with pytest.raises(ConfigError, match=r"--resume: the search .*budget.* ran out .*--name NEW"):
        run_search(SearchOptions(space=str(tmp_path / "tiny.yaml"), name="budget", storage_path=str(tmp_path / "r"),
                                 resume=True, time_budget=60, overrides={"data": str(corpus_file)}, verbose=0))


def test_wandb_runs_say_how_their_trial_ended_and_every_run_is_finished(monkeypatch, tmp_path):
    """Ray's W&B callback ends a run when Tune says the trial completed or errored, all alike, and waits at
    the experiment's end (then kills the logging actor) for runs Tune never ended (time budget, Ctrl+C).
    TrialStatusWandb puts the trial's end into the summary and ends every run once."""
    from ray.air.integrations.wandb import WandbLoggerCallback

    from tune_gpt import _wandb_callback as wb

    class Trial:
        def __init__(self, name, last_result, error_file=None):
            self.name, self.last_result, self.error_file = name, last_result, error_file

    class Queue(list):
        put = list.append

    ended, experiment_end = [], []
    # Ray's own: puts END in the queue; the queue goes only once the actor has finished the run
    monkeypatch.setattr(WandbLoggerCallback, "log_trial_end",
                        lambda self, trial, failed=False: ended.append((trial.name, failed)))
    monkeypatch.setattr(WandbLoggerCallback, "on_experiment_end", lambda self, trials, **kw: experiment_end.append(1))
    cb = wb.TrialStatusWandb(project="p", mode="offline")
    oom = tmp_path / "error.txt"
    oom.write_text("Traceback ...\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n")
    result = {"val/loss": 2.0, "total_steps": 100, "training_iteration": 7}
    trials = {"done": Trial("done", {**result, "step": 100}), "cut": Trial("cut", {**result, "step": 30}),
              "nan": Trial("nan", {**result, "step": 40, "diverged": 1}), "err": Trial("err", {**result, "step": 50}),
              "oom": Trial("oom", {**result, "step": 50}, str(oom)),
              "budget": Trial("budget", {**result, "step": 60}), "ctrl-c": Trial("ctrl-c", {**result, "step": 70}),
              "never": Trial("never", {})}
    queues = {name: Queue() for name in trials}
    for name, trial in trials.items():
        if name != "never":  # a trial that never reported has no run
            cb._trial_queues[trial] = queues[name]
    cb.on_trial_complete(0, [], trials["done"])
    cb.on_trial_complete(0, [], trials["cut"])  # ASHA
    cb.on_trial_complete(0, [], trials["nan"])
    cb.on_trial_error(0, [], trials["err"])
    cb.on_trial_error(0, [], trials["oom"])
    cb.end_trial(trials["budget"], "out-of-time")  # MarkTimeBudgetStops
    cb.end_trial(trials["budget"], "out-of-time")  # once only
    cb.log_trial_end(trials["never"])
    cb.on_experiment_end(list(trials.values()))  # ends only what was never ended: the Ctrl+C one
    said = {name: list(q) for name, q in queues.items()}
    expected = {"done": "finished", "cut": "early-stopped", "nan": "diverged", "err": "errored", "oom": "oom",
                "budget": "out-of-time", "ctrl-c": "interrupted"}
    for name, status in expected.items():
        assert said[name] == [(wb._QueueItem.CHECKPOINT, {wb.STATUS_KEY: status})], name
    assert said["never"] == []
    assert sorted(ended) == sorted((n, n in ("err", "oom")) for n in expected) and experiment_end == [1]

    class Run:
        summary: dict = {}

    actor = wb._StatusLoggingActor.__new__(wb._StatusLoggingActor)  # what the logging actor does with the item
    actor._wandb = type("W", (), {"run": Run()})
    actor._handle_checkpoint({wb.STATUS_KEY: "early-stopped"})
    assert Run.summary == {wb.SUMMARY_KEY: "early-stopped"}


def test_wandb_items_reach_the_logging_actor_in_order_without_the_driver_waiting(monkeypatch):
    """Ray's callback puts each result into a queue actor and waits for it (a trial's first result waited
    for that actor's process to start: seconds, the driver and the trial blocked). TrialStatusWandb sends
    numbered items straight to the trial's logging actor, which hands them to its W&B loop in order
    whatever order they arrive in; the run resumes its W&B run instead of starting it over."""
    import random
    import threading

    from tune_gpt import _wandb_callback as wb

    made, sent = [], []

    class Method:
        def __init__(self, name):
            self.name = name

        def remote(self, *args):
            sent.append((self.name, args))
            return f"ref-{self.name}"

    class Actor:
        put, run = Method("put"), Method("run")

    class RemoteClass:
        def remote(self, **kwargs):
            made.append(kwargs)
            return Actor()

    options = {}
    monkeypatch.setattr(wb.ray, "remote", lambda **kw: options.update(kw) or (
        lambda cls: options.update(cls=cls) or RemoteClass()))
    monkeypatch.setattr(wb, "_force_on_current_node", lambda: {})
    monkeypatch.setattr(wb.ray, "wait", lambda futures, **kw: ([], futures))  # the run never ends here
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_IDENTITY_TOKEN_FILE", raising=False)

    class Trial:
        local_path, last_result, error_file = "/tmp/trial", {"step": 10, "total_steps": 10}, None
        config, trial_id, experiment_dir_name = {}, "t1", "exp"  # what Ray's log_trial_start reads

    cb = wb.TrialStatusWandb(project="p", mode="offline")
    trial = Trial()
    cb._start_logging_actor(trial, ["x"], id="t1", resume=False, project="p")
    assert made == [{"logdir": "/tmp/trial", "queue": None, "exclude": ["x"], "to_config": cb.AUTO_CONFIG_KEYS,
                     "credentials": {}, "id": "t1", "resume": "allow", "project": "p",
                     "dir": "/tmp/trial"}]  # the trial's folder, where the search looks for its runs, over WANDB_DIR
    assert "runtime_env" not in options  # Ray's callback put the API key there, and Ray's runtime-env agent logs it
    assert options["max_concurrency"] == 2 and options.get("max_restarts", 0) == 0
    assert options["cls"] is wb._StatusLoggingActor
    cb.log_trial_result(1, trial, {"val/loss": 3.0, "training_iteration": 1})
    cb.log_trial_start(trial)  # Tune restarted the trial (--max-failures): same actor, numbering goes on
    cb.log_trial_result(2, trial, {"val/loss": 2.5, "training_iteration": 2})
    assert len(made) == 1
    cb.on_trial_complete(3, [], trial)
    puts = [args for name, args in sent if name == "put"]
    assert [seq for seq, _ in puts] == [0, 1, 2, 3] and sent[0] == ("run", ())
    kinds = [item[0] for _, item in puts]
    assert kinds == [wb._QueueItem.RESULT, wb._QueueItem.RESULT, wb._QueueItem.CHECKPOINT, wb._QueueItem.END]

    inbox = wb._OrderedInbox()  # the actor's end, the puts arriving shuffled, some after get() started waiting
    shuffled = puts[:]
    random.Random(0).shuffle(shuffled)
    got = []
    reader = threading.Thread(target=lambda: got.extend(inbox.get(timeout=10) for _ in puts))
    reader.start()
    for seq, item in shuffled:
        inbox.put(seq, item)
    reader.join(10)
    assert got == [item for _, item in puts]
    with pytest.raises(TimeoutError, match="no queue item 4"):
        inbox.get(timeout=0.01)


def test_wandb_credentials_reach_an_online_logging_actor_as_arguments(monkeypatch, tmp_path):
    """Online, the API key (or W&B's identity token file) goes to the logging actor as an argument (set in its
    environment before wandb starts); offline, nothing. With only an identity token file Ray's setup raised
    "No WandB API key found", which ended the search."""
    import os

    from tune_gpt import _wandb_callback as wb

    made = []

    class RemoteClass:
        def remote(self, **kwargs):
            made.append(kwargs)
            return type("Actor", (), {"run": type("M", (), {"remote": lambda self: "ref"})()})()

    monkeypatch.setattr(wb.ray, "remote", lambda **kw: (lambda cls: RemoteClass()))
    monkeypatch.setattr(wb, "_force_on_current_node", lambda: {})
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no netrc, no W&B settings
    token = tmp_path / "identity.jwt"
    token.write_text("header.payload.signature")
    monkeypatch.setenv("WANDB_IDENTITY_TOKEN_FILE", str(token))

    class Trial:
        local_path = "/tmp/trial"

    online = wb.TrialStatusWandb(project="p", mode="online")
    online.setup()  # raised ValueError (Ray's _set_api_key)
    online._start_logging_actor(Trial(), [], id="t1", mode="online")
    assert made[-1]["credentials"] == {"WANDB_IDENTITY_TOKEN_FILE": str(token)}
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_IDENTITY_TOKEN_FILE", "identity.jwt")  # relative: the actor starts in the trial's folder
    online._start_logging_actor(Trial(), [], id="t1b", mode="online")
    assert made[-1]["credentials"] == {"WANDB_IDENTITY_TOKEN_FILE": str(token)}
    monkeypatch.setenv("WANDB_IDENTITY_TOKEN_FILE", str(token))
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    wb.TrialStatusWandb(project="p", mode="online")._start_logging_actor(Trial(), [], id="t2", mode="online")
    assert made[-1]["credentials"] == {"WANDB_API_KEY": "k" * 40, "WANDB_IDENTITY_TOKEN_FILE": str(token)}
    wb.TrialStatusWandb(project="p", mode="offline")._start_logging_actor(Trial(), [], id="t3", mode="offline")
    assert made[-1]["credentials"] == {}

    def base_init(self, logdir, queue, *args, **kwargs):  # Ray's actor: what the constructor hands on
        self.seen = (os.environ.get("WANDB_API_KEY"), kwargs)

    monkeypatch.setattr(wb._WandbLoggingActor, "__init__", base_init)
    monkeypatch.delenv("WANDB_API_KEY")
    actor = wb._StatusLoggingActor("/tmp/trial", None, credentials={"WANDB_API_KEY": "z" * 40}, project="p")
    assert actor.seen == ("z" * 40, {"project": "p"})


def test_the_trial_table_lists_finished_trials_best_first_and_survives_one_without_a_value(ray_session, tmp_path,
                                                                                          monkeypatch):
    """Ray's CLIReporter with sort_by_metric raised a TypeError when a finished trial had no value (the
    time budget stopped it before it started): every such --time-budget search ended with a traceback."""
    import importlib

    from ray.train._internal.storage import StorageContext
    from ray.tune import CLIReporter
    from ray.tune.experiment import Trial

    from tune_gpt._tune_callbacks import TrialTable

    trials = []
    for i, (value, status) in enumerate([(2.5, Trial.TERMINATED), (None, Trial.TERMINATED),
                                          (2.1, Trial.TERMINATED), (3.0, Trial.RUNNING)]):
        trial = Trial("f", config={"lr": i}, stub=True, trial_id=f"t{i}",
                      storage=StorageContext(storage_path=str(tmp_path), experiment_dir_name="exp",
                                             trial_dir_name=f"t{i}"))
        trial.set_status(status)
        if value is not None:
            trial.run_metadata.last_result = {"val/loss": value, "step": 10, "training_iteration": 1,
                                              "config": {"lr": i}}
        trials.append(trial)
    columns = {"parameter_columns": ["lr"], "metric_columns": {"val/loss": "val/loss"},
               "print_intermediate_tables": True}  # as the search's: the table whatever Tune's verbosity
    tune_log = importlib.import_module("ray.tune.utils.log")  # Tune's verbosity: the last search's (tests: 0)
    monkeypatch.setattr(tune_log, "verbosity", tune_log.Verbosity.V1_EXPERIMENT)  # the CLI's: tables
    with pytest.raises(TypeError, match="not supported between"):  # what Ray's own sorting does
        CLIReporter(**columns, metric="val/loss", mode="min", sort_by_metric=True)._progress_str(trials, True)
    rows = [line for line in TrialTable(**columns, metric="val/loss", mode="min")._progress_str(trials, True)
            .splitlines() if line.startswith("| f_t")]
    assert [row.split()[1] for row in rows] == ["f_t3", "f_t2", "f_t0", "f_t1"], rows  # running, then best first
    rows = [line for line in TrialTable(**columns, metric="val/loss", mode="max")._progress_str(trials, True)
            .splitlines() if line.startswith("| f_t")]
    assert [row.split()[1] for row in rows] == ["f_t3", "f_t0", "f_t2", "f_t1"], rows


@pytest.mark.parametrize(("statuses", "budget", "says"), [
    (["out-of-time", "out-of-time"], 20, "before the time budget (20 s) ran out; nothing to replay: give it a larger --time-budget"),
    (["errored", "errored"], None, "every trial errored (see the trials table and each trial's error.txt)"),
    (["diverged", "oom"], None, "every trial diverged, ran out of memory or errored"),
    ([], None, "no trial ran"),
])
def test_a_search_without_a_best_trial_says_why_last(statuses, budget, says, capsys):
    """No trial with a finite objective: the search exits 1, and its last line on stderr says why (not
    Ray's "Could not find best trial. Did you pass the correct `metric` parameter?")."""
    import pandas as pd

    from tune_gpt.search import _print_summary

    plan = plan_search(SearchOptions(time_budget=budget))
    _print_summary(plan, pd.DataFrame(), [], None, None, Path("/nonexistent"), None, None, 12.0, len(statuses), 0,
                   statuses)
    out, err = capsys.readouterr()
    assert "replay the best trial" not in out
    last = err.strip().splitlines()[-1]
    assert last.startswith("no trial reported a finite val/loss") and says in last, last
    if statuses and set(statuses) == {"errored"}:  # --no-report: no statuses, Tune's count of errors
        _print_summary(plan, pd.DataFrame(), [], None, None, Path("/nonexistent"), None, None, 12.0, 2, 2, None)
        assert says in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_space_with_nothing_left_to_search_runs_one_trial_of_the_fixed_values(ray_session, tmp_path, corpus_file,
                                                                                 monkeypatch, capsys):
    """Every searched parameter fixed on the command line: Optuna refused the empty space at its first
    suggestion, after the experiment folder existed (a rerun then needed --resume, which crashed again).
    And a report that fails in an unforeseen way does not fail the search that ran: it ends with its summary."""
    import tune_gpt.report

    def broken_report(*args, **kwargs):
        raise KeyError("status")

    monkeypatch.setattr(tune_gpt.report, "write_report", broken_report)
    opts = SearchOptions(space=str(tiny_space(tmp_path, steps=6, every=3)), storage_path=str(tmp_path / "r"),
                         overrides={"data": str(corpus_file), "learning_rate": 3e-3, "batch_size": 4},
                         wandb=False, verbose=0)
    plan = plan_search(opts)
    assert plan.searcher == "grid" and plan.n_trials == 1
    assert "nothing left to search (every parameter is fixed): one trial of the fixed values" in plan.describe()
    out = run_search(opts)
    assert out.num_trials == 1 and out.num_errors == 0
    assert out.best_config["learning_rate"] == 3e-3 and out.best_config["batch_size"] == 4
    printed = capsys.readouterr()
    assert "report not written: KeyError: 'status'" in printed.err
    assert out.replay_command and out.replay_command in printed.out + printed.err  # the summary's last words


def test_a_trial_whose_device_does_not_report_the_metric_errors_alone():
    """`--metric mfu` on a GPU with no known peak (or fp32 without TF32): Tune's strict metric check ended
    the whole search at the first report; now that trial errors, saying why."""
    from tune_gpt.search import TuneReporter

    rep = TuneReporter(None, {"device": "cuda:0"}, objective="mfu")
    rep.total_steps = 10
    with pytest.raises(ConfigError, match=r"^metric mfu: this trial's evaluations do not report it \(no peak FLOPs "
                                          r"figure for this GPU and precision; device cuda:0\); search on val/loss"):
        rep.evaluate(5, {"val/loss": 2.0, "step": 5}, None)


def test_asha_max_t_counts_the_evaluations_of_the_longest_trial_a_searched_model_size_makes(tmp_path):
    """ASHA's max_t bounds every trial's reports. With an epoch budget, a searched model_size changes the
    context length through its preset, and so the steps of an epoch: max_t followed only the baseline's
    size, and ASHA (stop_last_trials) cut the trials of the other size off with their schedule half run."""
    from tune_gpt.search import max_evaluations

    space = write_space(tmp_path / "sizes.yaml", "name: sizes\nfixed: {epochs: 1, eval_interval: 10, batch_size: 8}\n"
                                                 "space:\n  model_size: {choice: [medium, small]}\n")
    plan = plan_search(SearchOptions(space=str(space)))
    assert plan.base_cfg.model_size == "medium"  # the baseline: 8 x 1024 tokens a step
    assert max_evaluations(plan, 100_000) == math.ceil(math.ceil(100_000 / (8 * 256)) / 10)  # small's: 8 x 256 a step


def test_a_trial_that_fits_the_cluster_but_no_node_is_refused(monkeypatch):
    """A 16-CPU head without a GPU and a 2-CPU worker with one: --cpus-per-trial 4 --gpus-per-trial 0.5 fit the
    cluster's totals, and no node can ever place the trial, which Tune leaves PENDING with a warning."""
    import ray

    from tune_gpt.search import _check_gpus

    nodes = [{"Alive": True, "Resources": {"CPU": 16.0}}, {"Alive": True, "Resources": {"CPU": 2.0, "GPU": 1.0}},
             {"Alive": False, "Resources": {"CPU": 8.0, "GPU": 1.0}}]  # a dead node places nothing
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 18.0, "GPU": 1.0})
    with pytest.raises(ConfigError, match=r"^--cpus-per-trial 4 --gpus-per-trial 0.5: no node of the Ray cluster has both "
                                          r"\(its nodes: 16 CPUs \+ 0 GPUs, 2 CPUs \+ 1 GPUs\); a trial runs on one node"):
        _check_gpus(SearchOptions(cpus_per_trial=4, gpus_per_trial=0.5))
    with pytest.warns(UserWarning, match=r"the Ray cluster has 2 nodes and --storage-path \./tune_results is a local "
                                         r"path: trials on other nodes fail at their first checkpoint unless"):
        _check_gpus(SearchOptions(cpus_per_trial=2, gpus_per_trial=0.5))  # the worker takes it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_gpus(SearchOptions(cpus_per_trial=8, storage_path="s3://bucket/results"))  # the head takes it


def test_a_resume_replaces_the_restored_w_and_b_callback_and_keeps_the_others(tmp_path, monkeypatch):
    """Tuner.restore brings back the callbacks of the session that began the search. Only the W&B one is
    renewed (mode, folder, W&B at all follow this command); the time-budget callback stays the restored
    one (Ray restores the search's own budget), told of the new W&B callback instead of the old."""
    from types import SimpleNamespace

    from ray.tune.logger import JsonLoggerCallback

    from tune_gpt._tune_callbacks import MarkTimeBudgetStops, TrialResultsJson
    from tune_gpt.search import _renew_callbacks

    class TrialStatusWandb:  # the restored one (matched by its class name)
        pass

    monkeypatch.setenv("WANDB_MODE", "offline")
    for wandb_on in (False, True):
        old = TrialStatusWandb()
        mine = TrialResultsJson()
        budget = MarkTimeBudgetStops(600, loggers=["tensorboard", old, mine])
        run_config = SimpleNamespace(callbacks=["keep", budget, old, "csv", mine])
        tuner = SimpleNamespace(_local_tuner=SimpleNamespace(get_run_config=lambda: run_config))
        plan = plan_search(SearchOptions(space=str(tiny_space(tmp_path)), storage_path=str(tmp_path / "r"),
                                         wandb=wandb_on))
        _renew_callbacks(tuner, plan)
        if not wandb_on:  # --resume --no-wandb: no W&B callback at all
            assert run_config.callbacks == ["keep", budget, "csv", mine] and budget._loggers == ["tensorboard", mine]
        else:
            new = run_config.callbacks[2]
            assert type(new).__module__ == "tune_gpt._wandb_callback" and new.kwargs["mode"] == "offline"
            assert run_config.callbacks == ["keep", budget, new, "csv", mine]
            assert budget._loggers == ["tensorboard", mine, new]
    # a search begun before TrialResultsJson: Tune's own writer (restored, or the one Tune would add) is replaced
    tunes = JsonLoggerCallback()
    budget = MarkTimeBudgetStops(600, loggers=["tensorboard", tunes])
    plan = plan_search(SearchOptions(space=str(tiny_space(tmp_path)), wandb=False, storage_path=str(tmp_path / "r")))
    # with a time budget (Tune's writer made by tune_gpt, in the budget callback's list too); without (Tune adds it)
    for restored in (["keep", budget, "csv", tunes], ["keep"]):
        run_config = SimpleNamespace(callbacks=list(restored))
        tuner = SimpleNamespace(_local_tuner=SimpleNamespace(get_run_config=lambda: run_config))
        _renew_callbacks(tuner, plan)
        mine = run_config.callbacks[-1]
        assert type(mine) is TrialResultsJson
        assert run_config.callbacks == [c for c in restored if c is not tunes] + [mine]  # in its place, or last
        if budget in restored:
            assert budget._loggers == ["tensorboard", mine]


def test_a_gpu_only_metric_this_gpu_cannot_report_is_refused_before_any_trial(tmp_path, monkeypatch):
    """--metric mfu on a GPU with no known peak (a T4 in fp32): every trial would train to its first
    evaluation, then error, each retried --max-failures times. The driver's GPU answers first."""
    import torch

    import tune_gpt.train
    from tune_gpt.search import _check_objective_here

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(tune_gpt.train, "peak_flops", lambda device, precision, matmul="auto": None)
    plan = plan_search(SearchOptions(space=str(tiny_space(tmp_path)), metric="mfu", mode="max", gpus_per_trial=0.5))
    with pytest.raises(ConfigError, match=r"^metric mfu: no peak FLOPs figure for Tesla T4 in fp32 .*use val/loss"):
        _check_objective_here(plan)
    monkeypatch.setattr(tune_gpt.train, "peak_flops", lambda device, precision, matmul="auto": 65e12)
    _check_objective_here(plan)  # a known peak: the trials report it


def test_a_search_its_budget_ended_is_not_taken_for_interrupted_by_a_late_signal(tmp_path, monkeypatch):
    """A signal while the search winds down (the W&B runs closing) after its time budget ended: the search
    had ended (its budget marker says so), and was reported interrupted, with a --resume that is refused."""
    import tune_gpt.search as search

    plan = plan_search(SearchOptions(space=str(tiny_space(tmp_path)), storage_path=str(tmp_path / "r")))
    stop = search._StopRequest(signum=2)
    monkeypatch.setattr(search, "_all_trials_ended", lambda *a: False)  # fewer trials than planned: the budget
    monkeypatch.setattr(search, "_budget_markers", lambda plan: (True, 1))
    assert not search._was_interrupted(stop, [], plan, None)
    monkeypatch.setattr(search, "_budget_markers", lambda plan: (False, 0))
    assert search._was_interrupted(stop, [], plan, None)


def test_a_size_preset_from_the_command_line_brings_its_own_shape(tmp_path):
    """`python -m tune_gpt.search --model_size small` (the README's example) trained the default space's
    shrunken tiny shape: the file's model.n_layer etc. went on overriding the preset. A preset given on the
    command line now leaves out the file's fixed shape values, and says so; shape flags still win."""
    plan = plan_search(SearchOptions(storage_path=str(tmp_path), overrides={"model_size": "small"}))
    assert not {k for k in plan.fixed if k.startswith("model.")} & {"model.n_layer", "model.n_head", "model.n_embd",
                                                                   "model.block_size", "model.dropout"}
    m = plan.base_cfg.model
    assert (plan.base_cfg.model_size, m.n_layer, m.n_head, m.n_embd, m.block_size) == ("small", 6, 6, 384, 256)
    assert any(n.startswith("model_size: 'small' from the command line, not the file's 'tiny', with its own shape: "
                            "the file's model.n_layer 2, model.n_head 4") for n in plan.notes), plan.notes
    mine = plan_search(SearchOptions(storage_path=str(tmp_path), overrides={"model_size": "small", "model.n_layer": 3}))
    assert (mine.base_cfg.model.n_layer, mine.base_cfg.model.n_embd) == (3, 384)
    same = plan_search(SearchOptions(storage_path=str(tmp_path), overrides={"model_size": "tiny"}))
    assert (same.fixed["model.n_layer"], same.base_cfg.model.n_embd) == (2, 64)  # the file's own preset: its shape


def test_the_summary_counts_trials_that_never_started_apart(capsys):
    """Ray's table counted a trial the time budget ended before it started (4/16 trials), the summary and the
    report did not (3 trials): the summary now says it."""
    import pandas as pd

    from tune_gpt.search import _print_summary

    plan = plan_search(SearchOptions(time_budget=20))
    statuses = ["out-of-time"] * 3
    _print_summary(plan, pd.DataFrame(), [], None, None, Path("/nonexistent"), None, None, 22.0, 3, 0, statuses,
                   never_started=1)
    assert "3 trials in 22 s (3 out-of-time; 1 more never started, the time budget ran out first)" in \
        capsys.readouterr().out


def test_a_size_preset_from_the_command_line_over_a_searched_or_unset_size(tmp_path):
    """Over a file that searches model_size, the shape values it fixes go as well, and the note says so; over a
    file that sets no size (tiny, the default), --model_size tiny keeps the file's shape values."""
    searched = write_space(tmp_path / "searched.yaml", "name: s\nmethod: random\nnum_samples: 1\nfixed:\n"
                           "  model.n_layer: 2\n  model.block_size: 32\nspace:\n  model_size: {grid: [tiny, small]}\n")
    plan = plan_search(SearchOptions(space=str(searched), storage_path=str(tmp_path), overrides={"model_size": "small"}))
    assert "model.n_layer" not in plan.fixed and plan.base_cfg.model.block_size == 256
    assert any("model_size: 'small', with its own shape: the file's model.n_layer 2, model.block_size 32 are left out" in n
               for n in plan.notes), plan.notes
    unset = write_space(tmp_path / "unset.yaml", "name: u\nmethod: random\nnum_samples: 1\nfixed:\n"
                        "  model.block_size: 32\nspace:\n  learning_rate: {choice: [0.001, 0.002]}\n")
    plan = plan_search(SearchOptions(space=str(unset), storage_path=str(tmp_path), overrides={"model_size": "tiny"}))
    assert plan.fixed["model.block_size"] == 32 and plan.base_cfg.model.block_size == 32
    plan = plan_search(SearchOptions(space=str(unset), storage_path=str(tmp_path), overrides={"model_size": "small"}))
    assert "model.block_size" not in plan.fixed and any("model.block_size 32 is left out" in n for n in plan.notes)
