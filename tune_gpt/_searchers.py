"""OptunaSearch that never trains the same configuration twice.

Every trial of a search trains with the same seed (``--trial-seed``), so a configuration
trained again gives the same losses again (exactly on a CPU): a repeat is compute spent for
nothing. TPE repeats itself readily where the space is discrete (a W&B sweep's ``values``,
batch sizes, quantized ranges): in a 3 x 3 space it proposed one point three times in twelve
trials. Here a repeated proposal is not run; the study is told what it already knows and asked
again:

- a repeat of a finished or stopped trial is told that trial's last reported value (what
  OptunaSearch itself tells the study when a trial ends), or a failure if it errored;
- a repeat of a trial still running is told a failure, so that TPE weighs the point only once
  (its sampler's constant liar already treats the running trial as a poor one).

Each repeat is a trial of the Optuna study (Optuna cannot be asked without one), marked with the
user attribute ``repeat_of`` (the Tune trial it repeats) for ``--optuna-storage`` dashboards. A trial
that runs carries ``tune_trial_id`` and, given `experiment`, ``tune_experiment`` (which search made it:
one ``--optuna-storage`` study can serve searches with the same name in different storage paths).
When every proposal in a row of `max_redraws` is a repeat, the search is over: it waits while any
trial is still running (its result may steer TPE elsewhere), then ends (``Searcher.FINISHED``,
before ``num_samples`` trials; `exhausted` is then True).

A trial the scheduler stopped (ASHA, the median rule) ends COMPLETE at its last value, as OptunaSearch
tells it (TPE then ranks it by that value; PRUNED would put a diverged trial, COMPLETE at an infinite
loss, among TPE's best while few trials have run to their end). For dashboards it carries the user
attribute ``stopped_at_step`` (the step of its last report) when its last result's ``step`` is below
its ``total_steps``.

The study's storage is pickled with the searcher (Ray's ``tuner.pkl`` and ``searcher-state-*.pkl`` in the
experiment folder), and Optuna's RDB storage pickles its URL: a password in ``--optuna-storage``
(``postgresql://user:PASSWORD@db/optuna``) landed in those files. `storage_password_kept_out` pickles it
redacted while a search runs, and puts it back from the URL given again when ``--resume`` unpickles it.

`RoundedIntUniform` and `RoundedIntLogUniform` are the Ray samplers of a W&B sweep's quantized integer ranges
(they round as W&B does).

Imported only when a search runs (it imports Ray Tune and Optuna).
"""

from __future__ import annotations

import contextlib
import copyreg
import json
import math
import sys
import threading
import warnings
from typing import Any, Iterator

import numpy as np
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, Searcher
from ray.tune.search.optuna import OptunaSearch
from ray.tune.search.sample import LogUniform, Uniform, _BackwardsCompatibleNumpyRng


_STORAGE_URLS: dict[str, str] = {}  # redacted URL -> the URL given (this process's searches only)
_KEPT_OUT = threading.Lock()
_kept_out_users = [0, None]  # searches inside storage_password_kept_out; the reducer registered before them


@contextlib.contextmanager
def storage_password_kept_out(url: str) -> Iterator[None]:
    """While the block runs, an Optuna RDB storage pickles its URL redacted, and one unpickled here whose
    URL is `url` redacted gets `url` back. Nothing for a URL without a secret (its pickles stay Optuna's
    own). Not for Ray Client: Tune unpickles the searcher on the cluster, where the URL is not known."""
    from optuna.storages import RDBStorage

    from tune_gpt._redact import redact

    if redact(url) == url:
        yield
        return
    with _KEPT_OUT:
        _STORAGE_URLS[redact(url)] = url
        if _kept_out_users[0] == 0:
            _kept_out_users[1] = copyreg.dispatch_table.get(RDBStorage)
            copyreg.pickle(RDBStorage, _reduce_rdb_storage)
        _kept_out_users[0] += 1
    try:
        yield
    finally:
        with _KEPT_OUT:
            _kept_out_users[0] -= 1
            if _kept_out_users[0] == 0:
                _STORAGE_URLS.clear()
                if _kept_out_users[1] is None:
                    copyreg.dispatch_table.pop(RDBStorage, None)
                else:
                    copyreg.dispatch_table[RDBStorage] = _kept_out_users[1]


