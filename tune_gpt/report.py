"""Search results -> one DataFrame row per trial, comparison tables, plots, report files.

Reads the experiment folder Ray Tune wrote (``<storage>/<name>/``): one
sub-folder per trial with ``params.json`` (the config), ``result.json`` (one
JSON object per evaluation), Ray's ``error.txt`` for a trial that raised, and
our ``tune_gpt_status.json`` for a trial that ended on its own. The folder can
be read while the search runs, and after it was copied or moved: trial folders
are found by listing, never through the absolute paths inside Ray's state.

How a trial's ``status`` is decided (first rule that applies):

- ``diverged`` / ``oom``: the status file says so (or error.txt holds a CUDA
  out-of-memory error; or the last loss reported is NaN/inf);
- ``errored``: Ray wrote error.txt (unless a later status file says the trial
  finished after a retry), or the status file says errored;
- ``out-of-time``: what would read *early-stopped* below, for a trial whose folder holds
  ``tune_gpt_stopped.json``: it was still training when the search's ``--time-budget`` ran out;
- ``finished`` / ``early-stopped``: the status file says so (a status file saying
  ``running`` is what a trial stopped by the scheduler can leave: it is ignored;
  ``early-stopped`` while Ray's state says RUNNING/PENDING/PAUSED is a trial an
  interrupted search stopped: ``running``, as ``--resume`` continues it);
- ``running``: Ray's saved state says RUNNING/PENDING/PAUSED, or there is no
  saved state yet;
- otherwise the trial was ended by Ray (TERMINATED): ``early-stopped`` when its
  last ``step`` is below the ``total_steps`` it planned, else ``finished``.

Trials that errored, diverged or ran out of memory get no ``rank``: the best
trial is the one to replay, and replaying those would fail again.

``python -m tune_gpt.report EXPERIMENT [--out DIR]`` writes ``trials.csv``,
``report.md``, a self-contained ``report.html`` and the plots.

pandas, matplotlib and optuna are imported inside the functions that use them.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import numbers
import re
import shlex
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Sequence

from tune_gpt._redact import REDACTED, is_redacted, refuse_credentials
from tune_gpt.config import RUNTIME_KEYS
from tune_gpt.errors import ConfigError, DataError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from matplotlib.figure import Figure

__all__ = [
    "load_results", "load_curves", "find_experiment", "experiment_info", "lr_batch_pivot",
    "lr_bin_label", "best_lr_per_batch", "curve_metric", "importance", "warnings_for", "heatmap_figure",
    "lr_scatter_figure", "curves_figure", "figure_png", "markdown_table", "write_report",
    "replay_command", "no_replay_reason", "skip_reason", "error_line", "lr_is_continuous", "main", "STATUSES",
    "FAILED", "batch_column",
]

STATUS_FILE = "tune_gpt_status.json"  # written by search.py's trainable in each trial folder
EXPERIMENT_FILE = "tune_gpt_experiment.json"  # written by search.py in the experiment folder
STOPPED_FILE = "tune_gpt_stopped.json"  # written by the search in a trial folder when --time-budget stopped it
FAILURES_FILE = "tune_gpt_failures.json"  # the search's driver: the Unix time of each failure of a trial (Ray's)
# searched, but no knob to turn further: a best trial at the largest seed asks for no larger seeds
NOT_TUNED = frozenset({"seed"})
STATUSES = ("finished", "early-stopped", "out-of-time", "running", "diverged", "oom", "errored")
FAILED = ("errored", "diverged", "oom")
COMPLETED = ("finished", "early-stopped", "out-of-time")
LR, BATCH = "learning_rate", "batch_size"
ACCUM, EFFECTIVE = "gradient_accumulation_steps", "effective_batch"  # effective_batch = batch_size x ACCUM
PLOTS = ("heatmap", "lr_scatter", "curves")
CONTINUOUS_TYPES = ("uniform", "loguniform", "quniform", "qloguniform", "normal", "qnormal",
                    "lognormal", "randn", "qrandn")
RANGE_TYPES = ("uniform", "loguniform", "quniform", "qloguniform", "randint", "lograndint",
               "qrandint", "qlograndint")
DISCRETE_LIMIT = 6  # more distinct learning rates than this: treat them as continuous
REMOTE_REPORTS = "tune_reports"  # where write_report puts the report of an experiment read from a URI
# The files of an experiment that the report reads; a URI's checkpoints and W&B runs are not downloaded.
_REPORT_FILES = ("params.json", "result.json", "error.txt", STATUS_FILE, EXPERIMENT_FILE, STOPPED_FILE, FAILURES_FILE)

# Ray's bookkeeping in result.json: not metrics.
_RAY_FIELDS = {
    "timestamp", "time_this_iter_s", "pid", "time_since_restore", "iterations_since_restore", "done",
    "should_checkpoint", "config", "hostname", "node_ip", "date", "checkpoint_dir_name", "trial_id",
    "experiment_tag", "experiment_id", "episodes_total", "timesteps_total", "timesteps_since_restore",
}
_METRIC_COLUMNS = ["final_val_loss", "best_val_loss", "final_val_bpc", "best_val_bpc", "steps",
                   "total_steps", "tokens", "wall_s", "tokens_per_s"]
_LOSS_LIKE = re.compile(r"(loss|bpc)$")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:\([\w.]+\))?): ?(.*)$")
_EXC_NAME = re.compile(r"(Error|Exception|Exit|Interrupt|Failure|Warning|\))$")
_TRIAL_ID = re.compile(r"(?:^|_)([0-9a-f]{5,}_\d{5})(?:_|$)")


# ----------------------------------------------------------------- reading


@dataclass
class _Trial:
    dir: Path
    params: dict[str, Any]
    records: list[dict[str, Any]]
    status_file: dict[str, Any] | None
    error_text: str | None
    ray_status: str | None
    budget_stopped: bool = False  # the search's time budget stopped it (STOPPED_FILE)
    trial_id: str = ""
    status: str = ""
    error: str = ""


@dataclass
class _Experiment:
    dir: Path
    info: dict[str, Any]
    trials: list[_Trial]
    pending: int = 0
    notes: list[str] = field(default_factory=list)
    uri: str | None = None  # set when read from storage such as s3://: `dir` was a temporary copy
    query: str = ""  # the URI's query (?endpoint_override=…&scheme=http): how to reach the storage again

    @property
    def location(self) -> str:
        """Where the experiment is, as a command is given it again: its folder, or its URI with the query."""
        if not self.uri:
            return str(self.dir)
        return self.uri + (f"?{self.query}" if self.query else "")


def find_experiment(path: str | Path) -> Path:
    """The experiment folder for `path`: itself, or the one experiment inside a storage folder."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{path}: no such experiment folder (pass <storage>/<experiment>, e.g. tune_results/default)")
    if not p.is_dir():
        raise DataError(f"{path}: not a folder (pass the experiment folder <storage>/<experiment>)")
    if _trial_dirs(p):
        return p
    inside = sorted(d for d in _subdirs(p) if _trial_dirs(d))
    if len(inside) == 1:
        return inside[0]
    if inside:
        names = ", ".join(d.name for d in inside[:8]) + (" ..." if len(inside) > 8 else "")
        raise DataError(f"{path} holds {len(inside)} experiments ({names}); pass one of them")
    if (p / "params.json").is_file():
        raise DataError(f"{path} is one trial's folder; pass the experiment folder above it ({p.parent})")
    raise DataError(f"{path}: no trials found (no sub-folder with params.json or result.json)")


def _subdirs(p: Path) -> list[Path]:
    try:
        return [d for d in p.iterdir() if d.is_dir() and not d.name.startswith(".")]
    except OSError:
        return []


def _trial_dirs(p: Path) -> list[Path]:
    return sorted(d for d in _subdirs(p) if (d / "params.json").is_file() or (d / "result.json").is_file())


def experiment_info(path: str | Path) -> dict[str, Any]:
    """The search's own description (tune_gpt_experiment.json) with defaults when it is missing.

    Keys: ``name``, ``metric`` (default ``val/loss``), ``mode`` (default ``min``), ``space``
    (flat key -> ``{"type", "low", "high" | "values"}``; ``{}`` when unknown), ``found``.
    """
    exp = Path(path)
    info: dict[str, Any] = {}
    f = exp / EXPERIMENT_FILE
    if f.is_file():
        try:
            loaded = json.loads(f.read_text(encoding="utf-8"))
            if isinstance(loaded, dict):
                info = loaded
        except (OSError, ValueError):
            info = {}
    mode = str(info.get("mode") or "min").lower()
    return {
        **info,
        "name": str(info.get("name") or exp.expanduser().resolve().name),  # "." is a folder with a name
        "metric": str(info.get("metric") or "val/loss"),
        "mode": mode if mode in ("min", "max") else "min",
        "space": _normalise_space(info.get("space")),
        "found": bool(info),
    }


