from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from wandb_offline import read_offline_run


def run(*args):
    env = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)


def test_check_replays_the_best_trial_exactly(finished_search, tmp_path):
    p = run("-m", "tune_gpt.replay", str(finished_search.experiment_dir), "--check", "--output-dir",
            str(tmp_path / "check"), "--no-wandb")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "check: MATCH" in p.stdout
    summary = json.loads((tmp_path / "check" / "replay_summary.json").read_text())
    assert summary["match"] is True and abs(summary["difference"]) <= 1e-4
    assert summary["trial_val_loss"] == finished_search.best_metric or summary["trial_val_loss"] is not None


def test_a_check_multiplies_as_its_trial_did_whatever_this_cpu_does(tmp_path):
    from tune_gpt.replay import trial_config

    common = dict(check=True, output_dir=str(tmp_path), max_steps=None, epochs=None, wandb=False)
    params = {"learning_rate": 1e-3, "matmul_precision": "auto"}
    assert trial_config(params, tmp_path, "t1", trial_bf16_products=True, **common).matmul_precision == "medium"
    assert trial_config(params, tmp_path, "t1", trial_bf16_products=False, **common).matmul_precision == "highest"
    final = trial_config(params, tmp_path, "t1", **{**common, "check": False}, trial_bf16_products=True)
    assert final.matmul_precision == "auto"  # a final run uses what this machine does best


def test_a_trial_whose_corpus_url_lost_its_token_is_replayed_only_with_data_given_again(tmp_path):
    import pytest

    from tune_gpt.errors import ConfigError
    from tune_gpt.replay import main, trial_config

    common = dict(check=False, output_dir=str(tmp_path), max_steps=None, epochs=None, wandb=False)
    params = {"learning_rate": 1e-3, "data": "https://host/c.txt?token=***"}
    with pytest.raises(ConfigError, match=r"^replay: trial t1 trained on https://host/c\.txt\?token=\*\*\*, whose "
                                          r"password or token the experiment does not keep: give --data"):
        trial_config(params, tmp_path, "t1", **common)
    assert trial_config(params, tmp_path, "t1", **common, data="https://host/c.txt?token=abc").data.endswith("=abc")
    plain = {"learning_rate": 1e-3, "data": "https://host/c.txt"}  # nothing left out: replayed as it is
    assert trial_config(plain, tmp_path, "t1", **common).data == "https://host/c.txt"
    assert main([str(tmp_path), "--data", " "]) == 2  # an empty --data: one line, before anything is read


def test_longer_replay_writes_a_model_generate_can_sample(finished_search, tmp_path):
    out = tmp_path / "final"
    p = run("-m", "tune_gpt.replay", str(finished_search.experiment_dir), "--max-steps", "30", "--output-dir", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((out / "replay_summary.json").read_text())
    assert summary["steps"] == 30 and summary["status"] == "finished"
    assert summary["final_val_loss"] < summary["trial_val_loss"] + 0.5
    run_dir = next((out / "wandb").glob("offline-run-*"))
    w = read_offline_run(run_dir)
    assert w.job_type == "final" and w.group == finished_search.experiment_dir.name
    assert w.config["replay_of"] == summary["trial_id"]
    g = run("-m", "tune_gpt.generate", "--checkpoint", str(out), "--prompt", "the ", "--max_new_tokens", "25")
    assert g.returncode == 0, g.stderr
    assert g.stdout.startswith("the ") and "\ufffd" not in g.stdout
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    again = run("-m", "tune_gpt.replay", str(finished_search.experiment_dir), "--max-steps", "20", "--output-dir", str(out))
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1, again.stderr[-3000:]
    assert f"replay: {out} already holds a final run (30 steps, val loss " in again.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files  # the earlier final run is intact


def test_unknown_trial_is_a_one_line_error(finished_search):
    p = run("-m", "tune_gpt.replay", str(finished_search.experiment_dir), "--trial", "nosuchtrial", "--no-wandb")
    assert p.returncode == 2 and "nosuchtrial" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_a_check_of_a_trial_that_reported_nothing_and_an_output_dir_that_is_a_file_are_refused_first(tmp_path):
    import pytest
    from fake_experiment import standard_experiment, trial_id

    from tune_gpt.errors import ConfigError
    from tune_gpt.replay import replay

    exp = standard_experiment(tmp_path)
    with pytest.raises(ConfigError, match=r"--check: trial .*\(errored\) reported no val loss"):
        replay(exp, trial_id(6), check=True, output_dir=str(tmp_path / "c"), wandb=False)
    assert not (tmp_path / "c").exists()  # refused before training
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match=r"--output-dir .*afile/sub: cannot be made: .*afile is a file"):
        replay(exp, trial_id(0), output_dir=str(tmp_path / "afile" / "sub"), wandb=False)


