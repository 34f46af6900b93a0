"""The search's W&B callback: Ray's `WandbLoggerCallback`, plus how each trial ended, and no run left open.

Ray 2.60's callback ends a trial's W&B run when Tune tells it the trial completed or errored, and
finishes every run the same way, so W&B cannot tell a trial ASHA cut from one that ran to its end. It
also never hears of the trials Tune stops without telling the callbacks (the time budget, Ctrl+C): at
the experiment's end it waits ``upload_timeout`` seconds for their runs, which never end, then kills
their logging actors before ``wandb.finish()``.

`TrialStatusWandb` puts the trial's end into its run's summary as ``trial_status`` (the report's
words: finished, early-stopped, diverged, oom, errored, out-of-time; ``interrupted`` for a trial a
Ctrl+C stopped, which ``--resume`` continues), so W&B's runs table can filter and colour by it, and
ends every run it started: `MarkTimeBudgetStops` ends those the budget stopped as out-of-time, and
the experiment's end the rest.

It also keeps the driver from waiting on W&B. Ray's callback sends each result through a
`ray.util.queue.Queue`, an actor of its own whose every ``put`` waits for an answer, so a trial's first
result waited for that actor's worker process to start: 1.7-3.7 s a trial on 2 cores, the driver
blocked (Ray's "callbacks.on_trial_result operation took 3.2 s" warnings) and the trial with it, in
`tune.report`. Here the driver sends items straight to the logging actor without waiting (`_Inbox`),
and the actor puts them back in order (`_OrderedInbox`): one actor a trial instead of two. And a
trial's run resumes its W&B run (``resume="allow"``) where Ray's would start it over: a retried trial, or
one a ``--resume``d search continues, keeps the history it had logged (W&B drops the steps it has).

The API key (or W&B's identity token file) reaches a logging actor as an argument, and only for an online run. Ray's callback hands it
over in the actor's ``runtime_env`` env vars, which Ray's runtime-env agent writes into its log
(``runtime_env_agent.log`` in the Ray session's logs, "Creating runtime env: {...}") and its actor table
shows on a shared cluster.

Imported only when a search logs to W&B (``ray.air.integrations.wandb`` imports wandb).
"""

from __future__ import annotations

import os
import threading
from typing import Any

import ray
from ray.air.integrations.wandb import WANDB_ENV_VAR, WandbLoggerCallback, _QueueItem, _WandbLoggingActor
from ray.air.util.node import _force_on_current_node

IDENTITY_TOKEN_ENV_VAR = "WANDB_IDENTITY_TOKEN_FILE"
STATUS_KEY = "_tune_gpt_trial_status"  # the queue item that carries a trial's end (never logged)
SUMMARY_KEY = "trial_status"


def ended_status(result: dict[str, Any] | None, failed: bool, error_text: str = "") -> str:
    """How a trial Tune says completed (or errored: `failed`, with Ray's `error_text`) ended, from its
    last result; in the report's words (`tune_gpt.report`)."""
    if failed:
        from tune_gpt.report import _looks_oom

        return "oom" if _looks_oom(error_text) else "errored"
    result = result or {}
    for why in ("diverged", "oom"):  # the worst-value report of tune_gpt.search._report_failed
        if result.get(why):
            return why
    step, total = result.get("step"), result.get("total_steps")
    if isinstance(step, (int, float)) and isinstance(total, (int, float)) and step < total:
        return "early-stopped"
    return "finished"


class _OrderedInbox:
    """The logging actor's end of a trial's queue: items numbered by the driver, handed to `get` in
    that order. The actor is threaded (its `run` holds one thread, `put` calls come in on another), and
    Ray does not keep the order of calls to a threaded actor."""

    def __init__(self) -> None:
        self._items: dict[int, Any] = {}
        self._next = 0
        self._ready = threading.Condition()

    def put(self, seq: int, item: Any) -> None:
        with self._ready:
            self._items[seq] = item
            self._ready.notify_all()

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        with self._ready:
            if not self._ready.wait_for(lambda: self._next in self._items, timeout if block else 0):
                raise TimeoutError(f"no queue item {self._next} within {timeout} s")
            self._next += 1
            return self._items.pop(self._next - 1)


class _Inbox:
    """The driver's end: `put` numbers an item and sends it to the logging actor without waiting."""

    def __init__(self, actor: Any) -> None:
        self._actor = actor
        self._seq = 0

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        self._actor.put.remote(self._seq, item)
        self._seq += 1


