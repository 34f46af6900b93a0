"""Bad input to ``python -m tune_gpt.search``, the real command (no --dry-run): search-space files,
flags and corpora. Each case must exit with code 2 and ONE line on stderr that names the file,
key or value, with no traceback, and must leave nothing behind: the results folder is not even
created. Checks run before Ray or torch are imported, so a case costs well under a second.

Also: untrusted files. A YAML tag that would build a Python object, and crafted pickles in place
of checkpoints (``python -m tune_gpt.generate`` and ``python -m tune_gpt.train --resume``), are
refused without running their payload.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, TINY_SPACE, closed_port, make_text

GOOD = TINY_SPACE.format(n=2, steps=10, every=5)  # block_size 16, n_embd 16, n_head 2


def run(args: list[str], cwd: Path, module: str = "tune_gpt.search") -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def one_line_error(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 2, (p.returncode, p.stdout[-1000:], p.stderr[-3000:])
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout
    return lines[0]


# ------------------------------------------------------------------ the files


SPACES = {
    # name: YAML text (native format unless it says parameters:)
    "unknown_distribution": GOOD.replace("{loguniform: [1.0e-3, 2.0e-2]}", "{logunifrom: [1.0e-3, 2.0e-2]}"),
    "min_above_max": GOOD.replace("[1.0e-3, 2.0e-2]", "[2.0e-2, 1.0e-3]"),
    "log_range_with_zero": GOOD.replace("[1.0e-3, 2.0e-2]", "[0, 2.0e-2]"),
    "empty_values": GOOD.replace("{choice: [4, 8]}", "{choice: []}"),
    "value_of_wrong_type": GOOD.replace("{choice: [4, 8]}", "{choice: [four, 8]}"),
    "bound_of_wrong_type": GOOD.replace("[1.0e-3, 2.0e-2]", "[small, 2.0e-2]"),
    "domain_not_a_mapping": GOOD.replace("{choice: [4, 8]}", "[4, 8]"),
    "fixed_of_wrong_type": GOOD.replace("max_steps: 10", "max_steps: many"),
    "unknown_parameter": GOOD.replace("  learning_rate:", "  learnin_rate:"),
    "unknown_top_key": GOOD + "spaces: {}\n",
    "yaml_syntax_error": GOOD.replace("{choice: [4, 8]}", "{choice: [4, 8}"),
    "yaml_bad_indent": GOOD.replace("  model.n_layer: 1", "    model.n_layer: 1\n   bad: 2"),
    "duplicate_key": GOOD.replace("  max_steps: 10", "  max_steps: 10\n  max_steps: 20"),
    "top_level_list": "- learning_rate\n- batch_size\n",
    "empty_file": "",
    "python_object_tag": "!!python/object/apply:os.system ['touch {marker}']\n",
    "python_tag_inside": GOOD.replace("max_steps: 10", "max_steps: !!python/object/apply:os.system ['touch {marker}']"),
    "python_name_tag": GOOD.replace("max_steps: 10", "max_steps: !!python/name:os.system"),
    "choice_value_not_trainable": GOOD.replace("{choice: [4, 8]}", "{choice: [8, 0]}"),
    "range_not_trainable": GOOD.replace("{loguniform: [1.0e-3, 2.0e-2]}", "{uniform: [-0.1, 0.1]}"),
    "dropout_range_past_one": GOOD + "  dropout: {uniform: [0.5, 1.5]}\n",
    "heads_do_not_divide": GOOD.replace("  model.n_head: 2\n", "") + "  model.n_head: {choice: [2, 3]}\n",
    "corpus_searched": GOOD + "  data: {choice: [a.txt, b.txt]}\n",
    "grid_under_optuna": GOOD.replace("{choice: [4, 8]}", "{grid: [4, 8]}"),
    "scheduler_unknown": GOOD.replace("{type: asha, grace_period: 1, reduction_factor: 2}", "{type: hyperbandit}"),
    "reduction_factor_one": GOOD.replace("reduction_factor: 2", "reduction_factor: 1"),
    "metric_unknown": GOOD.replace("method: optuna", "method: optuna\nmetric: val/loos"),
    "num_samples_zero": GOOD.replace("num_samples: 2", "num_samples: 0"),
    "probabilities_off": GOOD.replace("{choice: [4, 8]}", "{choice: [4, 8], probabilities: [0.5, 0.2]}"),
    "q_not_positive": GOOD + "  warmup_steps: {qrandint: [0, 10, 0]}\n",
    "wandb_unknown_distribution": "method: random\nparameters:\n  lr: {distribution: log_unifrom, min: 0.001, max: 0.01}\n",
    "wandb_min_above_max": "method: random\nparameters:\n  lr: {min: 0.01, max: 0.001}\n",
    "wandb_empty_values": "method: grid\nparameters:\n  batch_size: {values: []}\n",
}

# (case id, flags, words the one line must hold); {sp} = a space file, {bad} = the bad-files folder
SPACE_CASES = [
    ("space_" + name, ["--space", f"{{bad}}/{name}.yaml"], [f"{name}.yaml", *words])
    for name, words in [
        ("unknown_distribution", ["logunifrom"]),
        ("min_above_max", ["learning_rate", "0.02 > high 0.001"]),
        ("log_range_with_zero", ["learning_rate", "> 0"]),
        ("empty_values", ["batch_size", "empty"]),
        ("value_of_wrong_type", ["batch_size", "four"]),
        ("bound_of_wrong_type", ["learning_rate", "small"]),
        ("domain_not_a_mapping", ["batch_size"]),
        ("fixed_of_wrong_type", ["max_steps", "many"]),
        ("unknown_parameter", ["learnin_rate", "learning_rate"]),
        ("unknown_top_key", ["spaces"]),
        ("yaml_syntax_error", ["line"]),
        ("yaml_bad_indent", ["line"]),
        ("duplicate_key", ["max_steps", "duplicate"]),
        ("top_level_list", ["mapping"]),
        ("empty_file", ["empty"]),
        ("python_object_tag", ["!!python/object/apply:os.system", "not allowed"]),
        ("python_tag_inside", ["!!python/object/apply:os.system", "not allowed"]),
        ("python_name_tag", ["!!python/name:os.system", "not allowed"]),
        ("choice_value_not_trainable", ["batch_size", "0"]),
        ("range_not_trainable", ["learning_rate", "-0.1"]),
        ("dropout_range_past_one", ["dropout", "1.0 is outside"]),
        ("heads_do_not_divide", ["n_head", "3"]),
        ("corpus_searched", ["data", "cannot be searched"]),
        ("grid_under_optuna", ["batch_size", "grid"]),
        ("scheduler_unknown", ["hyperbandit"]),
        ("reduction_factor_one", ["reduction_factor", "1"]),
        ("metric_unknown", ["val/loos"]),
        ("num_samples_zero", ["num_samples", "0"]),
        ("probabilities_off", ["probabilities", "0.7"]),
        ("q_not_positive", ["warmup_steps", "q"]),
        ("wandb_unknown_distribution", ["lr", "log_unifrom"]),
        ("wandb_min_above_max", ["lr", "0.01 > max 0.001"]),
        ("wandb_empty_values", ["batch_size", "empty"]),
    ]
] + [
    ("space_missing", ["--space", "{bad}/no_such_space.yaml"], ["no_such_space.yaml", "no such file"]),
    ("space_is_a_directory", ["--space", "{bad}"], ["directory"]),
    ("space_not_utf8", ["--space", "{bad}/latin1.yaml"], ["latin1.yaml"]),
    ("space_is_a_fifo", ["--space", "{bad}/fifo"], ["fifo", "not a regular file"]),  # reading it would hang
]

FLAG_CASES = [
    ("num_samples_zero", ["--num-samples", "0"], ["--num-samples", "0"]),
    ("num_samples_negative", ["--num-samples", "-3"], ["--num-samples", "-3"]),
    ("num_samples_text", ["--num-samples", "many"], ["--num-samples", "many"]),
    ("num_samples_fraction", ["--num-samples", "1.5"], ["--num-samples", "1.5"]),
    ("cpus_zero", ["--cpus-per-trial", "0"], ["--cpus-per-trial", "0"]),
    ("cpus_negative", ["--cpus-per-trial", "-1"], ["--cpus-per-trial", "-1"]),
    ("cpus_text", ["--cpus-per-trial", "x"], ["--cpus-per-trial", "'x'"]),
    ("gpus_negative", ["--gpus-per-trial", "-0.5"], ["--gpus-per-trial", "-0.5"]),
    ("gpus_text", ["--gpus-per-trial", "lots"], ["--gpus-per-trial", "lots"]),
    ("gpus_fraction_above_one", ["--gpus-per-trial", "1.5"], ["--gpus-per-trial", "1.5"]),
    ("gpus_above_one", ["--gpus-per-trial", "2"], ["--gpus-per-trial", "2", "one GPU"]),
    ("max_concurrent_zero", ["--max-concurrent", "0"], ["--max-concurrent", "0"]),
    ("max_concurrent_text", ["--max-concurrent", "two"], ["--max-concurrent", "two"]),
    ("time_budget_zero", ["--time-budget", "0"], ["--time-budget", "0"]),
    ("time_budget_negative", ["--time-budget", "-5"], ["--time-budget", "-5"]),
    ("time_budget_nan", ["--time-budget", "nan"], ["--time-budget", "nan"]),
    ("max_failures_negative", ["--max-failures", "-1"], ["--max-failures", "-1"]),
    ("max_failures_text", ["--max-failures", "x"], ["--max-failures", "'x'"]),
    ("seed_negative", ["--seed", "-1"], ["--seed", "-1"]),
    ("seed_too_big", ["--seed", str(2**32)], ["--seed", str(2**32)]),
    ("grace_period_zero", ["--grace-period", "0"], ["--grace-period", "0"]),
    ("reduction_factor_one", ["--reduction-factor", "1"], ["--reduction-factor", "1"]),
    ("reduction_factor_half", ["--reduction-factor", "0.5"], ["--reduction-factor", "0.5"]),
    ("search_unknown", ["--search", "bayes"], ["--search", "bayes"]),
    ("scheduler_unknown", ["--scheduler", "hyperband"], ["--scheduler", "hyperband"]),
    ("scheduler_pbt", ["--scheduler", "pbt"], ["--scheduler pbt"]),
    ("mode_unknown", ["--mode", "maximize"], ["--mode", "maximize"]),
    ("metric_unknown", ["--metric", "val/loos"], ["--metric", "val/loos"]),
    ("metric_gpu_only_on_cpu", ["--metric", "mfu", "--mode", "max"], ["--metric", "mfu", "GPU"]),
    ("metric_gpu_util_on_a_shared_gpu", ["--metric", "gpu/util", "--mode", "max", "--gpus-per-trial", "0.5"],
     ["--metric", "gpu/util", "--gpus-per-trial 0.5", "sharing"]),
    ("name_escapes", ["--name", "../elsewhere"], ["--name", "../elsewhere"]),
    ("optuna_storage_bad", ["--optuna-storage", "notaurl"], ["--optuna-storage", "notaurl"]),
    ("retry_errored_without_resume", ["--retry-errored"], ["--retry-errored", "--resume"]),
    ("address_nothing_there", ["--address", "127.0.0.1:{port}"], ["--address 127.0.0.1:{port}", "nothing answers"]),
    ("unknown_flag", ["--num-trials", "2"], ["--num-trials"]),
    ("learning_rate_negative", ["--learning_rate", "-1"], ["learning_rate", "-1"]),
    ("learning_rate_text", ["--learning_rate", "fast"], ["learning_rate", "fast"]),
    ("batch_size_zero", ["--batch_size", "0"], ["batch_size", "0"]),
    ("batch_size_fraction", ["--batch_size", "2.5"], ["batch_size", "2.5"]),
    ("model_size_unknown", ["--model_size", "huge"], ["model_size", "huge"]),
    ("eval_interval_zero", ["--eval_interval", "0"], ["eval_interval", "0"]),
    ("dropout_one", ["--dropout", "1.0"], ["dropout", "1.0"]),
    ("n_head_does_not_divide", ["--n_head", "3"], ["--n_head 3", "n_embd"]),
    ("precision_unknown", ["--precision", "fp8"], ["precision", "fp8"]),
    ("bf16_on_cpu_trials", ["--bf16"], ["bf16", "--gpus-per-trial"]),
    ("device_unknown", ["--device", "tpu"], ["device", "tpu"]),
    ("device_cuda_without_gpus", ["--device", "cuda"], ["--device", "cuda", "--gpus-per-trial"]),
    ("device_numbered_with_gpus", ["--gpus-per-trial", "0.5", "--device", "cuda:1"], ["--device", "'cuda:1'", "cuda:0"]),
    ("max_steps_negative", ["--max_steps", "-5"], ["max_steps", "-5"]),
    ("epochs_zero", ["--epochs", "0"], ["epochs", "0"]),
    ("beta1_one", ["--beta1", "1.0"], ["beta1", "1.0"]),
    ("wandb_mode_unknown", ["--wandb_mode", "sometimes"], ["wandb.mode", "sometimes"]),
    ("chinese_and_data", ["--use_chinese"], ["--use_chinese"]),
]

CORPUS_CASES = [
    ("corpus_missing", "{bad}/missing.txt", ["missing.txt", "no such file"]),
    ("corpus_empty", "{bad}/empty.txt", ["empty.txt", "empty"]),
    ("corpus_blank", "{bad}/blank.txt", ["blank.txt", "empty"]),
    ("corpus_binary", "{bad}/binary.bin", ["binary.bin", "binary"]),
    ("corpus_not_utf8", "{bad}/latin1.txt", ["latin1.txt", "UTF-8"]),
    ("corpus_shorter_than_context", "{bad}/short.txt", ["short.txt", "too short"]),
    ("corpus_dangling_symlink", "{bad}/dangling.txt", ["dangling.txt", "broken symbolic link"]),
    ("corpus_fifo", "{bad}/fifo", ["fifo", "not a regular file"]),
    ("corpus_empty_directory", "{bad}/empty_dir", ["empty_dir", "no files"]),
    ("corpus_unreadable", "/proc/self/mem", ["/proc/self/mem", "cannot read"]),  # fails for root too (EIO)
    ("corpus_glob_matches_nothing", "{bad}/nothing-*.txt", ["nothing-*.txt", "matches no files"]),
    ("corpus_url_refused", "http://127.0.0.1:{port}/corpus.txt", ["127.0.0.1:{port}", "download failed"]),
]


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bad_input")
    marker = d / "pwned"
    for name, text in SPACES.items():
        (d / f"{name}.yaml").write_text(text.replace("{marker}", str(marker)))
    (d / "good.yaml").write_text(GOOD)
    (d / "latin1.yaml").write_bytes(GOOD.replace("name: tiny", "name: caf\xe9").encode("latin-1"))
    (d / "corpus.txt").write_text(make_text(20_000))
    (d / "empty.txt").write_text("")
    (d / "blank.txt").write_text(" \n\t\n  \n")
    (d / "binary.bin").write_bytes(bytes(range(256)) * 40)
    (d / "latin1.txt").write_bytes(("caf\xe9 cr\xe8me br\xfbl\xe9e " * 400).encode("latin-1"))
    (d / "short.txt").write_text("only a few words here, fewer than two contexts of sixteen")
    (d / "dangling.txt").symlink_to(d / "nowhere.txt")
    os.mkfifo(d / "fifo")
    (d / "empty_dir").mkdir()
    (d / "results_file").write_text("not a folder")
    return d


def _case(args: list[str], bad: Path, port: int) -> list[str]:
    return [a.replace("{bad}", str(bad)).replace("{port}", str(port)) for a in args]


CASES = ([(cid, args, words, True) for cid, args, words in SPACE_CASES]
         + [(f"flag_{cid}", args, words, True) for cid, args, words in FLAG_CASES]
         + [(cid, ["--data", spec], words, False) for cid, spec, words in CORPUS_CASES])


@pytest.mark.parametrize("args, words, corpus_given", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(args, words, corpus_given, bad, tmp_path):
    port = closed_port()
    args = _case(args, bad, port)
    if "--space" not in args:
        args = ["--space", str(bad / "good.yaml"), *args]
    if corpus_given:
        args += ["--data", str(bad / "corpus.txt")]
    results = tmp_path / "results"
    line = one_line_error(run([*args, "--storage-path", str(results)], cwd=tmp_path))
    assert line.startswith("tune_gpt.search: error: "), line  # argparse's errors and ours alike
    for w in _case(words, bad, port):
        assert w in line, (w, line)
    assert not results.exists(), f"{results} was created"
    assert not (tmp_path / "tune_results").exists()
    assert not (bad / "pwned").exists(), "the YAML payload ran"


def test_storage_path_that_is_a_file_is_refused_and_left_alone(bad, tmp_path):
    target = bad / "results_file"
    line = one_line_error(run(["--space", str(bad / "good.yaml"), "--data", str(bad / "corpus.txt"),
                               "--storage-path", str(target)], cwd=tmp_path))
    assert "--storage-path" in line and str(target) in line and "not a folder" in line
    assert target.read_text() == "not a folder"


def test_enough_cases():
    assert len(CASES) >= 40


# ---------------------------------------------------------------- untrusted files


class Payload:
    """Unpickling this would create `marker` (it never may)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_crafted_checkpoint_is_refused_by_generate(tmp_path):
    marker = tmp_path / "pwned"
    crafted = tmp_path / "crafted.pt"
    with open(crafted, "wb") as f:
        pickle.dump({"model": Payload(marker), "model_args": {}, "tokenizer": {}}, f)
    line = one_line_error(run(["--checkpoint", str(crafted)], cwd=tmp_path, module="tune_gpt.generate"))
    assert str(crafted) in line and "cannot be loaded safely" in line, line
    assert not marker.exists(), "the checkpoint's payload ran"