def test_a_replay_compares_the_text_its_trial_trained_on(finished_search, tmp_path):
    """Trials record the sha256 of the corpus they trained on; a replay whose --data now reads other text
    (an edited file, a URL fetched again) says so: a check is refused, a final run is warned."""
    import shutil
    from pathlib import Path

    from tune_gpt.data import load_corpus
    from tune_gpt.replay import pick_trial

    exp = tmp_path / "exp"
    shutil.copytree(finished_search.experiment_dir, exp)
    _, row, params = pick_trial(exp)
    status_file = Path(row["trial_dir"]) / "tune_gpt_status.json"
    status = json.loads(status_file.read_text())
    assert status["corpus_sha256"] == load_corpus(params["data"], cache_dir=tmp_path / "cache").sha256
    status_file.write_text(json.dumps({**status, "corpus_sha256": "f" * 64}))  # as if the file changed since

    p = run("-m", "tune_gpt.replay", str(exp), "--check", "--no-wandb")
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("tune_gpt.replay: error: --check: trial"), p.stderr
    assert "ffffffffffff" in p.stderr and "cannot reproduce the trial" in p.stderr
    assert not list(exp.glob("replay-*"))  # refused before anything was written
    p = run("-m", "tune_gpt.replay", str(exp), "--max-steps", "5", "--no-wandb", "--output-dir", str(tmp_path / "final"))
    assert p.returncode == 0 and "the final run trains on today's text" in p.stderr, p.stderr[-2000:]


def test_a_trial_prefix_names_one_trial_and_a_check_never_trains_over_a_run(tmp_path):
    """Trial ids share the search's prefix (abcde_00000, abcde_00001, ...): a prefix that begins several
    replayed the best-ranked of them, quietly. And --check skipped the guard for any --output-dir, so
    `--check --output-dir ./output_single` replaced a trained model and its checkpoint."""
    import pytest
    from fake_experiment import EXP_HASH, standard_experiment, trial_id

    from tune_gpt.errors import ConfigError
    from tune_gpt.replay import replay

    exp = standard_experiment(tmp_path)
    with pytest.raises(ConfigError, match=rf"^--trial: '{EXP_HASH}_0000' begins \d+ trial ids in .*\({EXP_HASH}_00000, "
                                          rf"{EXP_HASH}_00001, .*give more of it"):
        replay(exp, f"{EXP_HASH}_0000", check=True, wandb=False)
    held = tmp_path / "output_single"
    (held / "checkpoint").mkdir(parents=True)
    (held / "checkpoint" / "ckpt.pt").write_bytes(b"a run's checkpoint")
    with pytest.raises(ConfigError, match=r"already holds a run's checkpoint \(checkpoint/ckpt.pt\); give another"):
        replay(exp, trial_id(0), check=True, output_dir=str(held), wandb=False)
    (held / "model.pt").write_bytes(b"a trained model")
    with pytest.raises(ConfigError, match=r"already holds a trained model \(model.pt\)"):
        replay(exp, trial_id(0), check=True, output_dir=str(held), wandb=False)
    assert (held / "model.pt").read_bytes() == b"a trained model"
    # an interrupted replay (its mark says running) may be run again, by the same replay of the same trial only
    from tune_gpt.replay import _replaceable, _summary_in

    mark = tmp_path / "interrupted"
    mark.mkdir()
    (mark / "replay_summary.json").write_text(json.dumps({"trial_id": trial_id(0), "check": False, "status": "running"}))
    assert _replaceable(_summary_in(mark), trial_id(0), check=False)
    assert not _replaceable(_summary_in(mark), trial_id(1), check=False)
    assert not _replaceable(_summary_in(mark), trial_id(0), check=True)
    (mark / "replay_summary.json").write_text(json.dumps({"trial_id": trial_id(0), "check": False, "status": "finished"}))
    assert not _replaceable(_summary_in(mark), trial_id(0), check=False)  # a final run that ended: never trained over