class _StatusLoggingActor(_WandbLoggingActor):
    """Ray's logging actor, fed through its own `put` (`_OrderedInbox`); a status item goes into the
    run's summary, and the run is on disk (or uploaded) before the actor says it is done.

    The item travels as a checkpoint item, the one kind Ray's loop hands over without logging
    anything after it (a result would add a history row, or a warning for a step W&B is past).

    ``wandb.finish()`` returns before W&B's service process (wandb-core, a child of the actor) has
    written the run out. Ray kills an actor and its children as soon as its loop returns at the
    experiment's end, so a run could be lost whole: seen once in a full test suite, a run with a
    7-byte run file. `run` therefore also waits for the service to finish (``wandb.teardown()``).
    """

    def __init__(self, logdir: str, queue: Any, *args: Any, credentials: dict[str, str] | None = None,
                 **kwargs: Any) -> None:
        os.environ.update(credentials or {})  # as an argument, not a runtime_env: Ray's agent logs those (module doc)
        super().__init__(logdir, _OrderedInbox() if queue is None else queue, *args, **kwargs)

    def put(self, seq: int, item: Any) -> None:
        self.queue.put(seq, item)

    def run(self) -> None:
        try:
            super().run()
        finally:
            teardown = getattr(self._wandb, "teardown", None)
            if teardown is not None:
                try:
                    teardown()
                except Exception:  # noqa: BLE001 - the run was finished; only the wait failed
                    pass

    def _handle_result(self, result: dict) -> tuple[dict, dict]:
        if not getattr(self, "_axis_defined", False) and self._wandb.run is not None:
            from tune_gpt.tracking import define_step_axis

            define_step_axis(self._wandb.run)  # Ray logs at W&B step = evaluation count; plot against "step"
            self._axis_defined = True
        log, config_update = super()._handle_result(result)
        # Ray updates the run's config with the result's "config" whole: the keys the callback excludes
        # (how a trial runs: tensorboard, progress, wandb.enabled...) came back with every result
        return log, {k: v for k, v in config_update.items()
                     if not any(k == e or k.startswith(e + "/") for e in self._exclude)}

    def _handle_checkpoint(self, checkpoint_path: Any) -> None:
        if not (isinstance(checkpoint_path, dict) and STATUS_KEY in checkpoint_path):
            return super()._handle_checkpoint(checkpoint_path)
        run = self._wandb.run
        if run is not None:
            run.summary[SUMMARY_KEY] = checkpoint_path[STATUS_KEY]


