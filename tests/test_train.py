from __future__ import annotations

import math
import os
import pickle
from pathlib import Path

import pytest
import torch

from tune_gpt.config import TrainConfig
from tune_gpt.errors import ConfigError
from tune_gpt.tracking import Reporter
from tune_gpt.train import CKPT_NAME, MODEL_NAME, load_checkpoint, lr_at, model_from_checkpoint, train


class Recorder(Reporter):
    """Keeps every event; optionally crashes right after the evaluation at `crash_at`."""

    def __init__(self, crash_at: int | None = None) -> None:
        self.logs, self.evals, self.samples, self.results = [], [], [], []
        self.crash_at = crash_at

    def log(self, step, metrics):
        self.logs.append((step, dict(metrics)))

    def evaluate(self, step, metrics, checkpoint_dir):
        self.evals.append((step, dict(metrics), checkpoint_dir))
        if step == self.crash_at:
            raise RuntimeError("simulated crash")

    def sample(self, text):
        self.samples.append(text)

    def finish(self, result):
        self.results.append(result)


def test_tiny_run_learns_and_reports(tiny_cfg):
    rec = Recorder()
    res = train(tiny_cfg(), rec)
    assert res.status == "finished" and res.steps == 40 and res.tokens == 40 * 8 * 32
    assert [s for s, _, _ in rec.evals] == [10, 20, 30, 40]
    first, last = rec.evals[0][1], rec.evals[-1][1]
    assert last["val/loss"] < first["val/loss"] < math.log(60)
    assert last["val/bpc"] == pytest.approx(last["val/loss"] / math.log(2))
    assert [s for s, _ in rec.logs] == [5, 15, 25, 35]  # every 5 steps; an evaluated step reports once
    for _, m in rec.logs + [(s, m) for s, m, _ in rec.evals]:
        assert {"train/loss", "lr", "tokens_per_s", "epoch", "step", "cpu/percent", "rss_gb"} <= set(m)
    assert res.best_val_loss == min(m["val/loss"] for _, m, _ in rec.evals)
    assert rec.samples and len(rec.samples[0]) == 1 + 40
    assert res.tokens_per_s > 0 and res.wall_s >= res.train_s > 0


def test_same_seed_same_run_on_cpu(tiny_cfg):
    a, b = Recorder(), Recorder()
    train(tiny_cfg(max_steps=20), a)
    train(tiny_cfg(max_steps=20), b)
    assert [m["val/loss"] for _, m, _ in a.evals] == [m["val/loss"] for _, m, _ in b.evals]
    c = Recorder()
    train(tiny_cfg(max_steps=20, seed=7), c)
    assert [m["val/loss"] for _, m, _ in c.evals] != [m["val/loss"] for _, m, _ in a.evals]


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_resume_is_exact(tiny_cfg, tmp_path, dropout):
    full = Recorder()
    train(tiny_cfg(dropout=dropout, output_dir=str(tmp_path / "full")), full)

    crashed = Recorder(crash_at=20)
    cfg = tiny_cfg(dropout=dropout, output_dir=str(tmp_path / "split"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, crashed)
    resumed = Recorder()
    res = train(TrainConfig.from_flat({"resume": True}, base=cfg), resumed)
    assert res.status == "finished"
    assert [s for s, _, _ in resumed.evals] == [30, 40]
    want = {s: (m["val/loss"], m["train/loss"]) for s, m, _ in full.evals}
    got = {s: (m["val/loss"], m["train/loss"]) for s, m, _ in resumed.evals}
    assert got == {s: want[s] for s in (30, 40)}  # bit-for-bit
    assert [s for s, _ in resumed.logs] == [25, 35]
    assert resumed.samples == full.samples


def test_divergence_ends_the_run_with_status_diverged(tiny_cfg):
    rec = Recorder()
    res = train(tiny_cfg(learning_rate=1e6, grad_clip=0.0, warmup_steps=0, max_steps=200, eval_interval=50), rec)
    assert res.status == "diverged"
    assert "loss became" in res.message
    assert res.steps < 50  # caught within one evaluation interval
    assert rec.results[0].status == "diverged" and not rec.samples


def test_a_warmup_as_long_as_the_run_is_warned_of_by_train_itself(tiny_cfg):
    """The search's trials and the replay call train() too, not only the CLI."""
    import warnings

    with pytest.warns(UserWarning, match=r"^warmup_steps 4 is not below this run's 4 steps: the learning rate never "
                                         r"reaches learning_rate 0\.001$"):
        train(tiny_cfg(max_steps=4, eval_interval=4, warmup_steps=4, learning_rate=1e-3), Recorder())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        train(tiny_cfg(max_steps=4, eval_interval=4, warmup_steps=3), Recorder())  # below: no warning
        train(tiny_cfg(max_steps=4, eval_interval=4), Recorder())  # the default warmup: a tenth of the run
    assert not [w for w in seen if "warmup_steps" in str(w.message)]


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(learning_rate=1e-3, min_lr=1e-4)
    lrs = [lr_at(s, cfg, 2000, 100) for s in range(2001)]
    assert lrs[0] == pytest.approx(1e-3 / 101)
    assert max(lrs) == pytest.approx(1e-3, rel=1e-3) and lrs.index(max(lrs)) in (99, 100)
    assert lrs[2000] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[100:], lrs[101:]))


