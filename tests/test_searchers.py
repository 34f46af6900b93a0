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
    # the three real trials carry their own results; every repeat was told a known value or a failure
    told = {t.params["lr"]: t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}
    assert told == losses
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL) for t in study.trials)
    assert s._ot_trials["t1"].params["lr"] == first[1]["lr"]  # Ray's ids still map to the trials that ran


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
        assert s.suggest(f"t{i}") is not None
        s.on_trial_complete(f"t{i}", {"loss": 1.0 + i})
    before = len(s._ot_study.trials)
    assert s.suggest("x") == Searcher.FINISHED
    assert len(s._ot_study.trials) - before == 4  # max_redraws + 1 asks, then it stops
