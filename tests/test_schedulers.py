"""ASHA with promotions (`scheduler: {type: asha, pause: true}`), decided without Ray running: fake trials
and a fake Tune controller that does what Tune does with the scheduler's answers."""

from __future__ import annotations

import pytest

pytest.importorskip("ray.tune")

from ray.tune.experiment import Trial  # noqa: E402
from ray.tune.schedulers import TrialScheduler  # noqa: E402

from tune_gpt._schedulers import PromotingASHA  # noqa: E402


class FakeTrial:
    def __init__(self, trial_id: str):
        self.trial_id, self.status = trial_id, Trial.PENDING


class FakeController:
    def __init__(self, trials):
        self.trials, self.stopped = trials, []

    def get_trials(self):
        return self.trials

    def stop_trial(self, trial):
        trial.status = Trial.TERMINATED
        self.stopped.append(trial.trial_id)


def asha(**kw) -> PromotingASHA:
    return PromotingASHA(**{"time_attr": "it", "metric": "loss", "mode": "min", "max_t": 10, "grace_period": 1,
                            "reduction_factor": 3, **kw})


def pick(s: PromotingASHA, ctl: FakeController):
    """What Tune does with the scheduler's choice: the trial starts (or goes on from its checkpoint)."""
    trial = s.choose_trial_to_run(ctl)
    if trial is not None:
        trial.status = Trial.RUNNING
    return trial


class Finished:
    """Tune's search algorithm once it has made every trial (random and grid make them all at once)."""

    def is_finished(self) -> bool:
        return True


def simulate(s: PromotingASHA, losses: list[float], slots: int = 2,
             tell: bool = False) -> tuple[int, list[str], list[str]]:
    """Tune with `slots` trials at a time, every trial one iteration per tick; trial i's loss at iteration
    it is losses[i] - 0.01 * it. Returns the iterations trained, the order trials started or went on
    in, and the trials stopped where they waited. `tell`: the scheduler sees the controller (and that the
    search makes no more trials) as it decides, as in Tune."""
    trials = [FakeTrial(f"t{i}") for i in range(len(losses))]
    ctl, done, spent, order, running = FakeController(trials), {t.trial_id: 0 for t in trials}, 0, [], []
    ctl.search_alg = Finished()
    while True:
        while len(running) < slots and (t := pick(s, ctl)) is not None:
            running.append(t)
            order.append(t.trial_id)
        if not running:
            return spent, order, ctl.stopped
        for t in list(running):
            done[t.trial_id] += 1
            spent += 1
            loss = losses[int(t.trial_id[1:])] - 0.01 * done[t.trial_id]
            if report(s, t, done[t.trial_id], loss, ctl if tell else None) != "CONTINUE":
                running.remove(t)


def report(s: PromotingASHA, trial: FakeTrial, it: int, loss: float, ctl=None) -> str:
    decision = s.on_trial_result(ctl, trial, {"it": it, "loss": loss})
    trial.status = {TrialScheduler.PAUSE: Trial.PAUSED, TrialScheduler.STOP: Trial.TERMINATED}.get(decision, Trial.RUNNING)
    return decision


def test_rungs_are_those_of_rays_asha():
    assert asha().rungs == [1, 3, 9]
    assert asha(max_t=100, grace_period=2, reduction_factor=2).rungs == [2, 4, 8, 16, 32, 64]
    assert asha(max_t=1, grace_period=1).rungs == []  # nothing to decide: every trial runs to its end


def test_the_first_trials_at_a_rung_wait_until_the_rung_says_they_are_in_its_top_third():
    s = asha()
    a, b, c, d = (FakeTrial(x) for x in "abcd")
    ctl = FakeController([a, b, c, d])
    assert report(s, a, 1, 2.0) == TrialScheduler.PAUSE  # alone at its rung: Ray's ASHA would let it go on
    assert report(s, b, 1, 3.0) == TrialScheduler.PAUSE
    assert pick(s, ctl) is c  # new trials first (c, d are PENDING)
    assert report(s, c, 1, 2.5) == TrialScheduler.PAUSE  # third at the rung, not its best
    d.status = Trial.RUNNING
    assert pick(s, ctl) is a  # the rung of three lets its best (a) go on
    assert pick(s, ctl) is None  # and no other: one in three, d still runs
    assert report(s, d, 1, 1.0) == TrialScheduler.PAUSE  # the best, but the rung's one slot went to a
    assert report(s, a, 2, 1.9) == TrialScheduler.CONTINUE  # between rungs
    assert report(s, a, 3, 1.8) == TrialScheduler.PAUSE  # alone at the next rung


