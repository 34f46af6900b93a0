"""The entry points as a user meets them: flags, one-line errors, exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

TINY = ["--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--block_size", "16", "--batch_size", "4",
        "--eval_iters", "1", "--no-progress", "--wandb_mode", "disabled", "--num_threads", "1"]


def run(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=str(REPO))
    e.update(env or {})
    return subprocess.run([sys.executable, *args], cwd=cwd, env=e, capture_output=True, text=True, timeout=300)


def assert_one_line_error(p: subprocess.CompletedProcess, *needles: str) -> None:
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    assert "Traceback" not in p.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def bad_corpora(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.txt").write_text("")
    (d / "binary.bin").write_bytes(bytes(range(256)) * 20)
    (d / "short.txt").write_text("only a few characters")
    return d


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--data", "{bad}/missing.txt"], ["missing.txt", "no such file"]),
        (["--data", "{bad}/empty.txt"], ["empty.txt", "empty"]),
        (["--data", "{bad}/binary.bin"], ["binary.bin"]),
        (["--data", "{bad}/short.txt"], ["short.txt", "too short"]),
        (["--model_size", "huge"], ["model_size", "huge"]),
        (["--learning_rate", "-0.1"], ["learning_rate", "-0.1"]),
        (["--learning_rate", "-1e-3"], ["learning_rate", "must be positive", "-0.001"]),  # not "expected one argument"
        (["--sample_prompt", "x\udcff"], ["sample_prompt", "not UTF-8"]),  # found after the whole run, before
        (["--batch_size", "0"], ["batch_size", "0"]),
        (["--batch_size", "many"], ["batch_size", "many"]),
        (["--bf16", "--device", "cpu"], ["bf16"]),
        (["--matmul_precision", "tf32"], ["matmul_precision", "tf32"]),
        (["--epochs", "-1"], ["epochs"]),
        (["--not_a_flag", "1"], ["--not_a_flag"]),
        (["--resume", "--output_dir", "{bad}/never"], ["resume", "never"]),
    ],
)
def test_bad_input_exits_2_with_one_line(args, needles, bad_corpora, tmp_path):
    args = [a.replace("{bad}", str(bad_corpora)) for a in args]
    if "--output_dir" not in args:
        args += ["--output_dir", str(tmp_path / "out")]
    p = run("-m", "tune_gpt.train", *args, "--max_steps", "2")
    assert_one_line_error(p, *needles)
    assert not (tmp_path / "out").exists()  # nothing written


def test_an_unquoted_glob_the_shell_expanded_gets_a_hint(tmp_path, corpus_file):
    parts = [tmp_path / "a.txt", tmp_path / "b.txt"]
    for part in parts:
        part.write_text(corpus_file.read_text())
    p = run("-m", "tune_gpt.train", "--data", *map(str, parts), "--output_dir", str(tmp_path / "out"))  # data/*.txt
    assert_one_line_error(p, "unrecognized arguments", str(parts[1]), "quote it")
    assert not (tmp_path / "out").exists()
    p = run("-m", "tune_gpt.train", "--no_such_flag", "1")
    assert_one_line_error(p, "--no_such_flag")
    assert "quote it" not in p.stderr  # not for arguments that are no files


def test_train_cli_with_the_guide_flags_then_generate(tmp_path, corpus_file):
    out = tmp_path / "run"
    p = run("-m", "tune_gpt.train", "--data", str(corpus_file), "--model_size", "tiny", *TINY,
            "--epochs", "5", "--max_steps", "12", "--eval_interval", "6", "--batch_size", "4",
            "--gradient_accumulation_steps", "2", "--learning_rate", "2e-3", "--wandb_project", "p",
            "--wandb_run_name", "r", "--wandb_entity", "e", "--seed", "3", "--output_dir", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "val loss" in p.stderr and (out / "model.pt").is_file() and (out / "logs").is_dir()
    g = run("-m", "tune_gpt.generate", "--checkpoint", str(out), "--prompt", "the qu", "--max_new_tokens", "30")
    assert g.returncode == 0, g.stderr
    assert g.stdout.startswith("the qu") and len(g.stdout.splitlines()[0]) >= 6
    g = run("-m", "tune_gpt.generate", "--checkpoint", str(out), "--prompt", "€λ the", "--max_new_tokens", "8")
    assert g.returncode == 0 and "never seen in training are replaced: 'λ€'" in g.stderr, g.stderr
    assert g.stdout.startswith("€λ the") and "\ufffd" not in g.stdout, g.stdout  # the prompt as typed, then the text
    g = run("-m", "tune_gpt.generate", "--checkpoint", str(out), "--top_k", "0", "--max_new_tokens", "5")  # 0: no filter
    assert g.returncode == 0, g.stderr
    for args, needles in ((["--top_k", "-3"], ["--top_k", "got -3"]), (["--device", "cuda:7"], ["device", "'cuda:7'"]),
                          (["--device", "tpu"], ["device", "'tpu'"]), (["--temperature", "nan"], ["--temperature", "nan"]),
                          (["--temperature", "0"], ["--temperature", "--top_k 1"]),
                          (["--max_new_tokens", "-5"], ["--max_new_tokens", "-5"]),
                          (["--prompt", "ab\udcffc"], ["--prompt", "not UTF-8"]),  # crashed at print, after sampling
                          (["--seed", str(10**20)], ["--seed", str(10**20)])):
        assert_one_line_error(run("-m", "tune_gpt.generate", "--checkpoint", str(out), *args), *needles)


def test_resuming_a_finished_run_trains_nothing_and_rewrites_nothing(tmp_path, corpus_file):
    """`--resume` of a run that reached its end: one line says so, with its best val loss; its model, its
    TensorBoard events and its W&B run stay as they were (the model used to be rewritten without its loss).
    A new run into that folder is refused in one line unless it says --overwrite_output_dir (a forgotten
    --resume used to replace the earlier run's checkpoint at its first evaluation); then it warns."""
    out = tmp_path / "run"
    args = ["-m", "tune_gpt.train", "--data", str(corpus_file), *TINY, "--max_steps", "6", "--eval_interval", "3",
            "--output_dir", str(out)]
    assert run(*args).returncode == 0
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    again = run(*args, "--resume")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "already at step 6 of 6: nothing to train (best val loss " in again.stderr, again.stderr[-2000:]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
    (out / "model.pt").unlink()  # as when stopped between its last checkpoint and writing the model
    assert run(*args, "--resume").returncode == 0 and (out / "model.pt").is_file()
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert_one_line_error(run(*args), f"--output_dir {out} holds an earlier run (checkpoint/ckpt.pt and model.pt)",
                          "--resume continues it", "--overwrite_output_dir replaces it")
    (out / "model.pt").unlink()
    assert_one_line_error(run(*args), "holds an earlier run (checkpoint/ckpt.pt)")  # a checkpoint alone is a run
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == {k: v for k, v in files.items()
                                                                         if k.name != "model.pt"}
    fresh = run(*args, "--overwrite_output_dir")
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert f"tune_gpt.train: warning: {out} holds an earlier run: its model and checkpoint are replaced" in fresh.stderr


def test_generate_refuses_a_missing_checkpoint(tmp_path):
    assert_one_line_error(run("-m", "tune_gpt.generate", "--checkpoint", str(tmp_path / "nope")), "nope")


@pytest.mark.parametrize("args", [
    ["-m", "tune_gpt.train", "--model_size", "huge"],
    ["-m", "tune_gpt.train", "--data", "missing.txt"],
    ["-m", "tune_gpt.train", "--bf16", "--device", "cpu"],
    ["-m", "tune_gpt.generate", "--checkpoint", "nope"],
])
def test_mistakes_are_answered_before_torch_loads(args, tmp_path):
    """A typo costs a fraction of a second, not torch's few seconds of import."""
    p = run("-X", "importtime", *args, cwd=tmp_path)
    imported = {ln.rsplit("|", 1)[-1].strip() for ln in p.stderr.splitlines() if ln.startswith("import time:")}
    assert p.returncode == 2 and "tune_gpt.cli" in imported, p.stderr[-2000:]
    assert "torch" not in imported, "torch was imported before the error"


def test_import_is_light():
    code = ("import sys, tune_gpt; heavy = [m for m in ('torch', 'ray', 'wandb', 'tensorboard', 'matplotlib', "
            "'pandas', 'optuna') if m in sys.modules]; print(heavy)")
    p = run("-c", code)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr


@pytest.mark.slow
def test_use_chinese_trains_offline_and_samples_chinese(tmp_path):
    out = tmp_path / "zh"
    p = run("-m", "tune_gpt.train", "--use_chinese", *TINY, "--n_embd", "32", "--max_steps", "30",
            "--eval_interval", "30", "--sample_tokens", "60", "--output_dir", str(out),
            env={"WANDB_MODE": "offline", "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"})
    assert p.returncode == 0, p.stderr[-3000:]
    sample = (out / "sample.txt").read_text(encoding="utf-8")
    han = sum("\u4e00" <= ch <= "\u9fff" for ch in sample)
    assert han >= 20, sample


def test_an_output_dir_that_is_a_file_and_a_diverged_run_each_say_so(tmp_path, corpus_file):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    p = run("-m", "tune_gpt.train", *TINY, "--data", str(corpus_file), "--output_dir", str(afile))
    assert_one_line_error(p, "--output_dir", "is a file, not a folder")
    assert afile.read_text() == "keep me"
    p = run("-m", "tune_gpt.train", *TINY, "--data", str(corpus_file), "--output_dir", str(tmp_path / "div"),
            "--learning_rate", "1e4", "--grad_clip", "0")
    assert p.returncode == 3, p.stderr[-2000:]
    assert "loss became" in p.stderr and "try a lower --learning_rate" in p.stderr


def test_generate_takes_the_newest_model_in_a_folder_and_a_trials_latest_checkpoint(tmp_path):
    import os

    from tune_gpt.generate import find_model

    run_dir = tmp_path / "run"
    (run_dir / "checkpoint").mkdir(parents=True)
    old, new = run_dir / "model.pt", run_dir / "checkpoint" / "ckpt.pt"
    old.write_bytes(b"PK"), new.write_bytes(b"PK")
    os.utime(old, (1_000_000, 1_000_000))  # an earlier run's final model; this run stopped after a checkpoint
    assert find_model(run_dir) == new
    os.utime(new, (900_000, 900_000))
    assert find_model(run_dir) == old  # the run finished: its final model is the newest
    trial = tmp_path / "trial_abc"
    for i in (0, 1, 2):
        (trial / f"checkpoint_00000{i}").mkdir(parents=True)
        (trial / f"checkpoint_00000{i}" / "ckpt.pt").write_bytes(b"PK")
    assert find_model(trial) == trial / "checkpoint_000002" / "ckpt.pt"


def test_train_errors_name_the_flag_and_two_precisions_are_refused(tmp_path, corpus_file):
    out = ["--data", str(corpus_file), "--output_dir", str(tmp_path / "o")]
    for args, needles in ((["--n_embd", "0"], ["--n_embd: must be positive"]),
                          (["--wandb_mode", "foo"], ["--wandb_mode: unknown value 'foo'"]),
                          (["--bf16", "--fp16"], ["--bf16 and --fp16: give one"]),
                          (["--precision", "fp32", "--bf16"], ["--bf16 and --precision fp32"]),
                          (["--n_head", "3"], ["--n_embd: 128 is not divisible by --n_head=3"])):
        assert_one_line_error(run("-m", "tune_gpt.train", *args, *out), *needles)
    assert not (tmp_path / "o").exists()
    (tmp_path / "link").symlink_to(tmp_path / "nowhere" / "deeper")
    p = run("-m", "tune_gpt.train", "--data", str(corpus_file), "--output_dir", str(tmp_path / "link"))
    assert_one_line_error(p, "--output_dir", "is a link to nothing")


def test_config_mistakes_that_used_to_pass_or_end_in_a_traceback(tmp_path, corpus_file):
    """A W&B project W&B refuses (entity/project typed as one) was a traceback from wandb.init after the run
    had begun writing; an empty --data (an unset $CORPUS) trained on the default corpus, and an empty
    --output_dir wrote into the current folder; a seed beyond 64 bits was a traceback from torch."""
    out = tmp_path / "o"
    base = ["-m", "tune_gpt.train", *TINY, "--data", str(corpus_file), "--output_dir", str(out)]
    for args, needles in ((["--wandb_project", "me/gpt"], ["--wandb_project: 'me/gpt' holds /",
                                                           "give the entity with --wandb_entity"]),
                          (["--wandb_project", "a" * 129], ["--wandb_project", "128 characters"]),
                          (["--wandb_entity", "team:x"], ["--wandb_entity: 'team:x' holds :"]),
                          (["--data", ""], ["--data: empty (leave it out for the default corpus)"]),
                          (["--output_dir", " "], ["--output_dir: empty"]),
                          (["--seed", str(2**64)], ["--seed", "outside [0, 2**63)"])):
        assert_one_line_error(run(*base, *args), *needles)
    assert not out.exists()
    (out / "checkpoint").parent.mkdir()
    (out / "checkpoint").write_text("not a folder")
    assert_one_line_error(run(*base), f"{out / 'checkpoint'} is a file")
    assert (out / "checkpoint").read_text() == "not a folder"


def test_a_warmup_longer_than_the_run_is_named(tmp_path, corpus_file):
    p = run("-m", "tune_gpt.train", *TINY, "--data", str(corpus_file), "--output_dir", str(tmp_path / "o"),
            "--max_steps", "4", "--eval_interval", "4", "--warmup_steps", "10")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "tune_gpt.train: warning: warmup_steps 10 is not below this run's 4 steps: the learning rate never " \
           "reaches learning_rate" in p.stderr


def test_the_out_of_memory_hint_resumes_only_a_checkpoint_of_this_run(tmp_path, corpus_file, monkeypatch, capsys):
    """The hint adds --resume when this run wrote a checkpoint, not when an earlier run's is in the folder
    (resuming that would continue another run)."""
    import tune_gpt.train as train_mod
    from tune_gpt.cli import train_main
    from tune_gpt.train import CKPT_NAME

    out = tmp_path / "o"
    args = [*TINY, "--data", str(corpus_file), "--output_dir", str(out), "--batch_size", "8",
            "--overwrite_output_dir"]

    def oom(write_checkpoint):
        def fake_train(cfg, reporters=None, corpus=None):
            if write_checkpoint:
                (out / "checkpoint").mkdir(parents=True, exist_ok=True)
                (out / "checkpoint" / CKPT_NAME).write_bytes(b"this run's")
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return fake_train

    for earlier, writes, resume in ((False, True, True), (True, False, False), (True, True, True)):
        if earlier:
            (out / "checkpoint").mkdir(parents=True, exist_ok=True)
            (out / "checkpoint" / CKPT_NAME).write_bytes(b"an earlier run's")
            os.utime(out / "checkpoint" / CKPT_NAME, (1_000_000, 1_000_000))
        monkeypatch.setattr(train_mod, "train", oom(writes))
        assert train_main(args) == 3
        err = capsys.readouterr().err
        assert "out of memory at batch_size 8" in err and "--batch_size 4 --gradient_accumulation_steps 2" in err
        assert err.rstrip().endswith("--resume") == resume, (earlier, writes, err)


def test_a_flag_prefix_shared_only_by_spellings_of_one_flag_is_that_flag():
    """`--batch 8`: argparse (3.11) counted --batch_size and --batch-size as two candidates and said
    "ambiguous option"; a prefix of two different flags still is."""
    import pytest

    from tune_gpt.cli import OneLineParser

    p = OneLineParser(prog="python -m tune_gpt.train")
    p.add_argument("--batch_size", "--batch-size", type=int)
    p.add_argument("--beta1", type=float)
    p.add_argument("--beta2", type=float)
    assert p.parse_args(["--batch", "8"]).batch_size == 8
    with pytest.raises(SystemExit):
        p.parse_args(["--beta", "0.9"])


def test_generate_prints_each_sample_as_it_comes_and_stops_quietly_when_the_reader_does(tiny_cfg, tmp_path):
    """`generate --num_samples 3000 | head -1` printed nothing until all 3000 were sampled, then a
    BrokenPipeError traceback; with an ASCII stdout (PYTHONIOENCODING=ascii) a prompt "é" ended in a
    UnicodeEncodeError after the sampling."""
    from tune_gpt.train import train

    out = tmp_path / "g"
    train(tiny_cfg(max_steps=2, eval_interval=2, output_dir=str(out), tensorboard=False, **{"wandb.enabled": False}))
    env = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "tune_gpt.generate", "--checkpoint", str(out), "--prompt", "the",
           "--max_new_tokens", "40", "--num_samples", "3000"]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = p.stdout.readline()  # as `head -1` reads
    running = p.poll() is None  # the first sample came long before the 3000th
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141, err  # 128 + SIGPIPE, as a shell reports `yes | head -1`
    assert first.startswith(b"the") and running
    assert err == "", err  # no traceback, no "Exception ignored" at exit

    g = run("-m", "tune_gpt.generate", "--checkpoint", str(out), "--prompt", "é the", "--max_new_tokens", "5",
            env={"PYTHONIOENCODING": "ascii"})
    assert g.returncode == 0, g.stderr[-2000:]
    assert g.stdout.startswith("\\xe9 the") and "Traceback" not in g.stderr
