"""`python -m tune_gpt.search`: Ray Tune + Optuna over `train()`, one trial per config.

The only module that builds a Tuner. The corpus is tokenized once here, on the
driver, and handed to every trial with `tune.with_parameters`; each trial asks
for ``{"cpu": c, "gpu": g}`` with ``g`` fractional (0.25: four trials share a
GPU, each capping its CUDA memory to its share), reports once per evaluation,
checkpoints, and is stopped early by ASHA when it trails.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from tune_gpt._redact import REDACTED, redact, redact_flat, refuse_credentials
from tune_gpt.cli import OneLineParser, add_config_flags, flag_name, overrides_from_args, resume_command, run_main
from tune_gpt.config import MODEL_PRESETS, RUNTIME_KEYS, TrainConfig
from tune_gpt.errors import ConfigError, SearchInterrupted, TuneGPTError
from tune_gpt.spaces import (Choice, Grid, SearchSpace, SpaceError, Uniform, check_domain_values, hyperband_brackets,
                             load_space, metric_name)


def _bundled_spaces() -> Path:
    """The bundled spaces: the copy a wheel ships inside the package (``tune_gpt/search_spaces/``, see
    pyproject.toml), else ``search_spaces/`` next to the package (a checkout, an editable install).
    In that order: next to an installed package is site-packages, where another project's folder of
    that name could be."""
    here = Path(__file__).resolve().parent
    packaged = here / "search_spaces"
    return packaged if packaged.is_dir() else here.parent / "search_spaces"


REPO_SPACES = _bundled_spaces()
STATUS_FILE = "tune_gpt_status.json"
EXPERIMENT_FILE = "tune_gpt_experiment.json"
SEARCHERS = ("optuna", "random", "grid")
SCHEDULERS = ("asha", "median", "none", "pbt", "bohb")
# Keys that must be the same in every trial: the corpus is tokenized once.
CORPUS_KEYS = ("data", "use_chinese", "cache_dir")
# Metrics a trial on the CPU never reports: they cannot be the objective there.
GPU_ONLY_METRICS = ("mfu", "gpu/mem_gb", "gpu/util")
# How a trial ended that a resumed search must not train again (its status file says so).
DONE_STATUSES = ("finished", "diverged", "oom")
GRACE_PERIOD = {"asha": 1, "median": 2}  # evaluations before the scheduler may stop a trial, unless set
# What a trial that diverged or ran out of memory reports last: the worst value there is, so that
# Optuna (which accepts inf, not NaN) and ASHA rank it below every trial that trained.
FAILED_METRICS = {"val/loss": float("inf"), "val/bpc": float("inf"), "train/loss": float("inf")}


@dataclass
class SearchOptions:
    """Everything `run_search` needs; the CLI flags map one to one onto these fields."""

    space: str | None = None  # a YAML file; None: search_spaces/default.yaml
    name: str | None = None
    storage_path: str = "./tune_results"
    num_samples: int | None = None
    search: str | None = None  # optuna | random | grid; None: the space's method (optuna)
    scheduler: str | None = None  # asha | median | none; None: the space's (asha)
    metric: str | None = None
    mode: str | None = None
    grace_period: int | None = None
    reduction_factor: float | None = None
    pause_at_rungs: bool | None = None  # ASHA's form: True promotions (pause), False Ray's stops; None: the
    # space's `pause`, else promotions (stops where --max-concurrent is given or brackets > 1)
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int | None = None
    time_budget: float | None = None
    max_failures: int = 0
    oom_retry: bool = False  # on out-of-memory: half the micro-batch, twice the accumulation, from the checkpoint
    resume: bool = False
    retry_errored: bool = False
    address: str | None = None
    optuna_storage: str | None = None
    seed: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)  # flat TrainConfig keys, fixed for every trial
    wandb: bool = True
    dry_run: bool = False
    report: bool = True
    verbose: int = 1  # 0: no plan on stderr and Ray's quiet mode; 2: the trials' own output too
    summary: bool = True  # print the end-of-search table, best config and replay command (the CLI always does)
    cli_argv: tuple[str, ...] | None = None  # the command line's flags (the CLI): saved, so --resume can reuse them


@dataclass
class Plan:
    """What a search will do, fully resolved before Ray starts."""

    opts: SearchOptions
    space: SearchSpace
    name: str
    experiment_dir: Path
    searcher: str
    scheduler: dict[str, Any]
    metric: str
    mode: str
    num_samples: int
    fixed: dict[str, Any]
    base_cfg: TrainConfig
    max_evals: int
    notes: list[str]
    n_trials: int = 0
    pause_given: bool = False  # ASHA's form was asked for (a flag or the space's `pause`), not the default
    saved: dict[str, Any] | None = None  # a resumed search's experiment file: the settings Ray restores
    grid_cap: int | None = None  # a grid search's run_cap / --num-samples below its size: its first points only
    written: bool = False  # this process wrote the experiment file (a remote one is not looked up at a signal)

    def max_trials(self) -> int:
        """`n_trials`, or fewer where Optuna, which trains no configuration twice, searches a space holding fewer."""
        points = self.space.distinct_points() if self.searcher == "optuna" else None
        return self.n_trials if points is None else min(self.n_trials, points)

    def _trials_note(self) -> str:
        if self.searcher == "grid":
            return (f" (the first {self.grid_cap} of the grid's {self.space.grid_size()} points)" if self.grid_cap
                    else " (every grid point once)")
        if self.max_trials() >= self.n_trials:
            return ""
        return f" at most: the space holds {self.max_trials()} distinct configurations, and none is trained twice"

    def describe(self, restoring: bool | None = None) -> str:
        """The space and the plan; `restoring`: whether Ray restores a saved search (default: --resume)."""
        o = self.opts
        restoring = o.resume if restoring is None else restoring
        res = f"{o.cpus_per_trial:g} CPU" + (f" + {o.gpus_per_trial:g} GPU" if o.gpus_per_trial else "")
        saved = self.saved if restoring and self.saved else {}
        limit = saved.get("max_concurrent", o.max_concurrent)  # restored: the search's own (recorded since 2026-11-30)
        conc = limit if limit else "as resources allow"
        if "max_concurrent" in saved and o.max_concurrent is not None and o.max_concurrent != limit:
            conc = f"{conc} (the search's own: --max-concurrent is not applied to a resumed search)"
        sched = " ".join(f"{k}={v}" for k, v in self.scheduler.items())
        lines = [
            self.space.describe(),
            "",
            "plan:",
            f"  experiment   {self.experiment_dir}",
            f"  trials       {self.n_trials}{self._trials_note()}",
            f"  search       {self.searcher}" + (f" (TPE, multivariate, seed {o.seed}, baseline first, no configuration twice)" if self.searcher == "optuna"
                                                else f" (seed {o.seed})" if self.searcher == "random" else ""),
            f"  scheduler    {sched}",
            f"  objective    {self.metric} ({self.mode}), reported every {self.base_cfg.eval_interval} steps, "
            + (f"up to {self.max_evals} evaluation{'s' * (self.max_evals != 1)} a trial" if self.max_evals
               else "until each trial's budget ends"),
            f"  resources    {res} per trial, concurrency {conc}",
            f"  failures     retried {o.max_failures} time(s) from the last checkpoint; NaN/inf loss ends a trial "
            "'diverged'; out of memory ends it 'oom'"
            + (" after halving the micro-batch down to 1 (same effective batch)" if o.oom_retry else ""),
            f"  corpus       {redact(self.base_cfg.data or '') or ('chinese' if self.base_cfg.use_chinese else 'python-docs')}",
        ]
        had = saved.get("time_budget_s")
        if "time_budget_s" in saved and (had is not None or o.time_budget):
            lines.append("  time budget  " + (f"{had:g} s, the search's own, counted afresh in this run"
                                              if isinstance(had, (int, float)) else "none, as the search was started"
                                              if had is None else f"{had} (as recorded)")
                         + (" (--time-budget is not applied to a resumed search)"
                            if o.time_budget and o.time_budget != had else ""))
        elif o.time_budget and restoring:
            lines.append("  time budget  the one the search was started with (--time-budget is not applied to a "
                         "resumed search)")
        elif o.time_budget:
            lines.append(f"  time budget  {o.time_budget:g} s")
        lines += [f"  note: {n}" for n in self.notes + self._scheduler_notes()]
        return "\n".join(lines)

    def _scheduler_notes(self) -> list[str]:
        """A scheduler that can stop nothing because the trials end before its grace period."""
        kind = self.scheduler.get("type", "asha")
        if not self.max_evals or kind not in ("asha", "median"):
            return []
        ends_at_max_t = kind == "asha" and self.scheduler.get("stop_last_trials", True)
        last = int(self.scheduler.get("max_t") or self.max_evals) if ends_at_max_t else self.max_evals
        grace = self.scheduler.get("grace_period", GRACE_PERIOD[kind])
        if last > grace:
            return []
        return [f"{kind} can stop no trial: each reports at most {last} evaluation(s) and the grace period is "
                f"{grace}; evaluate more often (--eval_interval, now {self.base_cfg.eval_interval} steps) to stop "
                "weak trials early"]


# ------------------------------------------------------------------ planning


def _resolve_pause(sched: dict[str, Any], opts: SearchOptions, source: str, notes: list[str]) -> bool:
    """Sets ASHA's form in `sched` (``pause``: True, promotions; False, Ray's stops). Returns whether it was
    asked for (--pause-at-rungs / --stop-at-rungs, or the space's ``pause``) rather than defaulted.

    The default is the promotion form: on the 3 x 3 grid benchmark it reaches the grid's best for 24 % of the
    grid's steps, Ray's form for 48 % (docs/BENCHMARKS.md). Ray's form is the default where the promotion
    form cannot run: several brackets, or --max-concurrent (Ray's limiters count a waiting trial as running)."""
    flag = {True: "--pause-at-rungs", False: "--stop-at-rungs"}.get(opts.pause_at_rungs)  # type: ignore[arg-type]
    if sched["type"] != "asha":
        if flag:
            raise ConfigError(f"{flag}: chooses how ASHA ends trials at its rungs, and the scheduler is "
                              f"{sched['type']}; use it with --scheduler asha")
        return False
    if opts.pause_at_rungs is not None:
        sched["pause"] = opts.pause_at_rungs
    given = "pause" in sched
    if opts.pause_at_rungs and sched.get("brackets", 1) != 1:
        raise ConfigError(f"--pause-at-rungs: runs one bracket, and {source}'s scheduler has {sched['brackets']}")
    if not given:
        why = ("--max-concurrent counts a trial waiting at a rung as running" if opts.max_concurrent is not None
               else f"{sched['brackets']} brackets" if sched.get("brackets", 1) != 1 else "")
        sched["pause"] = not why
        if why:
            notes.append(f"ASHA stops trials at its rungs (Ray's form), not the promotion form: {why}")
    if sched["pause"] and opts.max_concurrent is not None:
        why = "--pause-at-rungs pauses" if flag else f"{source}'s scheduler pauses (pause: true)"
        raise ConfigError(f"--max-concurrent: {why} trials at ASHA's rungs, and a paused trial would count as "
                          "running for ever; limit trials with --cpus-per-trial or --gpus-per-trial instead, or "
                          "give --stop-at-rungs")
    return given


def _space_file(space: str | None) -> str | Path:
    """`--space` as given, or one of the bundled spaces (``search_spaces/``) when no such file is here: by
    name (``lr_batch``) or by the README's relative path, from any working directory."""
    if space is None:
        return REPO_SPACES / "default.yaml"
    given = Path(space).expanduser()
    for here in (given, given.with_name(given.name + ".yaml")):  # a file here comes first, by name too
        if here.exists():
            return space if here == Path(space) else here  # as given where nothing was added to it
    if Path(space).parent in (Path("."), Path("search_spaces")):  # a bare name, or the README's path
        name = Path(space).name
        for candidate in (REPO_SPACES / name, REPO_SPACES / f"{name}.yaml"):
            if candidate.is_file():
                return candidate
    bundled = ", ".join(sorted(p.stem for p in REPO_SPACES.glob("*.yaml")))
    raise SpaceError(f"{space}: no such file" + (f" (bundled spaces, by name: {bundled})" if bundled else ""))


def plan_search(opts: SearchOptions) -> Plan:
    """Load and check everything; raise a one-line TuneGPTError for what cannot work."""
    # a W&B sweep's values are grid axes or choices by its method: read as --search asks (else random search
    # walked the whole grid once per sample, 72 trials of 9 points; and --search grid refused its values)
    space = load_space(_space_file(opts.space), search=opts.search)
    notes = list(space.notes)
    for key in CORPUS_KEYS:
        if key in space.domains:
            raise ConfigError(f"{space.source}: {key}: the corpus cannot be searched (it is tokenized once); fix it")
    unsearched = _unsearch_overridden(space, opts.overrides)
    for key in unsearched:
        notes.append(f"{key}: fixed to {opts.overrides[key]!r} from the command line instead of searched")

    if opts.retry_errored and not opts.resume:
        raise ConfigError("--retry-errored: only with --resume (it re-runs the errored trials of the search resumed)")
    _check_number("--cpus-per-trial", opts.cpus_per_trial, low=0, strict=True)
    _check_number("--gpus-per-trial", opts.gpus_per_trial, low=0)
    if opts.gpus_per_trial > 1:  # (Ray's rule too: above 1 a trial takes whole GPUs)
        raise ConfigError(f"--gpus-per-trial: {opts.gpus_per_trial:g}: a trial trains on one GPU, so the others "
                          "would sit idle; use 1, or a fraction (0.25: four trials share a GPU)")
    if opts.max_concurrent is not None:
        _check_number("--max-concurrent", opts.max_concurrent, low=1)
    if opts.num_samples is not None:
        _check_number("--num-samples", opts.num_samples, low=1)
    if opts.time_budget is not None:
        _check_number("--time-budget", opts.time_budget, low=0, strict=True)
    if opts.max_failures is None or opts.max_failures < 0:
        raise ConfigError(f"--max-failures: must be >= 0, got {opts.max_failures}")
    if opts.seed is not None and (not isinstance(opts.seed, int) or not 0 <= opts.seed < 2**32):
        raise ConfigError(f"--seed: {opts.seed!r} is not an integer in [0, 2**32)")  # numpy's (Optuna, Ray) range
    _check_storage_path(opts.storage_path)

    searcher = opts.search or {"grid": "grid", "random": "random"}.get(space.method or "", "optuna")
    grids = [isinstance(d, Grid) for d in space.domains.values()]
    if not opts.search and not space.method and any(grids):  # the file says how to search by its domains
        searcher = "grid" if all(grids) else "random"
        notes.append(f"{space.source} sets no method: {searcher} search, as its `grid:` domains ask"
                     + ("" if all(grids) else " (Optuna cannot sample a grid axis)"))
    if searcher not in SEARCHERS:
        raise ConfigError(f"--search: unknown searcher {searcher!r} (choose from {', '.join(SEARCHERS)})")
    if not space.domains and searcher != "grid":  # Optuna refuses an empty space at its first suggestion
        notes.append("nothing left to search (every parameter is fixed): one trial of the fixed values")
        searcher = "grid"
    has_grid = any(grids)
    if searcher == "optuna":
        if has_grid:
            raise ConfigError(
                f"--search optuna: {space.source} has grid axes; a grid cannot be sampled by a model-based "
                "sampler (use --search grid or --search random)"
            )
        bad = space.optuna_unsupported()
        if bad:
            if opts.search == "optuna" or (space.format != "wandb" and space.method == "optuna"):
                where = "--search optuna" if opts.search == "optuna" else f"{space.source}: method: optuna"
                raise ConfigError(f"{where}: Optuna cannot sample {', '.join(bad)}; use --search random")
            notes.append(f"Optuna cannot sample {', '.join(bad)}: falling back to random search")
            searcher = "random"
    if searcher == "grid":
        not_grid = [k for k, d in space.domains.items() if not isinstance(d, Grid)]
        if not_grid:
            what = "is not a grid axis" if len(not_grid) == 1 else "are not grid axes"
            raise ConfigError(f"--search grid: {', '.join(not_grid)} {what} in {space.source} (a grid walks"
                              " `grid: [...]` domains, or a W&B sweep's `values`; choice and ranges are sampled:"
                              " use --search optuna or random)")

    if space.scheduler is not None:
        sched = dict(space.scheduler)
    elif space.format == "wandb":
        sched = {"type": "none"}  # a W&B sweep without early_terminate runs every trial to its end
    else:
        sched = {"type": "asha"}
    if opts.scheduler:
        if opts.scheduler not in SCHEDULERS:
            raise ConfigError(f"--scheduler: unknown scheduler {opts.scheduler!r} (choose from asha, median, none)")
        if opts.scheduler != sched.get("type"):
            sched = {"type": opts.scheduler}
    if sched["type"] == "pbt":
        raise ConfigError(
            "--scheduler pbt: Population Based Training mutates running trials and cannot be combined with a "
            f"search algorithm (here: {searcher}); use asha or median"
        )
    if sched["type"] == "bohb":
        raise ConfigError(
            "--scheduler bohb: HyperBandForBOHB works only with the TuneBOHB searcher, not with "
            f"{searcher}; use asha (Hyperband's successive halving) instead"
        )
    # asked for where nothing would use them: one line, not a search that stops nothing early
    none_why = (" (a W&B sweep without early_terminate runs every trial to its end)"
                if space.format == "wandb" and space.scheduler is None and not opts.scheduler else "")
    unused = []
    if opts.grace_period is not None and sched["type"] == "none":
        unused.append(f"--grace-period: the scheduler is none{none_why}; add --scheduler asha (or median) to "
                      "stop trials early")
    if opts.reduction_factor is not None and sched["type"] != "asha":
        unused.append(f"--reduction-factor: an ASHA setting, and the scheduler is {sched['type']}{none_why}; "
                      "add --scheduler asha")
    if unused and not opts.resume:
        raise ConfigError(unused[0])
    notes += [f"{u.split(';')[0]}: not used" for u in unused]  # a search started with it (saved so) resumes
    if opts.grace_period is not None:
        _check_number("--grace-period", opts.grace_period, low=1)
        sched["grace_period"] = opts.grace_period
    if opts.reduction_factor is not None:
        _check_number("--reduction-factor", opts.reduction_factor, low=1, strict=True)
        sched["reduction_factor"] = opts.reduction_factor
    pause_given = _resolve_pause(sched, opts, space.source, notes)

    metric = space.metric or "val/loss"
    if opts.metric is not None:
        metric = metric_name(opts.metric)
        if metric is None:
            from tune_gpt.spaces import METRICS

            raise ConfigError(f"--metric: {opts.metric!r} is not a metric tune_gpt reports "
                              f"(choose from {', '.join(METRICS)})")
    if metric in ("lr", "step", "tokens", "epoch"):
        raise ConfigError(f"{'--metric' if opts.metric else space.source + ': metric'}: {metric} is set by the run, "
                          "not a result to optimise; use val/loss")
    mode = opts.mode or space.mode or ("max" if metric in ("tokens_per_s", "mfu") else "min")  # higher is better
    if mode not in ("min", "max"):
        raise ConfigError(f"--mode: must be min or max, got {mode!r}")
    if mode == "max" and metric in ("val/loss", "val/bpc", "train/loss"):
        where = "--mode max" if opts.mode else f"{space.source}: its metric's goal is to maximize"
        raise ConfigError(f"{where}: {metric} is lower for better models, so the search would pick the worst "
                          "trial as its best; use min")
    if metric in GPU_ONLY_METRICS and opts.gpus_per_trial <= 0:
        raise ConfigError(f"{'--metric' if opts.metric else space.source + ': metric'}: {metric} is only reported "
                          "by trials on a GPU, and these run on the CPU (--gpus-per-trial 0); use val/loss")
    if metric == "gpu/util" and opts.gpus_per_trial < 1:
        raise ConfigError(f"{'--metric' if opts.metric else space.source + ': metric'}: gpu/util is the whole GPU's "
                          f"utilisation, and with --gpus-per-trial {opts.gpus_per_trial:g} the trials sharing it "
                          "count in each one's figure; use tokens_per_s, or whole GPUs per trial")

    fixed = dict(space.fixed)
    for key in list(fixed):
        if key in RUNTIME_KEYS and key not in ("compile",):
            notes.append(f"{key}: set per trial by the search; the file's value {fixed.pop(key)!r} is ignored")
    size, own_shape = opts.overrides.get("model_size"), ""
    files_size = fixed.get("model_size", None if "model_size" in space.domains  # searched: no one size
                           else TrainConfig.__dataclass_fields__["model_size"].default)  # left out: the default
    if size is not None and size != files_size:
        # a size preset given on the command line is that preset's shape: the file's own shape values (the default
        # space's shrunken tiny model) went on overriding it, and `--model_size small` trained the shrunken model
        shape = {k: fixed.pop(k) for k in [f"model.{f}" for f in MODEL_PRESETS.get(size, {})]
                 if k in fixed and k not in opts.overrides}
        own_shape = (", with its own shape: the file's " + ", ".join(f"{k} {v!r}" for k, v in shape.items())
                     + (" is" if len(shape) == 1 else " are") + " left out (flags such as --n_layer set them)"
                     ) if shape else ""
        if own_shape and "model_size" in unsearched:  # its note ("fixed ... instead of searched") is written above
            notes.append(f"model_size: {size!r}{own_shape}")
    for key, value in opts.overrides.items():  # the fixed values above are the file's: say what replaces them
        if key in fixed and fixed[key] != value:
            notes.append(redact(f"{key}: {value!r} from the command line, not the file's {fixed[key]!r}")
                         + (own_shape if key == "model_size" else ""))
        elif key not in fixed and key not in unsearched and key not in RUNTIME_KEYS:
            notes.append(redact(f"{key}: {value!r} from the command line") + (own_shape if key == "model_size" else ""))
    if opts.num_samples is not None and space.num_samples is not None and opts.num_samples != space.num_samples:
        notes.append(f"num_samples: {opts.num_samples} from the command line, not the file's {space.num_samples}")
    fixed.update(opts.overrides)
    fixed.update(_trial_runtime(opts))
    # trials run in other folders, and a replay may start in yet another: paths are kept absolute
    if fixed.get("data") and "://" not in str(fixed["data"]) and fixed["data"] not in ("python-docs", "chinese"):
        fixed["data"] = os.path.abspath(os.path.expanduser(str(fixed["data"])))
    if isinstance(fixed.get("cache_dir"), str) and fixed["cache_dir"].strip():  # an empty one: config's error
        fixed["cache_dir"] = os.path.abspath(os.path.expanduser(fixed["cache_dir"]))
    try:
        base_cfg = TrainConfig.from_flat({**fixed, **space.baseline()})
        check_domain_values(space, fixed)
    except ConfigError as exc:
        raise ConfigError(_blame(exc, opts.overrides, space)) from None
    _check_trial_device(base_cfg, fixed, opts, space)

    grid_cap = None
    if searcher == "grid":
        num_samples = 1  # Tune repeats the whole grid num_samples times
        n_trials = space.grid_size()
        # A W&B grid sweep stops after run_cap runs: its run_cap, or --num-samples in its place, caps the grid.
        # A native file's num_samples keeps Tune's meaning, which a grid ignores (each point runs once).
        asked = (opts.num_samples or space.num_samples) if space.format == "wandb" else None
        if asked is not None and asked < n_trials:
            grid_cap = n_trials = asked
            notes.append(f"run_cap {asked}: the first {asked} of the grid's {space.grid_size()} points "
                         "(in Tune's grid order), as W&B stops a grid sweep after run_cap runs")
        elif asked is not None and asked > n_trials:
            notes.append(f"a grid runs each point once: run_cap {asked} is more than its {n_trials} points")
        elif asked is None and (opts.num_samples or space.num_samples or 1) != 1:
            notes.append("a grid runs each point once: num_samples is ignored")
    else:
        num_samples = opts.num_samples or space.num_samples or 8
        n_trials = num_samples * space.grid_size()
    name = opts.name or space.name or "search"
    _check_name(name, "--name" if opts.name else f"{space.source}: name")
    storage = opts.storage_path
    experiment_dir = Path(storage).expanduser().resolve() / name if "://" not in storage else Path(name)
    return Plan(opts=opts, space=space, name=name, experiment_dir=experiment_dir, searcher=searcher,
                scheduler=sched, metric=metric, mode=mode, num_samples=num_samples, fixed=fixed,
                base_cfg=base_cfg, max_evals=0, notes=notes, n_trials=n_trials, pause_given=pause_given,
                grid_cap=grid_cap)


def _unsearch_overridden(space: SearchSpace, overrides: dict[str, Any]) -> list[str]:
    """Drop from `space` the domains the command line fixes (``--max-steps`` over a searched max_steps...);
    returns their keys."""
    keys = [key for key in overrides if key in space.domains]
    for key in keys:
        space.domains.pop(key)
    return keys


def _blame(exc: Exception, overrides: dict[str, Any], space: SearchSpace) -> str:
    """A config error in one line, blamed on the command-line flag it names, else on the space file."""
    msg = str(exc)
    if msg.startswith(f"{space.source}:"):
        return msg  # already names the file (a SpaceError from check_domain_values)
    named = [k for k in overrides if re.search(rf"(?<![\w.]){re.escape(k)}(?![\w])", msg)]
    if named:
        flags = ", ".join(f"--{flag_name(k)} {overrides[k]}" for k in named)
        return f"{flags}: {msg}"
    return f"{space.source}: {msg}"


def _check_trial_device(base: TrainConfig, fixed: dict[str, Any], opts: SearchOptions, space: SearchSpace) -> None:
    """Trials run on the CPU unless they ask Ray for a GPU: refuse GPU-only settings without one, and a fixed
    device with one (Ray shows each trial only the GPUs it was given, numbered from cuda:0)."""
    where = (lambda key: f"--{flag_name(key)}" if key in opts.overrides else f"{space.source}: {space.where(key)}")
    if opts.gpus_per_trial > 0:
        if "device" in fixed and str(fixed["device"]) not in ("auto", "cuda", "cuda:0"):
            raise ConfigError(f"{where('device')}: {fixed['device']!r}: each trial trains on the GPU Ray gives it "
                              f"(--gpus-per-trial {opts.gpus_per_trial:g}), which it sees as cuda:0; leave the device "
                              "out (or 'cuda')")
        return
    if "device" in fixed and str(fixed["device"]) not in ("cpu", "auto"):
        raise ConfigError(f"{where('device')}: {fixed['device']!r}: trials run where Ray places them; "
                          "ask for GPUs with --gpus-per-trial (e.g. 0.25) instead of a device")
    if base.precision != "fp32":
        key = "precision"
        raise ConfigError(f"{where(key)}: {base.precision} needs a CUDA GPU but the trials run on the CPU "
                          "(--gpus-per-trial 0); give --gpus-per-trial or use fp32")


def _check_name(name: str, flag: str) -> None:
    """An experiment name is one folder under the storage path."""
    if not name.strip() or name in (".", "..") or "/" in name or "\\" in name or name != name.strip() \
            or any(ord(c) < 32 for c in name):
        raise ConfigError(f"{flag}: {name!r} is not a usable experiment name (one folder name: no '/', not '.' or '..')")


def _check_storage_path(storage: str) -> None:
    """A local storage path must be a folder, or a path where one can be made."""
    if not storage or not str(storage).strip():
        raise ConfigError("--storage-path: empty path")
    if "://" in storage:
        refuse_credentials(storage, "--storage-path", "Ray's experiment state and every trial's files")
        return
    p = Path(storage).expanduser()
    for q in (p, *p.parents):
        if q.exists() or q.is_symlink():
            if not q.is_dir():
                what = "is not a folder" if q == p else f"cannot be created: {q} is not a folder"
                raise ConfigError(f"--storage-path: {storage} {what}")
            if not os.access(q, os.W_OK | os.X_OK):
                raise ConfigError(f"--storage-path: {storage}: {q} is not writable")
            return


def _check_number(flag: str, value: Any, low: float, strict: bool = False) -> None:
    if value is None or (value <= low if strict else value < low) or not math.isfinite(value):
        raise ConfigError(f"{flag}: must be {'>' if strict else '>='} {low:g}, got {value!r}")


def _trial_runtime(opts: SearchOptions) -> dict[str, Any]:
    """Per-trial settings that say where a trial runs, not what it trains."""
    out: dict[str, Any] = {
        "num_threads": max(1, int(round(opts.cpus_per_trial))),
        "progress": False, "tensorboard": False, "wandb.enabled": False, "checkpoint": True,
    }
    if opts.gpus_per_trial > 0:
        out["gpu_memory_fraction"] = min(1.0, opts.gpus_per_trial)
    return out


def max_evaluations(plan: Plan, train_tokens: int) -> int:
    """An upper bound on the reports a trial makes (ASHA's max_t), over the searched values."""
    candidates: dict[str, list[Any]] = {}
    for key in ("batch_size", "gradient_accumulation_steps", "model_size", "model.block_size", "max_steps", "epochs",
                "max_tokens", "eval_interval"):  # model_size: its preset's block_size sets the steps of an epoch
        dom = plan.space.domains.get(key)
        if isinstance(dom, (Choice, Grid)):
            candidates[key] = list(dom.values)
        elif isinstance(dom, Uniform):
            candidates[key] = [dom.low, dom.high]
    import itertools

    best = 1
    keys = list(candidates)
    for combo in itertools.product(*(candidates[k] for k in keys)) if keys else [()]:
        flat = dict(zip(keys, combo))
        if "batch_size" in flat:
            flat["batch_size"] = int(flat["batch_size"])
        # from the fixed values, not on top of base_cfg: a model_size given there resets the model section
        # to its preset, and the trial's fixed model fields (its block_size) would be lost
        cfg = TrainConfig.from_flat({**plan.fixed, **plan.space.baseline(), **flat})
        best = max(best, math.ceil(cfg.total_steps(train_tokens) / cfg.eval_interval))
    return best


# ---------------------------------------------------------------- the trial


class TuneReporter:
    """Reports each evaluation to Tune (with its checkpoint), resumes from Tune's checkpoint, and keeps
    the trial's status file (`STATUS_FILE`) and ``sample.txt``.

    Tune stops a trial's actor without waiting for its training thread (``FunctionTrainable.cleanup``
    finishes the session with ``timeout=0``): when the scheduler ends a trial inside `tune.report`
    (ASHA at its last rung, for one), what the thread does after that report may never happen. So
    `train()` writes the sample before its last report, and a trial that diverged or ran out of
    memory says so before reporting it. ``finished`` is written once the last report returned or Tune
    ended the trial inside it, with that report (``last_report``): a resumed search does not train the
    trial again, but that evaluation may never have been recorded (Ctrl+C ends trials inside their
    report, before the driver records it; a SIGKILL can land between the two), so the resumed trial
    reports it again unless Tune's saved state shows it recorded (`_recorded`). The report tells a
    trial ASHA ended at its last step by the steps reported.
    """

    def __init__(self, trial_dir: Path | None = None, where: dict[str, Any] | None = None, storage: Any = None,
                 objective: str | None = None) -> None:
        self.trial_dir = trial_dir
        self.objective = objective  # the search's metric: every report must carry it
        self.where = dict(where or {})
        self.storage = storage  # Tune's StorageContext, kept: get_storage() is None once Tune stops the trial
        self.total_steps: int | None = None
        self.last_step = 0
        self.start_step: int | None = None  # where the first attempt in this trial run began (a resume: > 0)
        self.cfg: TrainConfig | None = None  # the config of the latest train() call (smaller after an OOM retry)
        self.oom_retries: list[dict[str, Any]] = []  # filled by train_with_oom_retry
        self.last_report: dict[str, Any] | None = None  # the metrics of the latest evaluation reported
        self._restore_dirs: list[str] = []
        # when this attempt began: the report tells a retry from the attempt that failed by it, against the
        # failure's time the driver records (file times cannot: Ray copies error.txt to storage at every sync)
        self.attempt_started_s = time.time()

    def save_status(self, status: str, **fields: Any) -> None:
        """Write the status file: `status`, `fields`, where the trial runs and what OOM retries changed."""
        if self.trial_dir is None:
            return
        record = {"status": status, **fields, "steps": fields.get("steps", self.last_step),
                  "total_steps": self.total_steps, "start_step": self.start_step,
                  "attempt_started_s": self.attempt_started_s}
        if (self.oom_retries or status == "oom") and self.cfg is not None:
            record.update(_oom_info(self.oom_retries, self.cfg))
        _save_trial_file(self.trial_dir, STATUS_FILE, json.dumps({**record, **self.where}), self.storage)

    def start(self, cfg, info):
        self.cfg = cfg
        self.total_steps = info["total_steps"]
        self.where["device"] = str(info.get("device") or self.where.get("device"))  # the one used: not "auto"
        self.where["bf16_products"] = bool(info.get("bf16_products"))  # what `replay --check` must do again
        self.where["corpus_sha256"] = info.get("corpus_sha256")  # the text it trained on, which replay compares
        if self.start_step is None:
            self.start_step = int(info.get("start_step", 0))
            self.last_step = max(self.last_step, self.start_step)

    def log(self, step, metrics):
        pass

    def evaluate(self, step, metrics, checkpoint_dir):
        from ray import tune

        if self.objective and self.objective not in metrics:
            # Tune's strict metric check would end the whole search, every trial with it
            why = ("no peak FLOPs figure for this GPU and precision" if self.objective == "mfu"
                   else "not measured on this device")
            raise ConfigError(f"metric {self.objective}: this trial's evaluations do not report it ({why}; device "
                              f"{self.where.get('device', '?')}); search on val/loss instead")
        metrics = {**metrics, "total_steps": self.total_steps}
        self.last_step, self.last_report = step, metrics
        if checkpoint_dir is not None:
            checkpoint = tune.Checkpoint.from_directory(str(checkpoint_dir))
            checkpoint.set_metadata({"step": step})  # a resume tells whether the driver recorded this report
            tune.report(metrics, checkpoint=checkpoint)
        else:
            tune.report(metrics)

    def sample(self, text):
        if self.trial_dir is not None and text:
            _save_trial_file(self.trial_dir, "sample.txt", text, self.storage)

    def finish(self, result):
        pass

    def resume_checkpoint(self):
        from ray import tune

        ckpt = tune.get_checkpoint()
        if ckpt is None:
            return None
        d = tempfile.mkdtemp(prefix="tune_gpt_restore_")
        self._restore_dirs.append(d)
        return Path(ckpt.to_directory(d))

    def cleanup(self) -> None:
        for d in self._restore_dirs:
            shutil.rmtree(d, ignore_errors=True)
        self._restore_dirs.clear()


def trainable(config: dict[str, Any], corpus: Any = None, oom_retry: bool = False,
              objective: tuple[str, str] = ("val/loss", "min")) -> None:
    """The Tune function trainable: build the config, call `train()`, record how it ended.

    How it ends, in ``tune_gpt_status.json`` and for Tune:

    - finished / early-stopped (ASHA) as usual;
    - ``diverged`` (NaN/inf loss): the trial reports the worst value of every loss and of the
      `objective` (``inf``, or ``-inf`` for a metric maximised) and returns, so the searcher and
      the scheduler count it as the worst result and Tune does not retry it (Optuna takes inf as
      a value; ASHA ranks it last, though a rung where the percentile falls next to it gets a NaN
      cutoff and stops nobody that round);
    - ``oom``: the same, after `oom_retry` (half the micro-batch, twice the accumulation steps,
      from the last checkpoint) is exhausted or off; the retries are in the status file;
    - ``errored``: any other exception goes up to Tune, which retries the trial from its last
      checkpoint up to ``--max-failures`` times.

    Each attempt first writes ``running`` (an earlier attempt's ``errored`` no longer holds). A trial
    the scheduler stops may be left at ``running``: its actor can end before the ``finally`` below
    runs; the report then tells early-stopped from Tune's state and the steps reported.

    A trial whose status file already says finished, diverged or oom reports its last evaluation
    again (a finished one only if Tune's saved state does not show that report recorded, see
    `_recorded`) and returns: the search was resumed from a saved state older than the trial's end,
    and it must not train again.
    """
    from ray import tune

    from tune_gpt.train import OutOfMemory, train_with_oom_retry

    context = tune.get_context()
    trial_dir, storage = Path(context.get_trial_dir()), context.get_storage()
    previous = _read_trial_status(trial_dir, storage)
    if previous.get("status") in DONE_STATUSES:  # its last report may not have been recorded: again
        # this attempt began after any failure Ray recorded since: the report must not take it for that one
        _save_trial_file(trial_dir, STATUS_FILE, json.dumps({**previous, "attempt_started_s": time.time()}), storage)
        if previous["status"] in ("diverged", "oom"):
            _report_failed(previous["status"], objective, int(previous.get("steps") or 0), previous.get("total_steps"))
        elif isinstance(previous.get("last_report"), dict) and not _recorded(previous["last_report"], storage):
            tune.report(previous["last_report"])
        return
    flat = {k: v for k, v in config.items() if not k.startswith("_")}
    scratch = Path(tempfile.mkdtemp(prefix="tune_gpt_trial_"))
    flat["output_dir"] = str(scratch)
    if flat.get("gpu_memory_fraction"):
        import torch

        flat.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
    else:
        flat.setdefault("device", "cpu")
    cfg = TrainConfig.from_flat(flat)
    import ray

    ctx = ray.get_runtime_context()
    where = {"node_id": ctx.get_node_id(), "resources": ctx.get_assigned_resources(), "device": cfg.device}
    reporter = TuneReporter(trial_dir, where, storage, objective=objective[0])
    reporter.save_status("running")
    status: dict[str, Any] = {"status": "running"}
    try:
        try:
            result, _, _ = train_with_oom_retry(cfg, reporter, corpus=corpus, oom_retry=oom_retry,
                                                retries=reporter.oom_retries)
        except OutOfMemory as exc:
            reporter.cfg = exc.cfg
            status = {"status": "oom", "message": str(exc)}
            reporter.save_status(**status)  # before the last report, in which the scheduler may end the trial
            _report_failed("oom", objective, reporter.last_step, reporter.total_steps)
            return
        status = {"status": result.status, "message": result.message, "steps": result.steps}
        if result.status == "diverged":
            reporter.save_status(**status)
            _report_failed("diverged", objective, result.steps, reporter.total_steps)
    except Exception as exc:
        status = {"status": "errored", "message": _one_line(exc)}
        raise
    except BaseException:
        if status["status"] in ("running",):
            # Tune ends a trial the scheduler stopped by raising inside `tune.report`.
            done = reporter.total_steps is not None and reporter.last_step >= reporter.total_steps
            status = {"status": "finished" if done else "early-stopped"}
        raise
    finally:
        if status["status"] == "finished":  # also when Tune ended it inside its last report (ASHA, or Ctrl+C:
            status["last_report"] = reporter.last_report  # then the driver never recorded that report)
        reporter.save_status(**status)
        shutil.rmtree(scratch, ignore_errors=True)
        reporter.cleanup()


def _recorded(report: dict[str, Any], storage: Any) -> bool:
    """Whether the driver recorded `report`, a finished trial's last: the checkpoint Tune restores the
    trial from is the one that report carried, and the trial's result.json in storage (`storage`:
    its StorageContext) has the report's row. Tune writes the row, then registers the checkpoint,
    and saves its state every second; an older checkpoint cannot tell, so the report is made again
    (at worst a second copy of its row). The row is checked too because the state and result.json
    reach storage in one copy that is not atomic: a crash during it can leave the newer state next
    to the older result.json."""
    from ray import tune

    try:
        checkpoint = tune.get_checkpoint()
        if checkpoint is None or checkpoint.get_metadata().get("step") != report.get("step"):
            return False
        return any(row.get("step") == report.get("step") for row in _last_result_rows(storage))
    except Exception:  # unreadable: report again rather than lose the evaluation
        return False


def _last_result_rows(storage: Any, tail: int = 1 << 16) -> list[dict[str, Any]]:
    """The rows at the end (its last `tail` bytes) of the trial's result.json in storage."""
    fs, path = storage.storage_filesystem, f"{storage.trial_fs_path}/result.json"
    with fs.open_input_file(path) as f:
        size = f.size()
        f.seek(max(0, size - tail))
        lines = f.read().decode("utf-8", errors="replace").splitlines()
    if size > tail:
        lines = lines[1:]  # the first may be cut
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return [r for r in rows if isinstance(r, dict)]


def _oom_info(retries: list[dict[str, Any]], cfg: TrainConfig) -> dict[str, Any]:
    """What the status file records about out-of-memory retries: each shrink and the micro-batch that ran last."""
    return {"oom_retries": retries, "batch_size": cfg.batch_size,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps}


def _report_failed(why: str, objective: tuple[str, str], step: int, total_steps: int | None) -> None:
    """The last report of a trial that diverged or ran out of memory: the worst objective there is."""
    from ray import tune

    metric, mode = objective
    worst = {metric: float("-inf") if mode == "max" else float("inf")}
    tune.report({**FAILED_METRICS, **worst, "step": step, why: 1, "total_steps": total_steps})


def _read_trial_status(trial_dir: Path, storage: Any) -> dict[str, Any]:
    """The trial's status file from an earlier run of this trial (storage first, then the local folder).

    `storage` is the trial's StorageContext (None: the local folder only)."""
    texts = []
    try:
        with storage.storage_filesystem.open_input_stream(f"{storage.trial_fs_path}/{STATUS_FILE}") as f:
            texts.append(f.read().decode("utf-8"))
    except Exception:  # noqa: BLE001 - no earlier run, or storage unreachable
        pass
    try:
        texts.append((trial_dir / STATUS_FILE).read_text(encoding="utf-8"))
    except OSError:
        pass
    for text in texts:
        try:
            data = json.loads(text)
        except ValueError:
            continue
        if isinstance(data, dict):
            return data
    return {}


def _save_trial_file(trial_dir: Path, name: str, text: str, storage: Any = None) -> None:
    """Write a file into the trial's folder in storage (the local folder Ray gave us if storage fails).

    Not into that local folder as well: Ray 2.60 stages a trial's files in the driver's folder for it
    and uploads that folder to storage about once a second, and a trial retried in a reused actor is
    given another local folder. A copy left in the first one by an earlier attempt (its ``errored``
    status) would then be uploaded over what the retry wrote to storage (seen: a retried trial that
    finished, reported as errored); so a local copy is removed once storage has the file.
    `storage` is the trial's StorageContext (default: the running session's).
    """
    local = trial_dir / name
    try:
        if storage is None:
            from ray import tune

            storage = tune.get_context().get_storage()
        write_storage_file(storage.storage_filesystem, storage.trial_fs_path, name, text)
    except Exception:  # noqa: BLE001 - storage unreachable: the driver's node may still upload the local copy
        try:
            local.write_text(text, encoding="utf-8")
        except OSError:
            pass
        return
    try:
        if Path(storage.trial_fs_path, name).resolve() != local.resolve():  # (not where storage put it)
            local.unlink(missing_ok=True)
    except OSError:
        pass


def write_storage_file(fs: Any, folder: str, name: str, text: str) -> None:
    """Write `text` as ``<folder>/<name>`` on a pyarrow filesystem (local, s3://, gs://), creating the folder.

    Whole or not at all: on a local disk through a temporary name and a rename (a trial's actor ended by Ray
    while it wrote left an empty status file); an object store's upload is whole once it closes."""
    fs.create_dir(folder, recursive=True)
    local = getattr(fs, "type_name", "") == "local"
    path = f"{folder}/{name}"
    tmp = f"{folder}/.{name}.{uuid.uuid4().hex[:12]}.part" if local else path  # (threads and processes apart)
    try:
        with fs.open_output_stream(tmp) as out:
            out.write(text.encode("utf-8"))
        if local:
            fs.move(tmp, path)
    except BaseException:
        if local:
            with contextlib.suppress(OSError):
                fs.delete_file(tmp)
        raise


def _is_oom(exc: BaseException) -> bool:
    from tune_gpt.train import is_oom

    return is_oom(exc)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:500]


# ------------------------------------------------------------------ running


@dataclass
class SearchOutcome:
    experiment_dir: Path | str  # a str: the experiment's URI (s3://…)
    best_config: dict[str, Any] | None
    best_metric: float | None
    num_trials: int
    num_errors: int
    trials_csv: Path | None
    replay_command: str | None


def run_search(opts: SearchOptions, *, trainable: Callable[..., None] | None = None) -> SearchOutcome | Plan:
    """Run (or resume) a search as `opts` says. With ``dry_run`` return the Plan, start nothing.

    Everything is checked (space, flags, corpus, storage, searcher) before the experiment folder
    is created, so bad input leaves nothing behind. SIGINT or SIGTERM stops the trials, saves the
    search state and raises `SearchInterrupted` with the command that resumes it; a second signal
    quits at once. Before Tune starts (the corpus, Ray's start-up) a signal raises it without waiting
    for anything but ray.init, which must not be cut short.

    `trainable` replaces the function Tune runs for each trial (default: `tune_gpt.search.trainable`).
    Tune calls it as ``trainable(config, **kwargs)`` (``corpus``, ``oom_retry``, ``objective``); a
    replacement should hand over to `tune_gpt.search.trainable` with the same arguments. It is a hook for fault injection
    (the test suite raises, runs out of memory or diverges inside trials through it) and for
    instrumentation; it must be picklable by Ray.
    """
    plan = plan_search(opts)
    if opts.dry_run:
        _dry_run_checks(plan)
        print(plan.describe())
        return plan
    stop = _StopRequest()
    with _quiet_ray_analysis():
        with _stop_on_signals(stop, plan):  # until Tune has ended and Ray is down; the summary is Ctrl+C's as usual
            try:
                grid, elapsed, searcher = _run_tune(plan, trainable)
            except SearchInterrupted:
                raise
            except KeyboardInterrupt:
                raise SearchInterrupted(_resume_hint(plan), exit_code=_exit_code(stop.signum)) from None
        if _was_interrupted(stop, grid, plan, searcher):
            raise SearchInterrupted(_resume_hint(plan), exit_code=_exit_code(stop.signum or signal.SIGUSR1))
        if opts.optuna_storage and plan.searcher == "optuna":
            _close_study_trials(plan)
        return _summarise(plan, grid, elapsed)


def _check_experiment_folder(plan: Plan) -> None:
    """A local experiment folder: --resume needs one, a new search must not find one."""
    if "://" in plan.opts.storage_path:
        return
    if plan.opts.resume and not (plan.experiment_dir / EXPERIMENT_FILE).is_file():
        raise ConfigError(f"--resume: no experiment to resume at {plan.experiment_dir}")
    if not plan.opts.resume and plan.experiment_dir.exists() and any(plan.experiment_dir.iterdir()):
        raise ConfigError(
            f"--name: experiment {plan.experiment_dir} already exists; pass --resume to continue it or --name NEW"
        )


def _dry_run_checks(plan: Plan) -> None:
    """What --dry-run can check without starting Ray, tokenizing or downloading: the corpus can be read
    (a local file, folder or glob; not a URL), the experiment folder is as --resume says, --address
    answers, and the GPUs asked for exist here."""
    from tune_gpt.data import is_fetched, read_text, train_size

    try:
        _check_experiment_folder(plan)
    except ConfigError as exc:
        if plan.opts.resume:
            raise
        plan.notes.append(str(exc).replace("--name: experiment", "experiment", 1))  # the plan is still worth seeing
    if plan.opts.resume:  # in the run's order: the search resumed first, then its corpus
        _check_same_search(plan, _check_resumable(plan))
    cfg = plan.base_cfg
    if not is_fetched(cfg.data):
        _, text, _ = read_text(cfg.data, use_chinese=cfg.use_chinese)
        plan.max_evals = max_evaluations(plan, train_size(len(text)))  # the char tokenizer: a token a character
    if plan.opts.address:
        _check_address_answers(plan.opts.address)
    if plan.opts.gpus_per_trial > 0 and _local_gpus(plan.opts):
        _check_local_gpu(plan.opts)


@contextlib.contextmanager
def _quiet_ray_analysis():
    """Ray's result analysis warns of trials that never started ("Failed to fetch metrics": the time
    budget ran out first) and, when no trial has a result, asks whether the metric name is right. The
    summary says what happened instead (`_no_best`); real errors still show. After Ctrl+C, Tune's own
    "Resume experiment with: Tuner.restore(...)" and "Trials did not complete" are left out: the search's
    resume line says what to type."""
    logger = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with _filtered("ray.tune.tune", _NotRaysResumeHint()):
            yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _filtered(logger: str, quiet: logging.Filter):
    """`quiet` on the logger named while the block runs."""
    log = logging.getLogger(logger)
    log.addFilter(quiet)
    try:
        yield
    finally:
        log.removeFilter(quiet)


class _NotRaysResumeHint(logging.Filter):
    """Tune's lines that the search's own say better: its resume hint, and the ERROR listing the trials that
    did not complete (after Ctrl+C the search's line names the --resume command; trials that errored are
    counted in its summary, with their error files in the trials table)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "Resume experiment with:" not in message and not message.startswith("Trials did not complete")


class _NotTheDefaultTokenNotice(logging.Filter):
    """Ray's warning, at every start of a local cluster, that token authentication is on by default (it is:
    nothing to do; joining nodes is the README's Scaling out section). Its warning that it is off stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def _run_tune(plan: Plan, trainable: Callable[..., None] | None) -> tuple[Any, float, Any]:
    """Check what needs the corpus, start Ray, run Tune (new or restored). Returns the result grid, the
    seconds fit() took and the searcher built here (None for a restored search: Tune unpickles its own)."""
    opts = plan.opts
    if opts.wandb:
        from tune_gpt.tracking import check_wandb_env

        check_wandb_env()  # before Ray starts: its workers, W&B's actors among them, inherit the environment
    fn = trainable if trainable is not None else globals()["trainable"]

    from tune_gpt.data import load_corpus

    remote = "://" in opts.storage_path
    _check_experiment_folder(plan)  # before the corpus: a resume with another --data must not fetch it first
    if remote:
        _check_remote_experiment(plan)
    experiment_file = _check_resumable(plan) if opts.resume else {}
    if opts.resume:
        _check_same_search(plan, experiment_file)
    cfg = plan.base_cfg
    corpus = load_corpus(cfg.data, use_chinese=cfg.use_chinese, cache_dir=cfg.cache_dir)
    corpus.check_context(cfg.model.block_size, source=cfg.data or corpus.name)
    plan.max_evals = max_evaluations(plan, len(corpus.train))
    if opts.optuna_storage and plan.searcher == "optuna":
        _check_optuna_storage(opts.optuna_storage, plan.name, opts.resume)

    if opts.gpus_per_trial > 0 and _local_gpus(opts):
        _check_local_gpu(opts)
        _check_objective_here(plan)
    import ray
    from ray import tune

    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")  # experiment state saved often: resume loses little
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("TUNE_WARN_THRESHOLD_S", "5")
    searcher = None  # built here for a new search; a resumed one is unpickled inside Tune
    own_ray = not ray.is_initialized()
    wandb_mode_before = os.environ.get("WANDB_MODE")  # _wandb_mode may set it for the search's callback
    kept_out = contextlib.ExitStack()
    try:
        if _init_ray(opts):  # a cluster this process started
            kept_out.enter_context(_trials_inherit_the_environment())
        if opts.optuna_storage and plan.searcher == "optuna" and not ray.util.client.ray.is_connected():
            from tune_gpt._searchers import storage_password_kept_out  # (Ray Client: from --address or RAY_ADDRESS)

            kept_out.enter_context(storage_password_kept_out(opts.optuna_storage))  # out of Ray's pickles
        _check_gpus(opts)
        restore = opts.resume and _can_restore(plan)
        if restore:
            plan.saved = experiment_file  # the plan printed shows the limit and budget Ray restores
            _warn_budget_not_applied(plan, experiment_file)
        if not restore:
            param_space = {**plan.space.to_tune(), **redact_flat(plan.fixed)}  # Ray writes it in every trial's files
            tune_config = _tune_config(plan)  # searcher and scheduler built before anything is written
            searcher = tune_config.search_alg
            searcher = getattr(searcher, "searcher", searcher)  # the searcher itself, not --max-concurrent's limiter
            _check_searcher_space(plan, param_space)
        if opts.verbose:
            print(plan.describe(restoring=restore), file=sys.stderr)
            print(f"corpus: {corpus.describe()}", file=sys.stderr)
        trainable_fn = tune.with_resources(
            tune.with_parameters(fn, corpus=corpus, oom_retry=bool(opts.oom_retry), objective=(plan.metric, plan.mode)),
            {"cpu": opts.cpus_per_trial, "gpu": opts.gpus_per_trial},
        )
        if restore:
            import pickle

            try:
                tuner = tune.Tuner.restore(
                    str(plan.experiment_dir) if not remote else experiment_uri(plan),
                    trainable=trainable_fn, resume_unfinished=True, resume_errored=opts.retry_errored,
                )
            except (pickle.UnpicklingError, EOFError) as exc:  # cut short (a full disk, a partial copy)
                raise ConfigError(f"--resume: {_in_experiment(plan, 'tuner.pkl')} cannot be read "
                                  f"({redact(_one_line(exc))}): Ray cannot reopen the search; start another with "
                                  f"--name NEW") from None
            except (ImportError, AttributeError) as exc:  # a class it pickled is not here as it was
                raise ConfigError(f"--resume: {_in_experiment(plan, 'tuner.pkl')} cannot be restored here "
                                  f"({redact(_one_line(exc))}): it may have been saved by another version of "
                                  f"tune_gpt, Ray or Optuna; resume with those, or start another search with "
                                  f"--name NEW") from None
            _renew_callbacks(tuner, plan)
        else:
            if opts.resume:
                print(f"--resume: Ray saved no state in {plan.experiment_dir} before the interruption; "
                      "starting the search from its beginning", file=sys.stderr)
            run_config = _run_config(plan)
            _write_experiment_file(plan)
            tuner = tune.Tuner(trainable_fn, param_space=param_space, tune_config=tune_config,
                               run_config=run_config)
            del run_config, tune_config
        t0 = time.time()
        grid = tuner.fit()
        elapsed = time.time() - t0
        del tuner
        gc.collect()  # W&B's callback must be collected while Ray is still up (it closes the runs)
    finally:
        kept_out.close()
        if own_ray:
            _shutdown_ray()  # also after a ray.init that failed part-way: its processes go too
        if wandb_mode_before is None:  # a notebook's later train() probes for a key and network again
            os.environ.pop("WANDB_MODE", None)
        else:
            os.environ["WANDB_MODE"] = wandb_mode_before
    return grid, elapsed, searcher


def _renew_callbacks(tuner: Any, plan: Plan) -> None:
    """`Tuner.restore` brings back the callbacks pickled when the search began, with that session's W&B
    choices: its mode (``wandb.init``'s ``mode=`` wins over WANDB_MODE, so a search begun online went
    on online after the key or the network was gone), its folder (a moved experiment logged to the old
    one), and W&B at all (``--resume --no-wandb`` still logged, or failed for want of a key). The W&B
    callback (it holds no state Tune saves) is replaced by the one this command makes, or dropped; the
    others stay as restored, the time-budget one with them, since Ray restores the search's own budget.
    Not under Ray Client (``ray://``), where the tuner lives on the cluster."""
    internal = getattr(tuner, "_local_tuner", None)
    if internal is None:
        return
    run_config = internal.get_run_config()
    old = [c for c in run_config.callbacks or [] if type(c).__name__ == "TrialStatusWandb"]
    new = wandb_callback(plan) if plan.opts.wandb else None
    kept = [c for c in run_config.callbacks or [] if c not in old]
    for c in kept:  # MarkTimeBudgetStops tells its loggers of the trials the budget stops
        loggers = getattr(c, "_loggers", None)
        if isinstance(loggers, list) and any(x in old for x in loggers):
            c._loggers = [x for x in loggers if x not in old] + ([new] if new is not None else [])
    callbacks = [new if c in old else c for c in run_config.callbacks or []]  # in its place, or added last
    callbacks += [new] if not old and new is not None else []
    run_config.callbacks = _keeping_results_json([c for c in callbacks if c is not None])


def _keeping_results_json(callbacks: list[Any]) -> list[Any]:
    """A search begun before `TrialResultsJson` existed: Tune's own result.json writer (restored, or the one
    Tune would add) replaced by it, in its place (and in the time-budget callback's list)."""
    from ray.tune.logger import JsonLoggerCallback

    from tune_gpt._tune_callbacks import TrialResultsJson

    if any(isinstance(c, TrialResultsJson) for c in callbacks):
        return callbacks
    mine = TrialResultsJson()
    if not any(type(c) is JsonLoggerCallback for c in callbacks):
        return callbacks + [mine]
    for c in callbacks:
        loggers = getattr(c, "_loggers", None)
        if isinstance(loggers, list):
            c._loggers = [mine if type(x) is JsonLoggerCallback else x for x in loggers]
    return [mine if type(c) is JsonLoggerCallback else c for c in callbacks]


def _close_study_trials(plan: Plan) -> None:
    """Close the Optuna trials a finished search left RUNNING in ``--optuna-storage``.

    Tune does not tell the searcher about trials it stops when ``--time-budget`` runs out (nor about a
    trial it created but never started), so a dashboard would show them running for ever. Each becomes
    PRUNED at its last reported value (Optuna's meaning: stopped before the end), or FAIL if it reported
    nothing. Only for a search that ended (an interrupted one keeps them, as ``--resume`` continues them),
    and only this search's trials (user attribute ``tune_experiment``).
    """
    try:
        import optuna
        from optuna.trial import TrialState

        study = optuna.load_study(study_name=plan.name, storage=plan.opts.optuna_storage)
        ours = _study_tag(plan)
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.user_attrs.get("tune_experiment") != ours:
                continue  # another search's trial (same --name, another --storage-path): maybe running now
            study.tell(t.number, state=TrialState.PRUNED if t.intermediate_values else TrialState.FAIL)
    except Exception as exc:  # noqa: BLE001 - the search's results stand; only the study's bookkeeping is left
        warnings.warn(f"--optuna-storage: could not close the study's unfinished trials: {_one_line(exc)}")


def _all_trials_ended(grid: Any, plan: Plan, searcher: Any = None, saved: dict[str, Any] | None = None) -> bool:
    """Every planned trial ran to an end (a signal that came as the search was finishing changes nothing).

    Not by the trials' status in `grid`: after the stop a signal asks for, Tune hands back every trial
    TERMINATED, those it stopped running and those it never started alike, so a signal once every planned
    trial existed looked like the search's end. By Tune's last saved state (`saved`, `_saved_trial_states`:
    written before that stop, the stopped trials RUNNING or PENDING, which --resume continues): ended is
    TERMINATED or ERROR there. Without it (none could be read), a trial ended when it errored or its last
    result is ``done`` (finished, or stopped by the scheduler; Tune does not always save that flag, so a
    trial that ended before a --resume may count as not ended: a second --resume ends at once).
    Optuna, which trains no configuration twice, plans fewer trials where the space holds fewer points,
    and none at all once it has ended the search for want of new ones (`exhausted`).
    """
    planned = 0 if getattr(searcher, "exhausted", False) else plan.max_trials()

    def ended(result: Any) -> bool:
        name = str(getattr(result, "path", "") or "").rstrip("/").rsplit("/", 1)[-1]
        state = (saved or {}).get(f"dir:{name}") or (saved or {}).get(f"id:{(result.metrics or {}).get('trial_id')}")
        if state and state.get("status"):
            return state["status"] in ("TERMINATED", "ERROR")
        return result.error is not None or bool((result.metrics or {}).get("done"))

    try:
        return len(grid) >= planned and all(ended(r) for r in grid)
    except Exception:  # noqa: BLE001 - an unexpected ResultGrid: treat the search as interrupted
        return False


def _was_interrupted(stop: _StopRequest, grid: Any, plan: Plan, searcher: Any) -> bool:
    """Whether `fit()` returned because the search was stopped before its end (--resume goes on).

    - A search its time budget ended is not (its marker says so), even when a signal came while it was
      winding down (the W&B runs closing): it used to exit 130 with a --resume line that was then refused.
    - Our SIGINT/SIGTERM handler saw a signal: not every planned trial ended (`_all_trials_ended`).
    - No signal of ours, yet Tune saved trials still RUNNING or PENDING: Tune's own graceful stop,
      SIGUSR1 (which Ray installs for that, and which e.g. SLURM's --signal=USR1 sends before a job's time
      limit), used to be reported as the search's end, with a summary and its Optuna trials closed.
    """
    saved = _saved_trial_states(plan)
    if stop.signum is not None:
        interrupted = not _all_trials_ended(grid, plan, searcher, saved)
    else:
        interrupted = any(isinstance(v, dict) and v.get("status") in ("RUNNING", "PENDING", "PAUSED")
                          for v in (saved or {}).values())
    return interrupted and not _budget_markers(plan)[0]  # (the markers last: a request per trial on s3://)


def _saved_trial_states(plan: Plan) -> dict[str, Any] | None:
    """Tune's last saved trial states (None where none can be read)."""
    from tune_gpt.report import saved_trial_states

    return saved_trial_states(experiment_uri(plan) if "://" in plan.opts.storage_path else plan.experiment_dir) or None


# ------------------------------------------------------------ interruption


@dataclass
class _StopRequest:
    signum: int | None = None


def _exit_code(signum: int | None) -> int:
    return 128 + (signum or signal.SIGINT)


@contextlib.contextmanager
def _stop_on_signals(stop: _StopRequest, plan: Plan):
    """SIGINT/SIGTERM while Tune runs: the first stops the trials and saves the state (Tune's own
    graceful stop); a second one quits at once. Only in the main thread (signals go there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    tune_usr1_before = signal.getsignal(signal.SIGUSR1)

    def handler(signum, frame):
        if stop.signum is None:
            stop.signum = signum
            graceful = signal.getsignal(signal.SIGUSR1)
            if callable(graceful) and graceful is not tune_usr1_before:
                print(f"\ntune_gpt.search: {signal.Signals(signum).name}: stopping the trials and saving the "
                      "search state (send it again to quit at once)", file=sys.stderr, flush=True)
                graceful(signum, frame)  # Tune's handler: ends the run loop, saves, returns from fit()
                return
        raise KeyboardInterrupt

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    env_before = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # ours stands in front of Tune's (see handler)
    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        if env_before is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = env_before


def _resume_hint(plan: Plan) -> str:
    """What to type to continue an interrupted search."""
    remote = "://" in plan.opts.storage_path
    where = experiment_uri(plan) if remote else str(plan.experiment_dir)
    if not ((plan.opts.resume or plan.written) if remote else (plan.experiment_dir / EXPERIMENT_FILE).is_file()):
        return "the search had not started; nothing was saved"
    argv0 = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    if argv0 in ("search.py", "__main__.py") or argv0.startswith("tune_gpt"):
        cmd = resume_command("tune_gpt.search", sys.argv[1:])
    else:
        cmd = "run_search() again with resume=True and the same options"
    return f"the search state is saved in {where}; resume it with: {cmd}"


def _can_restore(plan: Plan) -> bool:
    """Ray saved a state to resume from: its tuner.pkl and at least one experiment_state file."""
    import pyarrow.fs as pafs

    try:
        fs, path = _experiment_fs(plan)
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except (OSError, ValueError):
        return False
    names = {Path(i.path).name for i in infos}
    return "tuner.pkl" in names and any(n.startswith("experiment_state") and n.endswith(".json") for n in names)


def _experiment_fs(plan: Plan) -> tuple[Any, str]:
    """The pyarrow filesystem and path of `plan`'s experiment folder: the storage URI's, or the local disk's."""
    import pyarrow.fs as pafs

    if "://" in plan.opts.storage_path:
        return pafs.FileSystem.from_uri(experiment_uri(plan))
    return pafs.LocalFileSystem(), str(plan.experiment_dir)


def _check_searcher_space(plan: Plan, param_space: dict[str, Any]) -> None:
    """Let the searcher read the space now, so that it cannot fail after the experiment folder exists."""
    if plan.searcher != "optuna":
        return
    from ray.tune.search.optuna import OptunaSearch

    try:
        OptunaSearch.convert_search_space(param_space)
    except (ValueError, TypeError, NotImplementedError) as exc:
        raise ConfigError(f"{plan.space.source}: Optuna cannot search this space ({_one_line(exc)}); "
                          "use --search random") from None


def _check_optuna_storage(url: str, name: str, resume: bool) -> None:
    """The storage opens, and a new search does not add its trials to an earlier search's study.

    The study is named after the experiment (``--name``); Optuna would load an existing one, and
    its trials would steer TPE and be proposed again as if this search had run them."""
    try:
        import optuna

        storage = optuna.storages.get_storage(url)
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy raises many kinds
        raise ConfigError(f"--optuna-storage {redact(url)}: cannot open it ({redact(_one_line(exc))})") from None
    if resume:
        return
    try:
        n = len(storage.get_all_trials(storage.get_study_id_from_name(name), deepcopy=False))
    except KeyError:  # no such study: this search creates it
        return
    if n:
        raise ConfigError(
            f"--optuna-storage {redact(url)}: study {name!r} already holds {n} trial(s) of an earlier search named"
            f" {name!r}; give another --name, --resume that search, or delete the study"
            f" (optuna delete-study --study-name {shlex.quote(name)} --storage {shlex.quote(redact(url))})")


def _init_ray(opts: SearchOptions) -> bool:
    """Start a local Ray, or join ``--address``; nothing when this process already has Ray. True where this
    started a cluster (`_local_cluster`)."""
    import ray

    if ray.is_initialized():
        return False
    local = _local_cluster(opts.address)  # what a new cluster gets; nothing for one that is joined
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": opts.verbose > 1,
                              "configure_logging": True, "logging_level": "WARNING"}
    # The driver's C++ failure-signal handler (Abseil) also takes SIGTERM once its core worker starts and,
    # having handed it on, made the process abort at exit (-6) after the search had stopped cleanly (2 of
    # 6 SIGTERMs late in ray.init, Ray 2.60). The search handles SIGTERM itself, so this process goes
    # without it: Ray's own switch (RAY_DISABLE_FAILURE_SIGNAL_HANDLER), for the driver only; the workers
    # keep theirs, and with them the C++ stack of a crash in a trial.
    try:
        from ray._private import ray_constants
    except ImportError:  # a Ray that moved it: its handler stays, and the search still runs
        pass
    else:
        ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True
    if opts.address:
        _check_address_answers(opts.address)
    with _signals_held_during_ray_start(), _ray_daemons_in_their_own_session(), \
            _filtered("ray._private.authentication.authentication_token_setup", _NotTheDefaultTokenNotice()):
        # (--address local starts a cluster too)
        if opts.address:
            auth_errors = tuple(filter(None, [getattr(ray.exceptions, "AuthenticationError", None)]))  # Ray >= 2.52
            try:
                ray.init(address=opts.address, **kwargs, **local)
            except (ConnectionError, *auth_errors) as exc:
                token = ("export RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN=<the head's "
                         "~/.ray/auth_token>, or copy that file here); see the README's Scaling out section")
                chain = [exc, exc.__cause__, exc.__context__]
                refused = any(isinstance(e, auth_errors) or "InvalidAuthToken" in str(e) for e in chain)
                if refused:
                    raise ConfigError(f"--address {opts.address}: the cluster refused this driver's token; "
                                      f"{token}") from None
                raise ConfigError(f"--address {opts.address}: cannot join the Ray cluster ({_one_line(exc)}); "
                                  f"check the address, and for token authentication (Ray's default) {token}") from None
        else:
            ray.init(**kwargs, **local)
    return bool(local)


