"""ASHA with promotions: tune_gpt's ASHA (``scheduler: {type: asha}``, ``pause: true`` unless set to false;
``--pause-at-rungs``; ``--stop-at-rungs`` runs Ray's ASHAScheduler instead).

Ray's ASHA decides when a trial reaches a rung: it goes on if it is in the top 1/reduction_factor of the
trials that reached that rung before it, else it stops. So the first trials to reach each rung go on
whatever they are worth, and in a small search (nine grid points, two trials at a time) their
full-length runs are most of what it spends. This is the promotion form of ASHA (Li et al., "A System
for Massively Parallel Hyperparameter Tuning", MLSys 2020): a trial that reaches a rung waits there
(PAUSED; Tune keeps its checkpoint of that evaluation) unless it is already in the top 1/reduction_factor
of the rung, and goes on from its checkpoint once enough trials have reached the rung to put it there.

- Of a rung's n trials, at most floor(n / reduction_factor) go on: the best of those that have not gone
  on yet, as the rung fills. A free slot goes to such a trial first, highest rung first, then to a new
  trial (Tune holds one pending trial at a time for a searcher, so a trial going on holds new ones back;
  random and grid search queue every trial at once, and Tune starts those first: with them every trial
  reaches the first rung before any goes on).
- The searcher learns from a trial as it waits: tune_gpt's Optuna searcher is told its value at the rung
  (`UniqueOptunaSearch.pause_after_this_result`), and a trial that goes on reports into a new Optuna trial
  with the same parameters. Otherwise TPE would see the waiting trials as running, and learn nothing
  until the end.
- The end of a search has too few trials at its top rungs to fill 1/reduction_factor: when nothing runs
  and nothing waits to start, the best trial of a rung goes on if it is waiting there (the highest such
  rung first); when no rung's best is left waiting, the waiting trials stop where they are, and the
  search ends. A trial that this rule would send on as soon as it paused does not pause: with nothing
  else to run (a one-trial search, the last trial of a search) a pause would only cost a restart.
- A resumed search: Tune does not keep a scheduler's state, and restores paused trials as pending, which it
  starts whatever the scheduler says. The rungs are rebuilt from the trials Tune restores (`on_trial_add`,
  from each one's last result): a trial past a rung counts as gone on from it, ranked there by its value at
  the rung, read from its ``result.json`` in storage (where that cannot be read, its last value stands in);
  one whose last result is a rung's is ranked there. Such a trial, started again
  by Tune, is decided at its first result: it goes on if the rung (as far as it is known again) has it in
  its top 1/reduction_factor, else it waits there again, one evaluation later.

It needs trials that report a checkpoint with each evaluation, as tune_gpt's trainable does. Imported only
when a search runs (it imports Ray Tune).
"""

from __future__ import annotations

import json
import math
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from tune_gpt.spaces import asha_rungs


# The flags of a trial's last report when it diverged or ran out of memory (tune_gpt.search._report_failed).
ENDED_BY_ITSELF = ("diverged", "oom")