def test_gradient_accumulation_counts_tokens_per_optimizer_step(tiny_cfg):
    res = train(tiny_cfg(max_steps=10, gradient_accumulation_steps=3, sample_tokens=0))
    assert res.tokens == 10 * 3 * 8 * 32


def test_epoch_budget(tiny_cfg, corpus_file):
    cfg = tiny_cfg(max_steps=None, epochs=0.05, eval_interval=1000, sample_tokens=0)
    res = train(cfg)
    n_train = int(len(corpus_file.read_text()) * 0.9)
    assert res.steps == math.ceil(0.05 * n_train / (8 * 32))


def test_saved_model_and_checkpoint_load_safely(tiny_cfg, tmp_path):
    res = train(tiny_cfg(max_steps=10))
    state = load_checkpoint(res.model_path)
    model, tok = model_from_checkpoint(state)
    assert model.config.n_embd == 32 and tok.vocab_size == state["model_args"]["vocab_size"]
    ck = load_checkpoint(res.checkpoint_path)
    assert ck["step"] == 10 and "optimizer" in ck and "rng" in ck


def test_crafted_checkpoint_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("open('/tmp/tune_gpt_pwned', 'w').write('x')",))

    p = tmp_path / "evil.pt"
    with open(p, "wb") as f:
        pickle.dump({"model": Evil()}, f)
    with pytest.raises(ConfigError, match="cannot be loaded safely"):
        load_checkpoint(p)


def test_bf16_on_cpu_is_a_clear_error(tiny_cfg):
    with pytest.raises(ConfigError, match="bf16"):
        train(tiny_cfg(precision="bf16", device="cpu"))


def test_resume_refuses_a_different_model(tiny_cfg, tmp_path):
    cfg = tiny_cfg(max_steps=10, output_dir=str(tmp_path / "r"))
    train(cfg)
    other = TrainConfig.from_flat({"resume": True, "n_embd": 64}, base=cfg)
    with pytest.raises(ConfigError, match="resume"):
        train(other)


def test_threads_follow_the_config_during_the_run_and_are_put_back_after(tiny_cfg):
    """num_threads (and on a GPU the float32 matmul precision and cuDNN's TF32) are process-wide: a notebook's
    later cells ran with the run's, e.g. one CPU thread after a trial-sized run."""
    class Threads(Reporter):
        def start(self, cfg, info):
            self.during = torch.get_num_threads()

    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    rec = Threads()
    res = train(tiny_cfg(max_steps=2, eval_interval=2, num_threads=other, sample_tokens=0), rec)
    assert res.status == "finished" and rec.during == other and torch.get_num_threads() == before
    # torch >= 2.9 cannot read the global precision while the per-backend ones differ (oneDNN's set alone, as
    # a linear layer multiplying in bfloat16 sets it, or a user of the newer API): train() runs all the same
    mkldnn = getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", None)
    if mkldnn is not None:
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        try:
            assert train(tiny_cfg(max_steps=2, eval_interval=2, sample_tokens=0)).status == "finished"
            assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"  # left as the caller had it
        finally:
            torch.backends.mkldnn.matmul.fp32_precision = mkldnn