def test_crafted_checkpoint_is_refused_by_train_resume(tmp_path, corpus_file):
    marker = tmp_path / "pwned"
    out = tmp_path / "run"
    (out / "checkpoint").mkdir(parents=True)
    crafted = out / "checkpoint" / "ckpt.pt"
    import torch

    torch.save({"model": Payload(marker), "step": 10}, crafted)  # a real torch zip file, with a pickle inside
    line = one_line_error(run(["--resume", "--output_dir", str(out), "--data", str(corpus_file), "--model_size",
                               "tiny", "--n_embd", "16", "--n_head", "2", "--n_layer", "1", "--block_size", "16",
                               "--max_steps", "20", "--no-progress", "--wandb_mode", "disabled"],
                              cwd=tmp_path, module="tune_gpt.train"))
    assert str(crafted) in line and "cannot be loaded safely" in line, line
    assert not marker.exists(), "the checkpoint's payload ran"


def test_a_checkpoint_that_loads_but_is_not_a_model_is_one_line(tmp_path):
    import torch

    plain = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), plain)
    line = one_line_error(run(["--checkpoint", str(plain)], cwd=tmp_path, module="tune_gpt.generate"))
    assert str(plain) in line and "not a tune_gpt checkpoint" in line, line


def test_resume_refuses_an_experiment_file_it_cannot_read(tmp_path, capsys):
    """Read as missing, a damaged experiment file let --resume go on with the default space and corpus, and
    the interrupted trials ended errored on their checkpoints' other corpus. Now one line, nothing touched."""
    from tune_gpt.search import EXPERIMENT_FILE, main

    exp = tmp_path / "r" / "x"
    exp.mkdir(parents=True)
    (exp / "tuner.pkl").write_bytes(b"saved by Ray")
    for text, why in (("garbage{", "JSONDecodeError"), ("[1, 2]", "a JSON list, not an object"),
                      (b"\xff\xfe", "UnicodeDecodeError"), (None, "")):
        if text is None:  # a folder of that name: there, but not readable as a file
            (exp / EXPERIMENT_FILE).unlink()
            (exp / EXPERIMENT_FILE).mkdir()
        elif isinstance(text, bytes):
            (exp / EXPERIMENT_FILE).write_bytes(text)
        else:
            (exp / EXPERIMENT_FILE).write_text(text)
        assert main(["--storage-path", str(tmp_path / "r"), "--name", "x", "--resume"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{exp / EXPERIMENT_FILE}: cannot be read ({why}" in err, err
        assert "--name NEW" in err
    assert sorted(p.name for p in exp.iterdir()) == [EXPERIMENT_FILE, "tuner.pkl"]


def test_train_refuses_a_search_folder_and_resume_with_overwrite(tmp_path, capsys):
    """A run into a trial's folder overwrote its sample.txt and left a model.pt that `generate --checkpoint`
    then sampled; into the experiment folder its files mixed with the trials'. Both refused, whatever the
    flags; --resume with --overwrite_output_dir (opposites) too. Nothing is written."""
    from tune_gpt.cli import train_main

    exp = tmp_path / "exp"
    trial = exp / "trial_0001"
    trial.mkdir(parents=True)
    (exp / "tune_gpt_experiment.json").write_text("{}")
    (trial / "params.json").write_text("{}")
    (trial / "result.json").write_text("")
    (trial / "sample.txt").write_text("the trial's sample")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for out, said in ((trial, "is a search trial's folder"), (exp, "is a search's experiment folder")):
        for extra in ([], ["--overwrite_output_dir"]):
            assert train_main(["--output_dir", str(out), "--max_steps", "1", *extra]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and f"--output_dir {out}: {said}" in err, err
    assert train_main(["--output_dir", str(tmp_path / "run"), "--resume", "--overwrite_output_dir"]) == 2
    assert "give one" in capsys.readouterr().err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert (trial / "sample.txt").read_text() == "the trial's sample"
