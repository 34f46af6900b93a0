"""UniqueOptunaSearch: a configuration is trained once; repeats are answered from what is known."""

from __future__ import annotations

import optuna
import pytest
from ray import tune
from ray.tune.search import Searcher

from tune_gpt._searchers import UniqueOptunaSearch, config_key


def searcher(values, seed=0, **kw):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return UniqueOptunaSearch(space={"lr": tune.choice(values), "bs": tune.choice([8])}, metric="loss", mode="min",
                              sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=1), **kw)


def test_each_configuration_is_proposed_once_and_the_search_ends_when_none_is_left():
    s = searcher([1e-3, 1e-2, 1e-1])
    first = [s.suggest(f"t{i}") for i in range(3)]  # three running at once: three different points
    assert sorted(c["lr"] for c in first) == [1e-3, 1e-2, 1e-1]
    assert s.suggest("t3") is None  # every proposal repeats a running trial: wait for one to end
    assert s.suggest("t4") is None  # ... without asking the study again meanwhile
    asked = len(s._ot_study.trials)
    losses = {1e-3: 2.5, 1e-2: 2.1, 1e-1: 3.0}
    for i, c in enumerate(first):
        s.on_trial_result(f"t{i}", {"loss": losses[c["lr"]] + 0.5, "training_iteration": 1})
        s.on_trial_complete(f"t{i}", {"loss": losses[c["lr"]], "training_iteration": 2})
    assert len(s._ot_study.trials) == asked
    assert s.suggest("t5") == Searcher.FINISHED and s.exhausted  # all three trained: nothing left to learn
    assert s.repeats_skipped > 0
    study = s._ot_study
    for i, c in enumerate(first):  # Ray's trial ids still map to the Optuna trials that ran, told their own results
        real = study.trials[s._ot_trials[f"t{i}"].number]
        assert real.params["lr"] == c["lr"] and real.value == losses[c["lr"]] and "repeat_of" not in real.user_attrs
    repeats = [t for t in study.trials if "repeat_of" in t.user_attrs]
    assert len(repeats) == s.repeats_skipped == len(study.trials) - 3
    for t in repeats:  # a repeat is told the value of the trial it repeats, or a failure if that one was running
        assert t.state == optuna.trial.TrialState.FAIL or t.value == losses[t.params["lr"]]


def test_a_repeat_of_an_ended_trial_is_told_its_result_and_a_new_point_is_drawn():
    s = searcher([1e-3, 1e-2, 1e-1, 1.0], seed=3)
    a = s.suggest("a")
    s.on_trial_complete("a", {"loss": 2.0})
    seen = {config_key(a)}
    for i in range(3):  # only 3 new points remain; each is new however often TPE proposes "a" again
        c = s.suggest(f"n{i}")
        assert config_key(c) not in seen
        seen.add(config_key(c))
        s.on_trial_complete(f"n{i}", {"loss": 3.0 + i})
    assert len(seen) == 4
    assert s.suggest("last") == Searcher.FINISHED


def test_an_errored_trial_is_not_run_again_and_its_state_survives_save_and_restore(tmp_path):
    s = searcher([1e-3, 1e-2])
    a = s.suggest("a")
    s.on_trial_complete("a", None, error=True)
    b = s.suggest("b")
    assert b != a
    s.save(str(tmp_path / "searcher.pkl"))
    r = searcher([1e-3, 1e-2])
    r.restore(str(tmp_path / "searcher.pkl"))
    r.on_trial_complete("b", {"loss": 2.0})
    assert r.suggest("c") == Searcher.FINISHED  # it remembers both: neither is trained again


@pytest.mark.parametrize("values", [[1e-3], [1e-3, 1e-2]])
def test_redraws_are_bounded(values):
    s = searcher(values, max_redraws=3)
    for i, _ in enumerate(values):
        assert isinstance(s.suggest(f"t{i}"), dict)
        s.on_trial_complete(f"t{i}", {"loss": 1.0 + i})
    before = len(s._ot_study.trials)
    assert s.suggest("x") == Searcher.FINISHED
    assert len(s._ot_study.trials) - before == 4  # max_redraws + 1 asks, then it stops