def _shutdown_ray() -> None:
    """ray.shutdown(), without a second spent waiting for the autoscaler's monitor of a cluster started here.

    Ray stops its processes one by one, each with SIGTERM and up to a second's wait, and the GCS before the
    monitor: the monitor's SIGTERM handler then tries to tell the GCS that it failed, and is killed when its
    second is up. Every search paid that second at its end (ray.shutdown 1.32 s, 0.31 s without it; Ray
    2.60). The monitor keeps nothing the search needs (it reports the cluster's load for `ray status` and
    the autoscaler), so it goes first, with SIGKILL."""
    import ray

    try:
        from ray._private import ray_constants, worker

        node = worker._global_node
        monitors = node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, []) if node and node.head else []
        for info in monitors:
            info.process.kill()
            info.process.wait(timeout=1)
    except Exception:  # noqa: BLE001 - another Ray, a start that failed part-way: Ray's own shutdown alone
        pass
    ray.shutdown()


# A local cluster the search starts runs its trials at the priority of everything else. Ray's default nices
# its workers (15), so that on a shared node its own processes stay responsive: then every wake-up of the
# driver's Tune loop or of a Ray daemon (nice 0) preempts a trial's training threads at once, and on a
# machine with few cores a preempted OpenMP thread holds up its partner at the next barrier. One-trial
# searches of 1,000 steps on 2 cores: search/direct 1.13, 1.04, 1.05 at niceness 0 against 1.15, 1.11, 1.11
# (docs/BENCHMARKS.md, 2026-12-01). A cluster joined with --address keeps its own setting.
_LOCAL_CLUSTER = {"_system_config": {"worker_niceness": 0}}