def test_a_trial_already_in_the_top_third_goes_on_without_waiting():
    s = asha()
    trials = [FakeTrial(x) for x in "abc"]
    for t, loss in zip(trials, (3.0, 2.0)):
        t.status = Trial.RUNNING
        assert report(s, t, 1, loss) == TrialScheduler.PAUSE
    trials[2].status = Trial.RUNNING
    assert report(s, trials[2], 1, 1.0) == TrialScheduler.CONTINUE  # best of three on arrival


def test_nine_points_cost_a_quarter_of_a_grid_and_the_best_runs_to_the_end():
    """Nine trials, as a 3 x 3 grid, two at a time: at most a third of each rung goes on, as it fills, before
    new trials start; the top rung's best runs to max_t once nothing else runs; the rest stop where they
    wait. Ray's ASHA lets the first two trials at every rung go on; here what runs to max_t is the best."""
    losses = [3.0, 2.0, 2.5, 1.5, 2.8, 2.2, 3.3, 1.2, 2.9]  # t7 is the best, then t3, t1
    spent, order, stopped = simulate(asha(), losses)
    # a trial that may go on does so before new ones start: t1, second best of the first six, before t6
    assert order[:8] == ["t0", "t1", "t2", "t3", "t4", "t5", "t1", "t6"]
    assert order[-2:] == ["t7", "t7"]  # t7 went on from the first rung, then from the top one at the end
    for flipped in (losses[::-1], losses):  # the best first or among the last, one slot or two: the same cost
        assert simulate(asha(), flipped, slots=1)[0] == simulate(asha(), flipped)[0] == 22
    assert sorted(stopped) == sorted(f"t{i}" for i in range(9) if i != 7)
    # iterations: 9 at the first rung, 3 promoted to the second (2 more each), the best to 10 (7 more)
    assert spent == 9 + 3 * 2 + 7 < 0.25 * 9 * 10


def test_a_pause_the_end_of_the_search_would_undo_at_once_is_skipped():
    """A trial pauses only while something else may still run: alone at the end it would go on at once,
    for the price of a restart (a compilation on a GPU with --compile)."""
    s, only = asha(), FakeTrial("only")
    ctl = FakeController([only])
    ctl.search_alg = Finished()
    only.status = Trial.RUNNING
    assert [report(s, only, it, 2.0, ctl) for it in (1, 3, 9)] == ["CONTINUE"] * 3  # a one-trial search
    assert s.num_paused == 0 and s.num_not_paused == 3 and s._promoted == [{"only"}] * 3
    ctl.search_alg.is_finished = lambda: False  # the searcher may still make a trial: it waits for it
    s2 = asha()
    assert report(s2, only, 1, 2.0, ctl) == TrialScheduler.PAUSE

    losses = [3.0, 2.0, 2.5, 1.5, 2.8, 2.2, 3.3, 1.2, 2.9]
    told, untold = asha(), asha()
    (spent, order, stopped), (spent_u, order_u, stopped_u) = simulate(told, losses, tell=True), simulate(untold, losses)
    assert spent == spent_u == 22 and stopped == stopped_u  # the same decisions, the same cost
    assert order_u[-2:] == ["t7", "t7"] and order == order_u[:-1]  # less the restart of t7 at the top rung
    assert told.num_paused < untold.num_paused and told.num_promoted < untold.num_promoted
    assert told.num_paused + told.num_not_paused == untold.num_paused  # each skipped pause: one undone at once