def test_a_repeat_of_a_trial_that_errored_after_reporting_is_told_a_failure():
    s = searcher([1e-3])
    s.suggest("a")
    s.on_trial_result("a", {"loss": 3.3, "training_iteration": 1})
    s.on_trial_complete("a", None, error=True)  # as Tune reports a crash: no result
    assert s.suggest("b") == Searcher.FINISHED
    states = {t.state for t in s._ot_study.trials}
    assert states == {optuna.trial.TrialState.FAIL}  # the crash and its repeats: none told 3.3 as a completed value


def test_the_search_waits_rather_than_ends_while_a_trial_runs():
    s = searcher([1e-3, 1e-2], max_redraws=40)
    a, b = s.suggest("a"), s.suggest("b")
    assert {a["lr"], b["lr"]} == {1e-3, 1e-2}
    s.on_trial_complete("a", {"loss": 2.0})
    assert s.suggest("c") is None  # only repeats are left, but b still runs: wait, do not end
    s.on_trial_complete("b", {"loss": 1.0})
    assert s.suggest("d") == Searcher.FINISHED and s.exhausted


def test_stepped_values_with_float_noise_are_the_same_configuration():
    """Optuna samples low + k * step (0.30000000000000004); the enqueued baseline says 0.3: one configuration."""
    assert config_key({"wd": 0.30000000000000004, "bs": 8}) == config_key({"bs": 8, "wd": 0.3})
    assert config_key({"wd": 0}) == config_key({"wd": 0.0}) != config_key({"wd": 0.1})
    s = UniqueOptunaSearch(space={"wd": tune.quniform(0.15, 0.45, 0.05)}, metric="loss", mode="min",
                           sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=1), points_to_evaluate=[{"wd": 0.3}])
    seen = []
    while (c := s.suggest(f"t{len(seen)}")) not in (None, Searcher.FINISHED):
        seen.append(c["wd"])
        s.on_trial_complete(f"t{len(seen) - 1}", {"loss": abs(c["wd"] - 0.3)})
    assert len(seen) == 7 and seen[0] == 0.3  # 0.15, 0.20, ..., 0.45: each once, the baseline first


def test_a_retried_errored_trial_reports_to_a_new_study_trial_and_leaves_waiting_ones_alone():
    """--retry-errored runs trial "a" again under its id: Optuna cannot reopen its FAILed trial, so the retry's
    results go to a new one with the same parameters; a WAITING trial in a shared study is not taken for it."""
    s = searcher([1e-3, 1e-2], experiment="/r/exp")
    a = s.suggest("a")
    s.on_trial_complete("a", None, error=True)
    study = s._ot_study
    study.enqueue_trial({"lr": 1e-2, "bs": 8})  # e.g. another search's baseline, not asked yet
    s.on_trial_result("a", {"loss": 2.5, "training_iteration": 1})  # the retry reports
    s.on_trial_complete("a", {"loss": 2.2, "training_iteration": 2})
    failed, waiting, retry = study.trials
    assert failed.state.name == "FAIL" and waiting.state.name == "WAITING"
    assert retry.state.name == "COMPLETE" and retry.value == 2.2 and retry.intermediate_values == {1: 2.5}
    assert retry.params == failed.params == {"lr": a["lr"], "bs": 8}
    assert retry.user_attrs == {"retry_of": failed.number, "tune_trial_id": "a", "tune_experiment": "/r/exp"}