def _local_cluster(address: str | None) -> dict[str, Any]:
    """`_LOCAL_CLUSTER` where ray.init will start a cluster, else nothing: without --address Ray joins one
    that RAY_ADDRESS or a `ray start` on this machine names, and refuses a _system_config there."""
    try:
        from ray._private.services import canonicalize_bootstrap_address

        starts = canonicalize_bootstrap_address(address) is None  # None, "auto", "local"; RAY_ADDRESS too
    except Exception:  # noqa: BLE001 - ray://, a Ray without it: Ray's defaults
        starts = False
    return _LOCAL_CLUSTER if starts else {}


@contextlib.contextmanager
def _trials_inherit_the_environment():
    """In a cluster this process started, Tune creates its trial actors without a runtime env.

    Tune gives every trial actor ``runtime_env={"env_vars": {...}}``: ``PL_DISABLE_FORK`` (for PyTorch
    Lightning) and, where they are set, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/session tokens and a
    few Train settings (``ray.tune.execution.class_cache``). Ray's runtime-env agent writes each runtime env it
    creates into its log (``runtime_env_agent.log``, world-readable under the default umask): the AWS secret
    of a search with S3 storage landed there. And a trial with a runtime env of its own cannot use the
    workers Ray prestarted, so it waited for a new one. A cluster started here has this process's
    environment in every worker already, so nothing needs carrying."""
    try:
        from ray.tune.execution import class_cache

        defaults, carried = class_cache.DEFAULT_ENV_VARS, class_cache.ENV_VARS_TO_PROPAGATE
        saved = dict(defaults), set(carried)
        defaults.clear()
        carried.clear()
    except (ImportError, AttributeError, TypeError):  # another Ray: Tune as it is
        yield
        return
    try:
        yield
    finally:
        defaults.clear()
        defaults.update(saved[0])
        carried.clear()
        carried.update(saved[1])