def test_ctrl_c_closes_the_reporters_and_says_how_to_go_on(tiny_cfg, corpus_file, tmp_path, monkeypatch, capsys):
    """Ctrl+C mid-run: the reporters are finished ('interrupted': TensorBoard writes its events out, W&B ends the
    run), the checkpoint stays the last evaluation's, and the CLI's last line gives the --resume command for
    this run's checkpoint, never for one an earlier run left in the same output dir."""
    from tune_gpt import cli, tracking

    class CtrlC(Recorder):
        def __init__(self, at):
            super().__init__()
            self.at = at

        def log(self, step, metrics):
            super().log(step, metrics)
            if step == self.at:
                raise KeyboardInterrupt

    rec = CtrlC(25)
    cfg = tiny_cfg()
    with pytest.raises(KeyboardInterrupt):
        train(cfg, rec)
    (res,) = rec.results
    assert res.status == "interrupted" and res.steps == 25 and [s for s, _, _ in rec.evals] == [10, 20]
    assert load_checkpoint(f"{cfg.output_dir}/checkpoint")["step"] == 20

    out = tmp_path / "cli"
    argv = ["--data", str(corpus_file), "--output_dir", str(out), "--no-wandb", "--no-tensorboard", "--no-progress",
            "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--batch_size", "8",
            "--max_steps", "40", "--eval_interval", "10", "--eval_iters", "2", "--log_interval", "5",
            "--num_threads", "1"]

    def interrupted_at(step, *extra):
        monkeypatch.setattr(tracking, "default_reporters", lambda cfg, **kw: CtrlC(step))
        return cli.train_main([*argv, *extra])

    assert interrupted_at(25) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (f"tune_gpt.train: interrupted; the last checkpoint (step 20) is in {out}/checkpoint; "
                    f"continue with: python -m tune_gpt.train {' '.join(argv)} --resume")
    assert interrupted_at(5, "--overwrite_output_dir") == 130  # a new run in the same dir, stopped before its first
    # evaluation
    assert capsys.readouterr().err.strip().endswith(
        "tune_gpt.train: interrupted; no checkpoint of this run yet (one is written at each evaluation: every 10 steps "
        "and at the last step)")
    argv.append("--resume")  # goes on from the first run's step 20: that checkpoint is this run's until the next
    assert interrupted_at(25) == 130
    assert "interrupted; the last checkpoint (step 20) is in" in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("matmul_precision", ["auto", "highest", "medium"])
def test_matmul_precision_decides_whether_the_linear_layers_multiply_in_bf16_on_cpu(tiny_cfg, matmul_precision):
    from tune_gpt.train import cpu_multiplies_bf16

    class Start(Recorder):
        def start(self, cfg, info):
            self.info = info

    rec = Start()
    res = train(tiny_cfg(max_steps=4, eval_interval=2, matmul_precision=matmul_precision, device="cpu"), rec)
    expected = {"auto": cpu_multiplies_bf16(), "highest": False, "medium": True}[matmul_precision]
    assert rec.info["bf16_products"] is expected
    assert res.status == "finished" and torch.get_float32_matmul_precision() == "highest"
    assert all(math.isfinite(m["val/loss"]) for _, m, _ in rec.evals)


def test_bf16_products_need_a_cpu_and_stay_off_under_compile_unless_asked_for():
    from tune_gpt.train import cpu_multiplies_bf16, uses_bf16_products

    cfg = lambda **kw: TrainConfig.from_flat(kw)  # noqa: E731
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert uses_bf16_products(cfg(), cpu) is cpu_multiplies_bf16()
    assert uses_bf16_products(cfg(compile=True), cpu) is False  # it would break the compiled graph
    assert uses_bf16_products(cfg(compile=True, matmul_precision="medium"), cpu) is True  # asked for
    assert uses_bf16_products(cfg(matmul_precision="highest"), cpu) is False
    assert uses_bf16_products(cfg(matmul_precision="medium"), cuda) is False  # CUDA: the global setting instead