def _normalise_space(raw: Any) -> dict[str, dict[str, Any]]:
    """Accept ``{"type": t, ...}`` entries and the native ``{loguniform: [lo, hi]}`` shorthand."""
    out: dict[str, dict[str, Any]] = {}
    if not isinstance(raw, Mapping):
        return out
    for key, spec in raw.items():
        if not isinstance(spec, Mapping):
            continue
        spec = dict(spec)
        if "type" not in spec:
            kinds = [k for k in spec if k not in ("probabilities",)]
            if len(kinds) != 1:
                continue
            kind, args = kinds[0], spec[kinds[0]]
            spec = {"type": kind}
            if kind in ("choice", "grid"):
                spec["values"] = list(args) if isinstance(args, (list, tuple)) else [args]
            elif isinstance(args, (list, tuple)) and len(args) >= 2:
                spec["low"], spec["high"] = args[0], args[1]
        spec["type"] = str(spec["type"]).lower().replace("_", "")
        if spec["type"] == "choice" or spec["type"] == "grid":
            spec["values"] = list(spec.get("values") or [])
        out[str(key)] = spec
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_records(path: Path) -> list[dict[str, Any]]:
    """result.json: one object per line; a half-written last line (running trial) is skipped."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def saved_trial_states(exp: Path | str) -> dict[str, dict[str, Any]]:
    """Ray's last saved trial states, keyed by relative trial folder and by trial id. `exp` is a folder or
    an experiment in storage (s3://…; an unreadable one has none)."""
    for data in _experiment_states(exp):
        if not isinstance(data, dict) or not isinstance(data.get("trial_data"), list):
            continue
        out: dict[str, dict[str, Any]] = {}
        for entry in data["trial_data"]:
            meta = entry[0] if isinstance(entry, (list, tuple)) and entry else entry
            if isinstance(meta, str):
                try:
                    meta = json.loads(meta)
                except ValueError:
                    continue
            if not isinstance(meta, dict):
                continue
            info = {"status": _unquote(meta.get("status")), "trial_id": _unquote(meta.get("trial_id")),
                    "logdir": _unquote(meta.get("relative_logdir"))}
            if info["logdir"]:
                out["dir:" + Path(str(info["logdir"])).name] = info
            if info["trial_id"]:
                out["id:" + str(info["trial_id"])] = info
        return out
    return {}


def _experiment_states(exp: Path | str) -> Iterator[Any]:
    """The experiment_state-*.json files' contents, newest name first (None for one that does not parse)."""
    if not _is_uri(exp):
        for f in sorted(Path(exp).glob("experiment_state-*.json"), reverse=True):
            yield _read_json(f)
        return
    import pyarrow.fs as pafs

    try:
        fs, root = pafs.FileSystem.from_uri(str(exp))
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except (OSError, ValueError):
        return
    for info in sorted((i for i in infos if re.fullmatch(r"experiment_state-.*\.json", i.base_name)),
                       key=lambda i: i.base_name, reverse=True):
        try:
            with fs.open_input_stream(info.path) as f:
                yield json.loads(f.read().decode("utf-8"))
        except (OSError, ValueError):
            yield None


def _unquote(v: Any) -> Any:
    if isinstance(v, str) and len(v) >= 2 and v[0] == v[-1] == '"':
        try:
            return json.loads(v)
        except ValueError:
            return v[1:-1]
    return v


def _is_uri(path: str | Path) -> bool:
    return isinstance(path, str) and "://" in path


def _read_remote_experiment(uri: str) -> _Experiment:
    """Read an experiment in storage (s3://, gs://, …) through a temporary copy of the files the
    report needs (never the checkpoints). Credentials and endpoint come from the environment,
    as for the search (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, …)."""
    import os
    import tempfile

    import pyarrow.fs as pafs

    # the URI is written into the report (the replay command) and a replay's summary
    refuse_credentials(uri, None, "the report and the replays made from it")
    try:
        fs, root = pafs.FileSystem.from_uri(uri)
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except (OSError, ValueError) as exc:
        raise DataError(f"{uri}: cannot list the experiment: {_one_line(exc)}") from None
    base, _, query = uri.partition("?")
    base = base.rstrip("/")
    root = root.rstrip("/")
    with tempfile.TemporaryDirectory(prefix="tune_gpt_report_") as tmp:
        for info in infos:
            rel = info.path[len(root):].lstrip("/")
            parts = rel.split("/")
            wanted = parts[-1] in _REPORT_FILES or re.fullmatch(r"experiment_state-.*\.json", parts[-1])
            if info.type != pafs.FileType.File or len(parts) > 3 or not wanted:
                continue
            dest = Path(tmp, *parts)
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                with fs.open_input_stream(info.path) as src:
                    dest.write_bytes(src.read())
            except OSError as exc:
                raise DataError(f"{base}/{rel}: cannot read: {_one_line(exc)}") from None
            if info.mtime is not None:  # _status compares error.txt's and the status file's times
                os.utime(dest, (info.mtime.timestamp(), info.mtime.timestamp()))
        try:
            exp = _read_experiment(tmp)
        except DataError as exc:
            raise DataError(str(exc).replace(tmp, base)) from None
        rel_exp = exp.dir.relative_to(tmp).as_posix()
    exp.uri = base if rel_exp == "." else f"{base}/{rel_exp}"
    exp.query = query
    if not exp.info.get("found"):  # no experiment file: named as its folder in storage, not the temporary copy
        exp.info["name"] = exp.uri.rstrip("/").rsplit("/", 1)[-1]
    return exp


def _read_experiment(path: str | Path) -> _Experiment:
    if _is_uri(path):
        return _read_remote_experiment(str(path))
    exp = find_experiment(path)
    info = experiment_info(exp)
    state = saved_trial_states(exp)
    trials = []
    seen_ids = set()
    for d in _trial_dirs(exp):
        params = _read_json(d / "params.json")
        records = _read_records(d / "result.json")
        if not isinstance(params, dict):
            params = next((r["config"] for r in records if isinstance(r.get("config"), dict)), {})
        err_file = d / "error.txt"
        error_text = None
        if err_file.is_file():
            try:
                error_text = err_file.read_text(encoding="utf-8", errors="replace")
            except OSError:
                error_text = ""
        sf = _read_json(d / STATUS_FILE)
        t = _Trial(dir=d, params=_flatten(params), records=records,
                   status_file=sf if isinstance(sf, dict) else None, error_text=error_text, ray_status=None,
                   budget_stopped=(d / STOPPED_FILE).is_file())
        rid = next((str(r["trial_id"]) for r in reversed(records) if r.get("trial_id")), None)
        st = state.get("dir:" + d.name) or (state.get("id:" + rid) if rid else None)
        m = _TRIAL_ID.search(d.name)
        t.trial_id = rid or (st or {}).get("trial_id") or (m.group(1) if m else d.name)
        t.ray_status = str((st or {}).get("status") or "").upper() or None
        t.status, t.error = _status(t)
        seen_ids.add(t.trial_id)
        trials.append(t)
    pending = sum(1 for k, v in state.items() if k.startswith("id:") and v["trial_id"] not in seen_ids
                  and str(v.get("status")).upper() in ("PENDING", "PAUSED"))
    return _Experiment(dir=exp, info=info, trials=trials, pending=pending)


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):  # numpy's scalars too (a frame's int64 cells)
        return None
    return float(x)


def _finite(x: Any) -> bool:
    v = _num(x)
    return v is not None and math.isfinite(v)