def _local_gpus(opts: SearchOptions) -> bool:
    """Whether the trials' GPUs are this machine's: no --address, or --address local (a new local cluster)."""
    return not opts.address or opts.address == "local"


def _check_address_answers(address: str, timeout_s: float = 10.0) -> None:
    """--address HOST:PORT (or ray://HOST:PORT) where nothing listens: one line at once. ray.init itself
    waits for a GCS that never comes, and did not give up within minutes (Ray 2.60)."""
    host_port = address.removeprefix("ray://")
    if address in ("auto", "local") or "://" in host_port or ":" not in host_port:
        return  # Ray finds or starts the cluster itself, and says what is wrong
    host, _, port = host_port.rpartition(":")
    if not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        why = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__).lower()
        raise ConfigError(f"--address {address}: nothing answers there ({why}); give the head node's address "
                          f"(`ray start --head` prints it; the GCS port is 6379 unless set)") from None


@contextlib.contextmanager
def _ray_daemons_in_their_own_session():
    """Start each of the local Ray's daemons (GCS, raylet and the rest; the trial workers and raylet's
    agents are raylet's children) in a session of its own, so that a signal sent to the driver's whole
    process group (`timeout`, ``kill -TERM -<pgid>``, a CI runner cancelling a job) reaches the driver
    alone: it stops the search as for any SIGTERM, saves it and shuts its Ray down. In the driver's
    group, the daemons died of that signal at once, and the driver waited for the GCS and exited 1
    without a resume line. They still die with the driver: Ray makes each one die with its parent
    through Linux's kernel fate-sharing (PR_SET_PDEATHSIG), which does not depend on the group. Without
    it (not Linux) Ray's reaper relies on the group, which then stays. Ray does the same on Windows
    (a new process group where it has kernel fate-sharing). Connecting to a running cluster starts no
    process, and is unaffected."""
    popen = None
    try:
        import ray._private.services as services
        from ray._private.utils import detect_fate_sharing_support
    except ImportError:  # a Ray that moved them: the daemons stay in the driver's group
        pass
    else:
        if sys.platform.startswith("linux") and detect_fate_sharing_support():
            popen = getattr(services, "ConsolePopen", None)
    if popen is None:
        yield
        return

    class OwnSession(popen):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("start_new_session", True)
            super().__init__(*args, **kwargs)

    services.ConsolePopen = OwnSession
    try:
        yield
    finally:
        services.ConsolePopen = popen