def test_a_better_trial_at_the_top_rung_after_the_first_finished_also_runs_to_the_end():
    s = asha(max_t=4, grace_period=1, reduction_factor=2)  # rungs 1, 2
    a, b = FakeTrial("a"), FakeTrial("b")
    ctl = FakeController([a, b])
    s._scores[1].update({"a": -2.0})  # a was at the top rung, went on, and finished
    s._promoted[1].add("a")
    a.status = Trial.TERMINATED
    s._scores[0]["b"] = -1.0
    s._promoted[0].add("b")
    b.status = Trial.RUNNING
    assert report(s, b, 2, 1.0) == TrialScheduler.PAUSE  # better than a (loss 2.0), one of two: no slot
    assert s.choose_trial_to_run(ctl) is b  # nothing runs: the rung's best goes on


def test_a_trial_paused_before_a_resume_goes_on_and_nan_ranks_last():
    s = asha()
    old = FakeTrial("old")
    old.status = Trial.PAUSED  # restored PAUSED: this scheduler never saw it
    assert s.choose_trial_to_run(FakeController([old])) is old
    x, y, z = FakeTrial("x"), FakeTrial("y"), FakeTrial("z")
    for t, loss in ((x, float("nan")), (y, 5.0), (z, 6.0)):
        t.status = Trial.RUNNING
        report(s, t, 1, loss)
    assert s.choose_trial_to_run(FakeController([x, y, z])) is y  # a diverged trial is never the best


def test_pause_is_an_asha_setting_of_the_space_file_and_refuses_what_it_cannot_run(tmp_path):
    from conftest import write_space

    from tune_gpt.errors import ConfigError
    from tune_gpt.search import SearchOptions, _scheduler, plan_search
    from tune_gpt.spaces import SpaceError, load_space

    def space(sched: str):
        return write_space(tmp_path / "s.yaml", f"method: optuna\nscheduler: {sched}\nspace:\n"
                                                "  learning_rate: {loguniform: [1.0e-4, 1.0e-2]}\n")

    plan = plan_search(SearchOptions(space=str(space("{type: asha, pause: true, reduction_factor: 2}"))))
    plan.max_evals = 8
    s = _scheduler(plan)
    assert isinstance(s, PromotingASHA) and s.rungs == [1, 2, 4]
    with pytest.raises(SpaceError, match=r"scheduler\.pause: must be true or false, got 'yes'"):
        load_space(space("{type: asha, pause: 'yes'}"))
    with pytest.raises(SpaceError, match=r"scheduler\.brackets: pause: true runs one bracket; drop brackets"):
        load_space(space("{type: asha, pause: true, brackets: 2}"))
    with pytest.raises(ConfigError, match=r"^--max-concurrent: .*s\.yaml's scheduler pauses \(pause: true\) trials"):
        plan_search(SearchOptions(space=str(space("{type: asha, pause: true}")), max_concurrent=2))

    from tune_gpt.search import build_parser, options_from_args

    flagged = plan_search(options_from_args(build_parser().parse_args(["--space", str(space("asha")),
                                                                      "--pause-at-rungs"])))
    assert flagged.scheduler == {"type": "asha", "pause": True}
    for flag, value in (("--pause-at-rungs", True), ("--stop-at-rungs", False)):
        with pytest.raises(ConfigError, match=rf"^{flag}: chooses how ASHA ends trials at its rungs, and the "
                                              r"scheduler is median; use it with --scheduler asha"):
            plan_search(SearchOptions(space=str(space("asha")), scheduler="median", pause_at_rungs=value))
    with pytest.raises(ConfigError, match=r"^--max-concurrent: --pause-at-rungs pauses trials"):
        plan_search(SearchOptions(space=str(space("asha")), pause_at_rungs=True, max_concurrent=1))