def _one_line(text: Any, limit: int = 300) -> str:
    s = " ".join(str(text or "").split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def error_line(text: str) -> str:
    """The exception line of a Ray error.txt ("RuntimeError: ..."), ANSI colours removed."""
    lines = [_ANSI.sub("", ln).rstrip() for ln in str(text).splitlines()]
    lines = [ln for ln in lines if ln.strip()]
    for ln in reversed(lines):
        m = _EXC_LINE.match(ln)
        if m and _EXC_NAME.search(m.group(1)):
            return _one_line(ln)
    body = [ln for ln in lines if not ln.startswith("Failure #")]
    return _one_line(body[-1] if body else (lines[-1] if lines else "error (empty error.txt)"))


def _looks_oom(text: str) -> bool:
    t = text.lower()
    return "outofmemoryerror" in t or "out of memory" in t


def _status(t: _Trial) -> tuple[str, str]:
    sf = t.status_file or {}
    said = str(sf.get("status") or "").lower().replace("_", "-")
    message = _one_line(sf.get("message") or "")
    err = error_line(t.error_text) if t.error_text is not None else ""
    if said in ("diverged", "oom"):
        return said, message or err or said
    if t.error_text is not None:
        # Ray retried the trial after the error (or --retry-errored re-ran it): its last attempt finished,
        # was stopped by the scheduler, or was ended before it could write more than "running" (written
        # first by every attempt).
        ended_well = ("finished", "early-stopped", "stopped", "terminated")
        retried_ok = (said in ended_well or (said == "running" and t.ray_status != "ERROR")) and (
            t.ray_status == "TERMINATED" or _attempt_after_failure(t))
        if not retried_ok:
            if _looks_oom(t.error_text):
                return "oom", err
            return "errored", (message if said == "errored" and message else err)
    if said == "errored":
        return "errored", message or "errored (no message)"
    if said == "finished":
        if t.budget_stopped and _short_of_plan(t):
            # it trained to its end, but the time budget ended the search before Tune recorded its last
            # evaluation: its results (and everything ranked on them) stop short, as an out-of-time trial's do
            return "out-of-time", ""
        return "finished", ""
    if said in ("early-stopped", "stopped", "terminated"):
        if t.ray_status in ("RUNNING", "PENDING", "PAUSED") and not t.budget_stopped:
            return "running", ""  # stopped by an interrupted search, not by the scheduler: --resume continues it
        return ("out-of-time" if t.budget_stopped else "early-stopped"), ""
    withloss = [r for r in t.records if "val/loss" in r or "train/loss" in r]
    if withloss:
        last = withloss[-1]
        bad = [k for k in ("val/loss", "train/loss") if k in last and _num(last[k]) is not None and not _finite(last[k])]
        if bad or last.get("diverged"):
            return "diverged", f"{bad[0] if bad else 'loss'} became {last.get(bad[0]) if bad else 'non-finite'} at step {last.get('step', '?')}"
    if t.ray_status == "ERROR":
        return "errored", "Ray marked the trial ERROR (no error.txt)"
    if t.ray_status in ("RUNNING", "PENDING", "PAUSED"):
        # (a trial paused at a rung when the time budget ended the search: Ray saves it PAUSED)
        return ("out-of-time", "") if t.budget_stopped else ("running", "")
    last = t.records[-1] if t.records else {}
    if t.ray_status == "TERMINATED" or last.get("done") is True:
        if not t.records or _short_of_plan(t):
            return ("out-of-time" if t.budget_stopped else "early-stopped"), ""
        return "finished", ""
    # Ray has not saved its state yet (or never will, for this trial): it is still going.
    return "running", ""


def _short_of_plan(t: _Trial) -> bool:
    """Whether the trial's recorded results stop before its planned last step."""
    step = max((_num(r.get("step")) or 0 for r in t.records), default=None)
    total = _planned_steps(t)
    return step is not None and total is not None and step < total


def _attempt_after_failure(t: _Trial) -> bool:
    """Whether the attempt that wrote the trial's status file began after the trial's last failure: a retry.
    Both are Unix times: the attempt's start (``attempt_started_s``, the trial's) and the failure's, which the
    search's driver writes into the trial's `FAILURES_FILE` as Ray records it. A retry starts after the
    failure (a new attempt), the attempt that failed before it. Without either (tune_gpt before it kept
    them) the files' times decide, which hold only where error.txt was not copied again since: Ray copies it
    to storage at every sync."""
    started = _num((t.status_file or {}).get("attempt_started_s"))
    failures = _read_json(t.dir / FAILURES_FILE)
    last = _num(failures[-1]) if isinstance(failures, list) and failures else None
    if started is not None and last is not None:
        return started > last
    return _newer(t.dir / STATUS_FILE, t.dir / "error.txt")


def _newer(a: Path, b: Path) -> bool:
    try:
        return a.stat().st_mtime > b.stat().st_mtime
    except OSError:
        return False


def _planned_steps(t: _Trial) -> float | None:
    for r in reversed(t.records):
        if _finite(r.get("total_steps")):
            return float(r["total_steps"])
    if t.status_file and _finite(t.status_file.get("total_steps")):
        return float(t.status_file["total_steps"])
    if _finite(t.params.get("max_steps")):
        return float(t.params["max_steps"])
    return None


# ----------------------------------------------------------------- DataFrames


def _metric_column(metric: str, mode: str) -> str:
    """The DataFrame column that ranks trials for the search's objective."""
    if mode == "min" and metric in ("val/loss", "val/bpc"):
        return "best_" + metric.replace("/", "_")
    return "best_" + re.sub(r"\W+", "_", metric).strip("_")


def _trial_metrics(t: _Trial, objective: str, rank_col: str, mode: str) -> dict[str, Any]:
    recs = t.records

    def last(key: str) -> Any:
        for r in reversed(recs):
            if key in r and _num(r[key]) is not None:
                return _num(r[key])
        return None

    def best(keys: Sequence[str], want: str = "min") -> float | None:
        vals = [float(r[k]) for r in recs for k in keys if _finite(r.get(k))]
        if not vals:
            return None
        return min(vals) if want == "min" else max(vals)

    wall = last("time_total_s")
    tokens = last("tokens")
    speeds = sorted(float(r["tokens_per_s"]) for r in recs if _finite(r.get("tokens_per_s")))
    if speeds:
        tps = speeds[len(speeds) // 2] if len(speeds) % 2 else (speeds[len(speeds) // 2 - 1] + speeds[len(speeds) // 2]) / 2
    else:
        tps = tokens / wall if tokens and wall else None
    out = {
        "final_val_loss": last("val/loss"),
        "best_val_loss": best(["val/loss", "best/val_loss"]),
        "final_val_bpc": last("val/bpc"),
        "best_val_bpc": best(["val/bpc"]),
        "steps": last("step"),
        "total_steps": _planned_steps(t),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tps,
    }
    if rank_col not in out:
        out[rank_col] = best([objective], mode)
    return out


def _rename_map(keys: Iterable[str]) -> dict[str, str]:
    """``model.n_layer`` -> ``n_layer`` unless the short name is taken."""
    keys = list(dict.fromkeys(keys))
    shorts: dict[str, list[str]] = {}
    for k in keys:
        shorts.setdefault(k.rsplit(".", 1)[-1], []).append(k)
    out = {}
    for k in keys:
        short = k.rsplit(".", 1)[-1]
        out[k] = short if "." in k and len(shorts[short]) == 1 and short not in keys else k
    return out


def _keep_key(k: str) -> bool:
    return not (k.startswith("wandb.") or k.startswith("_") or k in RUNTIME_KEYS or k.startswith("__"))


def load_results(path: str | Path) -> "pd.DataFrame":
    """One row per trial: id, status, rank, config (readable names), losses, budget, error.

    `path` is the experiment folder (or a storage folder holding exactly one). Rows are
    sorted by rank (best first; unranked trials last). ``df.attrs`` carries
    ``experiment``, ``name``, ``metric``, ``mode``, ``rank_by``, ``space`` (keys renamed like
    the columns), ``searched`` (the config columns that vary), and ``pending`` (trials Ray
    has not started).
    """
    return _results_frame(_read_experiment(path))


def _results_frame(exp: _Experiment) -> "pd.DataFrame":
    import pandas as pd

    info = exp.info
    mode, metric = info["mode"], info["metric"]
    rank_col = _metric_column(metric, mode)
    all_keys = [k for t in exp.trials for k in t.params if _keep_key(k)]
    rename = _rename_map(all_keys + [k for k in info["space"] if _keep_key(k)])
    config_cols = list(dict.fromkeys(rename[k] for k in all_keys))
    rows = []
    for t in exp.trials:
        row: dict[str, Any] = {"trial_id": t.trial_id, "status": t.status}
        row.update({rename[k]: v for k, v in t.params.items() if _keep_key(k)})
        row.update(_trial_metrics(t, metric, rank_col, mode))
        row["error"] = t.error
        row["trial_dir"] = f"{exp.uri}/{t.dir.name}" if exp.uri else str(t.dir.resolve())
        rows.append(row)
    metric_cols = _METRIC_COLUMNS + ([rank_col] if rank_col not in _METRIC_COLUMNS else [])
    columns = ["trial_id", "rank", "status", *config_cols, *metric_cols, "error", "trial_dir"]
    df = pd.DataFrame(rows, columns=[c for c in columns if c != "rank"])
    for c in metric_cols:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    df = df.sort_values("trial_id", kind="stable").reset_index(drop=True)
    if BATCH in df.columns and ACCUM in df.columns and df[ACCUM].dropna().nunique() > 1:
        # the batch a step trains on (an OOM retry keeps it), where the same batch_size meant different ones
        n = pd.to_numeric(df[BATCH], errors="coerce") * pd.to_numeric(df[ACCUM], errors="coerce")
        df.insert(df.columns.get_loc(ACCUM) + 1, EFFECTIVE, n.astype("Int64") if n.notna().all() else n)
    rankable = df["status"].isin(COMPLETED + ("running",)) & df[rank_col].map(_finite)
    df.insert(1, "rank", pd.array([pd.NA] * len(df), dtype="Int64"))
    if rankable.any():
        ranks = df.loc[rankable, rank_col].rank(method="first", ascending=(mode == "min"))  # ties: first trial
        df.loc[rankable, "rank"] = ranks.astype("int64")
    df = df.sort_values(["rank", "trial_id"], na_position="last", kind="stable").reset_index(drop=True)
    space = {rename.get(k, k): v for k, v in info["space"].items() if _keep_key(k)}
    searched = [c for c in space if c in df.columns]
    if not searched:
        searched = [c for c in config_cols if df[c].map(_hashable).nunique(dropna=True) > 1]
    df.attrs.update({
        "experiment": exp.location, "name": info["name"], "metric": metric, "mode": mode,
        "rank_by": rank_col, "space": space, "space_known": bool(space), "searched": searched,
        "pending": exp.pending, "command": info.get("command"),
    })
    return df


def _hashable(v: Any) -> Any:
    return json.dumps(v, sort_keys=True, default=str) if isinstance(v, (list, dict)) else v


def load_curves(path: str | Path) -> "pd.DataFrame":
    """Every evaluation of every trial, long format: trial_id, training_iteration, step, metrics."""
    return _curves_frame(_read_experiment(path))


def _curves_frame(exp: _Experiment) -> "pd.DataFrame":
    import pandas as pd

    rows = []
    for t in exp.trials:
        for r in t.records:
            row = {"trial_id": t.trial_id}
            for k, v in r.items():
                if k not in _RAY_FIELDS and _num(v) is not None:
                    row[k] = float(v) if isinstance(v, float) else v
            rows.append(row)
    first = ["trial_id", "training_iteration", "step", "val/loss", "train/loss", "val/bpc", "lr", "tokens",
             "epoch", "time_total_s"]
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=first)
    cols = [c for c in first if c in df.columns] + sorted(c for c in df.columns if c not in first)
    df = df[cols]
    key = "step" if "step" in df.columns else ("training_iteration" if "training_iteration" in df.columns else None)
    if key is not None:  # a restored trial re-reports evaluations: keep the latest of each
        df = df.drop_duplicates(["trial_id", key], keep="last")
    return df.reset_index(drop=True)


# ----------------------------------------------------------------- comparisons


def _objective(df: "pd.DataFrame", metric: str | None) -> tuple[str, str]:
    col = metric or df.attrs.get("rank_by") or "best_val_loss"
    mode = df.attrs.get("mode", "min") if col == df.attrs.get("rank_by", "best_val_loss") else "min"
    return col, mode


def _ranked(df: "pd.DataFrame", col: str) -> "pd.DataFrame":
    """Trials that count in comparisons: not failed, with a finite value of `col`."""
    if col not in df.columns:
        return df.iloc[0:0]
    ok = ~df["status"].isin(FAILED) & df[col].map(_finite)
    return df[ok]


def _space_type(df: "pd.DataFrame", key: str, space: Mapping | None = None) -> str | None:
    space = df.attrs.get("space", {}) if space is None else space
    spec = space.get(key) if isinstance(space, Mapping) else None
    return str(spec.get("type")) if isinstance(spec, Mapping) and spec.get("type") else None


def lr_is_continuous(df: "pd.DataFrame", lr: str = LR) -> bool:
    """Bin learning rates when the space sampled them from a range or there are many distinct ones."""
    kind = _space_type(df, lr)
    if kind is not None and kind not in ("choice", "grid"):
        return True
    if kind in ("choice", "grid"):
        return False
    return lr in df.columns and df[lr].dropna().nunique() > DISCRETE_LIMIT


def _half_decade(x: float) -> int:
    """2d for [1e<d>, 3e<d>), 2d+1 for [3e<d>, 1e<d+1>): the edges the labels name (at 10**0.5 = 3.16, a
    3.05e-4 sat in the column labelled 1e-4..3e-4)."""
    d = math.floor(math.log10(x) + 1e-9)
    return 2 * d + (1 if x / 10.0**d >= 3 * (1 - 1e-9) else 0)


def _decade_text(k: int) -> str:
    """10**(k/2) as people write it: 1e-3 for k=-6, 3e-3 for k=-5."""
    return f"1e{k // 2}" if k % 2 == 0 else f"3e{k // 2}"


def lr_bin_label(x: float) -> str:
    """The half-decade bin of a learning rate, e.g. 2e-3 -> ``1e-3..3e-3`` (its lower edge in, its upper out)."""
    k = _half_decade(float(x))
    return f"{_decade_text(k)}..{_decade_text(k + 1)}"


def _lr_bin_labels(lo: float, hi: float) -> list[str]:
    return [f"{_decade_text(k)}..{_decade_text(k + 1)}" for k in range(_half_decade(lo), _half_decade(hi) + 1)]


def batch_column(df: "pd.DataFrame") -> str:
    """The batch size to compare learning rates across: ``batch_size``, or ``effective_batch``
    (batch_size x gradient_accumulation_steps) when the trials accumulated gradients over different
    numbers of steps: the same batch_size then trained on different batches (16 x 4 is a batch of 64)."""
    return EFFECTIVE if EFFECTIVE in df.columns else BATCH


def lr_batch_pivot(df: "pd.DataFrame", metric: str | None = None, *, lr: str = LR,
                   batch: str | None = None, binned: bool | None = None) -> "pd.DataFrame":
    """Best `metric` (default: the ranking one) by batch size (rows) x learning rate (columns).

    Columns are a MultiIndex ``(stat, learning rate)`` with stat in ``best``, ``mean``, ``std``,
    ``count`` and ``full`` (several trials can share a cell): ``pivot["best"]`` is the table to read.
    ``best`` and ``count`` take every trial of the cell, early-stopped ones too; ``mean`` and ``std``
    only the ``full`` ones, the trials that ran their whole budget (a loss after 10 steps and one after
    300 differ by their lengths, not by noise).
    Learning rates are binned by half-decade (``1e-3..3e-3``) when they were sampled from a
    range or there are more than six distinct ones. Failed trials are left out. Empty when
    the learning rate or the batch size is not a column. `batch` defaults to `batch_column`.
    """
    import pandas as pd

    col, mode = _objective(df, metric)
    batch = batch or batch_column(df)
    d = _ranked(df, col)
    if lr not in df.columns or batch not in df.columns:
        return pd.DataFrame()
    d = d[d[lr].map(_finite) & d[batch].notna()]
    if d.empty:
        return pd.DataFrame()
    binned = lr_is_continuous(df, lr) if binned is None else binned
    d = d[[batch, lr, col, "status"]].copy()
    if binned and (d[lr] > 0).all():
        labels = _lr_bin_labels(float(d[lr].min()), float(d[lr].max()))
        d[lr] = pd.Categorical([lr_bin_label(x) for x in d[lr]], categories=labels, ordered=True)
        columns = labels
    else:
        columns = sorted(d[lr].unique())
    g = d.groupby([batch, lr], observed=True)[col]
    full = d[d["status"] == "finished"].groupby([batch, lr], observed=True)[col]
    stats = {
        "best": g.min() if mode == "min" else g.max(),
        "mean": full.mean(),
        "std": full.std(),
        "count": g.size(),
        "full": full.size(),
    }
    rows = sorted(d[batch].unique())
    parts = {}
    for name, s in stats.items():
        t = s.unstack(lr) if len(s) else pd.DataFrame(index=pd.Index([], name=batch))
        t = t.reindex(index=rows, columns=pd.Index(columns, name=lr))
        if name in ("count", "full"):
            t = t.fillna(0).astype(int)
        parts[name] = t
    out = pd.concat(parts, axis=1, names=["stat"])
    out.index.name = batch
    out.attrs.update({"metric": col, "mode": mode, "binned": bool(binned)})
    return out.sort_index()


def best_lr_per_batch(df: "pd.DataFrame", metric: str | None = None, *, lr: str = LR,
                      batch: str | None = None) -> "pd.DataFrame":
    """For each batch size: the learning rate of its best trial, that trial's value, steps, status and id,
    trials run (the steps and status tell an early-stopped best, whose value is from a shorter run).
    `batch` defaults to `batch_column` (with the micro-batch and accumulation of each best trial shown)."""
    import pandas as pd

    col, mode = _objective(df, metric)
    batch = batch or batch_column(df)
    if lr not in df.columns or batch not in df.columns:
        return pd.DataFrame(columns=[lr, col, "trial_id", "trials"])
    d = _ranked(df, col)
    d = d[d[batch].notna()]
    if d.empty:
        return pd.DataFrame(columns=[lr, col, "trial_id", "trials"])
    idx = d.groupby(batch)[col].idxmin() if mode == "min" else d.groupby(batch)[col].idxmax()
    parts = [BATCH, ACCUM] if batch == EFFECTIVE else []
    cols = [batch, lr, *parts, col] + [c for c in ("steps", "status") if c in d.columns] + ["trial_id"]
    out = d.loc[idx.values, cols].set_index(batch)
    out["trials"] = d.groupby(batch).size()
    return out.sort_index()


# ----------------------------------------------------------------- importance


def _native(v: Any) -> Any:
    return v.item() if hasattr(v, "item") and not isinstance(v, (str, bytes)) else v


def _distribution(values: list, spec: Mapping | None) -> Any:
    """An Optuna distribution for `values`, from the space when it fits, else from the data."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    nums = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    kind = str((spec or {}).get("type") or "")
    if kind in ("choice", "grid"):
        choices = [_native(c) for c in spec.get("values", [])]
        if choices and all(v in choices for v in values) and all(
                c is None or isinstance(c, (bool, int, float, str)) for c in choices):
            return CategoricalDistribution(choices)
    if nums and kind in RANGE_TYPES and _finite(spec.get("low")) and _finite(spec.get("high")):
        lo = min(float(spec["low"]), min(values))
        hi = max(float(spec["high"]), max(values))
        log = "log" in kind and lo > 0
        if "randint" in kind and all(float(v).is_integer() for v in values):
            return IntDistribution(int(math.floor(lo)), int(math.ceil(hi)), log=log)
        return FloatDistribution(lo, hi, log=log)
    distinct = sorted(set(values), key=lambda v: (str(type(v)), v)) if values else []
    if nums and len(distinct) > DISCRETE_LIMIT:
        lo, hi = float(min(values)), float(max(values))
        log = lo > 0 and hi / lo >= 20
        if all(isinstance(v, int) for v in values):
            return IntDistribution(int(lo), int(hi), log=log)
        return FloatDistribution(lo, hi, log=log)
    return CategoricalDistribution(distinct)


def importance(df: "pd.DataFrame", metric: str | None = None, *, params: Sequence[str] | None = None,
               min_trials: int = 4) -> "pd.Series":
    """How much each searched parameter explains `metric` (default: the column the trials are ranked
    by, as in the report), by Optuna's importance evaluators.

    Uses the finished, early-stopped and out-of-time trials, put into an in-memory Optuna study with
    distributions from the search space (or the data). fANOVA when scikit-learn is
    installed, else PED-ANOVA, else the share of variance explained by each parameter on
    its own. Returns a Series (sums to 1, largest first; ``.attrs["evaluator"]``); empty,
    with a warning, when fewer than `min_trials` trials can be used.
    """
    import pandas as pd

    empty = pd.Series(dtype=float, name="importance")
    metric = metric or df.attrs.get("rank_by") or "best_val_loss"
    params = list(params if params is not None else df.attrs.get("searched") or [])
    params = [p for p in params if p in df.columns]
    if metric not in df.columns or not params:
        warnings.warn(f"importance: nothing to compare (metric {metric!r}, searched {params})", stacklevel=2)
        return empty
    d = df[df["status"].isin(COMPLETED) & df[metric].map(_finite)]
    d = d[d[params].notna().all(axis=1)]
    if len(d) < min_trials:
        warnings.warn(f"importance: needs at least {min_trials} finished trials with {metric}, have {len(d)}",
                      stacklevel=2)
        return empty
    space = df.attrs.get("space", {})
    dists = {}
    for p in params:
        values = [_native(v) for v in d[p]]
        if len({_hashable(v) for v in values}) < 2 or not all(v is None or isinstance(v, (bool, int, float, str)) for v in values):
            continue
        dists[p] = _distribution(values, space.get(p))
    if not dists:
        warnings.warn("importance: every searched parameter has a single value in the finished trials", stacklevel=2)
        return empty
    y = [float(v) for v in d[metric]]
    if max(y) - min(y) <= 0:
        warnings.warn(f"importance: {metric} is the same in every trial", stacklevel=2)
        return empty
    _, mode = _objective(df, metric)
    result, evaluator = _optuna_importance(d, dists, y, mode)
    if result is None:
        result, evaluator = _variance_share(d, list(dists), y), "variance share"
    s = pd.Series(result, name="importance", dtype=float).sort_values(ascending=False)
    s.index.name = "parameter"
    s.attrs["evaluator"] = evaluator
    s.attrs["trials"] = len(d)
    return s


def _optuna_importance(d: "pd.DataFrame", dists: dict, y: list[float], mode: str) -> tuple[dict | None, str]:
    import optuna

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        trials = []
        for (_, row), value in zip(d.iterrows(), y):
            params = {p: _native(row[p]) for p in dists}
            params = {p: (float(v) if isinstance(dists[p], optuna.distributions.FloatDistribution) else v)
                      for p, v in params.items()}
            trials.append(optuna.trial.create_trial(params=params, distributions=dists, value=value))
        study = optuna.create_study(direction="minimize" if mode == "min" else "maximize")
        study.add_trials(trials)
        # PED-ANOVA compares the best `target_quantile` of the trials (10 % by default) with all of
        # them; below 20 trials that is the single best trial, and every parameter it has looks
        # equally important (a 3 x 3 grid: 0.5 / 0.5 where the learning rate explains 99 %).
        # At least three trials in the top region.
        top = min(0.5, max(0.1, 3 / len(y)))
        for make in (lambda: optuna.importance.FanovaImportanceEvaluator(seed=0),
                     lambda: optuna.importance.PedAnovaImportanceEvaluator(target_quantile=top)):
            try:
                ev = make()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    got = optuna.importance.get_param_importances(study, evaluator=ev, normalize=True)
            except Exception:  # noqa: BLE001 - missing scikit-learn, degenerate data: try the next one
                continue
            if got and all(_finite(v) for v in got.values()) and sum(got.values()) > 0:
                name = type(ev).__name__.replace("ImportanceEvaluator", "")
                return {k: float(v) for k, v in got.items()}, f"optuna {name}"
    except Exception:  # noqa: BLE001 - an Optuna version we do not know: fall back
        pass
    finally:
        optuna.logging.set_verbosity(verbosity)
    return None, ""


def _variance_share(d: "pd.DataFrame", params: list[str], y: list[float]) -> dict[str, float]:
    """Eta squared of each parameter alone (continuous ones cut into quartiles), normalised."""
    import pandas as pd

    ys = pd.Series(y, index=d.index)
    total = float(((ys - ys.mean()) ** 2).sum())
    out = {}
    for p in params:
        x = d[p]
        if pd.api.types.is_numeric_dtype(x) and x.nunique() > DISCRETE_LIMIT:
            x = pd.qcut(x.rank(method="first"), 4, labels=False)
        groups = ys.groupby(x.map(_hashable))
        between = float((groups.size() * (groups.mean() - ys.mean()) ** 2).sum())
        out[p] = between / total if total > 0 else 0.0
    s = sum(out.values())
    return {k: (v / s if s > 0 else 0.0) for k, v in out.items()}


# ----------------------------------------------------------------- warnings


def _fmtv(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _infer_space(df: "pd.DataFrame") -> dict[str, dict[str, Any]]:
    out = {}
    for c in df.attrs.get("searched", []):
        vals = df[c].dropna()
        if vals.empty:
            continue
        nums = all(isinstance(_native(v), (int, float)) and not isinstance(_native(v), bool) for v in vals)
        if nums and vals.nunique() > DISCRETE_LIMIT:
            lo, hi = float(vals.min()), float(vals.max())
            out[c] = {"type": "loguniform" if lo > 0 and hi / lo >= 20 else "uniform", "low": lo, "high": hi}
        else:
            out[c] = {"type": "choice", "values": sorted({_native(v) for v in vals}, key=lambda v: (str(type(v)), v))}
    return out


def warnings_for(df: "pd.DataFrame", space: Mapping[str, Any] | None = None) -> list[str]:
    """What to check before trusting the result, one sentence each.

    The best trial at the edge of a searched range (lowest/highest 10% of a linear or log
    range, or the smallest/largest number of a choice list of three or more), too few
    finished trials to rank, trials that errored, diverged, ran out of memory or still run.
    `space` defaults to the experiment's (keys as the DataFrame's columns); without one the
    ranges tried are used.
    """
    out: list[str] = []
    col, mode = _objective(df, None)
    space = _normalise_space(space) if space is not None else (df.attrs.get("space") or {})
    if space:
        rename = _rename_map(list(space) + list(df.columns))
        space = {(k if k in df.columns else rename.get(k, k)): v for k, v in space.items()}
    else:
        space = _infer_space(df)
    ranked = _ranked(df, col)
    done = df[df["status"].isin(COMPLETED) & df[col].map(_finite)] if col in df.columns else df.iloc[0:0]
    if len(done) < 3:
        out.append(f"only {len(done)} trial(s) finished with a {col}: too few to rank reliably; run more trials")
    if not ranked.empty:
        best = ranked.loc[ranked[col].idxmin() if mode == "min" else ranked[col].idxmax()]
        for key, spec in space.items():
            if key not in df.columns or not isinstance(spec, Mapping) or key in NOT_TUNED:
                continue
            msg = _edge(key, best[key], spec)
            if msg:
                out.append(msg)
    for status, verb in (("errored", "errored"), ("diverged", "diverged (loss became NaN/inf)"),
                         ("oom", "ran out of memory")):
        bad = df[df["status"] == status]
        if bad.empty:
            continue
        shown = "; ".join(f"{r.trial_id}: {r.error}" if r.error else str(r.trial_id) for r in bad.head(5).itertuples())
        more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
        out.append(f"{len(bad)} trial(s) {verb}: {shown}{more}")
    cut = df[df["status"] == "out-of-time"]
    if not cut.empty:
        msg = (f"{len(cut)} trial(s) were still training when the search's --time-budget ran out (out-of-time): "
               "their results are partial")
        if not ranked.empty and str(best["trial_id"]) in set(cut["trial_id"].astype(str)):
            msg += "; the best trial is one of them, so a longer replay may still improve on its result"
        out.append(msg)
    running = int((df["status"] == "running").sum())
    if running:
        out.append(f"{running} trial(s) still running (or the search was interrupted): their results are partial")
    if df.attrs.get("pending"):
        out.append(f"{df.attrs['pending']} trial(s) not started yet")
    return out


def _edge(key: str, value: Any, spec: Mapping[str, Any]) -> str | None:
    v = _num(_native(value))
    if v is None or not math.isfinite(v):
        return None
    kind = str(spec.get("type") or "")
    if kind in ("choice", "grid"):
        nums = [float(_native(x)) for x in spec.get("values", []) if _num(_native(x)) is not None]
        if len(nums) < 3 or len(nums) != len(spec.get("values", [])):
            return None
        if math.isclose(v, min(nums)):
            return f"best trial has {key}={_fmtv(_native(value))}, the smallest value searched ({_fmtv(min(nums))}); try smaller values"
        if math.isclose(v, max(nums)):
            return f"best trial has {key}={_fmtv(_native(value))}, the largest value searched ({_fmtv(max(nums))}); try larger values"
        return None
    lo, hi = _num(spec.get("low")), _num(spec.get("high"))
    if lo is None or hi is None or hi <= lo:
        return None
    log = "log" in kind and lo > 0 and v > 0
    pos = (math.log(v) - math.log(lo)) / (math.log(hi) - math.log(lo)) if log else (v - lo) / (hi - lo)
    scale = "log " if log else ""
    rng = f"[{_fmtv(lo)}, {_fmtv(hi)}]"
    if pos <= 0.1:
        return (f"best trial has {key}={_fmtv(_native(value))}, in the lowest 10% of the searched {scale}range {rng}; "
                f"the optimum may lie below it: widen the range")
    if pos >= 0.9:
        return (f"best trial has {key}={_fmtv(_native(value))}, in the highest 10% of the searched {scale}range {rng}; "
                f"the optimum may lie above it: widen the range")
    return None


# ----------------------------------------------------------------- plots


def _figure(w: float, h: float) -> "Figure":
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # no pyplot: no global state, works headless and inside notebooks
    return fig


def figure_png(fig: "Figure") -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _searched(df: "pd.DataFrame", key: str) -> bool:
    if key not in df.columns:
        return False
    if key in df.attrs.get("searched", []) and df[key].dropna().nunique() > 1:
        return True
    return df[key].dropna().nunique() > 1


def _lr_label(c: Any) -> str:
    return c if isinstance(c, str) else f"{c:.3g}"


def heatmap_figure(df: "pd.DataFrame", pivot: "pd.DataFrame | None" = None) -> "Figure | None":
    """Best value per batch size x learning rate cell, annotated; None when either was not searched."""
    import numpy as np

    pivot = lr_batch_pivot(df) if pivot is None else pivot
    batch = pivot.index.name or batch_column(df)
    if not (_searched(df, LR) and _searched(df, batch)):
        return None
    if pivot.empty:
        return None
    best, count = pivot["best"], pivot["count"]
    full = pivot["full"] if "full" in pivot.columns.get_level_values(0) else count
    values = best.to_numpy(dtype=float)
    nrows, ncols = values.shape
    fig = _figure(max(4.0, 1.25 * ncols + 2.5), max(2.5, 0.55 * nrows + 1.8))
    ax = fig.add_subplot()
    masked = np.ma.masked_invalid(values)
    cmap = "viridis_r" if pivot.attrs.get("mode", "min") == "min" else "viridis"
    im = ax.imshow(masked, cmap=cmap, aspect="auto")
    ax.set_xticks(range(ncols), [_lr_label(c) for c in best.columns], rotation=30, ha="right")
    ax.set_yticks(range(nrows), [str(i) for i in best.index])
    ax.set_xlabel(f"{LR}" + (" (half-decade bins)" if pivot.attrs.get("binned") else ""))
    ax.set_ylabel(f"{EFFECTIVE} ({BATCH} x {ACCUM})" if batch == EFFECTIVE else BATCH)
    ax.set_title(f"{pivot.attrs.get('metric', 'best_val_loss')} (best per cell)")
    finite = values[np.isfinite(values)]
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0
    for i in range(nrows):
        for j in range(ncols):
            v = values[i, j]
            if not math.isfinite(v):
                continue
            n = int(count.iloc[i, j])
            text = f"{v:.3f}" + (f"\nn={n}" if n > 1 else "") + ("\nshorter run" if not int(full.iloc[i, j]) else "")
            dark = (v > mid) == (cmap == "viridis_r")
            ax.text(j, i, text, ha="center", va="center", fontsize=9, color="white" if dark else "black")
    fig.colorbar(im, ax=ax)
    return fig


def lr_scatter_figure(df: "pd.DataFrame", metric: str | None = None) -> "Figure | None":
    """Learning rate (log x) vs best value, one colour per batch size; failed trials as red x beyond the
    worst value (above it in mode min, below it in mode max)."""
    col, mode = _objective(df, metric)
    if not _searched(df, LR) or col not in df.columns:
        return None
    ok = _ranked(df, col)
    ok = ok[ok[LR].map(_finite)]
    failed = df[df["status"].isin(("diverged", "oom")) & df[LR].map(_finite)]
    if ok.empty:
        return None
    fig = _figure(6.5, 4.2)
    ax = fig.add_subplot()
    batch = batch_column(df)
    if batch in ok.columns and ok[batch].notna().any():
        sizes = sorted(ok[batch].dropna().unique(), key=lambda v: (str(type(v)), v))
        colors = [f"C{i % 10}" for i in range(len(sizes))]
        for b, c in zip(sizes, colors):
            part = ok[ok[batch] == b]
            ax.scatter(part[LR], part[col], color=c, label=str(b), s=36, alpha=0.85, edgecolor="black", linewidth=0.4)
        legend_title = batch
    else:
        ax.scatter(ok[LR], ok[col], color="C0", s=36, label="trials")
        legend_title = None
    if not failed.empty:  # beyond the worst value: above it for a loss (min), below it for a maximised metric
        worst = float(ok[col].max() if mode == "min" else ok[col].min())
        span = float(ok[col].max() - ok[col].min()) or abs(worst) * 0.05 or 0.1
        beyond = worst + 0.08 * span if mode == "min" else worst - 0.08 * span
        ax.scatter(failed[LR], [beyond] * len(failed), marker="x", color="red", s=50, label="diverged / oom")
    if (ok[LR] > 0).all():
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 3.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:.0e}".replace("e-0", "e-").replace("e+0", "e")))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(LR)
    ax.set_ylabel(col)
    ax.grid(True, alpha=0.3)
    ax.legend(title=legend_title, fontsize=8)
    ax.set_title(f"{col} vs {LR}")
    return fig


def curve_metric(df: "pd.DataFrame", curves: "pd.DataFrame | None") -> str:
    """The metric the learning curves draw: the search's objective where the trials reported it at each
    evaluation (tokens_per_s, val/bpc...), else val/loss."""
    metric = str(df.attrs.get("metric") or "val/loss")
    return metric if curves is not None and metric in curves.columns else "val/loss"


def curves_figure(df: "pd.DataFrame", curves: "pd.DataFrame", top: int = 5,
                  metric: str = "val/loss") -> "Figure | None":
    """`metric` against step for the `top` best-ranked trials."""
    if curves is None or curves.empty or metric not in curves.columns or "rank" not in df.columns:
        return None
    best = df[df["rank"].notna()].sort_values("rank").head(top)
    x = "step" if "step" in curves.columns else "training_iteration"
    fig = _figure(7, 4.2)
    ax = fig.add_subplot()
    drawn = 0
    for r in best.itertuples():
        c = curves[(curves["trial_id"] == r.trial_id) & curves[metric].map(_finite)]
        if c.empty:
            continue
        parts = [f"#{r.rank} {r.trial_id}"]
        for key in (LR, BATCH):
            if key in df.columns and getattr(r, key, None) is not None:
                parts.append(f"{'lr' if key == LR else 'bs'}={_fmtv(_native(getattr(r, key)))}")
        if EFFECTIVE in df.columns and getattr(r, ACCUM, None) is not None:
            parts[-1] += f"x{_fmtv(_native(getattr(r, ACCUM)))}"  # bs=16x4: the accumulation steps differ
        ax.plot(c[x], c[metric], marker="o", markersize=3, label=" ".join(parts))
        drawn += 1
    if not drawn:
        return None
    ax.set_xlabel(x)
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{metric} of the {drawn} best trial(s)")
    return fig


# ----------------------------------------------------------------- tables


def _cell(col: str, v: Any) -> str:
    v = _native(v)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    try:
        import pandas as pd

        if v is pd.NA:
            return ""
    except ImportError:  # pragma: no cover
        pass
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if (_LOSS_LIKE.search(str(col)) or str(col) in ("mean", "std", "best")) and abs(v) < 1000:
            return f"{v:.4f}"  # (a loss; an objective such as tokens_per_s is shown as the numbers below)
        if str(col) == "importance":
            return f"{v:.3f}"
        if v.is_integer() and abs(v) < 1e15:
            return str(int(v))
        if abs(v) >= 1000:
            return f"{v:.0f}"
        return f"{v:.4g}"
    return str(v)


def _display(df: "pd.DataFrame", as_col: str | None = None) -> "pd.DataFrame":
    """Every cell as the text shown in report tables (`as_col`: format every value like that column)."""
    out = df.copy()
    for c in out.columns:
        name = c[-1] if isinstance(c, tuple) else c
        stat = c[0] if isinstance(c, tuple) else ""
        fmt = stat if stat == "count" else (as_col or stat or name)
        out[c] = [_cell(fmt, v) for v in out[c]]
    return out


def markdown_table(df: "pd.DataFrame", index: bool = False, as_col: str | None = None) -> str:
    """A GitHub-flavoured markdown table (no tabulate needed); cells formatted like the report."""
    if df is None or len(df.columns) == 0:
        return "_(empty)_"
    d = _display(df, as_col)
    cols = [" / ".join(map(str, c)) if isinstance(c, tuple) else str(c) for c in d.columns]
    if index:
        name = d.index.name or ""
        cols = [str(name)] + cols
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(esc(c) for c in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for i, row in zip(d.index, d.itertuples(index=False)):
        cells = ([_cell("", i)] if index else []) + list(row)
        lines.append("| " + " | ".join(esc(c) for c in cells) + " |")
    return "\n".join(lines)


def _html_table(df: "pd.DataFrame", index: bool = False, as_col: str | None = None) -> str:
    if df is None or len(df.columns) == 0:
        return "<p><em>(empty)</em></p>"
    d = _display(df, as_col)
    if d.columns.nlevels > 1:
        d.columns = [" / ".join(map(str, c)) for c in d.columns]
    return d.to_html(index=index, escape=True, border=0, classes="table", na_rep="")


def replay_command(experiment: str | Path, data: Any = None, trial: str | None = None) -> str:
    """The command that replays the best trial, or `trial` (``--trial``: that one even after a running
    search finds a better one). Where its corpus is a URL the experiment keeps without its secret (`data`
    holds ``***``), replay needs --data: shown with ``***`` where the secret goes."""
    command = f"python -m tune_gpt.replay {shlex.quote(str(experiment))}"
    if trial is not None:
        command += f" --trial {shlex.quote(str(trial))}"
    if is_redacted(data):
        command += f" --data {shlex.quote(data)}  # the corpus URL with its secret in place of {REDACTED}"
    return command


def no_replay_reason(df: "pd.DataFrame") -> str:
    """Why there is nothing to replay, for an experiment with no ranked trial: every trial failed (errored,
    diverged, out of memory) and none is left to start, or no trial has a result yet."""
    if _all_failed(df):
        return "every trial failed (see the warnings above): nothing to replay"
    return "no trial has a result yet: nothing to replay"


def _all_failed(df: "pd.DataFrame") -> bool:
    """Every trial errored, diverged or ran out of memory, and none is left to start."""
    return bool(len(df)) and bool(df["status"].isin(FAILED).all()) and not df.attrs.get("pending")


def _summary_columns(df: "pd.DataFrame") -> list[str]:
    col = df.attrs.get("rank_by", "best_val_loss")
    cols = ["rank", "trial_id", "status", *df.attrs.get("searched", []),
            *([EFFECTIVE] if batch_column(df) == EFFECTIVE else []), col]
    cols += [c for c in ("best_val_loss", "final_val_loss", "best_val_bpc", "steps", "total_steps", "wall_s",
                         "tokens_per_s") if c not in cols]
    return [c for c in dict.fromkeys(cols) if c in df.columns]


# ----------------------------------------------------------------- report files


@dataclass
class _Report:
    """Everything that goes into the report, computed once."""

    df: Any
    curves: Any
    pivot: Any
    per_batch: Any
    importance: Any
    importance_note: str
    warnings: list[str]
    images: dict[str, bytes]
    skipped: dict[str, str]
    experiment: str


def _build(exp: _Experiment, experiment_arg: str) -> _Report:
    import pandas as pd

    df = _results_frame(exp)
    curves = _curves_frame(exp)
    pivot = lr_batch_pivot(df)
    per_batch = best_lr_per_batch(df)
    note = ""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        imp = importance(df, df.attrs["rank_by"])
    if imp.empty:
        note = "; ".join(str(w.message) for w in caught) or "importance: not computed"
    else:
        note = f"{imp.attrs.get('evaluator', '')} over {imp.attrs.get('trials', '?')} trials (finished or stopped)"
    figs = {"heatmap": heatmap_figure(df, pivot), "lr_scatter": lr_scatter_figure(df),
            "curves": curves_figure(df, curves, metric=curve_metric(df, curves))}
    images, skipped = {}, {}
    for name, fig in figs.items():
        if fig is None:
            skipped[name] = skip_reason(name, df, curves)
        else:
            images[name] = figure_png(fig)
    return _Report(df=df, curves=curves, pivot=pivot if isinstance(pivot, pd.DataFrame) else pd.DataFrame(),
                   per_batch=per_batch, importance=imp, importance_note=note, warnings=warnings_for(df),
                   images=images, skipped=skipped, experiment=experiment_arg)


def skip_reason(name: str, df: "pd.DataFrame", curves: "pd.DataFrame | None" = None) -> str:
    """Why the plot `name` (one of PLOTS) was not drawn: the sentence the report shows in its place."""
    searched = df.attrs.get("searched", [])

    if EFFECTIVE in df.columns:
        searched = [*searched, EFFECTIVE]  # from batch_size and the accumulation steps

    def why(keys: Sequence[str]) -> str:
        return "; ".join(f"{k} not searched" if k not in searched else f"only one {k} tried" for k in keys)

    if name == "heatmap":
        missing = [k for k in (batch_column(df), LR) if not _searched(df, k)]
        if missing:
            return f"no heatmap: {why(missing)}"
    if name == "lr_scatter" and not _searched(df, LR):
        return f"no learning-rate plot: {why([LR])}"
    if _all_failed(df):
        return f"no {name.replace('_', ' ')} plot: every trial failed"
    return f"no {name.replace('_', ' ')} plot: no trial has a {df.attrs.get('rank_by', 'result')} yet"


def _best_config(df: "pd.DataFrame") -> dict[str, Any]:
    ranked = df[df["rank"].notna()]
    if ranked.empty:
        return {}
    best = ranked.sort_values("rank").iloc[0]
    skip = set(_METRIC_COLUMNS) | {"trial_id", "rank", "status", "error", "trial_dir", EFFECTIVE, df.attrs.get("rank_by")}
    searched = [c for c in df.attrs.get("searched", []) if c in df.columns]
    rest = [c for c in df.columns if c not in skip and c not in searched]
    return {c: _native(best[c]) for c in searched + rest}


def _status_counts(df: "pd.DataFrame") -> str:
    counts = df["status"].value_counts()
    return ", ".join(f"{int(counts[s])} {s}" for s in STATUSES if s in counts)


_EFFECTIVE_NOTE = (f"Batch sizes here are effective batches, `{BATCH}` x `{ACCUM}`: the trials accumulated "
                   f"gradients over different numbers of steps, so the same `{BATCH}` trained on different batches.")


_SHORT_NOTE = ("Some cells hold trials that did not run their whole budget (early-stopped, out of time, still "
               "running): their values come from shorter runs, and a cell with no full run is marked \"shorter run\" "
               "in the heatmap; the steps of each cell's best trial are in the table below.")
_SHARE_NOTE = ("Several trials share a cell: mean and spread (std) over the trials that ran their whole budget "
               "(full), of all the trials in the cell (count):")


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


def _markdown(r: _Report) -> str:
    df = r.df
    a = df.attrs
    col = a["rank_by"]
    lines = [f"# Search report: {a['name']}", ""]
    lines.append(f"{len(df)} trial(s): {_status_counts(df)}. Objective: `{a['metric']}` ({a['mode']}), "
                 f"ranked by `{col}`.")
    if a.get("command"):
        lines += ["", f"Search command: `{a['command']}`"]
    best = _best_config(df)
    lines += ["", "## Warnings", ""]
    lines += [f"- {w}" for w in r.warnings] or ["- none"]
    lines += ["", "## Best trial", ""]
    if best:
        top = df[df["rank"] == 1].iloc[0]
        lines.append(f"Trial `{top['trial_id']}` ({top['status']}): {col} = {_cell(col, top[col])}.")
        lines += ["", "| parameter | value |", "|---|---|"]
        lines += [f"| {k}{' (searched)' if k in a.get('searched', []) else ''} | {_cell(k, v)} |" for k, v in best.items()]
        lines += ["", "Train it for real (same config, full logging):", "", "```bash",
                  replay_command(r.experiment, best.get("data")), "```"]
    else:
        lines.append(_sentence(no_replay_reason(df)))
    lines += ["", "## Trials", "", markdown_table(df[_summary_columns(df)])]
    lines += ["", "## Learning rate x batch size", ""]
    if r.pivot.empty:
        lines.append(f"_Not available: {LR} or {BATCH} missing, or no trial with a result._")
    else:
        if r.pivot.index.name == EFFECTIVE:
            lines += [_EFFECTIVE_NOTE, ""]
        lines += [f"Best `{col}` per cell" + (" (learning rates in half-decade bins)" if r.pivot.attrs.get("binned") else "")
                  + ":", "", markdown_table(r.pivot["best"], index=True, as_col="best")]
        if (r.pivot["full"] < r.pivot["count"]).to_numpy().any():
            lines += ["", _SHORT_NOTE]
        if (r.pivot["count"] > 1).to_numpy().any():
            lines += ["", _SHARE_NOTE, "",
                      markdown_table(r.pivot.loc[:, ["mean", "std", "full", "count"]], index=True)]
        lines += ["", "Best learning rate per batch size:", "", markdown_table(r.per_batch, index=True)]
    lines += ["", "## Parameter importance", ""]
    if r.importance.empty:
        lines.append(f"_{r.importance_note}_")
    else:
        lines += [f"How much of `{col}`'s variation each parameter explains ({r.importance_note}):", "",
                  markdown_table(r.importance.to_frame(), index=True)]
    failed = df[df["status"].isin(FAILED)]
    lines += ["", "## Failed trials", ""]
    if failed.empty:
        lines.append("None.")
    else:
        lines += [markdown_table(failed[[c for c in ["trial_id", "status", LR, BATCH, "steps", "error"] if c in df.columns]])]
    lines += ["", "## Plots", ""]
    for name in PLOTS:
        lines.append(f"![{name}]({name}.png)" if name in r.images else f"_{r.skipped[name]}_")
        lines.append("")
    lines += ["All trials with every column: `trials.csv` (or `tune_gpt.report.load_results`).", ""]
    return "\n".join(lines)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
h1{margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table.table{border-collapse:collapse;font-size:13px;margin:.5em 0}
table.table th,table.table td{border:1px solid #ddd;padding:3px 7px;text-align:right}
table.table th{background:#f4f4f4}table.table td:nth-child(-n+3){text-align:left}
pre{background:#f6f8fa;padding:.6em;overflow-x:auto}ul.warn li{color:#8a4b00}
.status-errored,.status-diverged,.status-oom{color:#b00020}
img{max-width:100%;display:block;margin:.5em 0}figure{margin:1em 0}figcaption{color:#555;font-size:13px}
"""

