"""Reporters: where a run's metrics go. `train()` knows only the `Reporter` interface.

- `ConsoleReporter`: a progress bar with ETA and one line per evaluation.
- `TensorBoardReporter`: events in ``<output_dir>/logs``.
- `WandbReporter`: one W&B run (single runs and the replay); offline when no key.
- `TuneReporter` (in `tune_gpt.search`): `ray.tune.report` once per evaluation.

Metric names are the same everywhere (see DESIGN.md): ``train/loss``, ``val/loss``,
``val/bpc``, ``lr``, ``tokens_per_s``, ``mfu``, ``gpu/mem_gb``, ``gpu/util``,
``cpu/percent``, ``rss_gb``, ``step``, ``tokens``, ``epoch``.
Heavy imports (tensorboard, wandb, tqdm; NVML through torch.cuda) happen inside the reporters.
"""

from __future__ import annotations

import contextlib
import netrc
import os
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from tune_gpt._redact import redact
from tune_gpt.errors import TuneGPTError

if TYPE_CHECKING:  # pragma: no cover
    from tune_gpt.config import TrainConfig
    from tune_gpt.train import TrainResult


class Reporter:
    """Receives a run's events. Every method is optional (no-op by default)."""

    def start(self, cfg: "TrainConfig", info: dict[str, Any]) -> None:
        """Called once before the first step; `info` holds model/corpus facts."""

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Training metrics every `log_interval` steps, except at a step that is evaluated.

        An evaluation's metrics (`evaluate`) carry the same keys, so every metric has one value a
        step; its ``train/loss`` is measured on the fixed training batches, not the running mean."""

    def evaluate(self, step: int, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        """Evaluation metrics; `checkpoint_dir` holds ``ckpt.pt`` when one was saved."""

    def sample(self, text: str) -> None:
        """The text generated at the end of the run."""

    def finish(self, result: "TrainResult") -> None:
        """Called once at the end, whatever the status."""

    def resume_checkpoint(self) -> Path | None:
        """A directory holding ``ckpt.pt`` to resume from, if the reporter knows one."""
        return None

    def checkpoint_state(self) -> dict[str, Any]:
        """What goes into each checkpoint for the run resumed from it (`start` gets it back as
        ``info["reporter_state"]``): plain data only (the checkpoint is loaded with weights_only)."""
        return {}


class MultiReporter(Reporter):
    """Fans every event out to several reporters."""

    def __init__(self, reporters: Iterable[Reporter]) -> None:
        self.reporters = [r for r in reporters if r is not None]

    def start(self, cfg, info):
        for r in self.reporters:
            r.start(cfg, info)

    def log(self, step, metrics):
        for r in self.reporters:
            r.log(step, metrics)

    def evaluate(self, step, metrics, checkpoint_dir):
        for r in self.reporters:
            r.evaluate(step, metrics, checkpoint_dir)

    def sample(self, text):
        for r in self.reporters:
            r.sample(text)

    def finish(self, result):
        # each one closes even where one before it fails (TensorBoard's close on a full disk left the W&B run
        # open, and a notebook's next train() started a second run beside it); the first failure goes on up,
        # each later one is said in a warning (else a W&B sync error would hide behind TensorBoard's full disk)
        errors = []
        for r in self.reporters:
            try:
                r.finish(result)
            except Exception as exc:  # noqa: BLE001 - raised below, after the others
                errors.append((r, exc))
        if errors:
            try:  # (after the loop: where warnings are errors, -W error, every reporter is closed first)
                for r, exc in errors[1:]:
                    warnings.warn(f"{type(r).__name__}: closing failed as well ({type(exc).__name__}: "
                                  f"{redact(str(exc))})", stacklevel=2)
            finally:
                raise errors[0][1]

    def resume_checkpoint(self):
        for r in self.reporters:
            found = r.resume_checkpoint()
            if found is not None:
                return found
        return None

    def checkpoint_state(self):
        return {k: v for r in self.reporters for k, v in r.checkpoint_state().items()}


# ------------------------------------------------------------------- console


class ConsoleReporter(Reporter):
    """A tqdm progress bar (with ETA) and a line per evaluation, on stderr."""

    def __init__(self, progress: bool = True, stream: Any = None) -> None:
        self.progress = progress
        self.stream = stream or sys.stderr
        self.bar = None
        self.last_step = 0
        self._sample: str | None = None

    def start(self, cfg, info):
        end = info.get("end_step", info["total_steps"])  # (a --check replay stops at the trial's step)
        self._print(
            f"model {cfg.model_size}: {info['n_params'] / 1e6:.2f}M parameters, "
            f"{end} steps of {cfg.tokens_per_step:,} tokens on {info['device']}; "
            f"corpus {info['corpus']}" + (f"; resuming at step {info['start_step']}" if info.get("start_step") else "")
        )
        if self.progress and not _is_terminal(self.stream):
            self.progress = False  # a pipe or a file (| tee, > log): a line per log, not a bar's carriage returns
        if self.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=end, initial=info.get("start_step", 0), desc="train",
                unit="step", file=self.stream, dynamic_ncols=True, mininterval=0.5,
            )
            self.last_step = info.get("start_step", 0)

    def log(self, step, metrics):
        if self.bar is not None:
            self.bar.update(step - self.last_step)
            self.last_step = step
            self._postfix(metrics)
        else:
            self._print(f"step {step}: train loss {metrics['train/loss']:.4f}, lr {metrics['lr']:.2e}")

    def _postfix(self, metrics):
        self.bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", lr=f"{metrics['lr']:.2e}", refresh=False)

    def evaluate(self, step, metrics, checkpoint_dir):
        if self.bar is not None:
            self.bar.update(step - self.last_step)
            self.last_step = step
            self._postfix(metrics)
        self._print(
            f"step {step}: train loss {metrics['train/loss']:.4f}, val loss {metrics['val/loss']:.4f}, "
            f"val bpc {metrics['val/bpc']:.3f}, {metrics['tokens_per_s']:,.0f} tokens/s"
        )

    def sample(self, text):
        self._sample = text  # generated before the last evaluation; printed after it, with the result

    def finish(self, result):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self._sample is not None:
            self._print("sample:\n" + self._sample)
            self._sample = None
        self._print(
            f"{result.status}: {result.steps} steps, best val loss "
            f"{_fmt(result.best_val_loss)}, {result.tokens_per_s:,.0f} tokens/s, {result.wall_s:.1f} s"
        )

    def _print(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=self.stream)
        else:
            print(msg, file=self.stream, flush=True)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


# --------------------------------------------------------------- tensorboard


def _after_this_seconds_event_files(log_dir: Path) -> None:
    """Wait for the next second where `log_dir` holds an event file written in this one.

    TensorBoard reads a folder's event files in name order, ``events.out.tfevents.<second>.<host>.<pid>.<n>``
    with `n` counting the process's writers: a writer made in the same second as the one before it, its
    `n` 10 after 9 (or 100 after 99), sorted before it, and TensorBoard showed the earlier run's curves, the
    new run's purged. A later second sorts after, whatever `n`."""
    now = int(time.time())
    if any(p.name.startswith(f"events.out.tfevents.{now:010d}.") for p in log_dir.glob("events.out.tfevents.*")):
        time.sleep(max(0.0, now + 1 - time.time()) + 0.01)