class _FakeGPU:
    """torch.cuda as a machine with GPUs would answer, for the device logic that runs before any kernel."""

    def __init__(self, monkeypatch, name: str = "NVIDIA H200", major: int = 9, count: int = 1) -> None:
        from types import SimpleNamespace

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(major=major))
        monkeypatch.setattr(torch.version, "hip", None)


def test_cuda_resolves_to_an_indexed_device(monkeypatch):
    """torch.cuda.set_device and set_per_process_memory_fraction refuse torch.device("cuda"), which has no index."""
    from tune_gpt.train import resolve_device

    _FakeGPU(monkeypatch, count=2)
    for asked, want in (("auto", 0), ("cuda", 0), ("cuda:1", 1)):
        device = resolve_device(TrainConfig.from_flat({"device": asked}))
        assert device == torch.device("cuda", want) and device.index == want
    with pytest.raises(ValueError, match="specified index"):
        torch.cuda._utils._get_device_index(torch.device("cuda"))  # what the unindexed device met before


def test_bf16_needs_a_gpu_that_has_it_not_one_that_emulates_it(monkeypatch):
    from tune_gpt.train import resolve_device

    _FakeGPU(monkeypatch, name="Tesla V100-SXM2-16GB", major=7)
    with pytest.raises(ConfigError, match="GPU Tesla V100-SXM2-16GB does not support bf16; use --fp16"):
        resolve_device(TrainConfig.from_flat({"device": "cuda", "precision": "bf16"}))
    assert resolve_device(TrainConfig.from_flat({"device": "cuda", "precision": "fp16"})).type == "cuda"
    _FakeGPU(monkeypatch, name="NVIDIA A100-SXM4-80GB", major=8)
    assert resolve_device(TrainConfig.from_flat({"device": "cuda", "precision": "bf16"})).type == "cuda"


@pytest.mark.parametrize("name, major, precision, matmul, peak", [
    ("NVIDIA H200", 9, "bf16", "auto", 989e12),
    ("NVIDIA H100 PCIe", 9, "bf16", "auto", 756e12),  # not the SXM part's 989
    ("NVIDIA L40", 8, "bf16", "auto", 181e12),  # not the L4's 121
    ("NVIDIA L4", 8, "bf16", "auto", 121e12),
    ("NVIDIA H200", 9, "fp32", "auto", 989e12 / 2),  # TF32
    ("NVIDIA H200", 9, "fp32", "highest", None),  # plain fp32: no figure rather than a 7x wrong one
    ("Tesla V100-SXM2-16GB", 7, "fp32", "auto", None),  # no TF32 before Ampere
    ("Some Unknown GPU", 9, "bf16", "auto", None),
])
def test_peak_flops_is_the_gpus_for_the_arithmetic_used(monkeypatch, name, major, precision, matmul, peak):
    from tune_gpt.train import peak_flops

    _FakeGPU(monkeypatch, name=name, major=major)
    assert peak_flops(torch.device("cuda", 0), precision, matmul) == peak
    assert peak_flops(torch.device("cpu"), precision, matmul) is None


def test_cuda_allocation_failures_count_as_out_of_memory():
    from tune_gpt.train import is_oom

    assert is_oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert is_oom(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_oom(RuntimeError("CUDA error: device-side assert triggered"))
    # the CPU's allocator (a model too big for the machine's memory): out of memory too, not a bug to retry
    assert is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: "
                               "you tried to allocate 70368744177664 bytes. Error code 12 (Cannot allocate memory)"))


