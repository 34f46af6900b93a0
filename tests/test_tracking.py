from __future__ import annotations

import os
import glob
import re
from pathlib import Path

import pytest

from tune_gpt.config import TrainConfig
from tune_gpt.tracking import default_reporters, resolve_wandb_mode
from tune_gpt.train import train
from wandb_offline import offline_runs


def _scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return acc


def test_single_run_writes_tensorboard_and_offline_wandb(tiny_cfg, tmp_path, capsys):
    cfg = tiny_cfg(wandb_project="tune-gpt-tests", wandb_run_name="unit", wandb_entity=None)
    res = train(cfg, default_reporters(cfg))
    out = tmp_path / "out"
    last = capsys.readouterr().err.strip().splitlines()[-1]  # the run's last words: how to upload it
    assert last.startswith("W&B: offline run in ") and " wandb sync " in last, last
    assert Path(last.split(" wandb sync ")[1]).parent == out / "wandb"
    assert Path(last.split(" wandb sync ")[1]).name.startswith("offline-run-")

    acc = _scalars(out / "logs")
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "val/loss", "val/bpc", "lr", "tokens_per_s", "cpu/percent", "rss_gb"} <= tags
    val = acc.Scalars("val/loss")
    assert [e.step for e in val] == [10, 20, 30, 40]
    assert val[-1].value == pytest.approx(res.final_val_loss, rel=1e-6)
    train_loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert len(acc.Scalars("train/loss")) == len(train_loss)  # one point a step, also where a log meets an eval
    assert sorted(train_loss) == [5, 10, 15, 20, 25, 30, 35, 40]
    assert train_loss[40] == pytest.approx(res.history[-1]["train/loss"], rel=1e-6)  # the evaluation's
    assert "sample" in " ".join(acc.Tags()["tensors"])

    (run,) = offline_runs(out)
    assert run.project == "tune-gpt-tests" and run.name == "unit"
    assert set(run.tags) == {"tiny", "single-gpu"} and run.job_type == "train"
    assert run.config["learning_rate"] == pytest.approx(3e-3) and run.config["batch_size"] == 8
    assert run.config["model.n_layer"] == 2 and run.config["n_params"] > 0
    assert not any(k.startswith("wandb.") for k in run.config)
    assert {"train/loss", "val/loss", "val/bpc", "lr", "tokens_per_s", "epoch", "step"} <= run.history_keys
    vals = [row["val/loss"] for row in run.history if "val/loss" in row]
    assert vals[-1] == pytest.approx(res.final_val_loss, rel=1e-6)
    assert run.summary["status"] == "finished" and run.summary["sample_text"] == res.sample
    assert "sample/_type" in run.history_keys  # logged (as HTML) at the last step, before the last evaluation
    assert run.summary["sample"]["_type"] == "html-file"  # what W&B's summary makes of it
    assert run.step_metrics["val/*"] == run.step_metrics["train/*"] == run.step_metrics["lr"] == "step"


def test_wandb_logs_the_sample_with_the_last_evaluation(tiny_cfg):
    """train() makes the sample just before its last evaluation: W&B gets both at the last step, even when
    that step is no logging step (25 here, logging every 15), and the evaluation is not dropped."""
    cfg = tiny_cfg(wandb_project="tune-gpt-tests", max_steps=25, eval_interval=10, log_interval=15, tensorboard=False)
    res = train(cfg, default_reporters(cfg))
    (run,) = offline_runs(Path(cfg.output_dir))
    (row,) = [r for r in run.history if "sample/_type" in r]
    assert row["_step"] == 25 and row["val/loss"] == pytest.approx(res.final_val_loss, rel=1e-6), row
    assert run.summary["sample_text"] == res.sample and res.sample