@contextlib.contextmanager
def _signals_held_during_ray_start():
    """A Ctrl+C or SIGTERM must not cut ray.init short: raised inside it, it leaves Ray's core worker half
    made and the process aborts at exit (SIGABRT / SIGSEGV with Ray 2.60, after the resume hint was
    printed). Such a signal waits until ray.init returns, then goes to the handler that was in place
    (the search's: stop, with the resume hint); a second one while waiting quits at once. ray.init's own
    SIGTERM handler (``sys.exit(15)``, set first thing) is kept out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    try:
        import ray._private.utils as ray_utils
    except ImportError:  # a Ray that moved it: its SIGTERM handler may come back, the rest holds
        ray_utils = None
    held: list[int] = []
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def hold(signum, frame):  # noqa: ANN001 - a signal handler
        if held:  # the user insists: the handler in place before, at once
            handler = before[signum]
            if callable(handler):
                handler(signum, frame)
            raise KeyboardInterrupt
        held.append(signum)

    for s in before:
        signal.signal(s, hold)
    ray_sets = getattr(ray_utils, "set_sigterm_handler", None)
    if ray_sets is not None:
        ray_utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        if ray_sets is not None:
            ray_utils.set_sigterm_handler = ray_sets
        for s, h in before.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        if held:  # now, to the handler in place before (it wins over an error ray.init raised meanwhile)
            signal.raise_signal(held[0])


def _check_local_gpu(opts: SearchOptions) -> None:
    """Before starting a local Ray: no CUDA GPU here means a GPU request can never be granted."""
    import ray

    if ray.is_initialized():
        return  # an existing Ray session may declare (logical) GPUs; _check_gpus decides
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(
            f"--gpus-per-trial {opts.gpus_per_trial:g}: no CUDA GPU is visible on this machine; "
            "use --gpus-per-trial 0 to train on the CPU, or --address to join a cluster with GPUs"
        )


def _check_objective_here(plan: Plan) -> None:
    """On this machine's GPU, a GPU-only objective must be there to report: mfu needs a known peak for the
    GPU and precision, gpu/util needs NVML. Found by the first trial instead, every trial would train to
    its first evaluation and error (each retried --max-failures times). (On a cluster: each trial says so.)"""
    if plan.metric not in ("mfu", "gpu/util"):
        return
    import torch

    if not torch.cuda.is_available():
        return  # an existing Ray session's logical GPUs: the trials decide
    from tune_gpt.train import peak_flops

    device = torch.device("cuda", 0)
    cfg = plan.base_cfg
    if plan.metric == "mfu" and peak_flops(device, cfg.precision, cfg.matmul_precision) is None:
        raise ConfigError(f"metric mfu: no peak FLOPs figure for {torch.cuda.get_device_name(device)} in "
                          f"{cfg.precision} (matmul {cfg.matmul_precision}): the trials could not report it; "
                          "use val/loss, or --precision bf16")
    if plan.metric == "gpu/util":
        try:
            torch.cuda.utilization(device)
        except Exception as exc:  # noqa: BLE001 - no NVML
            raise ConfigError(f"metric gpu/util: GPU utilisation cannot be read here ({type(exc).__name__}); "
                              "pip install nvidia-ml-py, or use val/loss") from None


def _check_gpus(opts: SearchOptions) -> None:
    """A GPU request Ray cannot grant fails now, instead of leaving trials PENDING forever; a cluster of
    several nodes with results in a local folder is warned of."""
    import ray

    have_gpu = ray.cluster_resources().get("GPU", 0.0)
    have_cpu = ray.cluster_resources().get("CPU", 0.0)
    if opts.gpus_per_trial > 0 and have_gpu < opts.gpus_per_trial:
        raise ConfigError(
            f"--gpus-per-trial {opts.gpus_per_trial:g}: the Ray cluster has {have_gpu:g} GPUs "
            "(no CUDA GPU visible here); use --gpus-per-trial 0 to train on the CPU"
        )
    if have_cpu < opts.cpus_per_trial:
        raise ConfigError(f"--cpus-per-trial {opts.cpus_per_trial:g}: the Ray cluster has only {have_cpu:g} CPUs")
    # A trial's CPUs and GPU share come from one node: totals over the cluster are not enough.
    nodes = [n.get("Resources") or {} for n in ray.nodes() if n.get("Alive")]
    if nodes and not any(r.get("CPU", 0.0) >= opts.cpus_per_trial and r.get("GPU", 0.0) >= opts.gpus_per_trial
                         for r in nodes):
        sizes = ", ".join(sorted({f"{r.get('CPU', 0.0):g} CPUs + {r.get('GPU', 0.0):g} GPUs" for r in nodes}))
        raise ConfigError(f"--cpus-per-trial {opts.cpus_per_trial:g} --gpus-per-trial {opts.gpus_per_trial:g}: no node "
                          f"of the Ray cluster has both (its nodes: {sizes}); a trial runs on one node")
    if len(nodes) > 1 and "://" not in opts.storage_path:
        warnings.warn(f"the Ray cluster has {len(nodes)} nodes and --storage-path {opts.storage_path} is a local path: "
                      "trials on other nodes fail at their first checkpoint unless every node sees that folder "
                      "(a shared file system); else use --storage-path s3://... or gs://...")


def _tune_config(plan: Plan):
    from ray import tune

    opts = plan.opts
    search_alg = None
    if plan.searcher == "optuna":
        import optuna

        from tune_gpt._searchers import UniqueOptunaSearch

        sampler = optuna.samplers.TPESampler(seed=opts.seed, multivariate=True, n_startup_trials=max(2, min(10, plan.num_samples // 3)))
        kwargs: dict[str, Any] = {}
        if opts.optuna_storage:  # Ray's OptunaSearch takes a storage object, not its URL
            kwargs["storage"] = optuna.storages.get_storage(opts.optuna_storage)
            kwargs["study_name"] = plan.name
        search_alg = UniqueOptunaSearch(metric=plan.metric, mode=plan.mode, sampler=sampler, experiment=_study_tag(plan),
                                        points_to_evaluate=[plan.space.baseline()] if plan.space.domains else None, **kwargs)
    max_concurrent = opts.max_concurrent
    if plan.scheduler.get("pause") and max_concurrent is not None:  # only a resume adopts pause with it: before
        # Ray saved any state, the search starts afresh (restored, it keeps its own settings and ignores the flag)
        raise ConfigError("--max-concurrent: the search was started with ASHA's promotion form, which pauses "
                          "trials at its rungs, and a paused trial would count as running for ever; resume it "
                          "without --max-concurrent")
    if search_alg is not None and max_concurrent:
        from tune_gpt._searchers import TellingLimiter

        search_alg, max_concurrent = TellingLimiter(search_alg, max_concurrent=max_concurrent), None
    if search_alg is None:  # random and grid: Tune's generator, seeded so that --seed repeats a random search
        from tune_gpt._searchers import CappedVariantGenerator

        search_alg = CappedVariantGenerator(max_concurrent=opts.max_concurrent or 0, random_state=opts.seed,
                                            cap=plan.grid_cap)
        max_concurrent = None  # the generator applies it (Tune would ignore it, with a warning)
    return tune.TuneConfig(
        metric=plan.metric, mode=plan.mode, search_alg=search_alg, scheduler=_scheduler(plan),
        num_samples=plan.num_samples, max_concurrent_trials=max_concurrent,
        time_budget_s=opts.time_budget, trial_dirname_creator=trial_dirname, trial_name_creator=trial_dirname,
        reuse_actors=True,  # a worker imports torch once, not once per trial
    )


def trial_dirname(trial: Any) -> str:
    """Short trial folder names (Ray's default packs every parameter into the name)."""
    return f"trial_{trial.trial_id}"


def _scheduler(plan: Plan):
    s = plan.scheduler
    kind = s.get("type", "asha")
    if kind == "asha":
        from ray.tune.schedulers import ASHAScheduler

        max_t = int(s.get("max_t") or plan.max_evals)
        common = {"time_attr": "training_iteration", "max_t": max_t,
                  "grace_period": int(min(s.get("grace_period", GRACE_PERIOD["asha"]), max_t)),
                  "reduction_factor": float(s.get("reduction_factor", 3)),
                  "stop_last_trials": bool(s.get("stop_last_trials", True))}  # False: W&B's max_iter
        # a W&B sweep's brackets where Ray's rungs would not be them: min_iter with a fractional eta (its brackets
        # int(min_iter * eta^k); Ray's fractional rungs judge a trial at the report after each), and max_iter
        # where it is no multiple of eta^s (`rungs`, W&B's int(max_iter / eta^k))
        rungs = None
        if s.get("whole_rungs"):
            rungs = hyperband_brackets(common["grace_period"], common["reduction_factor"], max_t)
        elif s.get("rungs"):
            rungs = [r for r in s["rungs"] if r < max_t]
        if s.get("pause"):
            from tune_gpt._schedulers import PromotingASHA

            return PromotingASHA(metric=plan.metric, mode=plan.mode, rungs=rungs, **common)
        asha = ASHAScheduler(brackets=int(s.get("brackets", 1)), **common)
        bracket = (getattr(asha, "_brackets", None) or [None])[0]
        if rungs is not None and isinstance(getattr(bracket, "_rungs", None), list):  # (Ray's private state: a
            bracket._rungs = [(rung, {}) for rung in reversed(rungs)]  # Ray without it keeps its own rungs)
        return asha
    if kind == "median":
        from ray.tune.schedulers import MedianStoppingRule

        return MedianStoppingRule(time_attr="training_iteration",
                                  grace_period=float(s.get("grace_period", GRACE_PERIOD["median"])),
                                  min_samples_required=int(s.get("min_samples_required", 3)))
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler()


def _run_config(plan: Plan):
    from ray import tune

    from tune_gpt._tune_callbacks import KeepTrialResults, MarkTimeBudgetStops, TrialResultsJson, TrialTensorBoard

    opts = plan.opts
    callbacks: list[Any] = [KeepTrialResults()]  # a retried trial keeps every row of its history
    try:
        callbacks.append(TrialTensorBoard())  # instead of Tune's, which loads torch in the driver
    except ImportError:
        warnings.warn("tensorboard is not installed: no TensorBoard events for the trials (pip install tensorboard)")
    wandb = wandb_callback(plan) if opts.wandb else None
    result_loggers: list[Any] = [TrialResultsJson()]  # instead of Tune's: keeps a restarted trial's rows
    if opts.time_budget:  # trials still running when it runs out: out-of-time, not early-stopped
        from ray.tune.logger import CSVLoggerCallback

        # the progress.csv writer made here too (Tune then adds none), so that both close the files of the
        # trials the budget stops (else: ResourceWarnings at exit)
        result_loggers.insert(0, CSVLoggerCallback())
        loggers = callbacks[1:] + ([wandb] if wandb is not None else []) + result_loggers
        callbacks.append(MarkTimeBudgetStops(opts.time_budget, loggers=loggers))
    if wandb is not None:
        callbacks.append(wandb)
    callbacks += result_loggers  # where Tune would have put them: after the others
    return tune.RunConfig(
        name=plan.name,
        storage_path=_storage_uri(opts.storage_path),
        callbacks=callbacks,
        failure_config=tune.FailureConfig(max_failures=opts.max_failures),
        checkpoint_config=tune.CheckpointConfig(
            num_to_keep=2, checkpoint_score_attribute=plan.metric, checkpoint_score_order=plan.mode,
        ),
        verbose=1 if opts.verbose else 0,
        progress_reporter=_progress_reporter(plan),
    )


def _progress_reporter(plan: Plan):
    from tune_gpt._tune_callbacks import TrialTable

    return TrialTable(
        parameter_columns=list(plan.space.domains) or None,
        metric_columns={plan.metric: plan.metric, "step": "step", "training_iteration": "evals"},
        max_report_frequency=30, print_intermediate_tables=True, metric=plan.metric, mode=plan.mode,
    )


def _storage_uri(storage: str) -> str:
    return storage if "://" in storage else str(Path(storage).expanduser().resolve())


def wandb_callback(plan: Plan):
    """One W&B run per trial, grouped by experiment, its summary saying how the trial ended
    (``trial_status``); offline when no key is found."""
    from tune_gpt.tracking import wandb_available

    if not wandb_available():
        warnings.warn("wandb is not installed: trials are logged to TensorBoard only (pip install wandb)")
        return None
    mode = _wandb_mode(plan)
    if mode == "disabled":
        return None
    from tune_gpt._wandb_callback import TrialStatusWandb

    w = plan.base_cfg.wandb
    tags = [plan.base_cfg.model_size, "single-gpu", plan.space.name]
    if "model_size" in plan.space.domains:
        tags[0] = "mixed-sizes"
    extra: dict[str, Any] = {"entity": w.entity} if w.entity else {}
    local = "://" not in plan.opts.storage_path
    if local:
        # All trials' runs in <experiment>/wandb, written straight into the results (Ray's own
        # choice, the driver's staging folder, is synced before the last run is closed).
        (plan.experiment_dir / "wandb").mkdir(parents=True, exist_ok=True)
        extra["dir"] = str(plan.experiment_dir)
    cb = TrialStatusWandb(
        project=w.project, group=w.group or plan.name, log_config=True, upload_checkpoints=False,
        upload_timeout=30, tags=list(dict.fromkeys(tags)), mode=mode, job_type="trial",
        excludes=["wandb.enabled", "progress", "tensorboard", "checkpoint"], **extra,
    )
    where = f"{plan.experiment_dir}/wandb" if local else "<trial dir>/wandb"
    plan.notes.append(
        f"W&B {mode}: one run per trial in group {w.group or plan.name!r}"
        + (f"; upload later with: wandb sync {where}/offline-run-*" if mode == "offline" else "")
    )
    return cb


def _wandb_mode(plan: Plan) -> str:
    """online / offline / disabled for the trials' W&B runs (offline when no key or no reachable host)."""
    from tune_gpt.tracking import resolve_wandb_mode

    mode = resolve_wandb_mode(plan.base_cfg.wandb.mode)
    if mode == "offline":
        os.environ["WANDB_MODE"] = "offline"  # Ray's callback insists on a key unless W&B is offline
    return mode


def _space_json(space: SearchSpace) -> dict[str, Any]:
    """The space's domains as the experiment file keeps them (as JSON gives them back)."""
    return json.loads(json.dumps({k: _domain_json(d) for k, d in space.domains.items()}, default=str))


def _search_info(plan: Plan) -> dict[str, Any]:
    """What the experiment file says the search is (as JSON gives it back)."""
    info = {
        "name": plan.name, "metric": plan.metric, "mode": plan.mode, "space": _space_json(plan.space),
        "space_file": plan.space.source, "searcher": plan.searcher, "scheduler": plan.scheduler,
        "num_samples": plan.num_samples, "grid_cap": plan.grid_cap,
        "fixed": redact_flat(plan.fixed),  # a corpus URL's token: not kept
        "time_budget_s": plan.opts.time_budget, "max_concurrent": plan.opts.max_concurrent,
        "cpus_per_trial": plan.opts.cpus_per_trial, "gpus_per_trial": plan.opts.gpus_per_trial,
    }
    return json.loads(json.dumps(info, default=str))


def _study_tag(plan: Plan) -> str:
    """Which search an Optuna trial belongs to (its ``tune_experiment`` attribute): the experiment, no secret."""
    return redact(experiment_id(plan))


def _write_experiment_file(plan: Plan) -> None:
    # what the file keeps of the command line, for --resume and the report, holds no password or token
    argv = [redact(a) for a in (plan.opts.cli_argv if plan.opts.cli_argv is not None else sys.argv[1:])]
    info = {
        **_search_info(plan),
        "command": " ".join(shlex.quote(a) for a in ["python", "-m", "tune_gpt.search", *argv]),
        **({"argv": argv} if plan.opts.cli_argv is not None else {}),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    text = json.dumps(info, indent=2, default=str)
    # (whole or not at all: a --resume rewrites it, and a search killed then must still resume)
    write_storage_file(*_experiment_fs(plan), EXPERIMENT_FILE, text)
    plan.written = True


def experiment_id(plan: Plan) -> str:
    """Where the experiment lives, as an absolute path or a URI: the same for a search and its --resume."""
    return _experiment_location(plan.opts.storage_path, plan.name)


def _experiment_location(storage: str, name: str) -> str:
    """`experiment_id` from the storage path and the name alone (before there is a plan)."""
    return _uri_join(storage, name) if "://" in storage else str((Path(storage).expanduser() / name).resolve())


def experiment_uri(plan: Plan) -> str:
    """``<storage URI>/<name>``, keeping a query string (``?endpoint_override=…``) at the end."""
    return _uri_join(plan.opts.storage_path, plan.name)


def _uri_join(storage: str, name: str) -> str:
    base, _, query = storage.partition("?")
    return f"{base.rstrip('/')}/{name}" + (f"?{query}" if query else "")


def _check_resumable(plan: Plan) -> dict[str, Any]:
    """--resume of a search its time budget ended is refused. Returns the experiment file's content.

    When the budget runs out Ray 2.60 marks the search's generator finished and the trials it stopped
    TERMINATED, and saves both: a resumed search would start nothing (it printed the old summary
    after a second). Errored trials are still re-run with ``--retry-errored``.
    """
    where = experiment_id(plan)
    ended, stopped = _budget_markers(plan)
    info = _read_experiment_file(plan)
    if (ended or stopped) and not plan.opts.retry_errored:
        from tune_gpt.report import replay_command

        raise ConfigError(
            f"--resume: the search {where} ended when its time budget ran out"
            f"{f' ({stopped} trial(s) out-of-time)' if stopped else ''} and "
            f"Ray cannot reopen it (only its errored trials, with --retry-errored); start another with --name NEW, "
            f"or replay its best trial: {replay_command(where, (info.get('fixed') or {}).get('data'))}")
    return info


def _budget_markers(plan: Plan) -> tuple[bool, int]:
    """(the search's time budget ended it, how many trials it stopped), from the markers the budget
    callback writes; (False, 0) when they cannot be read."""
    import pyarrow.fs as pafs

    from tune_gpt.report import STOPPED_FILE

    try:
        fs, path = pafs.FileSystem.from_uri(experiment_id(plan))
        dirs = [i.path for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
                if i.type == pafs.FileType.Directory]
        markers = fs.get_file_info([f"{d}/{STOPPED_FILE}" for d in [path, *dirs]])  # the search's, its trials'
    except (OSError, ValueError):
        return False, 0
    return markers[0].type == pafs.FileType.File, sum(m.type == pafs.FileType.File for m in markers[1:])


def _read_experiment_file(plan: Plan) -> dict[str, Any]:
    """The experiment file of `plan`'s experiment, local or in storage; {} when there is none to read."""
    return _read_experiment_file_at(plan.opts.storage_path, plan.name)


def _read_experiment_file_at(storage_path: str, name: str) -> dict[str, Any]:
    """The experiment file's content; {} where there is none (or storage cannot be reached: said later).
    One that is there but cannot be read is refused: read as missing, --resume went on with the default
    space and corpus, and every interrupted trial ended errored on its checkpoint's other corpus."""
    import pyarrow.fs as pafs

    location = _experiment_location(storage_path, name)
    try:
        fs, path = pafs.FileSystem.from_uri(location)
        info = fs.get_file_info(f"{path}/{EXPERIMENT_FILE}")
    except (OSError, ValueError):
        return {}
    if info.type == pafs.FileType.NotFound:
        return {}
    try:
        with fs.open_input_stream(f"{path}/{EXPERIMENT_FILE}") as f:
            saved: Any = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError) as exc:  # (a folder of that name, no permission; UnicodeDecodeError too)
        saved = exc
    if not isinstance(saved, dict):
        why = _one_line(saved) if isinstance(saved, Exception) else f"a JSON {type(saved).__name__}, not an object"
        raise ConfigError(f"{redact(_file_in(location, EXPERIMENT_FILE))}: cannot be read ({why}); it records how "
                          "the search was started: put it back (from a backup), or start another search with --name NEW")
    return saved


def _file_in(location: str, name: str) -> str:
    """``<experiment>/<name>``, for a URI before its ``?query`` (as the file is named on its storage)."""
    return _uri_join(location, name) if "://" in location else str(Path(location) / name)


def _in_experiment(plan: Plan, name: str) -> str:
    return redact(_file_in(experiment_id(plan), name))


def _as_started_by_its_own_method(plan: Plan, saved: dict[str, Any]) -> None:
    """A W&B sweep that --search read as the file's own method when the search began (before --search read
    it as its own method, 9c3d743): its `values` were saved as they were read then, which Ray restores. The
    plan takes that reading, with a note, rather than refusing the same flags as another search."""
    if plan.space.format != "wandb" or not plan.opts.search or "space" not in saved:
        return
    if _space_json(plan.space) == saved["space"]:
        return
    try:
        own = load_space(plan.space.source)
    except TuneGPTError:
        return
    _unsearch_overridden(own, plan.opts.overrides)
    if _space_json(own) != saved["space"]:
        return
    plan.space = own
    if plan.searcher != "grid":
        plan.n_trials = plan.num_samples * own.grid_size()  # as plan_search counts them
    plan.notes.append(f"{own.source}: read as its own method ({own.method}), as when this search began: Ray "
                      "resumes it so")


def _same_kept(saved: Any, now: Any) -> bool:
    """A value as the experiment file keeps it is the value given now: equal, or a URL whose secrets an
    older tune_gpt redacted more widely (``?sig=***`` for ``?sig=***;v=2``, ``?author=***``): each ``***`` it
    holds stands for any text."""
    if saved == now:
        return True
    if not (isinstance(saved, str) and isinstance(now, str) and REDACTED in saved):
        return False
    return re.fullmatch(".*?".join(re.escape(part) for part in saved.split(REDACTED)), now) is not None


def _check_same_search(plan: Plan, saved: dict[str, Any]) -> None:
    """--resume continues the search as it was started: Ray restores its trials, searcher and space, while
    the corpus and the plan come from this run's flags. A flag that changes what the search trains (a
    corpus, a model field, the steps, the space, the searcher...) is refused rather than mixed in: trials
    resumed on another corpus failed on their checkpoints, and new ones would not be comparable."""
    if not saved:
        return
    was = saved.get("scheduler")
    if isinstance(was, dict) and was.get("type") == "asha":
        if "pause" not in was:  # started before promotions were the default
            was = {**was, "pause": False}
            saved = {**saved, "scheduler": was}
        if not plan.pause_given and plan.scheduler.get("type") == "asha":
            plan.scheduler["pause"] = was["pause"]  # not asked for: the form it was started with (Ray restores it)
            plan.notes[:] = [n for n in plan.notes if not n.startswith("ASHA stops trials at its rungs")]
        dropped = [plan.scheduler.pop(k) for k in ("whole_rungs", "rungs")
                   if k in plan.scheduler and not {"whole_rungs", "rungs"} & set(was)]  # started before W&B's brackets
        if dropped:
            plan.notes.append("ASHA keeps the rungs the search was started with, grace_period * reduction_factor^k "
                              "(Ray restores its scheduler), not W&B's whole brackets")
    if plan.grid_cap is not None and "grid_cap" not in saved and saved.get("searcher") == "grid":
        plan.notes[:] = [n for n in plan.notes if not n.startswith(f"run_cap {plan.grid_cap}:")]
        plan.notes.append(f"run_cap {plan.grid_cap}: not applied; the search was started before run_cap capped a "
                          "grid, and every grid point runs")
        plan.grid_cap, plan.n_trials = None, plan.space.grid_size()
    _as_started_by_its_own_method(plan, saved)
    now = _search_info(plan)
    diffs = [f"{key} {now.get(key)!r} (started with {saved.get(key)!r})"
             for key in ("space", "searcher", "scheduler", "num_samples", "grid_cap", "metric", "mode")
             if key in saved and now.get(key) != saved.get(key)]

    def trained(fixed: Any) -> dict[str, Any]:  # what the trials train with, not how they run
        return {k: v for k, v in (fixed or {}).items() if k not in RUNTIME_KEYS and not k.startswith("wandb.")}

    # (an experiment file from before URLs were redacted holds the token: compared, and named, without it)
    before, after = trained(redact_flat(saved.get("fixed") or {})), trained(now["fixed"])
    diffs += [f"{k} {after.get(k, 'unset')!r} (started with {before.get(k, 'unset')!r})"
              for k in sorted(set(before) | set(after), key=str) if not _same_kept(before.get(k), after.get(k))]
    # Resources: Ray restores each trial's resource request and the space's thread count and GPU memory
    # share as they were, so other ones would reach new trials only, and a trial that asked for a GPU on a
    # machine that has none now would wait PENDING for ever.
    was = saved.get("fixed") or {}
    given = {"--cpus-per-trial": plan.opts.cpus_per_trial, "--gpus-per-trial": plan.opts.gpus_per_trial}
    if "cpus_per_trial" in saved:  # the requests themselves (2.4 CPUs is not 2, though both give 2 threads)
        had = {"--cpus-per-trial": saved.get("cpus_per_trial"), "--gpus-per-trial": saved.get("gpus_per_trial") or 0}
        diffs += [f"{flag} {given[flag]:g} (started with {had[flag]:g})" for flag in had
                  if isinstance(had[flag], (int, float)) and had[flag] != given[flag]]
    elif "num_threads" in was:  # an experiment file from before the requests were recorded
        had = {"--cpus-per-trial": was.get("num_threads"), "--gpus-per-trial": was.get("gpu_memory_fraction") or 0}
        asked = {"--cpus-per-trial": now["fixed"].get("num_threads"),
                 "--gpus-per-trial": now["fixed"].get("gpu_memory_fraction") or 0}
        diffs += [f"{flag} {given[flag]:g} (started with {had[flag]:g})" for flag in had if had[flag] != asked[flag]]
    if diffs:
        argv = saved.get("argv")
        started = (f" (python -m tune_gpt.search {' '.join(shlex.quote(a) for a in argv)} --resume)"
                   if isinstance(argv, list) and all(isinstance(a, str) for a in argv) else "")
        raise ConfigError(f"--resume: {'; '.join(diffs)}: a search resumes as it was started{started}; give the "
                          f"same flags, or start another search with --name NEW")


def _warn_budget_not_applied(plan: Plan, info: dict[str, Any]) -> None:
    """Ray restores a resumed search's own TuneConfig: say so when --time-budget asks for another budget, or
    --max-concurrent for another limit."""
    started = info.get("time_budget_s", "not recorded")
    if plan.opts.time_budget is not None and started != plan.opts.time_budget:
        had = "none" if started is None else f"{started:g} s" if isinstance(started, (int, float)) else started
        warnings.warn(f"--time-budget {plan.opts.time_budget:g} is not applied to a resumed search: Ray restores the "
                      f"search's own settings, so each run of it has the budget it was started with ({had})")
    limit = plan.opts.max_concurrent
    if limit is not None and "max_concurrent" in info and limit != info["max_concurrent"]:  # (recorded since 2026-11-30)
        had = "none" if info["max_concurrent"] is None else info["max_concurrent"]
        warnings.warn(f"--max-concurrent {limit} is not applied to a resumed "
                      f"search: Ray restores the search's own settings, so it runs with the limit it was started "
                      f"with ({had})")


def _check_remote_experiment(plan: Plan) -> None:
    """The URI twin of the local checks: --resume needs the experiment, a new search must not reuse one."""
    import pyarrow.fs as pafs

    uri = experiment_uri(plan)
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
        found = fs.get_file_info(f"{path}/{EXPERIMENT_FILE}").type == pafs.FileType.File
        used = found or bool(fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--storage-path: cannot reach {uri}: {' '.join(str(exc).split())}") from None
    if plan.opts.resume and not found:
        raise ConfigError(f"--resume: no experiment to resume at {uri}")
    if not plan.opts.resume and used:
        raise ConfigError(f"--name: experiment {uri} already exists; pass --resume to continue it or --name NEW")


def _domain_json(d: Any) -> dict[str, Any]:
    if isinstance(d, Grid):
        return {"type": "grid", "values": list(d.values)}
    if isinstance(d, Choice):
        return {"type": "choice", "values": list(d.values)}
    if isinstance(d, Uniform):
        kind = ("log" if d.log else "") + ("randint" if d.integer else "uniform")
        return {"type": kind, "low": d.low, "high": d.high}
    return {"type": getattr(d, "kind", type(d).__name__.lower())}


def _summarise(plan: Plan, grid: Any, elapsed: float) -> SearchOutcome:
    remote = "://" in plan.opts.storage_path
    exp_dir = experiment_uri(plan) if remote else Path(grid.experiment_path)
    df = grid.get_dataframe()
    n_err = grid.num_errors
    trials_csv = None if remote else exp_dir / "trials.csv"
    table = None  # the report's trials table: how each trial ended, and the ranking `replay` follows
    if plan.opts.report:
        try:
            from tune_gpt.report import write_report

            out = write_report(exp_dir)  # a URI: read through a temporary copy, written to ./tune_reports/<name>
            trials_csv = Path(out) / "trials.csv"
            table = _read_table(trials_csv)
        except Exception as exc:  # noqa: BLE001 - a search that ran still ends with its summary and replay line
            why = str(exc) if isinstance(exc, (ImportError, TuneGPTError)) else _one_line(exc)
            print(f"report not written: {why}", file=sys.stderr)
            if trials_csv is not None:
                df.to_csv(trials_csv, index=False)
    elif trials_csv is not None:
        df.to_csv(trials_csv, index=False)
    if table is None and not remote:
        table = _read_table(exp_dir)
    best_cfg, best_val, top = _best_from_table(plan, grid, table) if table is not None else _best_from_tune(plan, grid)
    from tune_gpt.report import replay_command

    replay = replay_command(exp_dir, redact(plan.base_cfg.data or "")) if best_cfg is not None else None
    statuses = [str(s) for s in table["status"].fillna("unknown")] if table is not None else None
    # trials that ended before their first report count too (Tune's DataFrame leaves them out; the report
    # and the ResultGrid have them)
    n_trials = len(statuses) if statuses is not None else len(grid)
    # trials Tune made but never started (the time budget ran out first): in Ray's table, not in the report's
    never = max(len(grid) - n_trials, 0) if statuses is not None else 0
    if plan.opts.summary:
        _print_summary(plan, df, top, best_cfg, best_val, exp_dir, trials_csv, replay, elapsed, n_trials, n_err,
                       statuses, never_started=never)
    return SearchOutcome(exp_dir, best_cfg, best_val, n_trials, n_err, trials_csv, replay)


def _read_table(source: Path) -> Any:
    """The report's trials table: its trials.csv (just written), or read from the experiment folder.
    None when it cannot be had: the summary then falls back on Tune's own view."""
    try:
        import pandas as pd

        from tune_gpt.report import load_results

        if source.suffix == ".csv":
            return pd.read_csv(source, dtype={"trial_id": str})
        return load_results(source)
    except Exception as exc:  # noqa: BLE001 - only the summary depends on it: never let it fail a search that ran
        print(f"tune_gpt.search: cannot read the trials table ({' '.join(str(exc).split())[:200]}); the best "
              f"trial below is Tune's pick, which replay may not follow", file=sys.stderr)
        return None


def _best_from_table(plan: Plan, grid: Any, table: Any) -> tuple[dict | None, float | None, list]:
    """The best trial as the report ranks it, which is the trial `replay` replays: the best value each trial
    reported, among trials that did not diverge, run out of memory or error (Tune's own pick, by the best
    value over each trial's reports, could name a trial that reported well and then diverged). Returns its
    config, its value and the top ranked rows (trial id, best value, steps, status)."""
    from tune_gpt.report import _metric_column

    col = _metric_column(plan.metric, plan.mode)
    ranked = table[table["rank"].notna()].sort_values("rank") if "rank" in table and col in table else table.iloc[0:0]
    top = [(str(r["trial_id"]), float(r[col]), r.get("steps"), str(r.get("status"))) for _, r in ranked.head(5).iterrows()]
    if not top:
        return None, None, top
    best = {_result_trial_id(r): r.config for r in grid}.get(top[0][0])
    if best is None:  # not among Tune's results (a folder left by an earlier start): its params, as replay reads them
        try:
            best = json.loads((Path(str(ranked.iloc[0]["trial_dir"])) / "params.json").read_text())
        except (OSError, ValueError, KeyError):
            return None, None, top
    return dict(best), top[0][1], top


def _result_trial_id(result: Any) -> str | None:
    tid = (result.metrics or {}).get("trial_id")
    if tid is None and getattr(result, "path", None):
        tid = str(result.path).rstrip("/").rsplit("/", 1)[-1].removeprefix("trial_")
    return None if tid is None else str(tid)


def _best_from_tune(plan: Plan, grid: Any) -> tuple[dict | None, float | None, list]:
    """Tune's pick (when the report's table cannot be read): the best value over each trial's reports,
    leaving out trials that errored or whose last report is not finite (diverged, out of memory)."""
    from tune_gpt.report import _finite as _is_finite

    best_cfg = best_val = None
    for r in grid:
        frame = r.metrics_dataframe
        last = (r.metrics or {}).get(plan.metric)
        if r.error is not None or frame is None or plan.metric not in frame or not _is_finite(last):
            continue
        col = frame[plan.metric][frame[plan.metric].map(_is_finite)]
        value = float(col.min() if plan.mode == "min" else col.max())
        if best_val is None or (value < best_val if plan.mode == "min" else value > best_val):
            best_cfg, best_val = dict(r.config), value
    return best_cfg, best_val, []


def _print_summary(plan, df, top, best_cfg, best_val, exp_dir, trials_csv, replay, elapsed, n_trials, n_err,
                   statuses=None, never_started: int = 0) -> None:
    metric = plan.metric
    searched = list(plan.space.domains)
    counts = _status_counts(exp_dir, statuses)
    ended = f"{counts}" if counts else f"{n_err} errored"
    if never_started:
        ended += f"; {never_started} more never started" + (", the time budget ran out first" if plan.opts.time_budget
                                                            else "")
    print(f"\n{n_trials} trials in {elapsed:.0f} s ({ended}); results in {exp_dir}")
    cols = [c for c in [f"config/{k}" for k in searched] if c in df.columns]
    if top and "trial_id" in df.columns:  # the report's ranking: the best value each trial reported
        by_id = {str(r["trial_id"]): r for _, r in df.iterrows()}
        header = ["trial", *[c.split("/", 1)[1] for c in cols], f"best {metric}", "steps", "status"]
        rows = [[tid, *[_short(by_id[tid][c]) if tid in by_id else "" for c in cols], _short(value),
                 _short(_int_or(steps)), status] for tid, value, steps, status in top]
        title = f"top trials (each by its best {metric}, ranked as the report and replay rank them):"
    elif metric in df.columns and len(df):
        top_df = df.sort_values(metric, ascending=plan.mode == "min").head(5)
        header = ["trial", *[c.split("/", 1)[1] for c in cols], metric, "step"]
        rows = [[str(r.get("trial_id", "")), *[_short(r[c]) for c in cols], _short(r[metric]),
                 _short(r.get("step", ""))] for _, r in top_df.iterrows()]
        title = "top trials (last reported values):"
    else:
        rows = []
    if rows:
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
        print(title)
        print("  " + "  ".join(h.ljust(w) for h, w in zip(header, widths)))
        for row in rows:
            print("  " + "  ".join(v.ljust(w) for v, w in zip(row, widths)))
    if best_cfg is not None:
        shown = {k: best_cfg[k] for k in searched if k in best_cfg}
        print(f"best {metric}: {best_val:.4f} with {json.dumps(shown)}")
    if trials_csv:
        print(f"trials table: {trials_csv}")
    print(f"TensorBoard: tensorboard --logdir {exp_dir}")
    if isinstance(exp_dir, Path) and (exp_dir / "wandb").is_dir() and any((exp_dir / "wandb").glob("offline-run-*")):
        print(f"W&B runs are offline; upload them with: wandb sync {exp_dir / 'wandb'}/offline-run-*")
    if replay:
        print(f"replay the best trial as a final run: {replay}")
    if best_cfg is None:
        print(_no_best(plan, statuses, n_trials, n_err), file=sys.stderr)


def _int_or(v: Any) -> Any:
    from tune_gpt.report import _finite

    if not _finite(v):
        return ""
    return int(v) if float(v).is_integer() else v


def _no_best(plan: Plan, statuses: list[str] | None, n_trials: int, n_err: int = 0) -> str:
    """The line a search with no best trial ends with (it exits 1): why there is nothing to replay.
    `statuses`: the report's, None without a report (then Tune's count of errors, `n_err`)."""
    line = f"no trial reported a finite {plan.metric}"
    seen = set(statuses) if statuses is not None else ({"errored"} if n_trials and n_err >= n_trials else set())
    if not n_trials:
        return f"{line}: no trial ran; nothing to replay"
    if seen and seen <= {"errored"}:
        return f"{line}: every trial errored (see the trials table and each trial's error.txt); nothing to replay"
    if seen and seen <= {"diverged", "oom", "errored"}:
        return (f"{line}: every trial diverged, ran out of memory or errored (see the trials table); "
                "nothing to replay")
    if "out-of-time" in seen and plan.opts.time_budget:
        return (f"{line} before the time budget ({plan.opts.time_budget:g} s) ran out; nothing to replay: "
                "give it a larger --time-budget, or evaluate sooner (eval_interval)")
    return f"{line}; nothing to replay"


def _status_counts(exp_dir: Any, statuses: list[str] | None = None) -> str:
    """"3 finished, 1 diverged": how the trials ended, as the report classifies them.

    The report's classification, not the trials' status files alone: a trial that ASHA stopped as the
    search ended has no status file (Ray ended its worker before the trial could write one). `statuses`:
    that classification already made (the report's trials.csv); otherwise the experiment is read.
    """
    if statuses is None and not isinstance(exp_dir, Path):
        return ""
    try:
        import pandas as pd

        from tune_gpt.report import STATUSES, load_results

        seen = (pd.Series(statuses) if statuses is not None else load_results(exp_dir)["status"]).value_counts()
    except Exception:  # noqa: BLE001 - only a summary line: never let it fail a search that ran
        return ""
    return ", ".join(f"{seen[k]} {k}" for k in (*STATUSES, *sorted(set(seen.index) - set(STATUSES))) if k in seen)


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# ----------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m tune_gpt.search", allow_abbrev=False,  # saved commands are replayed by --resume
                      description="Search GPT hyperparameters with Ray Tune + Optuna (ASHA early stopping).")
    p.add_argument("--space", help="search-space YAML (native or W&B sweep); default: search_spaces/default.yaml")
    p.add_argument("--name", help="experiment name (default: the space's name)")
    p.add_argument("--storage-path", "--storage_path", dest="storage_path", default="./tune_results",
                   help="results root: a directory or a URI (s3://, gs://) shared by the cluster's nodes")
    p.add_argument("--num-samples", "--num_samples", dest="num_samples", type=int, help="trials to run")
    p.add_argument("--search", choices=SEARCHERS, help="search algorithm (default: the space's method, else optuna)")
    p.add_argument("--scheduler", metavar="{asha,median,none}", help="early stopping (default: the space file's; else asha, or for a W&B sweep its "
                   "early_terminate, else none)")
    p.add_argument("--metric", help="objective (default: val/loss)")
    p.add_argument("--mode", choices=("min", "max"), help="default: min")
    p.add_argument("--grace-period", dest="grace_period", type=int, help="evaluations before ASHA may stop a trial")
    p.add_argument("--reduction-factor", dest="reduction_factor", type=float, help="ASHA's halving rate")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--pause-at-rungs", dest="pause_at_rungs", action="store_const", const=True,
                      help="ASHA's promotion form (the default, scheduler pause: true): a trial waits at each rung "
                           "until it is known to be in the rung's top 1/reduction-factor, and goes on from there")
    form.add_argument("--stop-at-rungs", dest="pause_at_rungs", action="store_const", const=False,
                      help="Ray's form of ASHA (scheduler pause: false): a trial reaching a rung goes on if it is in "
                           "the top 1/reduction-factor of the trials that reached it before, else it stops")
    p.add_argument("--cpus-per-trial", dest="cpus_per_trial", type=float, default=1.0,
                   help="CPUs per trial; also the trial's torch threads")
    p.add_argument("--gpus-per-trial", dest="gpus_per_trial", type=float, default=0.0,
                   help="GPU share per trial (0.25: four trials per GPU, each capped to a quarter of its memory)")
    p.add_argument("--max-concurrent", dest="max_concurrent", type=int, help="at most this many trials at once")
    p.add_argument("--time-budget", dest="time_budget", type=float, help="stop the search after this many seconds")
    p.add_argument("--max-failures", dest="max_failures", type=int, default=0,
                   help="retry a failing trial this many times from its last checkpoint")
    p.add_argument("--oom-retry", "--oom_retry", dest="oom_retry", action=argparse.BooleanOptionalAction,
                   default=False,  # --no-oom-retry: off again for a --resume of a search started with it
                   help="on CUDA out-of-memory, retry the trial from its last checkpoint with half the micro-batch "
                        "and twice the gradient accumulation (same effective batch), down to batch_size 1")
    p.add_argument("--resume", action="store_true", help="continue an interrupted experiment (same --name)")
    p.add_argument("--retry-errored", dest="retry_errored", action="store_true",
                   help="with --resume: re-run errored trials from their last checkpoint")
    p.add_argument("--address", help="join an existing Ray cluster (e.g. auto or HOST:6379) instead of starting one")
    p.add_argument("--optuna-storage", dest="optuna_storage",
                   help="keep the Optuna study in a database (sqlite:///study.db) for optuna-dashboard")
    p.add_argument("--seed", dest="search_seed", type=int, default=0, help="seed of the search algorithm")
    p.add_argument("--wandb", dest="use_wandb", action=argparse.BooleanOptionalAction, default=True,
                   help="a W&B run per trial (--no-wandb: none; --wandb: again, for a --resume of a --no-wandb search)")
    p.add_argument("--report", dest="report", action=argparse.BooleanOptionalAction, default=True,
                   help="write the report at the end (--no-report: do not; --report: again, for a --resume)")
    p.add_argument("--dry-run", dest="dry_run", action="store_true", help="print the resolved space and plan, run nothing")
    p.add_argument("-q", "--quiet", action="store_true", help="less output")
    add_config_flags(p, skip=("seed", "output_dir", "resume", "progress", "tensorboard", "checkpoint",
                              "num_threads", "gpu_memory_fraction", "wandb.enabled"))
    p.add_argument("--trial-seed", dest="seed", default=argparse.SUPPRESS, help="training seed of every trial")
    return p


