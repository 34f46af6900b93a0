"""Tune callbacks the search installs (imported by `tune_gpt.search` only when a search runs: ray is heavy).

`TrialTensorBoard`: each trial's metrics as TensorBoard scalars (tags as `python -m tune_gpt.train`
writes them, x axis the training step) plus the HParams dashboard's records, in the trial's folder.
It replaces Tune's own TensorBoard logger, whose tensorboardX import loads torch in the driver
(3.5 s of CPU at every start and resume of a search, on a 2-core machine); this one writes the
event protos with the `tensorboard` package alone (0.6 s). When `tensorboard` is not installed
the search runs without it (with a warning), as Tune does without tensorboardX.

`KeepTrialResults`: Tune writes a trial's ``result.json`` / ``progress.csv`` in the driver's
staging folder and uploads that folder to the storage path about once a second. When a trial
fails and is retried (``--max-failures``), Tune first copies the storage copy back over the
staging one. A trial that fails within a second of an evaluation would lose that evaluation's
row (seen with Ray 2.60: a history of ``[15, 20]`` instead of ``[5, 10, 15, 20]``). This callback
uploads the two files the moment a trial fails, before Tune restarts it.

`TrialResultsJson`: Tune's ``result.json`` writer, which copies the file back from storage each time a
trial with a checkpoint starts again. A trial ASHA paused at a rung and sent on within that second (two
trials reaching the rung together) lost its row at the rung, every time, in a two-trial search
(``[20, 30, ...]`` instead of ``[10, 20, 30, ...]``). This one keeps the driver's copy where it has one
(it is the newest: storage only ever gets copies of it) for a trial it has written in this process, and
copies from storage as Tune does at a trial's first start in the process (a resumed search).

`MarkTimeBudgetStops`: when ``--time-budget`` runs out, Tune stops every trial still running
without telling the callbacks, the scheduler or the searcher that it ended (Ray 2.60's
``TuneController._stop_experiment_if_needed``). Such a trial would read as *early-stopped* in the
report (as if ASHA had cut it for trailing), be missing from TensorBoard's HParams tab, and stay
RUNNING in an Optuna study kept with ``--optuna-storage``. This callback writes
``tune_gpt_stopped.json`` into those trials' folders (the report then says *out-of-time*) and ends
their TensorBoard logging and their W&B runs (marked out-of-time); `tune_gpt.search` closes their
Optuna trials after the search. The budget can also run out between two trials (none running, none
marked): the search then writes the same file into the experiment folder, so that ``--resume`` can
say the search ended (Ray saved it finished).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback, CLIReporter
from ray.tune.logger import JsonLoggerCallback, TBXLoggerCallback
from ray.tune.result import AUTO_RESULT_KEYS

from tune_gpt.report import FAILURES_FILE, STOPPED_FILE

RESULT_FILES = ("result.json", "progress.csv", FAILURES_FILE)


def push_trial_results(trial: Any) -> None:
    """Copy the trial's result files from the driver's staging folder to its folder in storage."""
    import pyarrow.fs

    local_dir = getattr(trial, "local_path", None)
    storage = getattr(trial, "storage", None)
    if not local_dir or storage is None:
        return
    fs, remote_dir = storage.storage_filesystem, storage.trial_fs_path
    syncer = getattr(storage, "syncer", None)
    if syncer is not None:
        try:  # an upload in flight may hold an older copy: let it land first, then overwrite it
            syncer.wait()
        except Exception:  # noqa: BLE001 - a failed periodic upload does not stop this one
            pass
    for name in RESULT_FILES:
        local = Path(local_dir, name)
        remote = f"{remote_dir}/{name}"
        if not local.is_file() or Path(remote).resolve() == local.resolve():
            continue
        try:
            fs.create_dir(remote_dir, recursive=True)
            pyarrow.fs.copy_files(str(local), remote, source_filesystem=pyarrow.fs.LocalFileSystem(),
                                  destination_filesystem=fs)
        except Exception:  # noqa: BLE001 - storage unreachable: Tune's own sync still runs
            pass


class KeepTrialResults(Callback):
    """Upload a failed trial's result files before Tune restores them from storage (see module doc), with the
    time of the failure, which the report compares with when the trial's latest attempt began."""

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        record_failure(trial)
        push_trial_results(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        record_failure(trial)
        push_trial_results(trial)


def record_failure(trial: Any) -> None:
    """Add now (Unix time) to the trial's `FAILURES_FILE` in the driver's staging folder (Ray's error.txt has
    the time in the driver's local time, to the second). One that cannot be written is left out: the report
    then falls back to the files' times."""
    local_dir = getattr(trial, "local_path", None)
    if not local_dir:
        return
    path = Path(local_dir, FAILURES_FILE)
    try:
        times = json.loads(path.read_text()) if path.is_file() else []
        times = (times if isinstance(times, list) else []) + [time.time()]
        path.write_text(json.dumps(times))
    except (OSError, ValueError):
        pass


class TrialResultsJson(JsonLoggerCallback):
    """Tune's result.json writer, keeping the driver's copy of a trial that starts again (module doc)."""

    def _restore_from_remote(self, file_name: str, trial: Any) -> None:
        # only a file this writer has written in this process is known to be the newest: a staging folder left
        # by an earlier run in the same Ray session (a --resume on a long-lived cluster) may be older than storage
        opened = self.__dict__.setdefault("_opened", set())  # (not in one pickled before it existed)
        local = Path(trial.local_path, file_name)
        if trial.trial_id in opened and local.is_file() and local.stat().st_size > 0:
            return
        super()._restore_from_remote(file_name, trial)
        opened.add(trial.trial_id)


class MarkTimeBudgetStops(Callback):
    """Mark the trials the search's time budget stopped (see the module doc).

    A trial that started in this run (or, resumed, waits with results from an earlier run), was never
    told complete or errored, and is TERMINATED at the end of one of Tune's steps was stopped by the
    experiment's stopper, that is the time budget: Tune sets TERMINATED after telling the callbacks
    for a trial that ends on its own or by the scheduler, and Ctrl+C stops trials after the last step
    (``--resume`` continues them). `loggers` (TensorBoard, W&B, Tune's result files) are told that those
    trials ended.
    """

    def __init__(self, time_budget_s: float, loggers: list | None = None) -> None:
        self._budget = float(time_budget_s)
        self._loggers = list(loggers or [])
        self._live: set[str] = set()
        self._started: float | None = None
        self._last_step_at: float | None = None
        self._planned: int | None = None
        self._marked = 0

    def setup(self, stop: Any = None, num_samples: int | None = None, total_num_samples: int | None = None,
              **info: Any) -> None:
        """Tune's start of a run (a resumed search's too; Ray restarts the budget's clock with it)."""
        self._started, self._last_step_at, self._planned, self._marked = time.time(), None, total_num_samples, 0
        if isinstance(info.get("time_budget_s"), (int, float)):
            self._budget = float(info["time_budget_s"])  # the budget Ray applies: a restored search's own

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        # The budget is checked in Tune's steps: the last step's time says whether it ran out (the end
        # comes seconds later, after the trials' actors stop, also after a Ctrl+C, which --resume continues).
        if self._started is None or self._last_step_at is None or not trials:
            return
        if self._last_step_at - self._started < self._budget:
            return  # ended before its budget: done, or interrupted
        never_ran = any(t.status == "TERMINATED" and not _reported(t) for t in trials)  # random/grid make all first
        if self._marked or never_ran or (self._planned is not None and len(trials) < self._planned):
            storage = trials[0].storage
            self._write(storage.storage_filesystem, storage.experiment_fs_path, "the search",
                        ": --resume cannot tell it ended")

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._live.add(trial.trial_id)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._live.discard(trial.trial_id)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._live.discard(trial.trial_id)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self._last_step_at = time.time()
        for trial in trials:
            if trial.status in ("PENDING", "PAUSED") and _reported(trial):
                self._live.add(trial.trial_id)  # resumed: trained before, waits to go on
            elif trial.status == "TERMINATED" and trial.trial_id in self._live:
                self._live.discard(trial.trial_id)
                self._mark(trial)

    def _mark(self, trial: Any) -> None:
        self._marked += 1
        storage = getattr(trial, "storage", None)
        self._write(getattr(storage, "storage_filesystem", None), getattr(storage, "trial_fs_path", None),
                    f"trial {trial.trial_id}", ": the report will call it early-stopped")
        for logger in self._loggers:
            try:
                if hasattr(logger, "end_trial"):  # TrialStatusWandb: the W&B run says so
                    logger.end_trial(trial, "out-of-time")
                else:
                    logger.log_trial_end(trial, failed=False)
            except Exception:  # noqa: BLE001 - a logger that cannot close does not stop the search
                pass

    def _write(self, fs: Any, folder: str | None, what: str, consequence: str) -> None:
        import json

        from tune_gpt.search import write_storage_file

        text = json.dumps({"stopped_by": "time budget", "time_budget_s": self._budget,
                           "at": time.strftime("%Y-%m-%dT%H:%M:%S")})
        try:
            write_storage_file(fs, folder, STOPPED_FILE, text)
        except Exception as exc:  # noqa: BLE001 - storage unreachable: said, and the search goes on
            import warnings

            warnings.warn(f"{what} was stopped by --time-budget, but {STOPPED_FILE} could not be written to its "
                          f"folder ({exc}){consequence}")


# Bookkeeping keys Tune or the trial adds to every result: not worth a chart.
NOT_CHARTED = set(AUTO_RESULT_KEYS) | {"done", "step", "total_steps", "trial_id", "experiment_tag", "should_checkpoint"}


class TrialTensorBoard(TBXLoggerCallback):
    """Per-trial TensorBoard events written on the driver (see the module doc).

    A TBXLoggerCallback by type only, so that Tune does not add its own; every method is replaced.
    """

    def __init__(self) -> None:  # noqa: D107 - TBXLoggerCallback.__init__ would import tensorboardX
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._writer_cls = EventFileWriter
        self._writers: dict[Any, Any] = {}
        self._last: dict[Any, dict[str, float]] = {}

    def log_trial_start(self, trial: Any) -> None:
        if trial in self._writers:
            self._writers.pop(trial).close()
        trial.init_local_path()
        self._writers[trial] = self._writer_cls(str(trial.local_path), flush_secs=30)
        self._last.setdefault(trial, {})

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        if trial not in self._writers:
            self.log_trial_start(trial)
        step = int(result.get("step") or result.get("training_iteration") or 0)
        values = []
        for key, value in result.items():
            if key in NOT_CHARTED or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            value = float(value)
            if value != value:  # NaN: nothing to draw
                continue
            values.append(Summary.Value(tag=key, simple_value=value))
            self._last[trial][key] = value
        if values:
            self._write(trial, Summary(value=values), step)
            self._writers[trial].flush()

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        writer = self._writers.pop(trial, None)
        if writer is None:
            return
        last = self._last.pop(trial, {})
        params = {k: v for k, v in (trial.evaluated_params or {}).items() if isinstance(v, (bool, int, float, str))}
        if params and last:
            for summary in _hparams_summaries(params, last, failed):
                self._write(trial, summary, 0, writer)
        writer.close()

    def _write(self, trial: Any, summary: Any, step: int, writer: Any = None) -> None:
        from tensorboard.compat.proto.event_pb2 import Event

        (writer or self._writers[trial]).add_event(Event(wall_time=time.time(), step=step, summary=summary))


def _hparams_summaries(params: dict[str, Any], metrics: dict[str, float], failed: bool) -> list[Any]:
    """The three records TensorBoard's HParams dashboard reads (experiment, session start and end)."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams.api_pb2 import DataType, Experiment, HParamInfo, MetricInfo, MetricName, Status
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData, SessionEndInfo, SessionStartInfo

    def record(tag: str, **content: Any) -> Any:
        data = HParamsPluginData(version=0, **content).SerializeToString()
        meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="hparams", content=data))
        return Summary(value=[Summary.Value(tag=tag, metadata=meta)])

    start, infos = SessionStartInfo(), []
    for name, value in params.items():
        if isinstance(value, bool):
            start.hparams[name].bool_value, kind = value, "DATA_TYPE_BOOL"
        elif isinstance(value, str):
            start.hparams[name].string_value, kind = value, "DATA_TYPE_STRING"
        else:
            start.hparams[name].number_value, kind = float(value), "DATA_TYPE_FLOAT64"
        infos.append(HParamInfo(name=name, type=DataType.Value(kind)))
    experiment = Experiment(hparam_infos=infos, metric_infos=[MetricInfo(name=MetricName(tag=k)) for k in metrics])
    end = SessionEndInfo(status=Status.Value("STATUS_FAILURE" if failed else "STATUS_SUCCESS"))
    return [record("_hparams_/experiment", experiment=experiment),
            record("_hparams_/session_start_info", session_start_info=start),
            record("_hparams_/session_end_info", session_end_info=end)]


def _reported(trial: Any) -> bool:
    """The trial reported at least once (Ray 2.60's ``last_result`` is never empty: it holds at least the
    trial id, or the actor's auto-filled fields)."""
    return "training_iteration" in (trial.last_result or {})


class TrialTable(CLIReporter):
    """Ray's CLIReporter, its finished trials listed best first, those without a value last.

    Ray's own sorting (``sort_by_metric=True``) compares the trials' last values, and a trial that
    ended without one (the time budget stopped it before it started) made it raise a TypeError at the
    search's end ("'<' not supported between instances of 'NoneType' and 'float'"): every
    ``--time-budget`` search that left a trial unstarted exited 1 with a traceback. Pickled with the
    search's RunConfig: keep this class where it is.
    """

    def __init__(self, *args: Any, metric: str, mode: str, **kwargs: Any) -> None:
        super().__init__(*args, sort_by_metric=False, **kwargs)
        self._sort_key = (metric, -1.0 if mode == "max" else 1.0)

    def _progress_str(self, trials: list, done: bool, *sys_info: str, **kwargs: Any) -> str:
        metric, sign = self._sort_key

        def key(trial: Any) -> tuple[bool, float]:
            value = (trial.last_result or {}).get(metric)
            ok = isinstance(value, (int, float)) and value == value  # NaN and None go last
            return (not ok, sign * float(value) if ok else 0.0)

        return super()._progress_str(sorted(trials, key=key), done, *sys_info, **kwargs)