class TrialStatusWandb(WandbLoggerCallback):
    """A `WandbLoggerCallback` that records how each trial ended and closes every run (module doc)."""

    _logger_actor_cls = _StatusLoggingActor

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ended: set[Any] = set()

    def setup(self, *args: Any, **kwargs: Any) -> None:
        """Ray's, except where W&B's credential is an identity token file (``WANDB_IDENTITY_TOKEN_FILE``,
        which tune_gpt counts as a credential): Ray's setup insists on an API key and raised, ending the
        search with a traceback. W&B reads the token file itself."""
        import ray.air.integrations.wandb as ray_wandb

        if os.environ.get(WANDB_ENV_VAR) or not os.environ.get(IDENTITY_TOKEN_ENV_VAR):
            return super().setup(*args, **kwargs)
        insist = ray_wandb._set_api_key
        ray_wandb._set_api_key = lambda *a, **kw: None
        try:
            super().setup(*args, **kwargs)
        finally:
            ray_wandb._set_api_key = insist

    def log_trial_start(self, trial: Any) -> None:
        self._ended.discard(trial)  # a trial restarted after an error, or by a resumed search
        super().log_trial_start(trial)

    def _start_logging_actor(self, trial: Any, exclude_results: list[str], **wandb_init_kwargs: Any) -> None:
        """Ray's, with the driver's items sent straight to the logging actor (`_Inbox`; module doc)."""
        if trial in self._trial_logging_futures:  # a restarted trial keeps its actor
            return
        if wandb_init_kwargs.get("config"):
            wandb_init_kwargs["config"] = _whole_config(wandb_init_kwargs["config"], self.excludes)
        if wandb_init_kwargs.get("resume") is False:  # Ray's: a new run under the same id, over the old
            wandb_init_kwargs["resume"] = "allow"
        # runs in the trial's folder (the actor starts there) even where WANDB_DIR is set: the search
        # uploads <trial>/wandb to remote storage (`_upload_runs`) and prints where the runs are
        wandb_init_kwargs.setdefault("dir", trial.local_path)
        if not self._remote_logger_class:
            # No restarts: a restarted actor would wait for the items its predecessor took. (Ray's
            # restarts also print a core_worker error line per actor: Ray issue 53727.)
            self._remote_logger_class = ray.remote(
                num_cpus=0, max_concurrency=2, **_force_on_current_node(),
            )(self._logger_actor_cls)
        online = wandb_init_kwargs.get("mode") not in ("offline", "disabled")
        credentials = {k: os.environ[k] for k in (WANDB_ENV_VAR, IDENTITY_TOKEN_ENV_VAR) if online and os.environ.get(k)}
        if IDENTITY_TOKEN_ENV_VAR in credentials:  # a path: the actor works in the trial's folder
            credentials[IDENTITY_TOKEN_ENV_VAR] = os.path.abspath(credentials[IDENTITY_TOKEN_ENV_VAR])
        actor = self._remote_logger_class.remote(
            logdir=trial.local_path, queue=None, exclude=exclude_results, to_config=self.AUTO_CONFIG_KEYS,
            credentials=credentials, **wandb_init_kwargs,
        )
        self._trial_queues[trial] = _Inbox(actor)
        self._trial_logging_actors[trial] = actor
        future = actor.run.remote()
        self._trial_logging_futures[trial] = future
        self._logging_future_to_trial[future] = trial

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        self.end_trial(trial, ended_status(trial.last_result, failed, _error_text(trial) if failed else ""))

    def end_trial(self, trial: Any, status: str) -> None:
        """Write `status` into the trial's run and finish the run (nothing if it has none open)."""
        if trial in self._ended or trial not in self._trial_queues:
            return
        self._ended.add(trial)
        self._trial_queues[trial].put((_QueueItem.CHECKPOINT, {STATUS_KEY: status}))
        super().log_trial_end(trial, failed=status in ("errored", "oom"))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        for trial in list(self._trial_queues):  # never told it ended: Ctrl+C stopped it (--resume goes on)
            self.end_trial(trial, "interrupted")
        super().on_experiment_end(trials, **info)
        self._upload_runs(trials)

    def _upload_runs(self, trials: list) -> None:
        """With the results in remote storage (s3://, gs://), each trial's runs are written in the driver's
        staging folder, which Tune uploads for the last time before its callbacks' end: a run still
        open then (one closed just above) would reach the bucket cut short, or not at all. Each trial's
        ``wandb/`` goes up again now, whole. (Local storage: written in the results already.) The s3
        test's short search did not lose a run without this; it is there for the runs that end last."""
        if "dir" in self.kwargs:
            return
        import warnings

        import pyarrow.fs as pafs

        for trial in trials:
            storage, where = getattr(trial, "storage", None), getattr(trial, "local_path", None)
            fs = getattr(storage, "storage_filesystem", None)
            if fs is None or where is None or isinstance(fs, pafs.LocalFileSystem):
                continue
            local = os.path.join(str(where), "wandb")
            if not os.path.isdir(local):
                continue
            try:
                pafs.copy_files(local, f"{storage.trial_fs_path}/wandb", destination_filesystem=fs)
            except Exception as exc:  # noqa: BLE001 - the runs are still in the staging folder
                warnings.warn(f"W&B runs of trial {trial.trial_id} not uploaded to the results ({exc}); "
                              f"they are in {local}")

    def __del__(self) -> None:
        # Ray's __del__ asks ray.is_initialized(). A resumed search's callback (unpickled by
        # Tuner.restore) outlives the search: a frame of the restore stays referenced. So it can run at
        # interpreter exit, when the ray module's globals are gone: "Exception ignored ... AttributeError".
        # By then on_experiment_end has ended every run.
        try:
            super().__del__()
        except Exception:  # noqa: BLE001 - nothing left to close
            pass


def _error_text(trial: Any) -> str:
    """Ray's error.txt of a failed trial ('' when there is none to read)."""
    try:
        with open(trial.error_file, encoding="utf-8", errors="replace") as f:
            return f.read()
    except (OSError, TypeError):
        return ""


def _whole_config(config: dict[str, Any], excludes: list[str]) -> dict[str, Any]:
    """The trial's whole training config, as a single run's W&B config has it: Tune's holds only the searched
    and fixed values, so weight_decay, the betas, warmup, dropout, the seed... were missing. Defaults
    resolved as the trial resolves them (`search.trainable` builds its config with TrainConfig.from_flat);
    secrets left out (`to_record`); the trial's own values win."""
    from tune_gpt.config import TrainConfig

    try:
        whole = TrainConfig.from_flat({k: v for k, v in config.items() if not k.startswith("_")}).to_record()
    except Exception:  # noqa: BLE001 - a key TrainConfig does not know: the trial's config as Tune has it
        return config
    left_out = {"output_dir", "device", *excludes}  # where a trial runs, set per trial; and the callback's excludes
    return {**{k: v for k, v in whole.items() if not k.startswith("wandb.") and k not in left_out}, **config}