def test_time_budget_stops_are_told_from_every_other_end(tmp_path):
    """MarkTimeBudgetStops marks the trials Tune ends without telling the callbacks (its time budget), and only those."""
    from types import SimpleNamespace

    import pyarrow.fs

    from tune_gpt._tune_callbacks import MarkTimeBudgetStops
    from tune_gpt.report import STOPPED_FILE

    ended = []
    logger = SimpleNamespace(log_trial_end=lambda trial, failed=False: ended.append(trial.trial_id))
    cb = MarkTimeBudgetStops(60, loggers=[logger])

    def trial(tid: str, status: str, last_result: dict | None = None):
        storage = SimpleNamespace(storage_filesystem=pyarrow.fs.LocalFileSystem(), trial_fs_path=str(tmp_path / tid))
        # Ray's last_result is never empty: a trial that never reported has its id there
        return SimpleNamespace(trial_id=tid, status=status, last_result=last_result or {"trial_id": tid}, storage=storage)

    cut, done, failed, never, resumed, early = (trial("cut", "RUNNING"), trial("done", "RUNNING"), trial("failed", "RUNNING"),
                                                trial("never", "PENDING"),
                                                trial("resumed", "PENDING", {"val/loss": 2.0, "training_iteration": 3}),
                                                trial("early", "RUNNING"))
    trials = [cut, done, failed, never, resumed, early]
    for t in (cut, done, failed, early):
        cb.on_trial_start(0, trials, t)
    cb.on_step_end(1, trials)
    done.status = "TERMINATED"  # finished: Tune tells the callbacks first, then sets the status
    cb.on_trial_complete(2, trials, done)
    early.status = "TERMINATED"  # ASHA's stop goes the same way
    cb.on_trial_complete(2, trials, early)
    failed.status = "ERROR"
    cb.on_trial_error(2, trials, failed)
    cb.on_step_end(2, trials)
    for t in (cut, never, resumed):  # the budget runs out: everything left is TERMINATED within one step
        t.status = "TERMINATED"
    cb.on_step_end(3, trials)
    marked = sorted(p.parent.name for p in tmp_path.glob(f"*/{STOPPED_FILE}"))
    assert marked == ["cut", "resumed"] and sorted(ended) == ["cut", "resumed"]
    cb.on_step_end(4, trials)  # marked once
    assert sorted(ended) == ["cut", "resumed"]


def test_a_budget_that_runs_out_between_trials_marks_the_search(tmp_path, monkeypatch):
    """No trial running when the budget runs out: no trial is marked, so the search marks itself (--resume
    reads it); a search that ends before its budget, or with every planned trial run, leaves no such mark."""
    from types import SimpleNamespace

    import pyarrow.fs

    import tune_gpt._tune_callbacks as cbs
    from tune_gpt.report import STOPPED_FILE

    clock = [1000.0]
    monkeypatch.setattr(cbs.time, "time", lambda: clock[0])
    storage = SimpleNamespace(storage_filesystem=pyarrow.fs.LocalFileSystem(), experiment_fs_path=str(tmp_path / "exp"))

    def trial(tid: str, ran: bool = True):
        return SimpleNamespace(trial_id=tid, status="TERMINATED", storage=storage,  # Ray's: never empty
                               last_result={"val/loss": 2.0, "training_iteration": 1} if ran else {"trial_id": tid})

    marker = tmp_path / "exp" / STOPPED_FILE

    def run(last_step_s: float, trials: list, planned: int, end_s: float = 5) -> bool:
        cb = cbs.MarkTimeBudgetStops(600)  # the budget Ray applies comes with setup (a restored search's own)
        cb.setup(stop=None, num_samples=planned, total_num_samples=planned, time_budget_s=30)
        clock[0] += last_step_s
        cb.on_step_end(1, trials)  # Tune's last step: where its stopper found the budget spent, or not
        clock[0] += end_s  # the trials' actors stop, then the experiment ends
        cb.on_experiment_end(trials=trials)
        found = marker.is_file()
        marker.unlink(missing_ok=True)
        return found

    two = [trial("a"), trial("b")]
    assert run(31, two, planned=4)  # Optuna made 2 of 4 trials, then the budget ran out between trials
    assert run(31, [*two, trial("c", ran=False), trial("d", ran=False)], planned=4)  # random/grid: made, never ran
    assert not run(28, two, planned=4)  # Ctrl+C 2 s before the budget, ended 5 s later: --resume continues it
    assert not run(31, two, planned=2)  # every planned trial ran: done, whatever the clock says


def test_a_report_again_of_a_recorded_step_is_dropped_quietly():
    import warnings

    s = searcher([1e-3, 1e-2])
    s.suggest("a")
    s.on_trial_result("a", {"loss": 2.5, "training_iteration": 1})
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        s.on_trial_result("a", {"loss": 2.4, "training_iteration": 1})  # a resumed trial, its step again
    assert not [w for w in seen if "already reported" in str(w.message)], [str(w.message) for w in seen]
    assert s._ot_study.trials[0].intermediate_values == {1: 2.5}  # the first report stands