_IMAGES_SCRIPT = """<script>
window.addEventListener("load", function () {
  var ok = 0, imgs = document.images;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++; }
  document.body.dataset.imagesOk = String(ok);
  document.body.dataset.imagesTotal = String(imgs.length);
});
</script>"""


def _html(r: _Report) -> str:
    e = html.escape
    df = r.df
    a = df.attrs
    col = a["rank_by"]
    parts = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>Search report: {e(a['name'])}</title><style>{_CSS}</style></head><body>"]
    parts.append(f"<h1>Search report: {e(a['name'])}</h1>")
    parts.append(f"<p>{len(df)} trial(s): {e(_status_counts(df))}. Objective: <code>{e(a['metric'])}</code> "
                 f"({e(a['mode'])}), ranked by <code>{e(col)}</code>.</p>")
    if a.get("command"):
        parts.append(f"<p>Search command: <code>{e(a['command'])}</code></p>")
    parts.append('<h2>Warnings</h2><ul class="warn">')
    parts += [f"<li>{e(w)}</li>" for w in r.warnings] or ["<li>none</li>"]
    parts.append("</ul><h2>Best trial</h2>")
    best = _best_config(df)
    if best:
        top = df[df["rank"] == 1].iloc[0]
        parts.append(f"<p>Trial <code>{e(str(top['trial_id']))}</code> ({e(str(top['status']))}): "
                     f"{e(col)} = {e(_cell(col, top[col]))}.</p>")
        rows = "".join(f"<tr><th>{e(k)}{' (searched)' if k in a.get('searched', []) else ''}</th>"
                       f"<td>{e(_cell(k, v))}</td></tr>" for k, v in best.items())
        parts.append(f'<table class="table">{rows}</table>')
        parts.append(f"<p>Train it for real (same config, full logging):</p><pre><code>{e(replay_command(r.experiment, best.get('data')))}</code></pre>")
    else:
        parts.append(f"<p>{e(_sentence(no_replay_reason(df)))}</p>")
    parts.append("<h2>Trials</h2>" + _html_table(df[_summary_columns(df)]))
    parts.append("<h2>Learning rate &times; batch size</h2>")
    if r.pivot.empty:
        parts.append(f"<p><em>Not available: {LR} or {BATCH} missing, or no trial with a result.</em></p>")
    else:
        if r.pivot.index.name == EFFECTIVE:
            parts.append(f"<p>{e(_EFFECTIVE_NOTE).replace('`', '')}</p>")
        parts.append(f"<p>Best <code>{e(col)}</code> per cell"
                     + (" (learning rates in half-decade bins)" if r.pivot.attrs.get("binned") else "") + ":</p>")
        parts.append(_html_table(r.pivot["best"], index=True, as_col="best"))
        if (r.pivot["full"] < r.pivot["count"]).to_numpy().any():
            parts.append(f"<p>{e(_SHORT_NOTE)}</p>")
        if (r.pivot["count"] > 1).to_numpy().any():
            parts.append(f"<p>{e(_SHARE_NOTE)}</p>")
            parts.append(_html_table(r.pivot.loc[:, ["mean", "std", "full", "count"]], index=True))
        parts.append("<p>Best learning rate per batch size:</p>" + _html_table(r.per_batch, index=True))
    parts.append(_img(r, "heatmap", "Best value per batch size and learning rate (lower is better)"
                      if a["mode"] == "min" else "Best value per batch size and learning rate"))
    parts.append(_img(r, "lr_scatter", "Each trial's best value against its learning rate, by batch size"))
    parts.append("<h2>Learning curves</h2>")
    parts.append(_img(r, "curves", f"{curve_metric(r.df, r.curves)} against step for the best-ranked trials "
                                   "(up to five; the title says how many)"))
    parts.append("<h2>Parameter importance</h2>")
    if r.importance.empty:
        parts.append(f"<p><em>{e(r.importance_note)}</em></p>")
    else:
        parts.append(f"<p>{e(r.importance_note)}</p>" + _html_table(r.importance.to_frame(), index=True))
    parts.append("<h2>Failed trials</h2>")
    failed = df[df["status"].isin(FAILED)]
    if failed.empty:
        parts.append("<p>None.</p>")
    else:
        parts.append("<ul>")
        for t in failed.itertuples():
            parts.append(f'<li><code>{e(str(t.trial_id))}</code> <span class="status-{e(t.status)}">{e(t.status)}</span>: '
                         f"{e(str(t.error))}</li>")
        parts.append("</ul>")
    parts.append(_IMAGES_SCRIPT)
    parts.append("</body></html>")
    return "\n".join(parts)