def test_a_checkpoint_from_before_keeps_resuming_and_rng_states_stay_on_the_cpu(tiny_cfg, tmp_path):
    """RNG states are CPU byte tensors whatever the device (torch.set_rng_state and a Generator refuse any
    other): a resume loads the checkpoint to the CPU. A checkpoint written before 2026-11-30 holds a list of
    every GPU's CUDA state: still accepted."""
    from tune_gpt.train import _set_rng_state

    cfg = tiny_cfg(max_steps=20, output_dir=str(tmp_path / "r"))
    train(cfg, stop_after=10)
    path = tmp_path / "r" / "checkpoint" / CKPT_NAME
    state = load_checkpoint(path)
    assert all(t.device.type == "cpu" for t in (state["rng"]["torch"], state["sampler"]))
    assert "cuda" not in state["rng"]  # a CPU run has no GPU generator to save
    state["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8)]  # the old form
    _set_rng_state(state["rng"], torch.device("cpu"))  # ignored on a CPU run; no error
    torch.save(state, path)
    resumed = train(TrainConfig.from_flat({"resume": True}, base=cfg))
    assert resumed.steps == 20 and resumed.status == "finished"


def test_the_memory_cap_to_restore_on_a_torch_without_its_getter(monkeypatch):
    """torch 2.4/2.5 (the Docker image's base) have set_per_process_memory_fraction but not its getter: a run
    with a GPU memory share (every fractional-GPU trial) raised AttributeError before its first step."""
    from tune_gpt.train import _memory_fraction_now

    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device: 0.25, raising=False)
    assert _memory_fraction_now(torch.device("cuda", 0)) == 0.25
    monkeypatch.delattr(torch.cuda, "get_per_process_memory_fraction")
    assert _memory_fraction_now(torch.device("cuda", 0)) == 1.0


def test_rng_states_restore_exactly_mid_block():
    """numpy's generator is restored where it stood in its key block, with its cached normal, and Python's
    likewise: the draws after a restore are the draws the saved run would have made."""
    import random

    import numpy as np

    from tune_gpt.train import _rng_state, _set_rng_state

    np.random.seed(3)
    random.seed(3)
    np.random.rand(10)  # mid-block
    np.random.standard_normal()  # leaves a cached normal
    random.random()
    random.gauss(0, 1)  # so does Python's
    state = _rng_state(torch.device("cpu"))
    expected = (np.random.rand(5).tolist(), np.random.standard_normal(), random.gauss(0, 1), random.random(),
                torch.rand(3).tolist())
    np.random.seed(99)
    random.seed(99)
    torch.manual_seed(99)
    _set_rng_state(state, torch.device("cpu"))
    assert (np.random.rand(5).tolist(), np.random.standard_normal(), random.gauss(0, 1), random.random(),
            torch.rand(3).tolist()) == expected
    # a checkpoint written before its position was kept: restored at a fresh block, as it was
    del state["numpy_pos"], state["numpy_gauss"], state["python_gauss"]
    _set_rng_state(state, torch.device("cpu"))
    assert np.random.get_state()[2] == 624