@pytest.mark.slow
def test_a_search_with_pause_trains_the_better_trial_on_from_its_checkpoint_and_ends_cleanly(
        ray_session, tmp_path, corpus_file, capsys):
    """Two trials one at a time, rungs at evaluations 1 and 2 of 4: the first trial always waits at the first
    rung; whichever is better goes on from its checkpoint, waits alone at the second rung, and runs to the end
    once nothing else runs; the other ends at its first evaluation. 5 of 8 steps."""
    import json

    from conftest import TINY_MODEL, write_space

    from tune_gpt.report import saved_trial_states
    from tune_gpt.search import SearchOptions, run_search

    space = write_space(tmp_path / "p.yaml", "name: p\nmethod: optuna\nnum_samples: 2\n"
                        "scheduler: {type: asha, grace_period: 1, reduction_factor: 2, pause: true}\nfixed:\n"
                        + TINY_MODEL + "  max_steps: 4\n  eval_interval: 1\n  eval_iters: 1\n  sample_tokens: 0\n"
                        "space:\n  learning_rate: {choice: [1.0e-4, 3.0e-2]}\n")
    out = run_search(SearchOptions(space=str(space), storage_path=str(tmp_path / "r"), wandb=False, cpus_per_trial=2,
                                   overrides={"data": str(corpus_file)}, verbose=0))
    rows = {json.loads((d / "params.json").read_text())["learning_rate"]:
            [json.loads(line) for line in (d / "result.json").read_text().splitlines()]
            for d in out.experiment_dir.glob("trial_*")}
    assert sorted(len(r) for r in rows.values()) == [1, 4]  # 1 + 4 = 5 of the 8 steps two full trials take
    finisher = next(lr for lr, r in rows.items() if len(r) == 4)
    assert [r["step"] for r in rows[finisher]] == [1, 2, 3, 4]  # on from its checkpoint: no step trained twice
    restarts = [r["step"] for r in rows[finisher][1:] if r["iterations_since_restore"] == 1]
    # the baseline (1e-4) runs first and waits at the first rung; alone at the second with nothing else to
    # run, the finisher does not pause there
    assert restarts == ([2] if finisher == 1e-4 else []), rows
    assert {v["status"] for v in saved_trial_states(out.experiment_dir).values()} == {"TERMINATED"}
    said = capsys.readouterr()
    assert "2 trials in" in said.out and "(1 finished, 1 early-stopped)" in said.out
    assert "interrupted" not in said.err


@pytest.mark.slow
def test_a_trial_sent_on_from_a_rung_soon_after_it_paused_keeps_its_row_there(ray_session, tmp_path, corpus_file):
    """Two trials at once reach the first rung together: the first waits, the second makes room for it, and it
    goes on from its checkpoint at once. Tune's logger copies a restarted trial's result.json back from
    storage, which is uploaded about once a second: the row at the rung was lost every time. The two trials
    differ only in how often they log the training loss, so their values tie and the first to arrive (the
    one waiting) is the one that goes on, whichever it is."""
    import json

    from conftest import TINY_MODEL, write_space

    from tune_gpt.search import SearchOptions, run_search

    space = write_space(tmp_path / "q.yaml", "name: q\nmethod: grid\n"
                        "scheduler: {type: asha, grace_period: 1, reduction_factor: 2}\nfixed:\n" + TINY_MODEL
                        + "  max_steps: 6\n  eval_interval: 2\n  eval_iters: 1\n  sample_tokens: 0\n  warmup_steps: 0\n"
                        "space:\n  log_interval: {grid: [1, 2]}\n")
    out = run_search(SearchOptions(space=str(space), storage_path=str(tmp_path / "r"), wandb=False, cpus_per_trial=1,
                                   overrides={"data": str(corpus_file)}, verbose=0))
    rows = [[json.loads(line) for line in (d / "result.json").read_text().splitlines()]
            for d in out.experiment_dir.glob("trial_*")]
    finisher = max(rows, key=len)
    restarted = [r["step"] for r in finisher if r["iterations_since_restore"] == 1 and r["step"] > 2]
    assert sorted([r["step"] for r in t] for t in rows) == [[2], [2, 4, 6]], rows
    assert restarted == [4]  # it went on from the rung: the row there was written before the restart, and kept


def restored(s: PromotingASHA, trial_id: str, status: str, it: int, loss: float) -> FakeTrial:
    """A trial as Tune restores it for a resumed search, and tells the (new) scheduler of it."""
    trial = FakeTrial(trial_id)
    # Tune restores an unfinished trial (paused, running) as pending before it adds it, and starts it
    trial.status = status if status in (Trial.TERMINATED, Trial.ERROR) else Trial.PENDING
    trial.last_result = {"it": it, "loss": loss}
    s.on_trial_add(None, trial)
    return trial