def test_a_trial_that_ran_out_of_memory_is_replayed_at_the_micro_batch_it_went_on_with():
    """The status file records the smaller micro-batch an out-of-memory retry went on with (same effective
    batch); replay took params.json's, which runs out of memory again on the same GPU (replay has no retry)."""
    from tune_gpt.replay import _trial_where
    from tune_gpt.search import TuneReporter

    status = {"status": "finished", "device": "cuda:0", "batch_size": 4, "gradient_accumulation_steps": 4,
              "oom_retries": [{"batch_size": 8, "gradient_accumulation_steps": 2, "resumed_from_step": 50}]}
    assert _trial_where(status)["micro_batch"] == {"batch_size": 4, "gradient_accumulation_steps": 4}
    assert _trial_where({**status, "oom_retries": []})["micro_batch"] is None  # no retry: params.json holds
    # the status file records the device the trial trained on, not the "auto" it was given
    rep = TuneReporter(None, {"device": "auto"})
    rep.start(object(), {"total_steps": 10, "device": "cuda:0"})
    assert rep.where["device"] == "cuda:0"


def test_a_replay_logs_to_the_searchs_w_and_b_group_from_any_path_to_it(tmp_path, monkeypatch):
    """The group was the folder's name as typed: `replay .` ran in group '' and a renamed copy in the copy's
    name, not in the group the trials logged to (the search's name)."""
    import shutil

    from fake_experiment import standard_experiment

    from tune_gpt.replay import _pick, trial_config

    exp = standard_experiment(tmp_path, name="lr-sweep")  # the search's --name; its folder is called otherwise
    copy = tmp_path / "copied"
    shutil.copytree(exp, copy)
    common = dict(check=False, output_dir=str(tmp_path / "final"), max_steps=None, epochs=None, wandb=True)
    monkeypatch.chdir(exp)
    for path in (".", str(copy)):
        exp_dir, row, params, where = _pick(path, None)
        assert where["experiment_name"] == "lr-sweep"
        cfg = trial_config(params, exp_dir, row["trial_id"], **common, experiment_name=where["experiment_name"])
        assert cfg.wandb.group == "lr-sweep"
    assert trial_config({"learning_rate": 1e-3}, ".", "t1", **common).wandb.group == exp.name  # no name known