class PromotingASHA(FIFOScheduler):
    """ASHA that pauses trials at its rungs and promotes the best ones (see the module docstring)."""

    _supports_buffered_results = False  # a pause must come at the rung's result, not a later buffered one
    _chunk = 1 << 20  # bytes of a result.json read at a time (`_values_at_rungs`)

    def __init__(self, *, time_attr: str, metric: str, mode: str, max_t: int, grace_period: int,
                 reduction_factor: float, stop_last_trials: bool = True, rungs: list[int] | None = None) -> None:
        super().__init__()
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be min or max, got {mode!r}")
        self._time_attr, self._metric, self._mode = time_attr, metric, mode
        self._sign = 1.0 if mode == "max" else -1.0
        self._max_t, self._rf, self._stop_last = max_t, float(reduction_factor), stop_last_trials
        # Ray's ASHA rungs for one bracket, unless given (a W&B sweep's brackets)
        self.rungs: list[float] = list(rungs) if rungs is not None else asha_rungs(grace_period, reduction_factor, max_t)
        self._scores: list[dict[str, float]] = [{} for _ in self.rungs]  # rung -> trial id -> score (higher wins)
        self._promoted: list[set[str]] = [set() for _ in self.rungs]  # rung -> the trials that went on from it
        self._waiting: dict[str, int] = {}  # trial id -> the rung it is paused at
        self._restored: dict[str, int] = {}  # trial id -> the rung a resumed search found it at, undecided
        self.num_paused = self.num_promoted = self.num_stopped_waiting = self.num_not_paused = 0

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Ray pickles the scheduler when a search starts and unpickles it for --resume: one pickled by an
        # older tune_gpt lacks what was added since
        self.__dict__.update(state)
        self.__dict__.setdefault("_restored", {})
        self.__dict__.setdefault("num_not_paused", 0)

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return (metric in (None, self._metric)) and (mode in (None, self._mode))

    # ------------------------------------------------------------------ decisions

    def _score(self, result: dict) -> float:
        value = float(result[self._metric]) * self._sign
        return value if not math.isnan(value) else -math.inf  # a diverged trial ranks last

    def _next_up(self, k: int) -> list[str]:
        """The trials of rung `k` that may go on now, best first: the best of those not gone on yet, as many
        as floor(n / reduction_factor) allows after those gone on already (the first of equals first)."""
        scores, gone = self._scores[k], self._promoted[k]
        slots = int(len(scores) / self._rf) - len(gone)
        if slots <= 0:
            return []
        arrival = {t: i for i, t in enumerate(scores)}
        return sorted((t for t in scores if t not in gone), key=lambda t: (-scores[t], arrival[t]))[:slots]

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict) -> str:
        if self._time_attr not in result or self._metric not in result:
            return TrialScheduler.CONTINUE
        t = result[self._time_attr]
        if t >= self._max_t:
            return TrialScheduler.STOP if self._stop_last else TrialScheduler.CONTINUE
        tid = trial.trial_id
        ended = any(result.get(why) for why in ENDED_BY_ITSELF)
        k = self._restored.pop(tid, None)
        if k is not None and tid not in self._next_up(k):
            if ended:  # its first result since the resume is its end: ranked last at the rung, not waiting
                self._scores[k][tid] = self._score(result)
                return TrialScheduler.CONTINUE
            return self._pause(tune_controller, tid, k)  # a resumed search found it waiting: it waits again
        if k is not None:
            self._promoted[k].add(tid)
        for k in reversed(range(len(self.rungs))):
            if t < self.rungs[k]:
                continue
            if tid in self._promoted[k]:
                return TrialScheduler.CONTINUE  # it went on from this rung
            # here for the first time, or again (a retry after a failure): decided with this result
            self._scores[k][tid] = self._score(result)
            if tid in self._next_up(k):
                self._promoted[k].add(tid)
                return TrialScheduler.CONTINUE
            if ended:
                # its last report (it diverged, or ran out of memory): ranked at the rung, and left to end. Paused
                # there, it was promoted at the search's end and started again only to report its end again
                return TrialScheduler.CONTINUE
            return self._pause(tune_controller, tid, k)
        return TrialScheduler.CONTINUE

    def _pause(self, tune_controller: Any, tid: str, k: int) -> str:
        if self._pause_undone_at_once(tune_controller, tid, k):
            self._promoted[k].add(tid)
            self.num_not_paused += 1
            return TrialScheduler.CONTINUE
        self._waiting[tid] = k
        self.num_paused += 1
        searcher = _telling_searcher(tune_controller)
        if searcher is not None:
            searcher.pause_after_this_result(tid)  # Tune hands it this result next
        return TrialScheduler.PAUSE

    def _best(self, k: int) -> str | None:
        """The best trial of rung `k` (the first of equals), whether it went on or not."""
        scores = self._scores[k]
        return max(scores, key=lambda t: scores[t]) if scores else None

    def _waiting_to_go_on(self, paused: set[str], idle: bool) -> str | None:
        """The waiting trial to send on next: one its rung now has room for (highest rung first); else, when
        `idle` (the end of the search: nothing runs or waits to start), the best of the highest rung whose
        best waits there."""
        for k in reversed(range(len(self.rungs))):
            for tid in self._next_up(k):
                if self._waiting.get(tid) == k and tid in paused:
                    return tid
        if idle:
            for k in reversed(range(len(self.rungs))):
                best = self._best(k)
                if best in paused and self._waiting.get(best) == k:
                    return best
        return None

    def _pause_undone_at_once(self, tune_controller: Any, tid: str, k: int) -> bool:
        """Whether `choose_trial_to_run` would send `tid` on from rung `k` as soon as it paused there: the
        search makes no more trials, no other trial runs or waits to start, and the end-of-search rule picks
        it first. The pause would then cost a restart and change nothing (a one-trial search, the last trial
        of any search)."""
        get_trials, search_alg = (getattr(tune_controller, "get_trials", None),
                                  getattr(tune_controller, "search_alg", None))
        if get_trials is None or not getattr(search_alg, "is_finished", lambda: False)():
            return False
        trials = get_trials()
        if any(t.status in (Trial.RUNNING, Trial.PENDING) and t.trial_id != tid for t in trials):
            return False
        paused = {t.trial_id for t in trials if t.status == Trial.PAUSED}
        if any(t not in self._waiting for t in paused):  # paused by something else: choose_trial_to_run starts it
            return False
        self._waiting[tid] = k  # as if it waited there
        try:
            return self._waiting_to_go_on(paused | {tid}, idle=True) == tid
        finally:
            del self._waiting[tid]

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        """A trial a resumed search restored: its place at the rungs. Tune also adds again a trial it retries
        after a failure (this scheduler knows it: what it knows stands), and a new trial has no result yet."""
        last = getattr(trial, "last_result", None) or {}
        t = last.get(self._time_attr)
        tid = trial.trial_id
        if not isinstance(t, (int, float)) or self._metric not in last:
            return
        score = self._score(last)
        passed = [rung for k, rung in enumerate(self.rungs) if t > rung and tid not in self._scores[k]]
        at_rungs = self._values_at_rungs(trial, passed) if passed else {}
        for k, rung in enumerate(self.rungs):
            if t >= rung:
                # what it knows stands (a retry); past the rung, its value there (its last if unreadable)
                self._scores[k].setdefault(tid, at_rungs.get(rung, score) if t > rung else score)
            if t > rung:
                self._promoted[k].add(tid)
            elif t == rung and trial.status not in (Trial.TERMINATED, Trial.ERROR) and tid not in self._promoted[k]:
                # it waited here (or, restored, had just gone on; or failed as it paused): decided at its next
                # result, on its value here
                self._restored[tid] = k

    def _values_at_rungs(self, trial: Trial, rungs: list[float]) -> dict[float, float]:
        """`trial`'s score at each of `rungs`: that of its first result at or past the rung, as
        `on_trial_result` ranked it there, read from the trial's ``result.json`` in storage up to the last of
        them. Rungs it cannot tell (no storage, an unreadable file, a row missing) are left out.

        Where the row at a rung is missing the first later row stands in (Ray's JSON logger copies a
        restarted trial's result.json back from storage, dropping rows not yet uploaded; `KeepTrialResults`
        uploads them first, but a crash in that second can still lose one)."""
        out: dict[float, float] = {}
        try:
            storage = trial.storage
            fs, path = storage.storage_filesystem, f"{storage.trial_fs_path}/result.json"
            with fs.open_input_stream(path) as f:
                rest = b""
                while len(out) < len(rungs):
                    chunk = f.read(self._chunk)
                    lines = (rest + chunk).split(b"\n")
                    rest = lines.pop() if chunk else b""
                    for line in lines:
                        self._read_row(line, rungs, out)
                    if not chunk:
                        break
        except Exception:  # noqa: BLE001 - no storage (a trial made elsewhere) or unreadable: the last value stands in
            pass
        return out

    def _read_row(self, line: bytes, rungs: list[float], out: dict[float, float]) -> None:
        try:
            row = json.loads(line)
            t, value = row[self._time_attr], self._score(row)
        except (ValueError, TypeError, KeyError):
            return  # a cut line, or a row without the metric
        if not isinstance(t, (int, float)) or isinstance(t, bool):
            return
        for rung in rungs:
            if t >= rung and rung not in out:
                out[rung] = value

    def _go_on(self, trial: Trial) -> Trial:
        k = self._waiting.pop(trial.trial_id, None)
        if k is not None:
            self._promoted[k].add(trial.trial_id)
            self.num_promoted += 1
        return trial

    def choose_trial_to_run(self, tune_controller: Any) -> Trial | None:
        trials = tune_controller.get_trials()
        paused = {t.trial_id: t for t in trials if t.status == Trial.PAUSED}
        tid = self._waiting_to_go_on(set(paused), idle=False)  # a trial its rung has room for, before new ones
        if tid is not None:
            return self._go_on(paused[tid])
        for trial in trials:
            if trial.status == Trial.PENDING:
                return trial
        for tid, trial in paused.items():
            if tid not in self._waiting:  # paused by something other than this scheduler: not left stranded
                return trial
        if any(t.status == Trial.RUNNING for t in trials):
            return None  # the rungs may fill yet
        tid = self._waiting_to_go_on(set(paused), idle=True)  # the end of the search: a rung's best, from the top
        if tid is not None:
            return self._go_on(paused[tid])
        controller = getattr(tune_controller, "_tune_controller", tune_controller)  # (Tune hands a wrapper)
        for tid, trial in paused.items():  # nothing left worth training: they end at their rung
            self._waiting.pop(tid, None)
            self.num_stopped_waiting += 1
            tune_controller.stop_trial(trial)
            # Ray 2.60 saves a stopped trial's new state only if it had an actor: a paused one would be
            # written down PAUSED for ever, and the search taken for interrupted
            getattr(controller, "_mark_trial_to_checkpoint", lambda t: None)(trial)
        return None

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict) -> None:
        self._forget(trial)

    def on_trial_remove(self, tune_controller: Any, trial: Trial) -> None:
        self._forget(trial)

    def on_trial_error(self, tune_controller: Any, trial: Trial) -> None:
        self._forget(trial)

    def _forget(self, trial: Trial) -> None:
        self._waiting.pop(trial.trial_id, None)
        self._restored.pop(trial.trial_id, None)

    def debug_string(self) -> str:
        filled = ", ".join(f"{r:g}: {len(s)}" for r, s in zip(self.rungs, self._scores))
        return (f"ASHA with promotions: {self.num_paused} pauses, {self.num_promoted} promoted, "
                f"{self.num_stopped_waiting} ended waiting, {self.num_not_paused} pauses skipped (nothing else to "
                f"run); trials per rung {{{filled}}}")


def _telling_searcher(tune_controller: Any) -> Any:
    """The searcher under Tune's search algorithm that wants to hear of pauses (UniqueOptunaSearch), if any."""
    obj = getattr(tune_controller, "search_alg", None) if tune_controller is not None else None
    for _ in range(4):  # SearchGenerator -> (a limiter ->) the searcher
        if obj is None or hasattr(obj, "pause_after_this_result"):
            return obj
        obj = getattr(obj, "searcher", None)
    return None