class TensorBoardReporter(Reporter):
    """Scalars (and the sample as text) in `log_dir`, for ``tensorboard --logdir``.

    `log_dir` holds one run, as the output dir holds one model. Events an earlier writer left there are
    purged from TensorBoard's view (they stay on disk) from where this run begins: a fresh run in the same
    dir hides the old run's curves instead of drawing both as one zig-zag line, and a resumed run hides
    what the interrupted one logged after the checkpoint it goes on from (it logs those steps again).
    """

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = Path(log_dir)
        self.writer = None

    def start(self, cfg, info):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            warnings.warn("tensorboard is not installed: no TensorBoard events (pip install tensorboard)")
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        _after_this_seconds_event_files(self.log_dir)
        start = int(info.get("start_step") or 0)  # a resumed run keeps the checkpoint's own step, which it logs no more
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=start + 1 if start else 0)
        self.writer.add_text("config", _markdown_table(cfg.to_record()), 0)

    def _scalars(self, step, metrics):
        if self.writer is None:
            return
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                self.writer.add_scalar(k, v, step)

    def log(self, step, metrics):
        self._scalars(step, metrics)

    def evaluate(self, step, metrics, checkpoint_dir):
        self._scalars(step, metrics)
        if self.writer is not None:
            self.writer.flush()

    def sample(self, text):
        if self.writer is not None:
            self.writer.add_text("sample", "```\n" + text + "\n```", 0)

    def finish(self, result):
        if self.writer is not None:
            self.writer.add_text("status", result.status, result.steps)
            self.writer.close()
            self.writer = None