def test_a_resumed_run_goes_on_in_the_wandb_run_it_began(tiny_cfg, capsys):
    """--resume continues the W&B run that wrote the checkpoint (its id is kept in the checkpoint; W&B
    resume="allow" appends, and `wandb sync` uploads the offline pieces in order as one run), not a second
    run. A checkpoint written without W&B, or a resume logging to another project, starts a run of its own."""
    from tune_gpt.train import load_checkpoint

    def cfg_for(project="tune-gpt-tests", **kw):
        return tiny_cfg(wandb_project=project, max_steps=40, eval_interval=10, tensorboard=False, **kw)

    out = Path(cfg_for().output_dir)
    train(cfg_for(), default_reporters(cfg_for()), stop_after=20)
    kept = load_checkpoint(out / "checkpoint")["reporters"]
    assert set(kept) == {"wandb"} and set(kept["wandb"]) == {"id", "project", "entity", "mode"}  # ids, no key
    capsys.readouterr()
    res = train(cfg_for(resume=True), default_reporters(cfg_for(resume=True)))
    runs = offline_runs(out)
    assert len(runs) == 2 and runs[0].run_id == runs[1].run_id == kept["wandb"]["id"]
    # the end's upload command names both pieces (the last alone would upload half the run)
    (said,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("W&B: offline run in ")]
    assert said.endswith(f"upload it with: wandb sync {out / 'wandb'}/offline-run-*-{kept['wandb']['id']}*"), said
    # the glob takes both pieces, whether or not they began in the same second (W&B names the second ...-ID-1)
    assert len(glob.glob(said.rsplit("wandb sync ", 1)[1])) == 2
    steps = {tuple(r["_step"] for r in run.history if "val/loss" in r): run for run in runs}
    first, second = steps[(10, 20)], steps[(30, 40)]  # the history goes on where the first piece stopped
    assert second.summary["status"] == "finished" and second.summary["steps"] == res.steps == 40
    assert first.exit_code == 0 and second.exit_code == 0  # each piece was closed

    # a fresh run in the same dir without W&B overwrites the checkpoint: resuming it must not go on in A's run
    train(cfg_for(**{"wandb.enabled": False}), default_reporters(cfg_for(**{"wandb.enabled": False})), stop_after=20)
    train(cfg_for(resume=True), default_reporters(cfg_for(resume=True)), stop_after=30)
    train(cfg_for("elsewhere", resume=True), default_reporters(cfg_for("elsewhere", resume=True)))  # other project
    runs = offline_runs(out)
    by_project = {p: {r.run_id for r in runs if r.project == p} for p in ("tune-gpt-tests", "elsewhere")}
    assert len(runs) == 4 and len(by_project["tune-gpt-tests"]) == 2 and len(by_project["elsewhere"]) == 1, by_project
    assert not by_project["elsewhere"] & by_project["tune-gpt-tests"]



def test_tensorboard_shows_one_run_per_output_dir_after_a_rerun_or_a_resume(tiny_cfg):
    """logs/ holds one run: a fresh run in the same dir hides the earlier run's events (Python's loader drew
    both as one zig-zag line), and a resume from an earlier checkpoint hides what was logged after it."""
    import shutil

    def losses(out):
        points = _scalars(out / "logs").Scalars("train/loss")
        steps = [e.step for e in points]
        assert len(steps) == len(set(steps)), f"a step shown twice: {steps}"
        return {e.step: e.value for e in points}

    first = tiny_cfg(tensorboard=True, **{"wandb.enabled": False})
    out = Path(first.output_dir)
    train(first, default_reporters(first))
    again = tiny_cfg(tensorboard=True, learning_rate=1e-2, seed=7, **{"wandb.enabled": False})
    res = train(again, default_reporters(again))
    shown = losses(out)
    assert sorted(shown) == [5, 10, 15, 20, 25, 30, 35, 40]
    assert shown[40] == pytest.approx(res.history[-1]["train/loss"], rel=1e-6)  # the second run's, not the first's

    # an interrupted run: it logged past its last checkpoint (step 20) before it stopped
    cfg = tiny_cfg(output_dir=str(out.parent / "resumed"), tensorboard=True, **{"wandb.enabled": False})
    resumed_out = Path(cfg.output_dir)
    train(cfg, default_reporters(cfg), stop_after=20)
    shutil.copytree(resumed_out / "checkpoint", out.parent / "at20")
    resume = TrainConfig.from_flat({**cfg.to_flat(), "resume": True})
    train(resume, default_reporters(resume), stop_after=30)
    shutil.rmtree(resumed_out / "checkpoint")
    shutil.copytree(out.parent / "at20", resumed_out / "checkpoint")  # back to step 20: 25 and 30 are logged again
    res = train(resume, default_reporters(resume))
    shown = losses(resumed_out)
    assert sorted(shown) == [5, 10, 15, 20, 25, 30, 35, 40] and res.steps == 40


