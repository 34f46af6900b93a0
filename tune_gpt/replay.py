"""Replay a trial as a final run: ``python -m tune_gpt.replay EXPERIMENT [--trial ID] [--check]``.

The best trial (or the one named) is trained again through the same `train()`:
a W&B run with ``job_type="final"`` (``"check"`` for a check) in the experiment's group, TensorBoard, the
saved model with its tokenizer, a sample, and ``replay_summary.json`` comparing
the final val loss with the trial's. ``--check`` replays the trial at exactly
its budget and seed and says whether the val loss matches (within 1e-4 on CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import warnings
from pathlib import Path
from typing import Any

from tune_gpt._redact import is_redacted
from tune_gpt.cli import OneLineParser, check_output_dir, earlier_run, out_of_memory_line, run_main
from tune_gpt.config import FIELD_TYPES, MODEL_NAME, RUNTIME_KEYS, TrainConfig
from tune_gpt.errors import ConfigError

CPU_TOLERANCE = 1e-4
GPU_TOLERANCE = 2e-2  # GPU kernels are not bitwise deterministic; a replay lands close, not exact


def pick_trial(experiment: str | Path, trial: str | None = None) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """(experiment folder, the trial's row in the results table, its params) for the best or named trial.
    For an experiment in storage (s3://…), the folder is where its replays go by default:
    ``./tune_reports/<name>`` (beside its report)."""
    exp, row, params, _ = _pick(experiment, trial)
    return exp, row, params


def _pick(experiment: str | Path, trial: str | None) -> tuple[Path, dict[str, Any], dict[str, Any], dict[str, Any]]:
    """`pick_trial`, and where the trial ran (`_trial_where`). The results are read once, through a
    temporary copy of the files the report reads for an experiment in storage."""
    from tune_gpt.report import REMOTE_REPORTS, _read_experiment, _results_frame

    if trial is not None and not trial.strip():  # `--trial "$UNSET"`: not the best trial, quietly
        raise ConfigError("--trial: empty; give a trial id (or its prefix), or leave --trial out for the best trial")
    read = _read_experiment(experiment)
    df = _results_frame(read)
    exp = Path(REMOTE_REPORTS) / read.uri.rstrip("/").rsplit("/", 1)[-1] if read.uri else read.dir
    if trial is not None:
        ids = df["trial_id"].astype(str)
        rows = df[ids == trial]  # the id as given, else a prefix of one id only (ids share the search's prefix)
        rows = rows if not rows.empty else df[ids.str.startswith(trial)]
        if rows.empty:
            known = ", ".join(map(str, df["trial_id"].tolist()[:10]))
            raise ConfigError(f"--trial: no trial {trial!r} in {exp} (trials: {known})")
        if len(rows) > 1:
            some = ", ".join(map(str, rows["trial_id"].tolist()[:10])) + (", ..." if len(rows) > 10 else "")
            raise ConfigError(f"--trial: {trial!r} begins {len(rows)} trial ids in {exp} ({some}); give more of it")
        row = rows.iloc[0]
    else:
        ranked = df[df["rank"].notna()] if "rank" in df else df.iloc[0:0]
        if ranked.empty:
            raise ConfigError(f"{exp}: no trial reported a usable val loss; nothing to replay")
        row = ranked.sort_values("rank").iloc[0]
    t = next(t for t in read.trials if t.trial_id == row["trial_id"])
    if not t.params:
        raise ConfigError(f"{row['trial_dir']}/params.json: cannot read the trial's config (missing or not JSON)")
    # the search's name (its W&B group): the folder's may be "." or a renamed copy's
    return exp, row.to_dict(), dict(t.params), {**_trial_where(t.status_file), "experiment_name": read.info["name"]}


def trial_config(params: dict[str, Any], exp: Path, trial_id: str, *, check: bool, output_dir: str | None,
                 max_steps: int | None, epochs: float | None, wandb: bool, trial_device: str = "cpu",
                 trial_bf16_products: bool = False, data: str | None = None,
                 experiment_name: str | None = None, wandb_mode: str | None = None) -> TrainConfig:
    """The trial's hyperparameters, with where-it-runs settings for a final run.

    A check runs on the trial's device and, on a CPU, with the trial's matmul arithmetic (`auto`
    decides by the CPU it runs on, which need not be the trial's). W&B's mode is this command's
    (`wandb_mode`, else WANDB_MODE, else whether a key is found), never the search's."""
    flat = {k: v for k, v in params.items() if k in FIELD_TYPES}
    # how to log, like num_threads is where to run: a search's `--wandb_mode online` beat this shell's
    # WANDB_MODE (an explicit mode wins) and left a replay with no key or network no way out
    flat.pop("wandb.mode", None)
    if wandb_mode is not None:
        flat["wandb.mode"] = wandb_mode
    if data is not None:
        flat["data"] = data
    elif is_redacted(flat.get("data")):  # the search kept the URL without its token
        raise ConfigError(f"replay: trial {trial_id} trained on {flat['data']}, whose password or token the experiment "
                          f"does not keep: give --data with the full URL")
    if not check:
        for k in RUNTIME_KEYS:
            if k in ("num_threads",):
                flat.pop(k, None)  # a final run may use every core
        if max_steps is not None or epochs is not None:
            for k in ("max_steps", "epochs", "max_tokens"):
                flat.pop(k, None)
            if max_steps is not None:
                flat["max_steps"] = max_steps
            if epochs is not None:
                flat["epochs"] = epochs
    flat.pop("gpu_memory_fraction", None)
    flat.update({
        "output_dir": output_dir or str(exp / f"replay-{trial_id}{'-check' if check else ''}"),
        "progress": True, "tensorboard": True, "checkpoint": True, "resume": False,
        "wandb.enabled": wandb,
        "wandb.group": params.get("wandb.group") or experiment_name or Path(exp).expanduser().resolve().name,
    })
    if check:
        flat["device"] = trial_device
        if trial_device == "cpu":
            flat["matmul_precision"] = "medium" if trial_bf16_products else "highest"
    return TrainConfig.from_flat(flat)


def replay(experiment: str | Path, trial: str | None = None, *, check: bool = False, output_dir: str | None = None,
           max_steps: int | None = None, epochs: float | None = None, wandb: bool = True,
           data: str | None = None, batch_size: int | None = None,
           gradient_accumulation_steps: int | None = None, wandb_mode: str | None = None) -> dict[str, Any]:
    """Train the trial again; return (and save) the summary. `data`, when given, replaces the trial's corpus
    spec (needed where it was a URL with a token, which the search does not write down); the corpus must
    still be the text the trial trained on for a check (its sha256 is compared). `batch_size` /
    `gradient_accumulation_steps` cut the trial's effective batch into other pieces (where it does not fit
    in memory). Raises `OutOfMemory` (its `cfg` the config that ran out) when the run runs out of memory."""
    from tune_gpt.data import load_corpus
    from tune_gpt.tracking import default_reporters
    from tune_gpt.train import OutOfMemory, is_oom, resolve_device, train

    if check and (max_steps is not None or epochs is not None):
        raise ConfigError("--check replays the trial at its own budget: drop --max-steps / --epochs")
    exp, row, params, where = _pick(experiment, trial)
    trial_id = str(row["trial_id"])
    cfg = trial_config(params, exp, trial_id, check=check, output_dir=output_dir, max_steps=max_steps,
                       epochs=epochs, wandb=wandb, trial_device=where["device"],
                       trial_bf16_products=where["bf16_products"], data=data,
                       experiment_name=where["experiment_name"], wandb_mode=wandb_mode)
    if where["micro_batch"]:
        cfg = TrainConfig.from_flat(where["micro_batch"], base=cfg)
    if batch_size is not None or gradient_accumulation_steps is not None:
        cfg = _in_pieces(cfg, batch_size, gradient_accumulation_steps)
    elif where["micro_batch"]:
        print(f"replay: trial {trial_id} ran out of memory and went on at --batch_size {cfg.batch_size} "
              f"--gradient_accumulation_steps {cfg.gradient_accumulation_steps} (the same effective batch): so does "
              f"this run", file=sys.stderr)
    check_output_dir(Path(cfg.output_dir), "--output-dir")
    out = Path(cfg.output_dir).expanduser()
    with _OutputLock(out) as lock:
        lock.take(make=False)  # a replay writing here: said as such, before its mark reads as an interrupted one
        _check_may_write(out, trial_id, check)
        trial_loss = _float(row.get("final_val_loss"))
        if check and trial_loss is None:
            raise ConfigError(f"--check: trial {trial_id} ({row.get('status')}) reported no val loss: there is "
                              f"nothing to compare a replay with; replay it without --check, or pick another --trial")
        device = resolve_device(cfg)
        corpus = load_corpus(cfg.data, use_chinese=cfg.use_chinese, cache_dir=cfg.cache_dir)
        _check_same_corpus(trial_id, where.get("corpus_sha256"), corpus, check)
        corpus.check_context(cfg.model.block_size, source=cfg.data or corpus.name)  # (train() would, after the mark)
        trial_steps = _int(row.get("steps"))
        stop_after = trial_steps if check and trial_steps else None
        kind = "check" if check else "final"  # a check is no final run: W&B filters tell them apart
        reporters = default_reporters(cfg, job_type=kind, tags=[kind],
                                      extra_config={"replay_of": trial_id, "experiment": where["experiment_name"]})
        lock.take(make=True)  # refusals above leave no folder behind; from here on it is this replay's
        # another replay may have started and ended here since the folder was looked at (also where the lock
        # could not be taken: then nothing else keeps it out)
        _check_may_write(out, trial_id, check)
        # marked as this replay's until its summary replaces the mark
        (out / "replay_summary.json").write_text(json.dumps({"trial_id": trial_id, "check": check,
                                                             "status": "running"}))
        try:
            result = train(cfg, reporters, stop_after=stop_after, corpus=corpus)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is answered here
            if not is_oom(exc):
                raise
            message = " ".join(f"{exc}".split())[:500]
            # the mark says so, and lets this replay be run again here with smaller pieces (`_replaceable`)
            (out / "replay_summary.json").write_text(json.dumps(
                {"trial_id": trial_id, "check": check, "status": "oom", "message": message}))
            raise OutOfMemory(message, [], cfg) from None
        diff = None if result.final_val_loss is None or trial_loss is None else result.final_val_loss - trial_loss
        tol = CPU_TOLERANCE if device.type == "cpu" else GPU_TOLERANCE
        summary = {
            "experiment": str(row["trial_dir"]).rsplit("/", 1)[0],  # the folder, or the URI, the trials are in
            "trial_id": trial_id, "trial_status": row.get("status"),
            "trial_steps": trial_steps, "trial_val_loss": trial_loss, "check": check,
            "steps": result.steps, "status": result.status, "final_val_loss": result.final_val_loss,
            "best_val_loss": result.best_val_loss, "difference": diff, "tolerance": tol if check else None,
            "match": (diff is not None and abs(diff) <= tol) if check else None,
            "device": str(device), "output_dir": result.output_dir, "model_path": result.model_path,
            "wall_s": result.wall_s, "tokens_per_s": result.tokens_per_s, "sample": result.sample,
            "config": cfg.to_record(),
        }
        Path(result.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(result.output_dir) / "replay_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


LOCK_NAME = ".replay.lock"


class _OutputLock:
    """An exclusive ``flock`` on ``<output dir>/.replay.lock`` while a replay writes there: a second replay
    into the same folder (``replay exp`` and then ``replay exp --max-steps 5000`` in another terminal) is
    refused, even though the first one's ``running`` mark would let it retrain an interrupted replay. The
    kernel drops the lock with the process, so a crashed replay leaves none behind; the empty file stays
    (removing it would let a third replay lock a new file while the second still holds the old one)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self._fd: int | None = None

    def take(self, *, make: bool) -> None:
        """Hold the lock (once); `make`: make the folder and the file where they are missing, else take the
        lock only where the file is already there."""
        path = self.out / LOCK_NAME
        if self._fd is not None or not (make or path.is_file()):
            return
        if make:
            self.out.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # Windows: no flock; the replay goes on as where the file system cannot lock
            self._fd = -1
            warnings.warn(f"{path}: cannot lock on this platform; a second replay into this folder is not refused")
            return
        try:
            try:  # NFS emulates flock with fcntl locks: an exclusive one needs a descriptor open for writing
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            except PermissionError as first:  # a lock file another user left: flock needs no write access elsewhere
                try:
                    fd = os.open(path, os.O_RDONLY)
                except FileNotFoundError:  # no lock file, and a folder this user cannot write: say that
                    raise first from None
        except OSError as exc:  # a folder of that name, a 0600 file of another user's: one line, nothing written
            raise ConfigError(f"{path}: cannot open the replay lock ({exc.strerror or exc}); remove it if no replay "
                              f"is writing {self.out}, or give another --output-dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"replay: another replay is writing {self.out}; wait for it to end, or give another "
                              f"--output-dir") from None
        except OSError as exc:  # ENOLCK (NFS without lockd), EBADF, EOPNOTSUPP...: no lock, not a traceback
            os.close(fd)
            self._fd = -1  # taken, as far as this replay can
            warnings.warn(f"{path}: cannot lock ({exc.strerror or exc}); a second replay into this folder is not "
                          f"refused")
            return
        self._fd = fd

    def __enter__(self) -> "_OutputLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fd is not None and self._fd >= 0:
            os.close(self._fd)  # closing it releases the lock
        self._fd = None


def _check_may_write(out: Path, trial_id: str, check: bool) -> None:
    """One line where `out` holds something this replay must not train over (`_replaceable`)."""
    held = _summary_in(out)
    if not _replaceable(held, trial_id, check):
        _check_output_dir_free(out, held)


def _summary_in(out: Path) -> dict[str, Any] | None:
    """The replay_summary.json `out` holds ({} when it cannot be read), or None when there is none."""
    path = out / "replay_summary.json"
    if not path.is_file():
        return None
    try:
        s = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return s if isinstance(s, dict) else {}


UNFINISHED = ("running", "oom")  # a replay's mark: still running or interrupted; ran out of memory


def _replaceable(summary: dict[str, Any] | None, trial_id: str, check: bool) -> bool:
    """What a replay may train over (`summary`: the folder's replay summary): an earlier ``--check``, by
    another check (it replaces nothing of value), and the same replay of the same trial that was
    interrupted or ran out of memory (its mark says ``running`` or ``oom``), which has no --resume and
    would otherwise have to be deleted by hand."""
    if not summary:
        return False
    return (check and summary.get("check") is True) or (
        summary.get("status") in UNFINISHED and summary.get("trial_id") == trial_id and summary.get("check") is check)


def _check_output_dir_free(out: Path, summary: dict[str, Any] | None) -> None:
    """A run is never trained over another one (a final run, a check in a folder of its own choosing, e.g.
    ``--output-dir ./output_single``): its model, checkpoint, logs and W&B run would be replaced or mixed."""
    earlier = earlier_run(out)
    if summary is None and not earlier:
        return
    what = ""
    if summary:
        loss, steps = _float(summary.get("final_val_loss")), _int(summary.get("steps"))
        parts = ([f"{steps} steps"] if steps is not None else []) + ([f"val loss {loss:.4f}"] if loss is not None else [])
        what = f" ({', '.join(parts)})" if parts else ""
    kind = "a check" if summary and summary.get("check") is True else "a final run"
    if summary and summary.get("status") in UNFINISHED:  # another trial's, or a check's for a final run
        why = "out of memory" if summary["status"] == "oom" else "interrupted"
        kind, what = f"{kind} of trial {summary.get('trial_id')} that did not finish", f" ({why})"
    held = (f"{kind}{what}" if summary is not None else f"a trained model ({MODEL_NAME})" if MODEL_NAME in earlier
            else f"a run's checkpoint ({earlier[0]})")
    raise ConfigError(f"replay: {out} already holds {held}; give another --output-dir (or remove it)")


def _in_pieces(cfg: TrainConfig, batch_size: int | None, accumulation: int | None) -> TrainConfig:
    """`cfg` with its effective batch (batch size × accumulation steps) cut into the pieces asked for: what
    the out-of-memory line suggests. The effective batch is a hyperparameter of the trial, so it stays; the
    flag left out is worked out from it."""
    total = cfg.batch_size * cfg.gradient_accumulation_steps
    b = batch_size if batch_size is not None else total // accumulation if total % accumulation == 0 else None
    a = accumulation if accumulation is not None else total // batch_size if total % batch_size == 0 else None
    if b is None or a is None or b * a != total:
        given = " ".join(f"--{k} {v}" for k, v in (("batch_size", batch_size),
                                                   ("gradient_accumulation_steps", accumulation)) if v is not None)
        raise ConfigError(f"{given}: the trial trained on batches of {total} sequences (batch_size "
                          f"{cfg.batch_size} × gradient_accumulation_steps {cfg.gradient_accumulation_steps}), "
                          f"and a replay keeps that: give pieces whose product is {total}")
    return TrainConfig.from_flat({"batch_size": b, "gradient_accumulation_steps": a}, base=cfg)


def _trial_where(status: Any) -> dict[str, Any]:
    """Where and how the trial trained, as its status file recorded it: ``device`` (CPU when
    unknown), ``bf16_products`` (False when unknown: trials before it was recorded had none) and
    ``corpus_sha256`` (None when unknown)."""
    status = status if isinstance(status, dict) else {}
    # a trial that ran out of memory went on with a smaller micro-batch (the same effective batch): that one
    micro = {k: status[k] for k in ("batch_size", "gradient_accumulation_steps")
             if status.get("oom_retries") and isinstance(status.get(k), int) and status[k] > 0}
    return {"device": str(status.get("device") or "cpu"), "bf16_products": bool(status.get("bf16_products")),
            "corpus_sha256": status.get("corpus_sha256"), "micro_batch": micro if len(micro) == 2 else None}


def _check_same_corpus(trial_id: str, trained_on: Any, corpus: Any, check: bool) -> None:
    """A replay trains on the text its --data gives today: an edited file, a URL fetched again, another
    Python's built-in docs. A check on other text cannot match: refused. A final run goes on, warned."""
    if not trained_on or trained_on == corpus.sha256:
        return
    why = (f"trial {trial_id} trained on a corpus with sha256 {str(trained_on)[:12]}…, its data now reads "
           f"{corpus.name} with sha256 {corpus.sha256[:12]}… (the text changed since the search)")
    if check:
        raise ConfigError(f"--check: {why}: a replay on other text cannot reproduce the trial")
    warnings.warn(f"{why}: the final run trains on today's text")


def _float(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _int(v: Any) -> int | None:
    f = _float(v)
    return int(f) if f is not None else None


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python -m tune_gpt.replay", description=__doc__.splitlines()[0])
    p.add_argument("experiment", help="the experiment folder (<storage>/<name>), or its URI (s3://bucket/path/<name>)")
    p.add_argument("--trial", help="trial id (or its prefix); default: the best trial")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=float, help="train the final run for this many epochs")
    budget.add_argument("--max-steps", "--max_steps", dest="max_steps", type=int, help="train the final run this many steps")
    p.add_argument("--check", action="store_true", help="replay at the trial's own budget and seed; compare the val loss")
    p.add_argument("--output-dir", "--output_dir", dest="output_dir", help="default: <experiment>/replay-<trial> "
                   "(-check for --check); for an experiment in storage, ./tune_reports/<name>/replay-<trial>")
    wandb_flags = p.add_mutually_exclusive_group()
    wandb_flags.add_argument("--no-wandb", dest="wandb", action="store_false", help="no W&B run")
    wandb_flags.add_argument("--wandb-mode", "--wandb_mode", dest="wandb_mode",
                             choices=("online", "offline", "disabled"),
                             help="the W&B run's mode (not the search's); default: WANDB_MODE, else online when an "
                             "API key is found, else offline")
    p.add_argument("--data", help="the corpus, where the trial's was a URL with a token (the experiment keeps it "
                   "without), or where it moved; its text is compared with the trial's (sha256): other text is "
                   "refused for a --check and warned about for a final run")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int,
                   help="the micro-batch, where the trial's does not fit in memory: the accumulation steps keep the "
                   "trial's effective batch (batch size × accumulation steps)")
    p.add_argument("--gradient-accumulation-steps", "--gradient_accumulation_steps", dest="accumulation", type=int,
                   help="with --batch-size (or alone): the pieces the trial's effective batch is trained in")

    def _run() -> int:
        args = p.parse_args(argv)
        if args.max_steps is not None and args.max_steps <= 0:
            raise ConfigError(f"--max-steps: must be positive, got {args.max_steps}")
        if args.epochs is not None and not args.epochs > 0:
            raise ConfigError(f"--epochs: must be positive, got {args.epochs}")
        if args.data is not None and not args.data.strip():
            raise ConfigError("--data: empty; give the corpus (a file, folder, glob or URL)")
        for flag, n in (("--batch_size", args.batch_size), ("--gradient_accumulation_steps", args.accumulation)):
            if n is not None and n <= 0:
                raise ConfigError(f"{flag}: must be positive, got {n}")
        try:
            s = replay(args.experiment, args.trial, check=args.check, output_dir=args.output_dir,
                       max_steps=args.max_steps, epochs=args.epochs, wandb=args.wandb, data=args.data,
                       batch_size=args.batch_size, gradient_accumulation_steps=args.accumulation,
                       wandb_mode=args.wandb_mode)
        except Exception as exc:
            from tune_gpt.train import OutOfMemory  # loaded by replay() before it trains

            if not isinstance(exc, OutOfMemory):
                raise
            print(out_of_memory_line("tune_gpt.replay", exc.cfg, exc), file=sys.stderr)
            return 3
        trial_said = (f"trial: {_fmt(s['trial_val_loss'])} after {s['trial_steps']} steps"
                      if s["trial_val_loss"] is not None else f"the trial ({s['trial_status']}) reported no val loss")
        print(f"replayed trial {s['trial_id']}: val loss {_fmt(s['final_val_loss'])} after {s['steps']} steps "
              f"({trial_said})")
        print(f"model: {s['model_path']}  summary: {Path(s['output_dir']) / 'replay_summary.json'}")
        if s["model_path"]:
            print(f"sample it: python -m tune_gpt.generate --checkpoint {shlex.quote(str(s['output_dir']))}")
        if args.check:
            d = s["difference"]
            verdict = "MATCH" if s["match"] else "MISMATCH"
            print(f"check: {verdict}: difference {d:+.3e} (tolerance {s['tolerance']:.0e} on {s['device']})"
                  if d is not None else "check: MISMATCH: no val loss to compare")
            return 0 if s["match"] else 1
        return 0 if s["status"] == "finished" else 3

    return run_main(_run, prog="tune_gpt.replay")


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.6f}"


if __name__ == "__main__":
    sys.exit(main())