def _markdown_table(d: dict[str, Any]) -> str:
    return "| key | value |\n|---|---|\n" + "\n".join(f"| {k} | {v!r} |" for k, v in d.items())


# ----------------------------------------------------------------------- W&B


def wandb_api_key_present() -> bool:
    """True when W&B would find credentials: WANDB_API_KEY, an identity token file, or the netrc entry of
    the W&B host (``wandb login`` writes it as host:port when the URL has a port, as a self-hosted
    server's often does; an entry under the bare host name is taken too)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    netloc = wandb_base_url().split("://")[-1].split("/")[0]
    path = os.environ.get("NETRC") or next((p for p in ("~/.netrc", "~/_netrc") if os.path.exists(os.path.expanduser(p))),
                                           "~/.netrc")
    try:
        rc = netrc.netrc(os.path.expanduser(path))
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any((rc.authenticators(h) or (None, None, None))[2] for h in dict.fromkeys((netloc, netloc.split(":")[0])))


WANDB_PROBE_TIMEOUT_S = 3.0  # how long the W&B host may take to accept a TCP connection
# How long a finished run waits for W&B's uploads (W&B's default: for ever, so a network that went down during
# a long run held the finished run's process, its result already written, without a word). Long enough for a
# model artifact (GPT-2 124M: ~0.5 GB) on a slow uplink; what is not uploaded stays on disk for `wandb sync`.
WANDB_FINISH_TIMEOUT_S = 600.0


def wandb_base_url() -> str:
    """The W&B server: WANDB_BASE_URL, else the ``base_url`` that ``wandb login --host`` saved in W&B's
    settings (this folder's ``wandb/settings``, then ``$WANDB_CONFIG_DIR/settings``, by default
    ``~/.config/wandb/settings``), else W&B's cloud."""
    url = os.environ.get("WANDB_BASE_URL")
    if not url:
        import configparser

        config_dir = os.environ.get("WANDB_CONFIG_DIR") or os.path.join("~", ".config", "wandb")
        for path in (os.path.join("wandb", "settings"), os.path.join(os.path.expanduser(config_dir), "settings")):
            parser = configparser.ConfigParser()
            try:
                parser.read(path)
            except configparser.Error:
                continue
            url = parser.get("default", "base_url", fallback=None)
            if url:
                break
    return (url or "https://api.wandb.ai").strip().rstrip("/")