@pytest.fixture
def local_wandb_host(monkeypatch):
    """A port on 127.0.0.1 that accepts connections, as WANDB_BASE_URL (no real network)."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
    yield server
    server.close()


def test_wandb_mode_follows_key_and_environment(monkeypatch, tmp_path, local_wandb_host):
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert resolve_wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode() == "disabled"
    assert resolve_wandb_mode("offline") == "offline"
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login user password " + "y" * 40 + "\n")
    netrc.chmod(0o600)
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("NETRC", str(netrc))
    assert resolve_wandb_mode() == "online"


def test_a_self_hosted_w_and_b_login_is_found(monkeypatch, tmp_path, local_wandb_host):
    """`wandb login --host http://host:port` saves base_url in W&B's settings file and the key in netrc under
    host:port. Only WANDB_BASE_URL and the bare host name were read: such a user always ran offline ("no API
    key found"), and the reachability probe knocked at api.wandb.ai."""
    from tune_gpt.tracking import wandb_api_key_present, wandb_base_url

    url = local_wandb_host.getsockname()
    monkeypatch.delenv("WANDB_BASE_URL")
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)  # no ./wandb/settings
    config = tmp_path / "wandb-config"
    config.mkdir()
    (config / "settings").write_text(f"[default]\nbase_url = http://127.0.0.1:{url[1]}\n")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(config))
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1:{url[1]}\n  login user\n  password {'k' * 40}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert wandb_base_url() == f"http://127.0.0.1:{url[1]}"
    assert wandb_api_key_present() and resolve_wandb_mode() == "online"  # the probe found the host listening
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert not wandb_api_key_present() and resolve_wandb_mode() == "offline"  # a key for another host


def test_empty_wandb_mode_means_unset_and_an_unknown_one_is_refused(monkeypatch, tmp_path):
    """W&B itself refuses WANDB_MODE='' (every run would fail to start, silently inside Ray's actors)."""
    import subprocess
    import sys

    from tune_gpt.errors import ConfigError

    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "")
    assert resolve_wandb_mode() == "offline"
    assert "WANDB_MODE" not in os.environ  # removed, so nothing started later inherits it
    monkeypatch.setenv("WANDB_MODE", "offfline")
    with pytest.raises(ConfigError, match="WANDB_MODE='offfline'"):
        resolve_wandb_mode()
    env = {**os.environ, "WANDB_MODE": "offfline"}
    p = subprocess.run([sys.executable, "-m", "tune_gpt.search", "--name", "x", "--storage-path", str(tmp_path / "r")],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "WANDB_MODE='offfline'" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


def test_unreachable_wandb_host_means_offline_within_seconds(monkeypatch, tmp_path, capsys):
    import socket
    import time

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    closed_port = s.getsockname()[1]
    s.close()  # nothing listens there now: connections are refused
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port}")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    t0 = time.perf_counter()
    assert resolve_wandb_mode() == "offline"
    assert resolve_wandb_mode("online") == "offline"  # an explicit online request cannot reach it either
    assert time.perf_counter() - t0 < 5
    err = capsys.readouterr().err
    assert f"127.0.0.1:{closed_port}" in err and "offline" in err and "wandb sync" in err
    assert resolve_wandb_mode(probe=False) == "online"


def test_without_wandb_installed_it_warns_and_keeps_tensorboard(tiny_cfg, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *a, **kw):
        if name == "wandb" or name.startswith("wandb."):
            raise ImportError("No module named 'wandb'")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    cfg = tiny_cfg(max_steps=10)
    with pytest.warns(UserWarning, match="wandb is not installed"):
        train(cfg, default_reporters(cfg))
    assert list((tmp_path / "out" / "logs").glob("events.out.tfevents.*"))
    assert not (tmp_path / "out" / "wandb").exists()


def test_the_progress_bar_is_for_terminals_piped_output_gets_lines(tiny_cfg):
    """| tee or > log: a bar's carriage returns would glue the evaluation lines onto it."""
    import io

    from tune_gpt.tracking import ConsoleReporter
    from tune_gpt.train import train

    out = io.StringIO()
    train(tiny_cfg(max_steps=20, progress=True), ConsoleReporter(progress=True, stream=out))
    text = out.getvalue()
    assert "\r" not in text
    assert "step 5: train loss" in text and "step 10: train loss" in text and "val loss" in text