def test_resume_refuses_another_corpus_and_warns_of_changed_settings(tiny_cfg, tmp_path):
    """--resume on a corpus with another vocabulary would feed the embeddings the wrong characters: refused,
    naming both. Changed settings go on, with a warning naming each (the run is not the one it continued)."""
    import warnings

    cfg = tiny_cfg(max_steps=20, output_dir=str(tmp_path / "r"))
    train(cfg, stop_after=10)
    other = tmp_path / "other.txt"
    other.write_text("0123456789 +-*/=\n" * 4000, encoding="utf-8")
    with pytest.raises(ConfigError, match=r"resume: checkpoint .* was trained on .*words\.txt .*other\.txt.*--data"):
        train(TrainConfig.from_flat({"resume": True, "data": str(other)}, base=cfg))
    from tune_gpt.data import load_corpus
    from tune_gpt.train import _check_resume_matches

    state = load_checkpoint(Path(cfg.output_dir) / "checkpoint" / CKPT_NAME)
    state["config"] = {**state["config"], "data": None, "use_chinese": True}  # as a --use_chinese run's
    with pytest.raises(ConfigError, match=r"was trained on the Chinese corpus \(--use_chinese\) \(\d+ characters\)"):
        _check_resume_matches(state, cfg, load_corpus(str(other), cache_dir=tmp_path / "cache"), Path("ckpt.pt"),
                              asked=True)
    changed = TrainConfig.from_flat({"resume": True, "learning_rate": 1e-2, "max_steps": 30}, base=cfg)
    with pytest.warns(UserWarning, match=r"--learning_rate 0\.003 -> 0\.01, --max_steps 20 -> 30 differ"):
        res = train(changed)
    assert res.steps == 30 and res.status == "finished"
    shuffled = tmp_path / "shuffled.txt"  # the same characters in another order: another text
    lines = Path(cfg.data).read_text(encoding="utf-8").splitlines(keepends=True)
    shuffled.write_text("".join(reversed(lines)), encoding="utf-8")
    with pytest.warns(UserWarning, match=r"resume: --data .*words\.txt' -> .*shuffled\.txt' differ"):
        train(TrainConfig.from_flat({"resume": True, "data": str(shuffled)}, base=changed))
    relative = os.path.relpath(cfg.data)
    same = TrainConfig.from_flat({"resume": True, "log_interval": 1, "data": relative, "batch_size": 4,
                                  "gradient_accumulation_steps": 2}, base=changed)
    with warnings.catch_warnings():
        # how it logs, the corpus named by another path, and the same batch in two pieces (what the
        # out-of-memory hint asks for) change nothing: no warning
        warnings.simplefilter("error")
        train(same)


def test_a_resumed_run_interrupted_keeps_the_best_val_loss_it_resumed_with(tiny_cfg, tmp_path):
    class StopAt(Recorder):
        def log(self, step, metrics):
            super().log(step, metrics)
            if step >= 15:
                raise KeyboardInterrupt

    cfg = tiny_cfg(max_steps=40, output_dir=str(tmp_path / "r"))
    first = train(cfg, stop_after=10)
    with pytest.raises(KeyboardInterrupt) as info:
        train(TrainConfig.from_flat({"resume": True}, base=cfg), StopAt())
    assert info.value.train_result.best_val_loss == first.best_val_loss is not None


def test_compile_on_a_gpu_without_a_c_compiler_is_one_line(monkeypatch):
    """Triton builds its GPU kernels with the system's C compiler; a CUDA runtime image has none, and the
    first compiled step failed deep in Inductor (a search retried the trial to no end)."""
    import shutil

    from tune_gpt.train import _check_compiler

    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/cc" if name == "cc" else None)  # Triton never asks cc
    with pytest.raises(ConfigError, match=r"^--compile: no C compiler found \(gcc or clang.*apt-get install gcc"):
        _check_compiler(torch.device("cuda"))
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}" if name == "gcc" else None)
    _check_compiler(torch.device("cuda"))
    monkeypatch.setenv("CC", "/opt/nowhere/cc")  # Triton takes $CC as it is, gcc or not
    with pytest.raises(ConfigError, match=r"^--compile: CC='/opt/nowhere/cc' is no compiler found on PATH"):
        _check_compiler(torch.device("cuda"))


def test_compile_on_a_cpu_without_a_cpp_compiler_is_one_line(monkeypatch):
    """Inductor builds its CPU kernels with a C++ compiler ($CXX, else g++): a slim image has none, and the first
    step ended in a 100-line traceback after the run's logs were opened. Asked as Inductor asks, before."""
    import torch._inductor.cpp_builder as cpp_builder
    from torch._inductor.exc import InvalidCxxCompiler

    from tune_gpt.train import _check_compiler

    def none():
        raise InvalidCxxCompiler()

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", none)
    monkeypatch.setenv("CXX", "/opt/nowhere/g++")
    with pytest.raises(ConfigError, match=r"^--compile: no C\+\+ compiler found \(CXX='/opt/nowhere/g\+\+' is none; .*"
                                          r"apt-get install g\+\+\), or train without --compile$"):
        _check_compiler(torch.device("cpu"))
    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", lambda: "g++")
    _check_compiler(torch.device("cpu"))