def wandb_host_reachable(url: str | None = None, timeout: float = WANDB_PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """(True, "") when a TCP connection to the W&B host opens within `timeout` seconds, else (False, why).

    Goes to the proxy instead when one is configured for the URL (``HTTPS_PROXY``, ``NO_PROXY``
    respected). Name resolution is bounded too: the probe runs in a thread that is given up on.
    """
    import socket
    import threading
    import urllib.parse
    import urllib.request

    url = url or wandb_base_url()
    parts = urllib.parse.urlsplit(url if "://" in url else f"https://{url}")
    host, scheme = parts.hostname, parts.scheme or "https"
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        return False, f"bad port in {url}"
    if not host:
        return False, f"no host in {url}"
    proxy = urllib.request.getproxies().get(scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        pp = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if pp.hostname:
            host, port = pp.hostname, pp.port or 80
    outcome: dict[str, str] = {}

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome["ok"] = ""
        except OSError as exc:
            outcome["error"] = exc.strerror or str(exc) or type(exc).__name__

    t = threading.Thread(target=probe, name="wandb-probe", daemon=True)
    t.start()
    t.join(timeout + 0.5)
    if "ok" in outcome:
        return True, ""
    return False, f"{host}:{port}: " + outcome.get("error", f"no answer within {timeout:g} s")


def resolve_wandb_mode(requested: str | None = None, *, probe: bool = True) -> str:
    """online / offline / disabled: explicit request, then WANDB_MODE, then 'is there a key'.

    Online needs the W&B host: when it does not accept a connection within a few seconds
    (`wandb_host_reachable`, skipped with ``probe=False``), the run goes offline with a message,
    instead of waiting for W&B's own init timeout, and can be uploaded later with ``wandb sync``.
    """
    mode = _wanted_wandb_mode(requested)
    if mode == "online" and probe:
        ok, why = wandb_host_reachable()
        if not ok:
            print(f"W&B: cannot reach {redact(wandb_base_url())} ({redact(why)}): logging offline instead; "
                  "the runs can be uploaded later with `wandb sync`", file=sys.stderr, flush=True)
            return "offline"
    return mode


WANDB_ALIASES = {"dryrun": "offline", "run": "online"}  # W&B's older names
WANDB_MODES = ("online", "offline", "disabled", *WANDB_ALIASES, "shared")  # what W&B accepts in WANDB_MODE


def check_wandb_env() -> None:
    """An empty WANDB_MODE means unset (``export WANDB_MODE=``): it is removed, since W&B itself refuses
    it (each run would fail to start); a value W&B does not know is a one-line error naming it."""
    value = os.environ.get("WANDB_MODE")
    if value is None:
        return
    if not value.strip():
        del os.environ["WANDB_MODE"]
    elif value not in WANDB_MODES:
        from tune_gpt.errors import ConfigError

        raise ConfigError(f"WANDB_MODE={value!r}: W&B knows only online, offline or disabled (or unset it)")


def _wanted_wandb_mode(requested: str | None) -> str:
    check_wandb_env()
    if requested:
        return requested
    env = os.environ.get("WANDB_MODE")
    if env in WANDB_MODES and env != "shared":  # shared: a W&B multi-process setting, not online/offline
        return WANDB_ALIASES.get(env, env)
    if os.environ.get("WANDB_DISABLED", "").lower() in ("true", "1", "yes"):
        return "disabled"
    return "online" if wandb_api_key_present() else "offline"


def wandb_available() -> bool:
    try:
        import wandb  # noqa: F401
    except ImportError:
        return False
    return True


class WandbReporter(Reporter):
    """One W&B run: config, history, the sample, and (optionally) the model."""

    def __init__(
        self,
        output_dir: str | Path,
        *,
        job_type: str = "train",
        tags: list[str] | None = None,
        extra_config: dict[str, Any] | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.job_type = job_type
        self.extra_tags = tags or []
        self.extra_config = extra_config or {}
        self.run = None
        self.mode = "disabled"
        self.log_model = False
        self._step = 0  # the last step logged
        self._sample = None  # the sample, logged with the evaluation that follows it (train() makes it just before)
        self._where: dict[str, Any] = {}

    def start(self, cfg, info):
        if not cfg.wandb.enabled:
            return
        if not wandb_available():
            warnings.warn("wandb is not installed: logging to TensorBoard only (pip install wandb)")
            return
        import wandb

        self.mode = resolve_wandb_mode(cfg.wandb.mode)
        if self.mode == "disabled":
            return
        self.log_model = cfg.wandb.log_model
        self.output_dir.mkdir(parents=True, exist_ok=True)
        config = {k: v for k, v in cfg.to_record().items() if not k.startswith("wandb.")}
        config.update({"n_params": info["n_params"], "vocab_size": info["vocab_size"], "corpus": info["corpus"],
                       "bf16_products": bool(info.get("bf16_products"))})
        config.update(self.extra_config)
        tags = [cfg.model_size, "single-gpu", *self.extra_tags]
        self._where = {"project": cfg.wandb.project, "entity": cfg.wandb.entity, "mode": self.mode}
        kwargs = dict(
            project=cfg.wandb.project,
            entity=cfg.wandb.entity,
            name=cfg.wandb.run_name,
            group=cfg.wandb.group,
            job_type=self.job_type,
            tags=list(dict.fromkeys(tags)),
            config=config,
            dir=str(self.output_dir),
            mode=self.mode,
            reinit="create_new",
            settings=wandb.Settings(init_timeout=60, console="off", silent=True, **_finish_timeout(wandb)),
        )
        again = _run_to_resume(info.get("reporter_state"), self._where)
        with _argv_redacted():  # W&B records the command line in the run's metadata
            self._init_run(wandb, kwargs, again, cfg)
        define_step_axis(self.run)
        if self.mode == "offline":
            print(
                f"W&B: no API key found (or offline mode): run saved offline in {self.run.dir.rsplit('/files', 1)[0]}; "
                f"upload it later with: wandb sync {self.output_dir / 'wandb'}/offline-run-*",
                file=sys.stderr,
            )

    def _init_run(self, wandb: Any, kwargs: dict[str, Any], again: str | None, cfg: "TrainConfig") -> None:
        """Go on in the W&B run the checkpoint resumed from wrote (`again`) where it can, else start one."""
        if again is not None:
            # A run resumed from a checkpoint goes on in the W&B run that wrote it (W&B drops the steps it
            # already has); an out-of-memory retry may have changed the batch size.
            try:
                self.run = wandb.init(**kwargs, id=again, resume="allow", allow_val_change=True)
            except Exception as exc:  # noqa: BLE001 - e.g. the run was deleted: a new run beats no run
                warnings.warn(f"W&B: cannot go on in run {again} ({' '.join(str(exc).split())[:200]}); "
                              "starting a new run")
        if self.run is None:
            try:
                self.run = wandb.init(**kwargs)
            except Exception as exc:  # noqa: BLE001 - a refused key, an unknown entity, a server that does not answer
                where = f"project {cfg.wandb.project!r}" + (f", entity {cfg.wandb.entity!r}" if cfg.wandb.entity else "")
                raise TuneGPTError(f"W&B: cannot start a run ({where}, {self.mode}): "
                                   f"{' '.join(str(exc).split())[:300]}; --wandb_mode offline logs it locally, "
                                   f"--no-wandb runs without W&B") from None

    def checkpoint_state(self):
        if self.run is None:
            return {}
        return {"wandb": {"id": self.run.id, **self._where}}  # no key, no URL: ids and names only

    def log(self, step, metrics):
        if self.run is not None:
            self._step = step
            self.run.log(_numeric(metrics), step=step)

    def evaluate(self, step, metrics, checkpoint_dir):
        if self.run is not None:
            self._step = step
            data = _numeric(metrics)
            if self._sample is not None:
                data["sample"], self._sample = self._sample, None
            self.run.log(data, step=step)

    def sample(self, text):
        if self.run is not None:
            import wandb

            # the text in the summary (the runs table, search) under a key of its own: the Html logged as
            # "sample" (the media panel) makes W&B's summary "sample" that media file once its row is written
            self.run.summary["sample_text"] = text
            # Logged with the last evaluation, at its step: logged now without a step, it moved W&B past that
            # step and the evaluation was dropped as out of order.
            self._sample = wandb.Html("<pre>" + _html_escape(text) + "</pre>")

    def finish(self, result):
        if self.run is None:
            return
        import wandb

        if self._sample is not None:
            self.run.log({"sample": self._sample}, step=self._step)
            self._sample = None

        for k in ("status", "best_val_loss", "final_val_loss", "steps", "tokens", "wall_s", "tokens_per_s"):
            v = getattr(result, k)
            if v is not None:
                self.run.summary[k] = v
        if self.log_model and result.model_path:
            art = wandb.Artifact(f"model-{self.run.id}", type="model", metadata={"val_loss": result.final_val_loss})
            art.add_file(result.model_path)
            self.run.log_artifact(art)
        run_dir = self.run.dir.rsplit("/files", 1)[0]
        run_id = self.run.id
        try:
            self.run.finish(exit_code=0 if result.status == "finished" else 1)
        except TimeoutError:  # (finish_timeout_raises) the result and the checkpoints are written already
            print(f"W&B: the upload did not end within {WANDB_FINISH_TIMEOUT_S:g} s (is the network down?); the run "
                  f"is kept in {run_dir}: upload it with: wandb sync {run_dir}", file=sys.stderr)
        finally:
            self.run = None
        if self.mode == "offline":  # said again at the end, where a user reads (the start's line scrolled away)
            # a resumed run left a piece per start, under one id (W&B adds -1, -2 to one that starts in the
            # same second): wandb sync takes them together, in order
            pieces = list(Path(run_dir).parent.glob(f"offline-run-*-{run_id}*"))
            sync = f"{Path(run_dir).parent}/offline-run-*-{run_id}*" if len(pieces) > 1 else run_dir
            print(f"W&B: offline run in {run_dir}; upload it with: wandb sync {sync}", file=sys.stderr)


def _finish_timeout(wandb: Any) -> dict[str, Any]:
    """W&B's settings that bound ``run.finish()``'s wait for uploads (and make it raise TimeoutError when
    the time is up), where this W&B has them."""
    fields = getattr(wandb.Settings, "model_fields", {})
    if "finish_timeout" not in fields or "finish_timeout_raises" not in fields:
        return {}
    return {"finish_timeout": WANDB_FINISH_TIMEOUT_S, "finish_timeout_raises": True}


@contextlib.contextmanager
def _argv_redacted():
    """`sys.argv` with URL secrets left out while W&B starts a run: it writes the command line into the
    run's metadata, and ``--data https://host/corpus.txt?token=...`` would take the token there."""
    argv = sys.argv
    sys.argv = [redact(a) for a in argv]
    try:
        yield
    finally:
        sys.argv = argv


def _run_to_resume(state: Any, where: dict[str, Any]) -> str | None:
    """The id of the W&B run that wrote the checkpoint a run resumes from, when it logged to the same
    project and entity in the same mode (an offline piece and an online one under one id are not known
    to merge)."""
    prev = state.get("wandb") if isinstance(state, dict) else None
    if not isinstance(prev, dict) or any(prev.get(k) != v for k, v in where.items()):
        return None
    run_id = prev.get("id")
    return run_id if isinstance(run_id, str) and run_id else None


def _is_terminal(stream: Any) -> bool:
    """A terminal, or a Jupyter kernel (whose streams are not ttys; tqdm.auto draws a widget there)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    if any(c.__name__ == "ZMQInteractiveShell" for c in type(shell).__mro__):  # in a kernel (Colab's Shell is
        return True  # a subclass), not merely having imported one
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


# What train() reports, plotted against its training step ("step") in W&B: a search's trial runs are
# logged by Ray's callback at W&B step = the evaluation count, a single run and a replay at the training
# step, so without this the trials and the final run of one group drew on two different x-axes.
STEP_AXIS_METRICS = ("train/*", "val/*", "best/*", "cpu/*", "gpu/*", "lr", "tokens", "epoch", "tokens_per_s",
                     "rss_gb", "mfu")


def define_step_axis(run: Any) -> None:
    """Make the training step the x-axis of every metric train() reports (W&B globs take a prefix only)."""
    run.define_metric("step")
    for name in STEP_AXIS_METRICS:
        run.define_metric(name, step_metric="step")


def _numeric(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _html_escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# ------------------------------------------------------------ system metrics


_UTIL_WARNED = False  # the missing-NVML warning, once a process


class SystemMetrics:
    """GPU memory and utilisation, CPU %, RSS: cheap enough to read at every log."""

    def __init__(self, device: Any) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self._proc = None
        self._util = None
        try:
            import psutil

            self._proc = psutil.Process()
            self._proc.cpu_percent(None)  # first call primes the counter
        except ImportError:  # pragma: no cover - psutil comes with ray
            pass
        if self.device.type == "cuda":
            try:  # torch maps the device through CUDA_VISIBLE_DEVICES (Ray gives a trial "its" GPU as cuda:0)
                torch.cuda.utilization(self.device)  # to NVML's index; on ROCm it asks amdsmi
                self._util = True
            except Exception as exc:  # no NVML / amdsmi, or a driver without it: utilisation is left out
                self._util = None
                global _UTIL_WARNED
                if not _UTIL_WARNED:
                    _UTIL_WARNED = True
                    warnings.warn(f"GPU utilisation is not logged ({type(exc).__name__}: {exc}); it needs NVML: "
                                  "pip install nvidia-ml-py (the gpu extra: pip install 'tune_gpt[gpu]')")

    def read(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self._proc is not None:
            out["cpu/percent"] = self._proc.cpu_percent(None)
            out["rss_gb"] = self._proc.memory_info().rss / 1e9
        if self.device.type == "cuda":
            cuda = self.torch.cuda
            out["gpu/mem_gb"] = cuda.memory_allocated(self.device) / 1e9
            out["gpu/mem_reserved_gb"] = cuda.memory_reserved(self.device) / 1e9
            out["gpu/max_mem_gb"] = cuda.max_memory_allocated(self.device) / 1e9
            if self._util:
                try:
                    out["gpu/util"] = float(cuda.utilization(self.device))
                except Exception:
                    pass
        return out


def default_reporters(cfg: "TrainConfig", *, job_type: str = "train", tags: list[str] | None = None,
                      extra_config: dict[str, Any] | None = None) -> MultiReporter:
    """Console + TensorBoard (<output_dir>/logs) + W&B, as a single run wants them."""
    out = Path(cfg.output_dir).expanduser().resolve()
    reps: list[Reporter] = [ConsoleReporter(progress=cfg.progress)]
    if cfg.tensorboard:
        reps.append(TensorBoardReporter(out / "logs"))
    if cfg.wandb.enabled:
        reps.append(WandbReporter(out, job_type=job_type, tags=tags, extra_config=extra_config))
    return MultiReporter(reps)