def test_a_resumed_search_rebuilds_the_rungs_from_the_trials_tune_restores():
    """Rungs 1, 3, 9 (reduction factor 3). Before the resume: a, b, c reached rung 1; a went on and is at
    it 2, b waits at rung 1, c ended there; d finished; e waits at rung 3."""
    s = asha()
    a = restored(s, "a", Trial.RUNNING, 2, 1.0)
    b = restored(s, "b", Trial.PAUSED, 1, 2.0)
    restored(s, "c", Trial.TERMINATED, 1, 3.0)
    restored(s, "d", Trial.TERMINATED, 10, 0.5)
    e = restored(s, "e", Trial.PAUSED, 3, 1.5)
    assert s._scores[0].keys() == {"a", "b", "c", "d", "e"} and s._promoted[0] == {"a", "d", "e"}
    assert s._scores[1].keys() == {"d", "e"} and s._promoted[1] == {"d"}
    # b and e, started again by Tune, are decided at their first result: rung 1 has five trials, one slot
    # (5 // 3) and three gone on, so b waits again; so does e at rung 3 (d took its one slot), and so does a,
    # which was running, when it reaches rung 3
    assert report(s, b, 2, 1.9) == TrialScheduler.PAUSE and s._waiting["b"] == 0
    assert report(s, e, 4, 1.4) == TrialScheduler.PAUSE and s._waiting["e"] == 1
    assert report(s, a, 3, 0.9) == TrialScheduler.PAUSE and s._waiting["a"] == 1
    assert s._scores[0]["b"] == -2.0 and s._scores[1]["e"] == -1.5  # ranked by their values at the rung
    # at the end a rung's best goes on if it waits there: d's value stands in for it at both rungs (its
    # last, 0.5, the best), and d went on: they all end where they wait, as they would have without the resume
    ctl = FakeController([a, b, e])
    assert s.choose_trial_to_run(ctl) is None and sorted(ctl.stopped) == ["a", "b", "e"]