def test_a_shared_gpus_memory_cap_leaves_room_for_the_cuda_context():
    """set_per_process_memory_fraction caps torch's allocator only; each process's CUDA context comes on top.
    Four trials at exactly 0.25 would claim the whole GPU plus four contexts: each share gives 1 GiB back."""
    from tune_gpt.train import CONTEXT_ALLOWANCE, memory_cap

    h200 = 141 * 10**9
    quarter = memory_cap(0.25, h200)
    assert quarter == pytest.approx(0.25 - CONTEXT_ALLOWANCE / h200) and CONTEXT_ALLOWANCE == 1 << 30
    assert 4 * quarter * h200 + 4 * CONTEXT_ALLOWANCE == pytest.approx(h200)  # four caps and four contexts fit
    assert memory_cap(1.0, h200) == 1.0 and memory_cap(1, h200) == 1.0 and isinstance(memory_cap(1, h200), float)
    assert memory_cap(0.125, 4 * 2**30) == 0.0625  # a 4 GiB GPU: never less than half the share
    assert isinstance(memory_cap(1, 0), float)


def test_resuming_keeps_this_runs_optimizer_kernel_not_the_checkpoints():
    """torch's load_state_dict takes fused/foreach from the saved groups: a checkpoint saved unfused (an MPS
    run), resumed on CUDA with fp16, failed at the first step (GradScaler hands its scale to fused AdamW)."""
    from tune_gpt.train import load_optimizer_state

    model = torch.nn.Linear(4, 4)
    saved = torch.optim.AdamW(model.parameters(), lr=0.1)  # not fused
    model(torch.randn(2, 4)).sum().backward()
    saved.step()
    state = saved.state_dict()
    assert state["param_groups"][0]["fused"] is None
    fused = torch.optim.AdamW(model.parameters(), lr=0.5, fused=True)
    loaded = []  # torch places each `step` counter by the groups it is given (CUDA for fused): they carry the flags
    fused.load_state_dict = lambda sd, load=fused.load_state_dict: (loaded.append(sd), load(sd))[1]
    load_optimizer_state(fused, state)
    assert loaded[0]["param_groups"][0]["fused"] is True and state["param_groups"][0]["fused"] is None  # not edited
    group = fused.param_groups[0]
    assert group["fused"] is True and group["lr"] == 0.1  # the kernel is this run's; the hyperparameters resumed
    assert torch.equal(fused.state[model.weight]["exp_avg"], saved.state[model.weight]["exp_avg"])
    fused.step()  # and it steps


def test_a_compiled_run_raises_the_recompile_limit_while_it_trains_and_puts_it_back(tiny_cfg, monkeypatch):
    """A search's worker process compiles trial after trial; at torch's default limit of 8 compiled variants
    every later new shape ran eagerly, so a trial's tokens/s depended on the trials before it."""
    import torch._dynamo

    from tune_gpt.train import RECOMPILE_LIMIT

    class Limit(Reporter):
        def start(self, cfg, info):
            self.during = torch._dynamo.config.recompile_limit

    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)  # the limit, not Inductor, is under test
    before = torch._dynamo.config.recompile_limit
    rec = Limit()
    res = train(tiny_cfg(max_steps=2, eval_interval=2, sample_tokens=0, compile=True), rec)
    assert res.status == "finished" and rec.during == max(before, RECOMPILE_LIMIT) > 8
    assert torch._dynamo.config.recompile_limit == before