def options_from_args(args: argparse.Namespace) -> SearchOptions:
    overrides = overrides_from_args(args)
    return SearchOptions(
        space=args.space, name=args.name, storage_path=args.storage_path, num_samples=args.num_samples,
        search=args.search, scheduler=args.scheduler, metric=args.metric, mode=args.mode,
        grace_period=args.grace_period, reduction_factor=args.reduction_factor, pause_at_rungs=args.pause_at_rungs,
        cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial, max_concurrent=args.max_concurrent,
        time_budget=args.time_budget, max_failures=args.max_failures, oom_retry=args.oom_retry, resume=args.resume,
        retry_errored=args.retry_errored, address=args.address, optuna_storage=args.optuna_storage,
        seed=args.search_seed, overrides=overrides, wandb=args.use_wandb, dry_run=args.dry_run,
        report=args.report, verbose=0 if args.quiet else 1,
    )


# Flags of one run of a search, not of the search: --resume does not take them from the saved command.
_RUN_FLAGS = ("--resume", "--retry-errored", "--dry-run", "-q", "--quiet")


def _argv_for_resume(argv: list[str]) -> list[str]:
    """With --resume: the flags the search was started with (saved in its experiment file), then the ones
    given now, which win where both set a value. So `--resume --name NAME` continues the search as it was
    started; a flag given now that changes what it trains is refused later (`_check_same_search`)."""
    args = build_parser().parse_args(argv)
    if not args.resume:
        return argv
    try:
        name = args.name or plan_search(options_from_args(args)).name  # else the name comes from the space
    except TuneGPTError:
        return argv  # the run itself says what is wrong
    started = _read_experiment_file_at(args.storage_path, name).get("argv")
    if not isinstance(started, list) or not all(isinstance(a, str) for a in started):
        return argv  # made by run_search() or an older tune_gpt: only the check applies
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    secret = [f for f, v in _flag_values(started) if REDACTED in v and f not in given]
    if secret:
        raise ConfigError(f"--resume: {', '.join(secret)} held a password or token, which the experiment file does not "
                          f"keep: give {' '.join(f + ' ...' for f in secret)} again")
    return [*_without_run_flags(started), *argv]