def test_a_second_replay_into_a_folder_a_replay_is_writing_is_refused(tmp_path, corpus_file, monkeypatch):
    """`replay exp`, then `replay exp --max-steps 5000` in another terminal: the first one's "running" mark
    read as an interrupted replay, and the second trained into the same folder. A replay now holds a lock
    there while it runs (flock, so a crashed replay leaves none)."""
    import fcntl
    import re

    import pytest
    from fake_experiment import standard_experiment, trial_id

    import tune_gpt.data as data_mod
    import tune_gpt.train as train_mod
    from tune_gpt.errors import ConfigError
    from tune_gpt.replay import LOCK_NAME, replay

    def locked_elsewhere(path):
        with open(path, "a") as probe:
            try:
                fcntl.flock(probe.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
        return False

    exp = standard_experiment(tmp_path)
    out = tmp_path / "final"
    out.mkdir()
    (out / "replay_summary.json").write_text(json.dumps({"trial_id": trial_id(0), "check": False, "status": "running"}))
    refused = rf"^replay: another replay is writing {re.escape(str(out))}; "
    args = dict(output_dir=str(out), max_steps=5, wandb=False, data=str(corpus_file))
    with open(out / LOCK_NAME, "a") as first:  # the first replay: another open file description holds the lock
        fcntl.flock(first.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ConfigError, match=refused):
            replay(exp, trial_id(0), **args)
        with pytest.raises(ConfigError, match=refused):  # also while it is another trial's replay
            replay(exp, trial_id(1), **args)
    assert json.loads((out / "replay_summary.json").read_text())["status"] == "running"  # the first one's mark

    trained = []

    def fake_train(cfg, reporters=None, *, stop_after=None, corpus=None):
        assert locked_elsewhere(out / LOCK_NAME)  # held while it trains
        trained.append(cfg.max_steps)
        return train_mod.TrainResult(status="finished", steps=cfg.max_steps, tokens=0, output_dir=cfg.output_dir)

    monkeypatch.setattr(train_mod, "train", fake_train)
    assert replay(exp, trial_id(0), **args)["status"] == "finished"  # the first one gone: its mark is trained over
    assert trained == [5] and not locked_elsewhere(out / LOCK_NAME)  # let go at the end

    # a replay that starts while this one reads the corpus (no lock file yet when this one looked)
    fresh = tmp_path / "fresh"
    load = data_mod.load_corpus
    holder = []

    def load_while_another_starts(*a, **kw):
        fresh.mkdir()
        holder.append(open(fresh / LOCK_NAME, "a"))
        fcntl.flock(holder[0].fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return load(*a, **kw)

    monkeypatch.setattr(data_mod, "load_corpus", load_while_another_starts)
    with pytest.raises(ConfigError, match=rf"^replay: another replay is writing {re.escape(str(fresh))}; "):
        replay(exp, trial_id(0), **{**args, "output_dir": str(fresh)})
    holder[0].close()
    assert trained == [5] and not (fresh / "replay_summary.json").exists()


def test_a_corpus_too_short_for_the_trial_is_refused_before_the_folder_is_marked(tmp_path, monkeypatch, capsys):
    """The context check ran inside train(), after the replay had marked its folder "running": the refused
    replay left a folder saying a replay was under way. Now refused first: no folder."""
    from fake_experiment import standard_experiment, trial_id

    import tune_gpt.train as train_mod
    from tune_gpt.replay import main

    exp = standard_experiment(tmp_path)
    short = tmp_path / "short.txt"
    short.write_text("too short for any context\n")
    out = tmp_path / "final"
    monkeypatch.setattr(train_mod, "train", lambda *a, **kw: pytest.fail("trained"))
    assert main([str(exp), "--trial", trial_id(0), "--output-dir", str(out), "--no-wandb", "--data", str(short),
                 "--max-steps", "5"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"tune_gpt.replay: error: {short}: corpus") and "too short" in last, last
    assert not out.exists()


def test_where_flock_does_not_exist_a_replay_warns_and_goes_on(tmp_path, monkeypatch):
    """Windows has no fcntl: the lock is skipped with a warning, not an ImportError."""
    import sys

    from tune_gpt.replay import LOCK_NAME, _OutputLock

    monkeypatch.setitem(sys.modules, "fcntl", None)  # import fcntl raises ImportError
    with pytest.warns(UserWarning, match=r"cannot lock on this platform"), _OutputLock(tmp_path / "out") as lock:
        lock.take(make=True)
        lock.take(make=True)  # taken once: no second warning
    assert (tmp_path / "out").is_dir() and not (tmp_path / "out" / LOCK_NAME).exists()


def test_a_lock_that_cannot_be_opened_is_one_line_and_nothing_trained(tmp_path, corpus_file, monkeypatch, capsys):
    """A folder named .replay.lock (or another user's 0600 lock file) gave a traceback: one line now."""
    from fake_experiment import standard_experiment, trial_id

    import tune_gpt.train as train_mod
    from tune_gpt.replay import LOCK_NAME, main

    exp = standard_experiment(tmp_path)
    out = tmp_path / "final"
    (out / LOCK_NAME).mkdir(parents=True)
    trained = []
    monkeypatch.setattr(train_mod, "train", lambda *a, **kw: trained.append(1))
    assert main([str(exp), "--trial", trial_id(0), "--output-dir", str(out), "--no-wandb", "--data",
                 str(corpus_file), "--max-steps", "5"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"tune_gpt.replay: error: {out / LOCK_NAME}: cannot open the replay lock (Is a directory); "
                                f"remove it if no replay is writing {out}, or give another --output-dir"], err
    assert trained == [] and sorted(p.name for p in out.iterdir()) == [LOCK_NAME]


def test_a_replay_out_of_memory_says_so_in_one_line_with_the_flags_that_fit(tmp_path, corpus_file, monkeypatch,
                                                                            capsys):
    """A CUDA OOM in a replay printed a traceback (`python -m tune_gpt.train` gives one line suggesting a
    smaller micro-batch). Now the same line, with flags replay takes; the folder's mark says oom, so the
    same replay may run there again with them, and the lock is let go."""
    import fcntl

    from fake_experiment import standard_experiment, trial_id

    import tune_gpt.train as train_mod
    from tune_gpt.replay import LOCK_NAME, main

    exp = standard_experiment(tmp_path)  # trial 0: batch_size 16, no accumulation
    out = tmp_path / "final"
    args = [str(exp), "--trial", trial_id(0), "--output-dir", str(out), "--no-wandb", "--data", str(corpus_file),
            "--max-steps", "5"]
    trained = []

    def fake_train(cfg, reporters=None, *, stop_after=None, corpus=None):
        trained.append((cfg.batch_size, cfg.gradient_accumulation_steps))
        if cfg.batch_size > 4:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return train_mod.TrainResult(status="finished", steps=5, tokens=0, output_dir=cfg.output_dir)

    monkeypatch.setattr(train_mod, "train", fake_train)
    assert main(args) == 3
    err = capsys.readouterr().err
    assert err.splitlines() == ["tune_gpt.replay: out of memory at batch_size 16 (CUDA out of memory. Tried to "
                                "allocate 2.00 GiB); the same effective batch in smaller pieces: --batch_size 8 "
                                "--gradient_accumulation_steps 2"], err
    assert json.loads((out / "replay_summary.json").read_text())["status"] == "oom"
    with open(out / LOCK_NAME, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # let go
    assert main([*args, "--batch_size", "8", "--gradient_accumulation_steps", "2"]) == 3  # its hint: 4 x 4
    assert "--batch_size 4 --gradient_accumulation_steps 4" in capsys.readouterr().err
    assert main([*args, "--batch-size", "4"]) == 0  # the accumulation steps keep the trial's 16
    assert trained == [(16, 1), (8, 2), (4, 4)]
    assert json.loads((out / "replay_summary.json").read_text())["status"] == "finished"
    capsys.readouterr()
    for pieces in (["--batch_size", "3"], ["--batch_size", "4", "--gradient_accumulation_steps", "2"]):
        assert main([*args, "--output-dir", str(tmp_path / "other"), *pieces]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and "batches of 16 sequences" in err, err
    assert trained == [(16, 1), (8, 2), (4, 4)]


def test_a_replay_logs_in_the_w_and_b_mode_of_its_own_command(tmp_path, corpus_file, monkeypatch, capsys):
    """A search run with --wandb_mode online put wandb.mode in every params.json; the replay kept it, and an
    explicit mode beats WANDB_MODE, so a replay with no key or network could not log offline; and replay had
    no --wandb_mode, the flag W&B's start-failure message tells users to pass."""
    import pytest
    from fake_experiment import FakeTrial, make_experiment

    import tune_gpt.train as train_mod
    from tune_gpt.replay import main, trial_config

    common = dict(check=False, output_dir=str(tmp_path), max_steps=None, epochs=None, wandb=True)
    params = {"learning_rate": 1e-3, "wandb.mode": "online", "wandb.project": "p"}
    for check in (False, True):
        cfg = trial_config(params, tmp_path, "t1", **{**common, "check": check})
        assert cfg.wandb.mode is None and cfg.wandb.project == "p"  # WANDB_MODE or a key decides, as for train
    assert trial_config(params, tmp_path, "t1", **common, wandb_mode="offline").wandb.mode == "offline"

    exp = make_experiment(tmp_path, [FakeTrial(1e-3, 8, "finished", [2.0], extra={"wandb.mode": "online"})])
    modes = []

    def fake_train(cfg, reporters=None, *, stop_after=None, corpus=None):
        modes.append((cfg.wandb.enabled, cfg.wandb.mode))
        return train_mod.TrainResult(status="finished", steps=5, tokens=0, output_dir=cfg.output_dir)

    monkeypatch.setattr(train_mod, "train", fake_train)
    base = [str(exp), "--data", str(corpus_file), "--max-steps", "5"]
    assert main([*base, "--wandb_mode", "offline", "--output-dir", str(tmp_path / "a")]) == 0
    assert main([*base, "--wandb-mode", "disabled", "--output-dir", str(tmp_path / "b")]) == 0
    assert main([*base, "--output-dir", str(tmp_path / "c")]) == 0
    assert modes == [(True, "offline"), (True, "disabled"), (True, None)]
    capsys.readouterr()
    for bad in (["--wandb_mode", "dryrun"], ["--wandb_mode", "offline", "--no-wandb"]):
        with pytest.raises(SystemExit) as exited:  # argparse's error, one line
            main([*base, *bad])
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and "--wandb" in err, err


def test_a_check_is_logged_and_named_as_a_check_and_the_sample_command_is_quoted(tmp_path, corpus_file, monkeypatch,
                                                                                  capsys):
    """--check runs were W&B job_type "final" with tag "final"; a folder holding an earlier check was refused as
    holding "a final run" (and an unfinished replay of another trial too); `--trial ""` replayed the best
    trial; and the printed generate command broke on a folder with a space in its name."""
    import pytest
    from fake_experiment import standard_experiment, trial_id

    import tune_gpt.train as train_mod
    from tune_gpt.errors import ConfigError
    from tune_gpt.replay import main, replay
    from tune_gpt.tracking import WandbReporter

    exp = standard_experiment(tmp_path)
    logged = []

    def fake_train(cfg, reporters=None, *, stop_after=None, corpus=None):
        w = next(r for r in reporters.reporters if isinstance(r, WandbReporter))
        logged.append((w.job_type, w.extra_tags))
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "model.pt").write_bytes(b"model")
        return train_mod.TrainResult(status="finished", steps=stop_after or cfg.max_steps, tokens=0, final_val_loss=1.6,
                                     output_dir=cfg.output_dir, model_path=str(out / "model.pt"))

    monkeypatch.setattr(train_mod, "train", fake_train)
    spaced = tmp_path / "my runs" / "x"
    assert main([str(exp), "--trial", trial_id(0), "--check", "--output-dir", str(spaced), "--data",
                 str(corpus_file), "--wandb-mode", "offline"]) == 0
    assert f"sample it: python -m tune_gpt.generate --checkpoint '{spaced}'" in capsys.readouterr().out
    replay(exp, trial_id(0), max_steps=5, output_dir=str(tmp_path / "final"), data=str(corpus_file))
    assert logged == [("check", ["check"]), ("final", ["final"])]

    with pytest.raises(ConfigError, match=r"already holds a check \(30 steps, val loss 1\.6000\); give another"):
        replay(exp, trial_id(0), max_steps=5, output_dir=str(spaced), data=str(corpus_file))
    mark = tmp_path / "interrupted"
    mark.mkdir()
    (mark / "replay_summary.json").write_text(json.dumps({"trial_id": trial_id(1), "check": False, "status": "oom"}))
    with pytest.raises(ConfigError, match=rf"already holds a final run of trial {trial_id(1)} that did not finish "
                                          r"\(out of memory\); give another --output-dir"):
        replay(exp, trial_id(0), max_steps=5, output_dir=str(mark), data=str(corpus_file))

    assert main([str(exp), "--trial", "", "--no-wandb"]) == 2  # `--trial "$UNSET"`
    err = capsys.readouterr().err
    assert err.splitlines() == ["tune_gpt.replay: error: --trial: empty; give a trial id (or its prefix), or leave "
                                "--trial out for the best trial"], err
    assert len(logged) == 2


@pytest.mark.parametrize("lockable", [True, False])
def test_a_replay_that_ended_while_another_loaded_its_corpus_is_not_trained_over(tmp_path, corpus_file, monkeypatch,
                                                                                  lockable):
    """The folder was looked at before the corpus loaded: a replay that started and ended there meanwhile left
    the lock free, and the second one trained over its finished run. The folder is looked at again once the
    lock is this replay's, and also where no lock can be taken (NFS without lockd), where nothing else keeps
    the other replay out."""
    import errno
    import fcntl
    import warnings

    import pytest
    from fake_experiment import standard_experiment, trial_id

    import tune_gpt.data as data_mod
    import tune_gpt.train as train_mod
    from tune_gpt.errors import ConfigError
    from tune_gpt.replay import replay

    exp, out = standard_experiment(tmp_path), tmp_path / "final"

    def fake_train(cfg, reporters=None, *, stop_after=None, corpus=None):
        (Path(cfg.output_dir) / "model.pt").write_text(f"model of {cfg.max_steps}")
        return train_mod.TrainResult(status="finished", steps=cfg.max_steps, tokens=0, output_dir=cfg.output_dir,
                                     final_val_loss=1.0)

    load = data_mod.load_corpus

    def meanwhile(*a, **kw):  # another replay starts and ends in the same folder while this one loads
        monkeypatch.setattr(data_mod, "load_corpus", load)
        replay(exp, trial_id(0), output_dir=str(out), max_steps=5000, wandb=False, data=str(corpus_file))
        return load(*a, **kw)

    monkeypatch.setattr(train_mod, "train", fake_train)
    monkeypatch.setattr(data_mod, "load_corpus", meanwhile)
    if not lockable:
        def no_locks(fd, op):
            raise OSError(errno.ENOLCK, "No locks available")

        monkeypatch.setattr(fcntl, "flock", no_locks)
        out.mkdir()
        (out / ".replay.lock").touch()  # an earlier replay's lock file: the lock is tried before the corpus loads
    with pytest.raises(ConfigError, match="already holds a final run"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (cannot lock: warned)
        replay(exp, trial_id(1), output_dir=str(out), max_steps=5, wandb=False, data=str(corpus_file))
    assert (out / "model.pt").read_text() == "model of 5000"


def test_a_folder_that_cannot_be_locked_warns_and_replays(tmp_path, corpus_file, monkeypatch):
    """flock on NFS without lockd (ENOLCK), or a descriptor the file system will not lock: one warning, and
    the replay runs (it was a traceback)."""
    import errno
    import fcntl

    import pytest
    from fake_experiment import standard_experiment, trial_id

    import tune_gpt.train as train_mod
    from tune_gpt.replay import replay

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    monkeypatch.setattr(train_mod, "train", lambda cfg, reporters=None, *, stop_after=None, corpus=None:
                        train_mod.TrainResult(status="finished", steps=5, tokens=0, output_dir=cfg.output_dir))
    with pytest.warns(UserWarning, match="cannot lock \\(No locks available\\)"):
        summary = replay(standard_experiment(tmp_path), trial_id(0), output_dir=str(tmp_path / "final"),
                         max_steps=5, wandb=False, data=str(corpus_file))
    assert summary["status"] == "finished"
