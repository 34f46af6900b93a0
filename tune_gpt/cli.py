"""Shared command-line plumbing: flags generated from the config fields, one-line errors and warnings."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

from tune_gpt.config import CKPT_NAME, FIELD_TYPES, MODEL_NAME, TrainConfig, check_precision, coerce, field_help
from tune_gpt.errors import ConfigError, TuneGPTError


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2, and ``-1e-3`` is a value."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # argparse (3.11) takes '-1e-3' for an option ("--learning_rate: expected one argument"); a negative
        # number in any float form is a value, so `--learning_rate -1e-3` gets the range check's message
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")

    def _get_option_tuples(self, option_string: str) -> list:  # type: ignore[override]
        # A prefix of two spellings of one flag (--batch: --batch_size and --batch-size) is that flag, not
        # "ambiguous option" (Python 3.11 counts each spelling as a candidate)
        seen: set[int] = set()
        return [t for t in super()._get_option_tuples(option_string) if not (id(t[0]) in seen or seen.add(id(t[0])))]

    def error(self, message: str) -> None:  # type: ignore[override]
        # Named as run_main names the entry point (``tune_gpt.search: error: ...``), not as the usage line does
        # (``python -m tune_gpt.search``): every error of a command starts the same way.
        name = self.prog.removeprefix("python -m ")
        extra = message.removeprefix("unrecognized arguments:").split() if message.startswith("unrecognized") else []
        if extra and all(Path(a).exists() for a in extra):  # `--data corp/*.txt`: the shell expanded the glob
            message += " (existing files: a glob the shell expanded? quote it, e.g. --data 'corpus/*.txt')"
        self.exit(2, f"{name}: error: {message}\n")


PACKAGE_DIR = Path(__file__).resolve().parent


def run_main(fn: Callable[[], int], prog: str) -> int:
    """Run an entry point: TuneGPTError -> one line and exit 2; Ctrl-C -> one line and 130.

    tune_gpt's own warnings print as one line, ``<prog>: warning: ...`` (others as Python shows them).
    """
    shown = warnings.showwarning

    def one_line(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001 - warnings' hook
        if issubclass(category, UserWarning) and Path(filename).resolve().is_relative_to(PACKAGE_DIR):
            print(f"{prog}: warning: {' '.join(str(message).split())}", file=file or sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = one_line
    try:
        return fn()
    except TuneGPTError as exc:
        msg = " ".join(str(exc).split())  # one line, whatever the message held
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        detail = " ".join(str(exc).split())
        print(f"{prog}: interrupted" + (f"; {detail}" if detail else ""), file=sys.stderr, flush=True)
        return int(getattr(exc, "exit_code", 130))
    finally:
        warnings.showwarning = shown


def flag_name(key: str) -> str:
    """Flat key -> the flag users type: model.n_layer -> n_layer, wandb.project -> wandb_project."""
    if key.startswith("model."):
        return key.split(".", 1)[1]
    if key == "wandb.enabled":
        return "wandb"
    return key.replace(".", "_")


def add_config_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per TrainConfig field (``--batch_size`` and ``--batch-size``), values checked later."""
    group = parser.add_argument_group("training configuration (every TrainConfig field)")
    for key, (ann, meta) in FIELD_TYPES.items():
        if key in skip:
            continue
        name = flag_name(key)
        names = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        default = getattr(TrainConfig(), key) if "." not in key else None
        help_text = meta.get("help", "")
        if str(ann).startswith("bool"):
            group.add_argument(*names, dest=key, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
        else:
            shown = f" (default: {default!r})" if default is not None and "." not in key else ""
            group.add_argument(*names, dest=key, default=argparse.SUPPRESS, metavar=name.upper(),
                               help=help_text + shown)
    group.add_argument("--bf16", dest="bf16", action="store_true", default=argparse.SUPPRESS,
                       help="bf16 autocast (GPU only); same as --precision bf16")
    group.add_argument("--fp16", dest="fp16", action="store_true", default=argparse.SUPPRESS,
                       help="fp16 autocast with loss scaling (GPU only); same as --precision fp16")


def overrides_from_args(args: argparse.Namespace, keys: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The config keys the user actually gave, values converted (ConfigError names the flag)."""
    out: dict[str, Any] = {}
    switches = [k for k in ("bf16", "fp16") if getattr(args, k, False)]
    for k, v in vars(args).items():
        if k in FIELD_TYPES:
            out[k] = coerce(k, v)
    if len(switches) == 2:
        raise ConfigError("--bf16 and --fp16: give one (bf16 where the GPU has it, fp16 on older GPUs)")
    if switches:
        if out.get("precision", switches[0]) != switches[0]:
            raise ConfigError(f"--{switches[0]} and --precision {out['precision']}: give one")
        out["precision"] = switches[0]
    return out


def build_train_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m tune_gpt.train",
        description="Train a GPT on one GPU (or the CPU), logging to TensorBoard and W&B.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_config_flags(parser)
    parser.add_argument("--overwrite_output_dir", "--overwrite-output-dir", action="store_true",
                        help="start afresh in an --output_dir that holds an earlier run, replacing its model and "
                             "checkpoint (without this flag such a folder is refused; --resume continues it)")
    return parser


def check_output_dir(out: Path, flag: str = "--output_dir") -> None:
    """One line, before any training, when `out` cannot be a folder this process writes into: a file is
    in its way (itself or a parent), or the nearest existing folder above it is not writable."""
    out = out.expanduser()
    probe = out
    while not probe.exists() and probe != probe.parent:
        if probe.is_symlink():
            raise ConfigError(f"{flag} {out}: {probe} is a link to nothing ({os.readlink(probe)})")
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "is a file" if probe == out else f"cannot be made: {probe} is a file"
        raise ConfigError(f"{flag} {out}: {where}, not a folder")
    if probe.is_dir() and not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {out}: {probe} is not writable")
    for sub in ("checkpoint", "logs"):  # the folders a run makes in it
        if (out / sub).exists() and not (out / sub).is_dir():
            raise ConfigError(f"{flag} {out}: {out / sub} is a file; a run keeps its {sub} folder there")
    # a search's own folders, whatever else is asked: a run there overwrote a trial's sample.txt, and its
    # model.pt made `generate --checkpoint <trial>` sample another model
    from tune_gpt.report import EXPERIMENT_FILE, STATUS_FILE  # (light: pandas and Ray are imported on use)

    if (out / EXPERIMENT_FILE).is_file() or (out / "tuner.pkl").is_file():
        raise ConfigError(f"{flag} {out}: is a search's experiment folder; give a folder of its own (a replay "
                          f"makes {out}/replay-<trial>)")
    if (out / "params.json").is_file() and any((out / f).is_file() for f in (STATUS_FILE, "result.json")):
        raise ConfigError(f"{flag} {out}: is a search trial's folder; give a folder of its own")


def earlier_run(out: Path) -> list[str]:
    """What of an earlier run `out` holds (its checkpoint, its final model), as paths inside it."""
    return [name for name in (f"checkpoint/{CKPT_NAME}", MODEL_NAME) if (out / name).is_file()]


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's config; an error about a field names the flag that sets it (--n_embd, not model.n_embd)."""
    try:
        return TrainConfig.from_flat(overrides_from_args(args))
    except ConfigError as exc:
        key, sep, rest = str(exc).partition(":")
        if sep and key in FIELD_TYPES:  # (also the other fields it names: model.n_head=3 -> --n_head=3)
            rest = re.sub(r"\b(?:model|wandb)\.\w+", lambda m: f"--{flag_name(m.group(0))}"
                          if m.group(0) in FIELD_TYPES else m.group(0), rest)
            raise ConfigError(f"--{flag_name(key)}:{rest}") from None
        raise


def train_main(argv: list[str] | None = None) -> int:
    """``python -m tune_gpt.train``. Flags, config and corpus are checked before torch is imported, so a
    mistake is answered in a fraction of a second instead of after torch's few seconds of start-up."""

    def _run() -> int:
        from tune_gpt.data import load_corpus

        args = build_train_parser().parse_args(argv)
        cfg = config_from_args(args)
        kind = cfg.device.split(":")[0]
        if kind == "cpu":
            check_precision(cfg, kind)
        elif kind != "auto":  # cuda / mps: torch is needed to know, and a missing GPU is said first
            from tune_gpt.train import resolve_device

            resolve_device(cfg)
        out = Path(cfg.output_dir).expanduser()
        check_output_dir(out)
        ckpt = out / "checkpoint" / CKPT_NAME
        if cfg.resume and args.overwrite_output_dir:
            raise ConfigError("--resume continues the run in --output_dir, --overwrite_output_dir replaces it: give one")
        if cfg.resume and not ckpt.is_file():
            raise ConfigError(f"resume: no checkpoint in {out / 'checkpoint'}")
        earlier = earlier_run(out)
        if earlier and not cfg.resume and not args.overwrite_output_dir:  # before the corpus is read: at once
            # a forgotten --resume must not cost the run that is there
            raise ConfigError(f"--output_dir {out} holds an earlier run ({' and '.join(earlier)}): --resume "
                              f"continues it, --output_dir NEW keeps it, --overwrite_output_dir replaces it")
        corpus = load_corpus(cfg.data, use_chinese=cfg.use_chinese, cache_dir=cfg.cache_dir)
        corpus.check_context(cfg.model.block_size, source=cfg.data or corpus.name)
        if earlier and not cfg.resume:
            fate = "are replaced by this run's as it saves them" if cfg.checkpoint else "stay (this run saves none)"
            warnings.warn(f"{out} holds an earlier run: its model and checkpoint {fate}, and its TensorBoard events "
                          f"stay in {out / 'logs'}, hidden from TensorBoard by this run's")
        ckpt_before = ckpt.stat().st_mtime_ns if ckpt.is_file() else None

        from tune_gpt.tracking import default_reporters
        from tune_gpt.train import is_oom, resolve_device, train

        if kind == "auto":
            resolve_device(cfg)  # bf16 / fp16 where no GPU is: before the run writes anything
        try:
            result = train(cfg, default_reporters(cfg), corpus=corpus)
        except KeyboardInterrupt as exc:
            raise KeyboardInterrupt(_resume_hint(cfg, getattr(exc, "train_result", None), argv)) from None
        except Exception as exc:  # noqa: BLE001 - only out-of-memory gets a one-line answer here
            if not is_oom(exc):
                raise
            # --resume only from a checkpoint of this run (or the one it resumed), never an earlier run's
            mine = ckpt.is_file() and (cfg.resume or ckpt.stat().st_mtime_ns != ckpt_before)
            print(out_of_memory_line("tune_gpt.train", cfg, exc, " --resume" if mine else ""), file=sys.stderr)
            return 3
        if result.message and result.status == "finished":  # resumed at its end: train() started no reporter
            best = "n/a" if result.best_val_loss is None else f"{result.best_val_loss:.4f}"
            print(f"tune_gpt.train: {result.message} (best val loss {best}); to train on, raise --max_steps or "
                  f"--epochs", file=sys.stderr)
        elif result.status == "diverged":
            print(f"tune_gpt.train: {result.message or 'the loss diverged'}; try a lower --learning_rate, or keep "
                  f"--grad_clip on (default 1.0)", file=sys.stderr)
        elif result.message and result.status != "finished":
            print(f"tune_gpt.train: {result.message}", file=sys.stderr)
        saved = "" if result.model_path else " (no model saved: --no-checkpoint)" if not cfg.checkpoint else ""
        print(f"output: {result.output_dir}{saved}", file=sys.stderr)
        return 0 if result.status == "finished" else 3

    return run_main(_run, prog="tune_gpt.train")


def out_of_memory_line(prog: str, cfg: TrainConfig, exc: BaseException, again: str = "") -> str:
    """One line for a run that ran out of memory: the error, and the flags that train the same effective
    batch in smaller pieces (then `again`), while the micro-batch can still be halved."""
    from tune_gpt.train import smaller_micro_batch

    smaller = smaller_micro_batch(cfg)
    hint = (f"; the same effective batch in smaller pieces: --batch_size {smaller.batch_size} "
            f"--gradient_accumulation_steps {smaller.gradient_accumulation_steps}{again}"
            if smaller is not None else "")
    return f"{prog}: out of memory at batch_size {cfg.batch_size} ({' '.join(str(exc).split())[:200]}){hint}"


def _resume_hint(cfg: TrainConfig, result: Any, argv: list[str] | None) -> str:
    """What Ctrl+C left to go on from: the checkpoint this run wrote or resumed from (`train()` hangs its
    result on the KeyboardInterrupt), never one an earlier run left in the same output dir."""
    if not cfg.checkpoint:
        return "checkpoints are off (--no-checkpoint): nothing to resume from"
    path = getattr(result, "checkpoint_path", None)
    if not path:
        return (f"no checkpoint of this run yet (one is written at each evaluation: every {cfg.eval_interval} steps "
                f"and at the last step)")
    cmd = resume_command("tune_gpt.train", sys.argv[1:] if argv is None else argv)
    return f"the last checkpoint (step {result.checkpoint_step}) is in {Path(path).parent}; continue with: {cmd}"


def resume_command(module: str, args: list[str]) -> str:
    """The command that continues an interrupted ``python -m <module>`` run: its arguments, with --resume.
    A password or token in them (a corpus or Optuna storage URL's) is printed as ``***``, with a word to
    put it back: the hint goes to logs and saved notebook output."""
    from tune_gpt._redact import redact

    kept = [a for a in args if a != "--resume"]
    shown = [redact(a) for a in kept]
    cmd = " ".join(shlex.quote(a) for a in ["python", "-m", module, *shown, "--resume"])
    return cmd + ("  # with the password or token where *** stands" if shown != kept else "")


__all__ = ["OneLineParser", "run_main", "train_main", "check_output_dir", "add_config_flags", "overrides_from_args",
           "field_help", "resume_command", "out_of_memory_line"]