def _flag_values(argv: list[str]) -> list[tuple[str, str]]:
    """(flag, value) pairs of a command line (``--flag value`` and ``--flag=value``)."""
    out = []
    for i, a in enumerate(argv):
        if a.startswith("--") and "=" in a:
            out.append(tuple(a.split("=", 1)))
        elif a.startswith("--") and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out.append((a, argv[i + 1]))
    return out


def _without_run_flags(argv: list[str]) -> list[str]:
    return [a for a in argv if a not in _RUN_FLAGS and not re.fullmatch(r"-q+", a)]


# Flags whose value is a path: saved absolute, so that --resume from another directory means the same files.
_PATH_FLAGS = ("--space", "--data", "--cache_dir", "--cache-dir", "--storage-path", "--storage_path",
               "--optuna-storage")


def _absolute_paths(argv: list[str]) -> list[str]:
    """`argv` with the values of `_PATH_FLAGS` made absolute (a bundled space by name: its file; URLs, URIs,
    the bundled corpora's names and absolute paths as they are)."""
    out, i = [], 0
    while i < len(argv):
        flag, eq, value = argv[i].partition("=")
        if flag in _PATH_FLAGS and (eq or i + 1 < len(argv)):
            if not eq:
                i += 1
                value = argv[i]
            out += [flag, _absolute(flag, value)]
        else:
            out.append(argv[i])
        i += 1
    return out


def _absolute(flag: str, value: str) -> str:
    if flag == "--space":
        try:
            return str(Path(_space_file(value)).expanduser().absolute())
        except TuneGPTError:
            return value  # the run says it is missing
    if flag == "--optuna-storage":
        head = "sqlite:///"
        rest = value[len(head):] if value.startswith(head) else None
        return head + os.path.abspath(rest) if rest and not rest.startswith(("/", "file:")) else value
    if "://" in value or (flag == "--data" and value in ("python-docs", "chinese")) or not value:
        return value
    return os.path.abspath(os.path.expanduser(value))


def main(argv: list[str] | None = None) -> int:
    def _run() -> int:
        given = list(sys.argv[1:] if argv is None else argv)
        full = _argv_for_resume(given)
        args = build_parser().parse_args(full)
        out = run_search(replace(options_from_args(args), cli_argv=tuple(_without_run_flags(_absolute_paths(full)))))
        if isinstance(out, SearchOutcome) and out.best_config is None:
            return 1
        return 0

    return run_main(_run, prog="tune_gpt.search")


if __name__ == "__main__":
    sys.exit(main())