def test_the_step_loop_runs_with_older_objects_frozen_and_gives_them_back(tiny_cfg):
    """A full collection walks every object in the process: in a search's worker (Ray, Tune, pyarrow and pandas
    beside torch, 420k objects) each took 0.1 s every few hundred steps. The loop freezes what existed before it
    and unfreezes it after; a caller who manages the collector itself keeps its own state."""
    import gc
    import weakref

    class Frozen(Reporter):
        during = None

        def evaluate(self, step, metrics, checkpoint_dir):
            self.during = gc.get_freeze_count()

    cfg = tiny_cfg(max_steps=2, eval_interval=2, sample_tokens=0)
    assert gc.get_freeze_count() == 0
    rec = Frozen()
    assert train(cfg, rec).status == "finished"
    assert rec.during > 1000 and gc.get_freeze_count() == 0
    # garbage an earlier run left (old: only a full collection finds it) is collected, not frozen with the rest
    class Cycle:
        def __init__(self):
            self.me = self

    class Gone(Reporter):
        def evaluate(self, step, metrics, checkpoint_dir):
            self.alive = ref() is not None

    holder = [Cycle()]
    ref = weakref.ref(holder[0])
    gc.collect()  # it survives (still held), so it is in the oldest generation
    holder.clear()
    rec = Gone()
    train(cfg, rec)
    assert rec.alive is False and ref() is None
    gc.freeze()  # the caller's own freeze: not added to, not undone
    try:
        mine = gc.get_freeze_count()
        rec = Frozen()
        train(cfg, rec)
        assert 0 < rec.during <= mine and 0 < gc.get_freeze_count() <= mine  # (freed objects leave it)
    finally:
        gc.unfreeze()
    gc.disable()  # the caller's collector switched off: left off, nothing frozen
    try:
        rec = Frozen()
        train(cfg, rec)
        assert rec.during == 0 and not gc.isenabled()
    finally:
        gc.enable()


def test_training_keeps_its_step_tensors_in_glibcs_heap_unless_the_user_tuned_malloc(monkeypatch, tiny_cfg):
    """glibc maps and unmaps every block above 128 KiB until a large free raises its threshold: a search's
    trial (corpus from Ray's shared memory, no large free) trained slower than the same run called directly."""
    import platform
    import subprocess
    import sys

    from tune_gpt import train as train_module

    for var in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(var, raising=False)
    glibc = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
    calls = []
    real = train_module._malloc_for_training
    monkeypatch.setattr(train_module, "_malloc_for_training", lambda: calls.append(real()) or calls[-1])
    train(tiny_cfg(max_steps=2, eval_interval=2, sample_tokens=0))
    assert calls == [glibc]  # every run sets it
    if glibc:  # and it takes effect: in a fresh process, a 16 MiB block then comes from the heap, not a mapping
        code = ("import ctypes\nfrom tune_gpt.train import _malloc_for_training\n"
                "class M(ctypes.Structure): _fields_ = [(n, ctypes.c_size_t) for n in ('arena ordblks smblks hblks "
                "hblkhd usmblks fsmblks uordblks fordblks keepcost').split()]\n"
                "libc = ctypes.CDLL('libc.so.6'); libc.mallinfo2.restype = M; libc.malloc.restype = ctypes.c_void_p\n"
                "def mapped(n):  # whether a block of n bytes is mapped (hblks: how many are)\n"
                "    h = libc.mallinfo2().hblks; p = libc.malloc(n); h = libc.mallinfo2().hblks - h\n"
                "    libc.free(ctypes.c_void_p(p)); return h\n"
                # 16 MiB mapped, and freed: glibc's own dynamic threshold rises to 16 MiB, not past it
                "before = mapped(16 << 20)\nassert _malloc_for_training()\nprint(before, mapped(24 << 20))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        before, after = map(int, out.stdout.split())
        assert (before, after) == (1, 0), out.stdout  # 24 MiB from the heap: only the 32 MiB set here allows it
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")  # the user's own tuning stands
    assert real() is False
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0")  # glibc's newer way to say it
    assert real() is False


def test_a_prompt_with_windows_line_ends_reads_as_the_corpus_does(tiny_cfg, tmp_path, recwarn):
    """Corpora are read with one newline for \\r\\n; a prompt pasted from Windows fed the model a carriage
    return it never saw (and warned of it as an unseen character)."""
    from tune_gpt.generate import generate

    cfg = tiny_cfg(max_steps=5, output_dir=str(tmp_path / "g"))
    train(cfg)
    crlf = generate(tmp_path / "g", prompt="the\r\nword", max_new_tokens=20, seed=3)
    assert not [w for w in recwarn if "never seen" in str(w.message)]
    assert crlf == generate(tmp_path / "g", prompt="the\nword", max_new_tokens=20, seed=3)