def _reduce_rdb_storage(storage: Any) -> tuple:
    from tune_gpt._redact import redact

    state = storage.__getstate__()
    return _rdb_storage, ({**state, "url": redact(state["url"])},)


def _rdb_storage(state: dict[str, Any]) -> Any:
    """An RDB storage unpickled: its URL as given to this search where the pickle holds it redacted."""
    from optuna.storages import RDBStorage

    from tune_gpt._redact import is_redacted, redact
    from tune_gpt.errors import ConfigError

    url = _STORAGE_URLS.get(state["url"], state["url"])
    if is_redacted(url):
        raise ConfigError(f"--optuna-storage {redact(url)}: the search's study is in this database, whose password "
                          "the experiment does not keep: give --optuna-storage with the full URL")
    storage = RDBStorage.__new__(RDBStorage)
    storage.__setstate__({**state, "url": url})
    return storage


def _canonical(value: Any) -> Any:
    """Numbers as 12 significant digits: Optuna's stepped values carry float noise (low + k * step gives
    0.30000000000000004 where the enqueued baseline says 0.3), and an int enqueued for a float range is 0 not 0.0."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(f"{value:.12g}")
    return value


def config_key(params: dict[str, Any]) -> str:
    """The identity of a configuration: its searched values, in a canonical order."""
    return json.dumps({k: _canonical(v) for k, v in params.items()}, sort_keys=True, default=repr)


class UniqueOptunaSearch(OptunaSearch):
    """`OptunaSearch` that answers repeated proposals from what is known (see the module docstring).

    Its state (which configurations ran, and how they ended) is pickled with OptunaSearch's own
    by `save`, so a resumed search keeps not repeating itself.
    """

    def __init__(self, *args: Any, max_redraws: int = 30, experiment: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._max_redraws = max_redraws
        self._experiment = experiment  # recorded on each Optuna trial it creates (a study can hold several searches)
        self._trial_of: dict[str, str] = {}  # configuration key -> the trial that trains it
        self._ended: dict[str, tuple[dict | None, bool]] = {}  # trial id -> ({metric: last value} or None, errored)
        self._last: dict[str, Any] = {}  # trial id -> its last reported value of the metric, while it runs
        self._stopped_at: dict[str, int] = {}  # trial id -> the step the scheduler stopped it at
        self._waiting = False  # only repeats were proposed while trials run: ask again once one ends
        self.repeats_skipped = 0
        self.exhausted = False

    def suggest(self, trial_id: str) -> dict | str | None:
        if self._waiting or self.exhausted:
            return Searcher.FINISHED if self.exhausted else None
        for attempt in range(self._max_redraws + 1):
            ask_id = f"{trial_id}~ask{attempt}"  # a repeat is told under its own id, never the trial's
            config = super().suggest(ask_id)
            key = config_key(self._ot_trials[ask_id].params)
            first = self._trial_of.get(key)
            if first is None:
                ot_trial = self._ot_trials[trial_id] = self._ot_trials.pop(ask_id)  # Ray reports under its trial id
                self._trial_of[key] = trial_id
                ot_trial.set_user_attr("tune_trial_id", trial_id)
                if self._experiment:
                    ot_trial.set_user_attr("tune_experiment", self._experiment)
                return config
            self.repeats_skipped += 1
            self._ot_trials[ask_id].set_user_attr("repeat_of", first)
            result, errored = self._ended.get(first, (None, True))  # a running trial's repeat: a failure
            if first in self._stopped_at:  # told the stopped trial's short-run value: labelled as it is
                self._ot_trials[ask_id].set_user_attr("stopped_at_step", self._stopped_at[first])
            # OptunaSearch tells COMPLETE whenever the metric is in `result`, whatever `error` says
            super().on_trial_complete(ask_id, result=None if errored else result, error=errored or not result)
        if any(t not in self._ended for t in self._trial_of.values()):  # trials still running: wait for one to end
            self._waiting = True
            return None
        self.exhausted = True
        print(f"tune_gpt.search: the searcher proposed only configurations already trained "
              f"({len(self._trial_of)} distinct ones) {self._max_redraws + 1} times in a row: the search ends here",
              file=sys.stderr)
        return Searcher.FINISHED

    def _reopen_if_retried(self, trial_id: str) -> None:
        """``--retry-errored`` runs an errored trial again under its Tune id, but its Optuna trial was told
        FAIL, and OptunaSearch drops what a finished trial reports (with a warning per result). Optuna
        cannot reopen a finished trial: the retry gets a new one with the same parameters (``retry_of``).
        So does a trial that waited at a rung (told its value there) and goes on (``resumed_from``)."""
        paused = self._paused_trials()
        if trial_id not in self._completed_trials or not (trial_id in paused
                                                           or self._ended.get(trial_id, (None, False))[1]):
            return
        from optuna.trial import Trial, TrialState, create_trial

        old, study = self._ot_trials[trial_id], self._ot_study
        attrs = {k: v for k, v in old.user_attrs.items() if k in ("tune_trial_id", "tune_experiment")}
        attrs["resumed_from" if trial_id in paused else "retry_of"] = old.number
        paused.discard(trial_id)
        # made RUNNING directly: enqueue_trial + ask would take the study's oldest WAITING trial, which in a
        # study shared by several searches may be another search's
        template = create_trial(state=TrialState.RUNNING, params=old.params, distributions=old.distributions,
                                user_attrs=attrs)
        self._ot_trials[trial_id] = Trial(study, study._storage.create_new_trial(study._study_id, template_trial=template))
        self._completed_trials.discard(trial_id)
        self._ended.pop(trial_id, None)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._reopen_if_retried(trial_id)
        if isinstance(self.metric, str) and self.metric in result:
            self._last[trial_id] = result[self.metric]
        with warnings.catch_warnings():
            # A resumed trial reports again the evaluations after the saved state's, which Optuna may have
            # recorded already (a shared study, or a driver stopped between the two saves): the first stands.
            warnings.filterwarnings("ignore", message="The reported value is ignored because this")
            super().on_trial_result(trial_id, result)
        if trial_id in self._pausing_trials():
            self._pausing_trials().discard(trial_id)
            self._close_while_waiting(trial_id, result)

    # Pauses (PromotingASHA, ``pause: true``). The sets are made on first use: a searcher pickled by an
    # older tune_gpt (a resumed search) has no such attributes.
    def _pausing_trials(self) -> set[str]:
        return self.__dict__.setdefault("_pausing", set())

    def _paused_trials(self) -> set[str]:
        return self.__dict__.setdefault("_paused", set())

    def pause_after_this_result(self, trial_id: str) -> None:
        """The scheduler pauses the trial at the result Tune hands this searcher next (Tune asks the scheduler
        first). The study is then told that value (COMPLETE, ``paused_at_step``), so that TPE learns from a
        trial while it waits rather than counting it as running; if it goes on, it reports into a new Optuna
        trial with the same parameters (``resumed_from``); if it ends there, nothing more is told."""
        self._pausing_trials().add(trial_id)

    def _close_while_waiting(self, trial_id: str, result: dict) -> None:
        if trial_id not in self._ot_trials or trial_id in self._completed_trials:
            return
        value = result.get(self.metric) if isinstance(self.metric, str) else None
        try:
            self._ot_trials[trial_id].set_user_attr("paused_at_step", result.get("step"))
        except Exception:  # noqa: BLE001 - a label for dashboards; the value is told below either way
            pass
        told = {self.metric: value} if value is not None else None
        super().on_trial_complete(trial_id, result=told)
        self._paused_trials().add(trial_id)
        self._ended[trial_id] = (told, False)  # what repeats of it are told
        self._last.pop(trial_id, None)
        self._waiting = False  # it is not running: a proposal that repeats it is answered, not waited for

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._paused_trials() and not error and not result:
            # stopped where it waited (Tune tells no result): the study has its value at the rung. A trial
            # that went on and reached max_t at its next result (Tune's STOP skips on_trial_result) comes
            # with that result, and is reopened below to be told it.
            self._paused_trials().discard(trial_id)
            self._waiting = False
            return
        self._reopen_if_retried(trial_id)  # (a retry that fails again before its first report)
        value = result.get(self.metric) if result and isinstance(self.metric, str) else None
        value = self._last.get(trial_id) if value is None else value
        self._ended[trial_id] = ({self.metric: value} if value is not None else None, error)
        self._last.pop(trial_id, None)
        self._waiting = False
        step, total = (result or {}).get("step"), (result or {}).get("total_steps")
        if (not error and isinstance(step, int) and isinstance(total, int) and step < total
                and isinstance(value, (int, float)) and math.isfinite(value)  # (not a diverged or OOM trial)
                and trial_id in self._ot_trials and trial_id not in self._completed_trials):
            self._stopped_at[trial_id] = step
            try:
                self._ot_trials[trial_id].set_user_attr("stopped_at_step", step)
            except Exception:  # noqa: BLE001 - a label for dashboards; the trial's end is told below either way
                pass
        super().on_trial_complete(trial_id, result=result, error=error)


class TellingLimiter(ConcurrencyLimiter):
    """Tune's `ConcurrencyLimiter` (``--max-concurrent``), but the searcher hears of every trial's end.

    The limiter passes on the end of the trials it handed out this session only: it keeps that set
    (``live_trials``) in memory, not in the searcher's saved state, so after ``--resume`` the trials
    the interrupted search had running, and every trial ``--retry-errored`` runs again, ended without
    the searcher being told. Optuna then kept them RUNNING (PRUNED in ``--optuna-storage`` at the end,
    though they finished), TPE counted them as running for ever, and `UniqueOptunaSearch`, which waits
    for running trials before it calls a space exhausted, could wait with nothing running: the search
    hung. Such a trial's end now reaches the searcher; it is not counted against the limit (Tune's
    resources still bound what runs at once).
    """

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if self._limit_concurrency and trial_id not in self.live_trials:
            self.searcher.on_trial_complete(trial_id, result=result, error=error)
            return
        super().on_trial_complete(trial_id, result=result, error=error)


class CappedVariantGenerator(BasicVariantGenerator):
    """Tune's generator for random and grid search, ending after `cap` trials (None: no cap).

    A W&B grid sweep's ``run_cap`` (or ``--num-samples``) below the grid's size: W&B stops the sweep after
    that many runs; Tune's own generator would run every grid point (its ``num_samples`` repeats the whole
    grid). The count is part of the generator's state, so a resumed search stops at the same total.
    """

    def __init__(self, *args: Any, cap: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._cap = cap
        self._made = 0

    @property
    def total_samples(self) -> int:
        total = super().total_samples
        return total if self._cap is None else min(total, self._cap)

    def next_trial(self):
        if self._cap is not None and self._made >= self._cap:
            self.set_finished()
            return None
        trial = super().next_trial()
        if trial is not None:
            self._made += 1
        return trial


class _RoundedInt:
    """W&B's integer draw: round(x), x uniform (log-uniform) on the domain's range, where Ray's integer samplers
    floor x or give each integer the same share (sweeps' params.py rounds: round(U(min, max) / q) * q, and
    round(exp(U(log min, log max)) / q) * q). Flooring gave a log range's low end 1.7 times W&B's share (batch
    size 16 of 16..256 step 16: 25 % of the trials against 15 %); on a uniform range rounding gives the two end
    values half the others' share (n_layer 2..8 step 2: 1/6, 1/3, 1/3, 1/6), Ray a quarter each. Under Ray's
    `Quantized` (q > 1) it draws the index of a multiple of q on [min / q, max / q]: round(x / q), as W&B does.
    A subclass of Ray's sampler, so that OptunaSearch converts the domain as it would Ray's own."""

    log = False

    def sample(self, domain: Any, config: Any = None, size: int = 1, random_state: Any = None) -> Any:
        """Ray's sampler interface: drawn from `random_state`, the search's seeded generator."""
        if not isinstance(random_state, _BackwardsCompatibleNumpyRng):
            random_state = _BackwardsCompatibleNumpyRng(random_state)
        lo, hi = domain.lower, domain.upper - 1  # Ray's integer samplers exclude the upper bound
        if self.log:
            x = np.exp(random_state.uniform(np.log(lo), np.log(hi), size=size))
        else:
            x = random_state.uniform(lo, hi, size=size)
        items = np.clip(np.round(x), lo, hi).astype(int)  # (exp(log(hi)) may come out a hair above hi)
        return items if len(items) > 1 else domain.cast(items[0])


class RoundedIntUniform(_RoundedInt, Uniform):
    """round(U(min, max)) on an integer domain (OptunaSearch: an IntDistribution)."""


class RoundedIntLogUniform(_RoundedInt, LogUniform):
    """round(exp(U(log min, log max))) on an integer domain (OptunaSearch: an IntDistribution with log=True)."""

    log = True