def test_a_trial_the_scheduler_stopped_is_complete_at_its_value_and_labelled_for_dashboards():
    """ASHA's stop stays COMPLETE (TPE ranks it by its value; a diverged trial, at inf, stays last) and carries
    stopped_at_step; a trial that ran to its end and a diverged one carry no such label."""
    s = searcher([1e-3, 1e-2, 1e-1])
    for t in "abc":
        s.suggest(t)
    s.on_trial_complete("a", {"loss": 2.6, "step": 30, "total_steps": 300, "training_iteration": 1})
    s.on_trial_complete("b", {"loss": 2.1, "step": 300, "total_steps": 300, "training_iteration": 10})
    s.on_trial_complete("c", {"loss": float("inf"), "step": 40, "total_steps": 300, "diverged": 1,
                              "training_iteration": 2}, error=False)
    stopped, full, diverged = (s._ot_study.trials[s._ot_trials[t].number] for t in "abc")
    assert stopped.state.name == "COMPLETE" and stopped.value == 2.6 and stopped.user_attrs["stopped_at_step"] == 30
    assert full.state.name == "COMPLETE" and "stopped_at_step" not in full.user_attrs
    assert diverged.value == float("inf") and "stopped_at_step" not in diverged.user_attrs  # the worst value there is
    before = len(s._ot_study.trials)
    s.suggest("d")  # only repeats are left: each is told what its first got, and labelled as it
    later = s._ot_study.trials[before:]
    repeats = [t for t in later if t.user_attrs.get("repeat_of") == "a"]
    assert repeats and all(t.user_attrs.get("stopped_at_step") == 30 and t.value == 2.6 for t in repeats)
    of_full = [t for t in later if t.user_attrs.get("repeat_of") == "b"]
    assert of_full and all("stopped_at_step" not in t.user_attrs for t in of_full)


def test_under_max_concurrent_the_searcher_hears_of_trials_it_did_not_hand_out_this_session():
    """Tune's ConcurrencyLimiter keeps the trials it handed out in memory only: after --resume, the trials
    the interrupted search had running (and every trial --retry-errored runs again) ended without the
    searcher being told, so Optuna kept them RUNNING and UniqueOptunaSearch waited for them for ever."""
    from ray.tune.search import ConcurrencyLimiter

    from tune_gpt._searchers import TellingLimiter

    for limiter_cls, told in ((ConcurrencyLimiter, False), (TellingLimiter, True)):
        inner = searcher([1e-3, 1e-2])
        first = ConcurrencyLimiter(inner, max_concurrent=1)  # the session that was interrupted
        assert first.suggest("t0") is not None and first.suggest("t1") is None  # the limit holds
        resumed = limiter_cls(inner, max_concurrent=1)  # Tune.restore: the limiter from tuner.pkl, the searcher's state
        resumed.on_trial_complete("t0", {"loss": 2.0, "training_iteration": 3})
        assert ("t0" in inner._ended) is told
        if told:
            assert inner._ot_study.trials[inner._ot_trials["t0"].number].value == 2.0
            assert resumed.suggest("t2")["lr"] != inner._ot_trials["t0"].params["lr"]  # goes on to the other point
            assert resumed.suggest("t3") is None  # and the limit still holds for trials it hands out


def test_the_search_puts_its_optuna_searcher_under_telling_limiter_for_max_concurrent(tmp_path):
    from conftest import tiny_space

    from tune_gpt._searchers import TellingLimiter
    from tune_gpt.search import SearchOptions, _tune_config, plan_search

    def config(**kw):
        plan = plan_search(SearchOptions(space=str(tiny_space(tmp_path)), **kw))
        plan.max_evals = 4  # (run_search sets it once the corpus is read)
        return _tune_config(plan)

    cfg = config(max_concurrent=2)
    assert isinstance(cfg.search_alg, TellingLimiter) and cfg.search_alg.max_concurrent == 2
    assert type(cfg.search_alg.searcher).__name__ == "UniqueOptunaSearch" and cfg.max_concurrent_trials is None
    assert isinstance(config().search_alg, UniqueOptunaSearch)  # no limit asked: no limiter