def test_the_progress_bar_stays_in_a_jupyter_kernel(monkeypatch):
    """A kernel's streams are not ttys, but tqdm.auto draws a widget there; importing ipykernel is not enough."""
    import io
    import sys
    import types

    from tune_gpt.tracking import _is_terminal

    assert not _is_terminal(io.StringIO())
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    assert not _is_terminal(io.StringIO())
    zmq_shell = type("ZMQInteractiveShell", (), {})
    for kernel in (zmq_shell(), type("Shell", (zmq_shell,), {})()):  # Jupyter's, and Colab's subclass of it
        monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda k=kernel: k))
        assert _is_terminal(io.StringIO())
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: None))  # a plain script
    assert not _is_terminal(io.StringIO())


@pytest.mark.parametrize("error, status", [("CUDA out of memory. Tried to allocate 2.00 GiB", "oom"),
                                           ("[Errno 28] No space left on device", "errored")])
def test_a_run_ended_by_an_exception_still_closes_its_logs(tiny_cfg, capsys, error, status):
    """An out-of-memory error, a full disk or a bug mid-run: the exception goes on up, but first the W&B
    run is finished as failed (left open, a notebook's next train() started a second run beside it) and
    TensorBoard writes its events out, with the status (out of memory: "oom", as trials and replays say)."""
    import wandb

    from tune_gpt.tracking import MultiReporter, Reporter

    class Boom(Reporter):
        def log(self, step, metrics):
            if step == 15:
                raise RuntimeError(error)

    cfg = tiny_cfg(wandb_project="tune-gpt-tests", max_steps=40, eval_interval=10, log_interval=5)
    reps = default_reporters(cfg)
    with pytest.raises(RuntimeError, match=re.escape(error)):
        train(cfg, MultiReporter([*reps.reporters, Boom()]))
    assert wandb.run is None
    (run,) = offline_runs(Path(cfg.output_dir))
    assert run.exit_code == 1 and run.summary["status"] == status and run.summary["steps"] == 15
    assert [row["val/loss"] for row in run.history if "val/loss" in row]  # what it logged before is there
    acc = _scalars(Path(cfg.output_dir) / "logs")
    assert max(e.step for e in acc.Scalars("train/loss")) == 15
    assert f"{status}: 15 steps" in capsys.readouterr().err


def test_a_w_and_b_run_that_cannot_start_is_one_line_and_tensorboard_is_closed(tiny_cfg, monkeypatch):
    """wandb.init refusing (a revoked key, an unknown entity, a server that does not answer) was a traceback
    after TensorBoard had opened its file; now one line that names the project and the ways on."""
    import wandb

    from tune_gpt.errors import TuneGPTError
    from tune_gpt.tracking import TensorBoardReporter

    def refuse(**kwargs):
        raise wandb.errors.CommError("permission denied: entity 'nobody' not found")

    monkeypatch.setattr(wandb, "init", refuse)
    cfg = tiny_cfg(wandb_project="tune-gpt-tests", max_steps=10, tensorboard=True)
    reps = default_reporters(cfg)
    with pytest.raises(TuneGPTError) as err:
        train(cfg, reps)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("W&B: cannot start a run (project 'tune-gpt-tests', offline): ")
    assert "entity 'nobody' not found" in msg and "--wandb_mode offline" in msg and "--no-wandb" in msg
    (tb,) = [r for r in reps.reporters if isinstance(r, TensorBoardReporter)]
    assert tb.writer is None  # closed


def test_a_w_and_b_upload_that_does_not_end_gives_up_and_says_how_to_sync(tiny_cfg, monkeypatch, capsys):
    """run.finish() waits for W&B's uploads for ever by default: a network gone during a long run held the
    finished run's process without a word. The wait is bounded (W&B's finish_timeout), and when it runs out
    (W&B raises TimeoutError, finish_timeout_raises) the run ends normally and says how to upload later."""
    import wandb
    from wandb.sdk.wandb_run import Run

    from tune_gpt.tracking import WANDB_FINISH_TIMEOUT_S

    settings, finish = [], Run.finish

    def init(*args, **kwargs):
        settings.append(kwargs["settings"])
        return real_init(*args, **kwargs)

    def finish_timed_out(self, *args, **kwargs):
        finish(self, *args, **kwargs)
        raise TimeoutError("Timed out finishing run.")  # what W&B raises once its finish_timeout is up

    real_init = wandb.init
    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setattr(Run, "finish", finish_timed_out)
    cfg = tiny_cfg(wandb_project="tune-gpt-tests", max_steps=10, eval_interval=5)
    result = train(cfg, default_reporters(cfg))
    assert result.status == "finished"
    assert settings and settings[0].finish_timeout == WANDB_FINISH_TIMEOUT_S and settings[0].finish_timeout_raises
    (run,) = offline_runs(Path(cfg.output_dir))
    err = capsys.readouterr().err
    assert f"W&B: the upload did not end within {WANDB_FINISH_TIMEOUT_S:g} s" in err, err
    assert f"upload it with: wandb sync {run.path.parent}" in err, err
    assert wandb.run is None