def _img(r: _Report, name: str, caption: str) -> str:
    if name not in r.images:
        return f"<p><em>{html.escape(r.skipped[name])}</em></p>"
    data = base64.b64encode(r.images[name]).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{name}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def write_report(path: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write trials.csv, report.md, report.html and the PNG plots; return the folder.

    Default folder: ``<experiment>/report/``; for an experiment in storage such as
    ``s3://bucket/prefix/name`` (read through a temporary copy), ``./tune_reports/<name>/``. ``trial_dir`` in trials.csv is relative to
    the experiment folder, so the report stays right when the folder moves.
    """
    if out_dir is not None and not str(out_dir).strip():  # Path("") is the working folder: not what was meant
        raise ConfigError("--out: empty; give the folder the report goes to, or leave --out out")
    exp = _read_experiment(path)
    if exp.uri:
        shown = exp.location  # with its query: the replay command must reach the same storage
        default_out = Path(REMOTE_REPORTS) / exp.uri.rsplit("/", 1)[-1]
    else:
        shown = str(path) if Path(path).resolve() == exp.dir.resolve() else str(exp.dir)
        default_out = exp.dir / "report"
    r = _build(exp, shown)
    out = Path(out_dir) if out_dir is not None else default_out
    try:
        out.mkdir(parents=True, exist_ok=True)
        csv = r.df.copy()
        csv["trial_dir"] = [Path(p).name for p in csv["trial_dir"]]
        csv.to_csv(out / "trials.csv", index=False)
        for name in PLOTS:
            png = out / f"{name}.png"
            if name in r.images:
                png.write_bytes(r.images[name])
            elif png.exists():
                png.unlink()  # a stale plot from an earlier report
        (out / "report.md").write_text(_markdown(r), encoding="utf-8")
        (out / "report.html").write_text(_html(r), encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot write the report to {out}: {exc.strerror or exc}") from None
    return out


# ----------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    from tune_gpt.cli import OneLineParser, run_main

    def _run() -> int:
        parser = OneLineParser(
            prog="python -m tune_gpt.report",
            description="Summarise a search: trials.csv, report.md, a self-contained report.html and plots.",
        )
        parser.add_argument("experiment", help="the experiment folder (e.g. tune_results/default) or its URI "
                            "(s3://bucket/prefix/default)")
        parser.add_argument("--out", default=None, metavar="DIR",
                            help=f"where to write (default: <experiment>/report; {REMOTE_REPORTS}/<name> for a URI)")
        args = parser.parse_args(argv)
        out = write_report(args.experiment, args.out)
        print(f"report written to {out}: report.html, report.md, trials.csv")
        return 0

    return run_main(_run, prog="tune_gpt.report")


if __name__ == "__main__":
    sys.exit(main())