def test_a_trial_waiting_at_a_rung_is_told_to_the_study_and_goes_on_in_a_new_study_trial(caplog):
    """`pause: true`: the scheduler says it pauses "a" at its next result; the study gets that value (COMPLETE,
    paused_at_step), so TPE learns from it while it waits and the search does not wait for it as if it ran.
    When "a" goes on, its results go to a new study trial (resumed_from); "b", which ends where it waited,
    adds nothing and no warning."""
    import logging

    s = searcher([1e-3, 1e-2, 1e-1])
    a, b = s.suggest("a"), s.suggest("b")
    for t, loss in (("a", 2.5), ("b", 2.9)):
        s.pause_after_this_result(t)
        s.on_trial_result(t, {"loss": loss, "step": 30, "training_iteration": 1})
    study = s._ot_study
    first_a, only_b = study.trials[s._ot_trials["a"].number], study.trials[s._ot_trials["b"].number]
    assert first_a.state.name == only_b.state.name == "COMPLETE" and first_a.value == 2.5
    assert first_a.user_attrs["paused_at_step"] == 30
    c = s.suggest("c")  # the third point: both others are known, not running
    assert c is not None and c["lr"] not in (a["lr"], b["lr"])
    with caplog.at_level(logging.WARNING):
        s.on_trial_result("a", {"loss": 2.2, "step": 60, "training_iteration": 2})  # it went on
        s.on_trial_complete("a", {"loss": 2.0, "step": 90, "training_iteration": 3})
        s.on_trial_complete("b")  # stopped where it waited (Tune tells no result)
    assert not [r for r in caplog.records if "already finished" in r.getMessage()]
    went_on = study.trials[s._ot_trials["a"].number]
    assert went_on.number != first_a.number and went_on.params == first_a.params
    assert went_on.state.name == "COMPLETE" and went_on.value == 2.0 and went_on.intermediate_values == {2: 2.2}
    assert went_on.user_attrs["resumed_from"] == first_a.number
    assert len([t for t in study.trials if t.params["lr"] == b["lr"]]) == 1  # b: its value at the rung only


def test_a_trial_that_went_on_from_the_top_rung_and_was_stopped_at_max_t_is_told_its_last_value():
    """Rungs 1, 3, 9 with max_t 10: a trial promoted from rung 9 gets Tune's STOP at its next result, and Tune
    then skips on_trial_result: the value comes only with on_trial_complete, into a reopened study trial."""
    s = searcher([1e-3, 1e-2])
    s.suggest("a")
    s.pause_after_this_result("a")
    s.on_trial_result("a", {"loss": 2.3, "step": 270, "training_iteration": 9})
    s.on_trial_complete("a", {"loss": 2.1, "step": 300, "training_iteration": 10})
    at_rung, final = s._ot_study.trials[0], s._ot_study.trials[s._ot_trials["a"].number]
    assert at_rung.value == 2.3 and at_rung.user_attrs["paused_at_step"] == 270
    assert final.number != at_rung.number and final.state.name == "COMPLETE" and final.value == 2.1
    assert final.user_attrs["resumed_from"] == at_rung.number


def test_the_storage_password_is_kept_out_only_where_there_is_one_and_nested_blocks_share_it(tmp_path):
    """A URL without a secret leaves Optuna's pickles as they are (an older tune_gpt can read them); an inner
    block's end does not unregister the outer search's reducer; outside every block a redacted pickle cannot
    be opened without the password (one line)."""
    import copyreg
    import pickle

    from optuna.storages import RDBStorage

    from tune_gpt._searchers import storage_password_kept_out
    from tune_gpt.errors import ConfigError

    plain = f"sqlite:///{tmp_path / 'a.db'}"
    secret = f"sqlite:///file:{tmp_path / 'b.db'}?mode=rwc&token=S3CRETdb&uri=true"
    with storage_password_kept_out(plain):
        assert RDBStorage not in copyreg.dispatch_table
    storage = RDBStorage(secret)
    with storage_password_kept_out(secret):
        with storage_password_kept_out(secret):
            pass
        data = pickle.dumps(storage)
        assert b"S3CRETdb" not in data and pickle.loads(data).url == secret
    assert RDBStorage not in copyreg.dispatch_table
    with pytest.raises(ConfigError, match=r"give --optuna-storage with the full URL"):
        pickle.loads(data)