def test_every_reporter_closes_when_one_before_it_fails_and_the_bar_counts_the_steps_this_run_takes(tiny_cfg):
    """TensorBoard's close failing (a full disk) skipped the W&B run's finish: left open, a notebook's next
    train() started a second run beside it. And with stop_after (replay --check) the bar's total and ETA
    counted the whole budget and closed at 25 %."""
    import io

    import wandb

    from tune_gpt.tracking import ConsoleReporter, MultiReporter, Reporter

    class FullDisk(Reporter):
        def finish(self, result):
            raise OSError(28, "No space left on device")

    class Unreachable(Reporter):
        def finish(self, result):
            raise ConnectionError("https://alice:PW0rd@wandb.example/: refused")

    cfg = tiny_cfg(wandb_project="tune-gpt-tests", max_steps=40, eval_interval=10)
    reps = default_reporters(cfg)
    with pytest.raises(OSError, match="No space left"), pytest.warns(UserWarning) as said:
        train(cfg, MultiReporter([FullDisk(), *reps.reporters, Unreachable()]))
    # the second failure is not lost behind the first, and its password stays out of the warning
    assert [str(w.message) for w in said if "closing failed" in str(w.message)] == [
        "Unreachable: closing failed as well (ConnectionError: https://alice:***@wandb.example/: refused)"]
    assert wandb.run is None
    (run,) = offline_runs(Path(cfg.output_dir))
    assert run.exit_code is not None

    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    console = ConsoleReporter(stream=out)
    console.progress = True
    train(tiny_cfg(max_steps=40, eval_interval=10), console, stop_after=10)
    text = out.getvalue()
    assert "10 steps of" in text and "10/10" in text and "/40" not in text, text[-500:]


def test_a_second_run_in_the_same_second_is_the_one_tensorboard_shows(tmp_path, monkeypatch):
    """TensorBoard reads event files in name order, events.out.tfevents.<second>.<host>.<pid>.<n> with n
    counting the process's writers: two runs in one folder in the same second, n 9 then 10, sorted the new
    run first, and TensorBoard showed the old run's curve (the suite caught it once, by the order its tests
    ran in). The second run's writer now starts in a later second."""
    from tensorboard.summary.writer import event_file_writer

    from tune_gpt.tracking import TensorBoardReporter

    monkeypatch.setattr(event_file_writer, "_global_uid", event_file_writer.AtomicCounter(9))
    cfg = TrainConfig.from_flat({"max_steps": 20})
    for loss in (1.0, 2.0):  # the earlier run, then this one: well within a second
        tb = TensorBoardReporter(tmp_path / "logs")
        tb.start(cfg, {})
        for step in (5, 10):
            tb.log(step, {"train/loss": loss})
        tb.writer.close()
    assert sorted(p.name.rsplit(".", 1)[1] for p in (tmp_path / "logs").iterdir()) == ["10", "9"]  # n 9, then 10
    assert [e.value for e in _scalars(tmp_path / "logs").Scalars("train/loss")] == [2.0, 2.0]


def test_where_warnings_are_errors_every_reporter_is_still_closed():
    """The warning for a second failure is made after all reporters closed: under -W error it would
    otherwise have left the ones after it open."""
    import warnings

    from tune_gpt.tracking import MultiReporter, Reporter

    closed = []

    class Fails(Reporter):
        def finish(self, result):
            raise OSError(28, "No space left on device")

    class Closes(Reporter):
        def finish(self, result):
            closed.append(result)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(OSError, match="No space left"):
            MultiReporter([Fails(), Fails(), Closes()]).finish("result")
    assert closed == ["result"]