def test_a_restored_trial_past_a_rung_is_ranked_there_by_its_value_there_read_from_its_results(tmp_path):
    """Its last value (a later, better one) made the rung's cut-off stricter for every trial after the resume."""
    import json
    from types import SimpleNamespace

    from pyarrow.fs import LocalFileSystem

    rows = [{"it": "one", "loss": 9.0}, {"it": 1, "loss": 2.0}, {"it": 2, "loss": 1.8}, {"it": 3, "loss": 1.2},
            {"it": 2, "loss": 1.8}, {"it": 3, "loss": 1.1}, {"it": 4, "loss": 0.9}]  # 5-6: a retry from it 1
    (tmp_path / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"it": 5, "lo')  # cut
    s = asha()
    s._chunk = 7  # rows cut across reads
    x = FakeTrial("x")
    x.storage = SimpleNamespace(storage_filesystem=LocalFileSystem(), trial_fs_path=str(tmp_path))
    x.last_result = {"it": 4, "loss": 0.9}
    s.on_trial_add(None, x)
    assert s._scores[0]["x"] == -2.0 and s._scores[1]["x"] == -1.2  # the first result at each rung, as ranked then
    assert s._promoted[0] == s._promoted[1] == {"x"}
    y = restored(s, "y", Trial.PAUSED, 4, 0.7)  # no storage to read: its last value stands in
    (tmp_path / "result.json").write_text("not json\n")
    z = FakeTrial("z")
    z.storage, z.last_result = x.storage, {"it": 4, "loss": 0.8}  # unreadable rows: the same
    s.on_trial_add(None, z)
    assert s._scores[0]["y"] == s._scores[1]["y"] == -0.7 and s._scores[0]["z"] == s._scores[1]["z"] == -0.8
    assert y.status == Trial.PENDING


def test_a_restored_trial_in_its_rungs_top_third_goes_on_at_its_first_result_and_is_ranked_at_the_next():
    s = asha()
    for i in range(5):
        restored(s, f"w{i}", Trial.TERMINATED, 1, 5.0 + i)  # five ended at rung 1
    b = restored(s, "b", Trial.PAUSED, 1, 1.0)  # the best of six: two slots, none gone on
    assert report(s, b, 2, 0.9) == TrialScheduler.CONTINUE and "b" in s._promoted[0]
    assert report(s, b, 3, 0.8) == TrialScheduler.PAUSE and s._waiting["b"] == 1  # alone at rung 3


def test_retries_are_ranked_again_and_the_searcher_hears():
    from types import SimpleNamespace

    told = []
    ctl = SimpleNamespace(search_alg=SimpleNamespace(searcher=SimpleNamespace(pause_after_this_result=told.append)))
    s = asha()
    r = restored(s, "r", Trial.PAUSED, 1, 9.0)  # waited at rung 1 in a search since resumed
    assert s.on_trial_result(ctl, r, {"it": 2, "loss": 9.0}) == TrialScheduler.PAUSE  # it waits there again
    assert told == ["r"]  # Optuna is told its value (Tune hands the searcher this result next)
    u = FakeTrial("u")
    assert s.on_trial_result(ctl, u, {"it": 1, "loss": 5.0}) == TrialScheduler.PAUSE
    s.on_trial_error(ctl, u)  # failed before Tune kept the pause; retried from an earlier checkpoint
    assert s.on_trial_result(ctl, u, {"it": 1, "loss": 4.0}) == TrialScheduler.PAUSE  # decided again, on this result
    assert s._scores[0]["u"] == -4.0 and s._waiting["u"] == 0
    last = asha(stop_last_trials=False)  # W&B's hyperband max_iter: the survivors train to their own end
    assert last.on_trial_result(None, FakeTrial("v"), {"it": 10, "loss": 1.0}) == TrialScheduler.CONTINUE
    assert asha().on_trial_result(None, FakeTrial("v"), {"it": 10, "loss": 1.0}) == TrialScheduler.STOP


def test_the_promotion_form_is_the_default_asha_and_rays_form_is_kept_where_asked_or_needed(tmp_path):
    from conftest import write_space
    from ray.tune.schedulers import ASHAScheduler

    from tune_gpt.errors import ConfigError
    from tune_gpt.search import (SearchOptions, _check_same_search, _scheduler, _tune_config, build_parser,
                                 options_from_args, plan_search)

    def plan(sched: str = "{type: asha, reduction_factor: 2}", *flags: str):
        path = write_space(tmp_path / "s.yaml", f"method: optuna\nscheduler: {sched}\nspace:\n"
                                                "  learning_rate: {loguniform: [1.0e-4, 1.0e-2]}\n")
        p = plan_search(options_from_args(build_parser().parse_args(["--space", str(path), *flags])))
        p.max_evals = 8
        return p

    default = plan()
    assert default.scheduler["pause"] is True and not default.pause_given
    assert isinstance(_scheduler(default), PromotingASHA)
    assert plan_search(SearchOptions()).scheduler["pause"] is True  # the README's search
    stops = plan("{type: asha, reduction_factor: 2}", "--stop-at-rungs")
    assert stops.scheduler["pause"] is False and stops.pause_given
    assert isinstance(_scheduler(stops), ASHAScheduler) and not isinstance(_scheduler(stops), PromotingASHA)
    assert plan("{type: asha, pause: false}").scheduler["pause"] is False
    with pytest.raises(SystemExit):  # one form or the other
        build_parser().parse_args(["--pause-at-rungs", "--stop-at-rungs"])

    # where the promotion form cannot run and nobody asked for it: Ray's form, and the plan says why
    limited = plan("asha", "--max-concurrent", "2")
    assert limited.scheduler["pause"] is False and isinstance(_scheduler(limited), ASHAScheduler)
    assert any("Ray's form" in n and "--max-concurrent" in n for n in limited.notes)
    assert "Ray's form" in limited.describe()
    brackets = plan("{type: asha, brackets: 2}")
    assert brackets.scheduler["pause"] is False and any("2 brackets" in n for n in brackets.notes)
    with pytest.raises(ConfigError, match=r"^--pause-at-rungs: runs one bracket, and .*s\.yaml's scheduler has 2$"):
        plan("{type: asha, brackets: 2}", "--pause-at-rungs")

    # --resume: a search started before promotions were the default (no `pause` in its experiment file) goes
    # on in Ray's form, which Ray restores with it; one started paused goes on paused; asking for the other
    # form is refused, as any other change of scheduler
    old = {"scheduler": {"type": "asha", "reduction_factor": 2.0}}
    resumed = plan()
    _check_same_search(resumed, old)
    assert resumed.scheduler["pause"] is False
    paused = {"scheduler": {"type": "asha", "reduction_factor": 2.0, "pause": True}}
    resumed = plan("{type: asha, reduction_factor: 2}")
    _check_same_search(resumed, paused)
    assert resumed.scheduler["pause"] is True
    # with --max-concurrent: Ray's restored search keeps its own settings; one that starts afresh (Ray had saved
    # nothing) would limit paused trials: refused
    limited = plan("{type: asha, reduction_factor: 2}", "--max-concurrent", "2")
    _check_same_search(limited, paused)
    assert limited.scheduler["pause"] is True and not any("Ray's form" in n for n in limited.notes)
    with pytest.raises(ConfigError, match=r"^--max-concurrent: the search was started with ASHA's promotion form"):
        _tune_config(limited)
    with pytest.raises(ConfigError, match=r"^--resume: scheduler .*'pause': True.* \(started with .*'pause': False"):
        _check_same_search(plan("{type: asha, reduction_factor: 2}", "--pause-at-rungs"), old)


@pytest.mark.slow
def test_a_search_killed_while_trials_wait_at_a_rung_resumes_to_a_clean_end(tmp_path, corpus_file):
    """The default ASHA (promotions) and a crash: SIGKILL to the search once Ray has saved a trial waiting
    at a rung, then --resume. Every trial ends TERMINATED, none starts over, and the waiting ones, which Tune
    restores as pending and starts, are ranked again at their rung rather than trained on unranked."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import TINY_MODEL, write_space
    from test_faults import cli_env, rows, trial_dirs

    from tune_gpt.report import saved_trial_states

    space = write_space(tmp_path / "w.yaml", "name: w\nmethod: optuna\nnum_samples: 6\n"
                        "scheduler: {type: asha, grace_period: 1, reduction_factor: 2}\nfixed:\n"
                        + TINY_MODEL + "  max_steps: 40\n  eval_interval: 5\n  eval_iters: 1\n  sample_tokens: 0\n"
                        "space:\n  learning_rate: {loguniform: [1.0e-4, 3.0e-2]}\n")
    exp = tmp_path / "r" / "w"
    base = [sys.executable, "-m", "tune_gpt.search", "--storage-path", str(tmp_path / "r"), "--no-wandb",
            "--no-report", "-q"]
    proc = subprocess.Popen([*base, "--space", str(space), "--data", str(corpus_file)], env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline, waiting = time.time() + 240, []
        while time.time() < deadline and proc.poll() is None and not waiting:
            time.sleep(0.1)
            waiting = [k for k, v in saved_trial_states(exp).items() if v.get("status") == "PAUSED"] if exp.is_dir() else []
        assert waiting and proc.poll() is None, "no trial was saved waiting at a rung before the search ended"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    before = {d.name: [r["step"] for r in rows(d)] for d in trial_dirs(exp)}

    done = subprocess.run([*base, "--name", "w", "--resume"], env=cli_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    states = {k: v["status"] for k, v in saved_trial_states(exp).items() if k.startswith("id:")}
    assert len(states) == 6 and set(states.values()) == {"TERMINATED"}, states
    steps = {d.name: [r["step"] for r in rows(d)] for d in trial_dirs(exp)}
    for name, seq in steps.items():
        assert seq[:len(before.get(name, []))] == before.get(name, []), name  # what was reported stays
        resumed = seq[len(before.get(name, [])):]
        if before.get(name) and resumed:  # a trial that had reported goes on from its checkpoint
            assert resumed[0] > before[name][-1] - 10, (name, seq)  # (at most the evaluation the kill lost)
    assert max(len(s) for s in steps.values()) == 8 and any(len(s) < 8 for s in steps.values()), steps
    assert "interrupted" not in done.stderr


def test_a_scheduler_pickled_by_an_older_tune_gpt_resumes():
    """Ray pickles the scheduler as a search starts and unpickles it for --resume."""
    import pickle

    old = asha()
    for added in ("_restored", "num_not_paused"):
        del old.__dict__[added]
    s = pickle.loads(pickle.dumps(old))
    t = restored(s, "t", Trial.PAUSED, 1, 2.0)
    assert report(s, t, 2, 1.9) == TrialScheduler.PAUSE and "0 pauses skipped" in s.debug_string()


def test_a_trial_that_fails_after_going_on_from_a_rung_keeps_its_place_when_tune_retries_it():
    """Tune retries a failed trial (--max-failures) by adding it again (on_trial_add), with its last result."""
    s = asha()
    trials = [FakeTrial(f"t{i}") for i in range(3)]
    for t, loss in zip(trials, (3.0, 2.0, 1.0)):
        t.status = Trial.RUNNING
        report(s, t, 1, loss)
    best = trials[2]
    assert best.status == Trial.RUNNING and "t2" in s._promoted[0]  # third of three, the best: it went on
    s.on_trial_error(None, best)
    best.status, best.last_result = Trial.PENDING, {"it": 1, "loss": 1.0}
    s.on_trial_add(None, best)  # known, and it went on: it goes on
    assert report(s, best, 2, 0.9) == TrialScheduler.CONTINUE and "t2" not in s._waiting


def test_a_trial_that_fails_as_it_pauses_is_decided_again_on_its_value_at_the_rung():
    """Tune retries a trial whose pause failed (its actor died): on its retry's first result it is ranked on
    its value at the rung, not on the evaluation after it, which would take the slot of a better trial."""
    s = asha(max_t=8, grace_period=1, reduction_factor=3)  # rungs 1, 3
    trials = [FakeTrial(f"t{i}") for i in range(3)]
    for t, loss in zip(trials, (1.0, 2.0, 3.0)):
        t.status = Trial.RUNNING
        report(s, t, 1, loss)
    # all three wait (one slot of three, not yet taken: t0 is to go on, the best)
    assert [t.status for t in trials] == [Trial.PAUSED, Trial.PAUSED, Trial.PAUSED] and s._next_up(0) == ["t0"]
    s.on_trial_error(None, trials[2])  # its pause failed: Tune retries it
    trials[2].status, trials[2].last_result = Trial.PENDING, {"it": 1, "loss": 3.0}
    s.on_trial_add(None, trials[2])
    trials[2].status = Trial.RUNNING
    assert report(s, trials[2], 2, 0.5) == TrialScheduler.PAUSE  # ranked on 3.0: the slot stays t0's
    assert s._scores[0]["t2"] == -3.0 and s._next_up(0) == ["t0"]


@pytest.mark.parametrize("why", ["diverged", "oom"])
def test_a_trial_whose_last_report_says_it_failed_is_ranked_at_its_rung_but_not_paused(why):
    """A trial that diverged (or ran out of memory) reports the worst value and ends. Paused at the rung that
    report reached, it was promoted at the search's end and started again only to report its end again."""
    s = asha()
    a, b = FakeTrial("a"), FakeTrial("b")
    assert report(s, a, 1, 2.0) == TrialScheduler.PAUSE
    assert s.on_trial_result(None, b, {"it": 1, "loss": float("inf"), why: 1}) == TrialScheduler.CONTINUE
    assert s._scores[0] == {"a": -2.0, "b": float("-inf")} and "b" not in s._waiting  # ranked, last; not waiting
    assert s._next_up(0) == []  # two at the rung: no slot yet, and the failed trial holds none


def test_a_trial_a_resumed_search_found_waiting_is_not_paused_again_by_its_failure():
    """A resumed search pauses a trial it found waiting at a rung on its first result: where that result says
    the trial diverged (or ran out of memory), it is ranked with it and left to end, as in the rung loop."""
    s = asha()
    restored(s, "a", Trial.TERMINATED, 1, 3.0)
    restored(s, "c", Trial.TERMINATED, 1, 4.0)
    b = restored(s, "b", Trial.PAUSED, 1, 1.0)  # the best at rung 1, waiting there (3 trials: 1 slot)
    restored(s, "d", Trial.TERMINATED, 10, 0.5)  # went on from rung 1 (its slot)
    assert s.on_trial_result(None, b, {"it": 2, "loss": float("inf"), "diverged": 1}) == TrialScheduler.CONTINUE
    assert "b" not in s._waiting and s._scores[0]["b"] == float("-inf")
