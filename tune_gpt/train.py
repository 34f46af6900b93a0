"""`train(cfg, reporter)`: the one training function behind single runs, trials and replays.

Also ``python -m tune_gpt.train`` with the flags users of ``train_single_gpu.py``
already type (``--model_size tiny --use_chinese --epochs 5 --batch_size 16
--gradient_accumulation_steps 4 --bf16 --wandb_project ...``).
"""

from __future__ import annotations

if __name__ == "__main__":  # the CLI checks flags and corpus before torch loads (seconds), then imports this module
    import sys

    from tune_gpt.cli import train_main

    sys.exit(train_main())

import contextlib
import gc
import math
import os
import random
import re
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from tune_gpt.config import CKPT_NAME, MODEL_NAME, RUNTIME_KEYS, TrainConfig, check_precision
from tune_gpt.data import BatchSampler, CharTokenizer, Corpus, load_corpus, one_newline
from tune_gpt.errors import ConfigError, TuneGPTError
from tune_gpt.model import GPT, GPTConfig
from tune_gpt.tracking import Reporter, SystemMetrics

EVAL_BATCH_SIZE = 12  # sequences per evaluation batch, whatever the run's batch size
EVAL_SEED = 20240601  # eval windows do not depend on the run's seed: every trial is scored on the same text

# Dense bf16 peak FLOP/s of common accelerators, for MFU. Matched by substring of the device name.
PEAK_FLOPS = {  # dense bf16/fp16 tensor-core peaks; looked up by the longest name the GPU's name contains
    "H200 NVL": 835e12, "H200": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12,
    "A100": 312e12, "A10G": 125e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12,
    "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12, "MI300": 1307e12, "MI250": 362e12,
}


class Diverged(TuneGPTError):
    """The loss became NaN or infinite."""


class OutOfMemory(RuntimeError):
    """The run ran out of (GPU) memory, and smaller micro-batches did not help or were not allowed.

    `retries` lists the micro-batch shrinks tried before giving up; `cfg` is the last config tried.
    """

    def __init__(self, message: str, retries: list[dict[str, Any]], cfg: TrainConfig) -> None:
        super().__init__(message)
        self.retries = retries
        self.cfg = cfg


@dataclass
class TrainResult:
    status: str  # finished | diverged (interrupted / errored: on the exception train() raises again)
    steps: int
    tokens: int
    final_val_loss: float | None = None
    best_val_loss: float | None = None
    final_val_bpc: float | None = None
    best_val_bpc: float | None = None
    wall_s: float = 0.0
    train_s: float = 0.0
    tokens_per_s: float = 0.0
    output_dir: str | None = None
    checkpoint_path: str | None = None
    checkpoint_step: int | None = None  # the step checkpoint_path holds
    model_path: str | None = None
    sample: str | None = None
    message: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------- devices


def resolve_device(cfg: TrainConfig) -> torch.device:
    """The device to run on; raises ConfigError when the request cannot work here."""
    dev = auto_device() if cfg.device == "auto" else cfg.device
    device = available_device(dev, cfg.device)
    if device.type == "cuda" and device.index is None:
        # "cuda" means the current GPU (cuda:0 in a Ray trial, which sees only its own): named, because
        # torch.cuda.set_device and set_per_process_memory_fraction refuse a CUDA device without an index
        device = torch.device("cuda", torch.cuda.current_device())
    check_precision(cfg, device.type)
    if cfg.precision == "bf16" and device.type == "cuda" and not cuda_supports_bf16(device):
        raise ConfigError(f"bf16: GPU {torch.cuda.get_device_name(device)} does not support bf16; use --fp16")
    return device


def auto_device() -> str:
    """What ``--device auto`` means here: a CUDA (or ROCm) GPU, else Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cuda_supports_bf16(device: torch.device) -> bool:
    """bfloat16 in hardware: compute capability 8.0 (Ampere) or later, or any ROCm GPU. Not the emulation
    that `torch.cuda.is_bf16_supported()` also accepts (V100, T4): it runs, many times slower than fp16."""
    if torch.version.hip:
        return True
    return torch.cuda.get_device_properties(device).major >= 8


def uses_bf16_products(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether the model's linear layers multiply in bfloat16 (`model.Linear`): on a CPU, with
    ``matmul_precision`` medium, or auto where the CPU multiplies bfloat16 in hardware and the
    model is not compiled (the switch around each layer breaks a compiled graph into pieces)."""
    if device.type != "cpu":
        return False
    if cfg.matmul_precision == "auto":
        return not cfg.compile and cpu_multiplies_bf16()
    return cfg.matmul_precision == "medium"


def cpu_multiplies_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AMX or AVX512-BF16) and oneDNN can use it."""
    try:
        hw = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
        return bool(hw and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without these probes: assume not
        return False


def available_device(dev: str, requested: str | None = None) -> torch.device:
    """`dev` as a torch device that exists here; ConfigError naming `requested` (default `dev`) otherwise."""
    requested = dev if requested is None else requested
    try:
        device = torch.device(dev)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device: {requested!r} is not a device (cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {requested!r} requested but no CUDA GPU is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device: {requested!r} does not exist ({torch.cuda.device_count()} GPUs visible)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"device: {requested!r} requested but MPS is not available")
    return device


def peak_flops(device: torch.device, precision: str, matmul_precision: str = "auto") -> float | None:
    """The device's dense peak for the arithmetic the run uses (None off CUDA or for an unknown GPU)."""
    if device.type != "cuda":
        return None  # no meaningful MFU figure on CPU
    name = torch.cuda.get_device_name(device)
    for key, peak in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if key in name:
            if precision in ("bf16", "fp16"):
                return peak
            tf32 = matmul_precision != "highest" and torch.cuda.get_device_properties(device).major >= 8
            return peak / 2 if tf32 else None  # TF32 is about half the bf16 peak; no figure for plain fp32
    return None


# ------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically: a crash mid-write never leaves a torn checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``: a crafted pickle is refused, not run."""
    p = Path(path)
    if p.is_dir():
        p = p / CKPT_NAME if (p / CKPT_NAME).is_file() else p / MODEL_NAME
    if not p.is_file():
        raise ConfigError(f"checkpoint: {path} not found")
    with open(p, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch.save's zip, or a bare pickle
        raise ConfigError(f"checkpoint: {p} is not a checkpoint (not a file torch.save wrote)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the verdict below says enough
            return torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:  # UnpicklingError for crafted files, RuntimeError for torn ones
        raise ConfigError(f"checkpoint: {p} cannot be loaded safely ({_load_failure(exc)})") from None


def _load_failure(exc: Exception) -> str:
    """Why torch.load(weights_only=True) refused a file, in a few words (never "retry without weights_only")."""
    text = str(exc)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text) or re.search(r"Unsupported operand (\d+)", text)
    if found and "global" in found.group(0).lower():
        return f"it would import {found.group(1)}, which a checkpoint never needs: refused, not run"
    if found:
        return f"unsupported pickle opcode {found.group(1)}: not a plain tensors-only checkpoint; refused, not run"
    if "Weights only load failed" in text:
        detail = next((ln.strip() for ln in text.splitlines() if "WeightsUnpickler error" in ln), "")
        return (detail.replace("WeightsUnpickler error:", "").strip() or "it holds more than tensors") + ": refused, not run"
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def check_state(state: Any, keys: tuple[str, ...], source: str | Path) -> dict[str, Any]:
    """Raise ConfigError unless `state` is a dict holding `keys` (a checkpoint loads safely but may be anything)."""
    if not isinstance(state, dict):
        raise ConfigError(f"checkpoint: {source} is not a tune_gpt checkpoint (it holds a {type(state).__name__})")
    missing = [k for k in keys if k not in state]
    if missing:
        raise ConfigError(f"checkpoint: {source} is not a tune_gpt checkpoint (no {', '.join(missing)})")
    return state


def model_from_checkpoint(state: dict[str, Any], device: Any = "cpu", source: str | Path = "checkpoint") -> tuple[GPT, CharTokenizer]:
    check_state(state, ("model", "model_args", "tokenizer"), source)
    try:
        model = GPT(GPTConfig(**state["model_args"]))
        model.load_state_dict(state["model"])
        tok = CharTokenizer.from_dict(state["tokenizer"])
    except (TypeError, ValueError, KeyError, RuntimeError, AttributeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"checkpoint: {source} does not hold a usable model ({first})") from None
    model.to(device).eval()
    return model, tok


def _rng_state(device: torch.device) -> dict[str, Any]:
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    _, py_keys, py_gauss = random.getstate()
    st = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.frombuffer(keys.tobytes(), dtype=np.uint8).copy()),
        # where in its key block numpy's generator stands, and its cached normal (without them a resume
        # restarted numpy at a fresh block: other draws than the run it continues)
        "numpy_pos": torch.tensor([int(pos), int(has_gauss)], dtype=torch.int64),
        "numpy_gauss": torch.tensor([float(gauss)], dtype=torch.float64),
        "python": torch.tensor(list(py_keys), dtype=torch.int64),
        # Python's cached normal (random.gauss keeps the second of each pair): NaN for none
        "python_gauss": torch.tensor([math.nan if py_gauss is None else py_gauss], dtype=torch.float64),
    }
    if device.type == "cuda":  # the training GPU's generator only: a resume may see other GPUs, or fewer
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_state(st: dict[str, Any], device: torch.device) -> None:
    """Restore `st` (loaded to the CPU: RNG states are CPU byte tensors) for a run on `device`."""
    torch.set_rng_state(st["torch"])
    keys = np.frombuffer(st["numpy"].numpy().tobytes(), dtype=np.uint32)
    pos, has_gauss = st["numpy_pos"].tolist() if "numpy_pos" in st else (624, 0)  # 624: before 2026-12-01
    gauss = float(st["numpy_gauss"][0]) if "numpy_gauss" in st else 0.0
    np.random.set_state(("MT19937", keys, pos, has_gauss, gauss))
    gauss = float(st["python_gauss"][0]) if "python_gauss" in st else math.nan  # NaN: none (or before 2026-12-01)
    random.setstate((3, tuple(int(x) for x in st["python"].tolist()), None if math.isnan(gauss) else gauss))
    cuda = st.get("cuda")
    if isinstance(cuda, (list, tuple)):  # written before 2026-11-30: every visible GPU's, the first the run's
        cuda = cuda[0] if cuda else None
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


_CKPT_KEYS = ("model", "optimizer", "scaler", "sampler", "rng", "step", "tokens", "model_args")
# settings a resume may change without changing the training (what is logged and how, and where)
_RESUME_FREE = frozenset(RUNTIME_KEYS) | {"log_interval", "sample_tokens", "sample_prompt"}


def _check_resume_matches(state: dict[str, Any], cfg: TrainConfig, corpus: Corpus, src: Path, asked: bool) -> None:
    """A checkpoint continues on the corpus it was trained on (another vocabulary would feed its embeddings
    the wrong characters: ConfigError). On a resume the user asked for (`asked`: --resume), a warning lists the
    settings that differ from the checkpoint's run: it goes on, but not as that run would have (a different
    model is refused after this, by its shape)."""
    old_tok = state.get("tokenizer")
    if isinstance(old_tok, dict) and old_tok != corpus.tokenizer.to_dict():
        was = state.get("config") or {}
        before = was.get("data") or ("the Chinese corpus (--use_chinese)" if was.get("use_chinese")
                                     else "the default corpus")
        raise ConfigError(f"resume: checkpoint {src} was trained on {before} ({len(old_tok.get('chars', ''))} "
                          f"characters); this run's corpus ({corpus.name}, {corpus.vocab_size} characters) is "
                          f"another: give the --data (or --use_chinese) of the run it continues")
    old = state.get("config")
    if not asked or not isinstance(old, dict):
        return
    from tune_gpt.cli import flag_name

    new = cfg.to_record()  # as the checkpoint keeps it: a URL's token is not written down
    old = {**TrainConfig().to_flat(), **old}  # a checkpoint from before a field existed: its default then
    same_text = state.get("corpus_sha256") == corpus.sha256 if state.get("corpus_sha256") else None

    def same(k: str) -> bool:
        if k == "data" and same_text is not None:  # the text itself, however its path was typed
            return same_text
        return old.get(k) == new.get(k)

    changed = [k for k in sorted(set(old) | set(new))
               if k not in _RESUME_FREE and not k.startswith(("wandb.", "model")) and not same(k)]
    tokens = [(d.get("batch_size"), d.get("gradient_accumulation_steps")) for d in (old, new)]
    if all(isinstance(v, int) for t in tokens for v in t) and tokens[0][0] * tokens[0][1] == tokens[1][0] * tokens[1][1]:
        # the same batch in other pieces (what the out-of-memory hint asks for): the same training
        changed = [k for k in changed if k not in ("batch_size", "gradient_accumulation_steps")]
    if changed:
        listed = ", ".join(f"--{flag_name(k)} {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        warnings.warn(f"resume: {listed} differ from the run in {src}, which goes on from step {state.get('step')} "
                      f"but not as it would have (give its settings to continue it as it was)")


# --------------------------------------------------------------- schedule


def lr_at(step: int, cfg: TrainConfig, total: int, warmup: int) -> float:
    """Linear warmup to the peak, then cosine decay to min_lr at the last step (nanoGPT's shape)."""
    peak, floor = cfg.learning_rate, cfg.final_min_lr
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    if step >= total:
        return floor
    ratio = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (peak - floor)


# ------------------------------------------------------------------- train


def train(
    cfg: TrainConfig,
    reporter: Reporter | None = None,
    *,
    corpus: Corpus | None = None,
    resume_from: str | Path | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train a GPT as `cfg` says; report to `reporter`; return what happened.

    `corpus` skips loading (the search tokenizes once and ships it to trials).
    `resume_from` (a directory holding ``ckpt.pt``) continues a run exactly; with
    ``cfg.resume`` the run resumes from ``<output_dir>/checkpoint`` when it exists.
    `stop_after` ends the run after that step (evaluated) without changing the
    schedule, as when a trial was stopped early and is replayed exactly.
    Raises `TuneGPTError` subclasses for bad input; returns status ``diverged``
    when the loss turns NaN or infinite.

    The process-wide torch settings the run changes (CPU threads, float32 matmul precision, cuDNN's
    TF32, the CUDA memory cap, torch.compile's recompile limit) are put back when it returns or raises:
    a notebook's next cell runs as it did before.
    """
    threads, matmul, cudnn_tf32 = torch.get_num_threads(), _matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        with contextlib.ExitStack() as restore:  # what _train changes once it knows the device
            return _train(cfg, reporter, corpus=corpus, resume_from=resume_from, stop_after=stop_after,
                          restore=restore)
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        if matmul is not None and _matmul_precision() not in (None, matmul):  # a GPU run set it: put it back
            torch.set_float32_matmul_precision(matmul)
        if torch.backends.cudnn.allow_tf32 != cudnn_tf32:
            torch.backends.cudnn.allow_tf32 = cudnn_tf32


def _matmul_precision() -> str | None:
    """torch's global float32 matmul precision; None where it cannot be read as one: since torch 2.9 it
    raises while the per-backend settings differ (a linear layer multiplying in bfloat16 on this CPU sets
    oneDNN's alone; so does torch's newer per-backend API), and then it is left as it is."""
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        return None


def _memory_fraction_now(device: torch.device) -> float:
    """The process's CUDA memory cap on `device`, to put back after the run. torch < 2.6 has no getter: 1.0,
    the allocator's default (a cap set before the run by the caller is then lifted, not restored)."""
    get = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    return float(get(device)) if get is not None else 1.0


def _train(cfg: TrainConfig, reporter: Reporter | None, *, corpus: Corpus | None, resume_from: str | Path | None,
           stop_after: int | None, restore: contextlib.ExitStack) -> TrainResult:
    t_start = time.perf_counter()
    reporter = reporter or Reporter()
    device = resolve_device(cfg)
    _malloc_for_training()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)  # gpu/max_mem_gb is this run's (a Ray actor runs trial after trial)
        torch.set_float32_matmul_precision("high" if cfg.matmul_precision == "auto" else cfg.matmul_precision)
        torch.backends.cudnn.allow_tf32 = cfg.matmul_precision != "highest"
        if cfg.gpu_memory_fraction:
            restore.callback(torch.cuda.set_per_process_memory_fraction, _memory_fraction_now(device), device)
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(memory_cap(cfg.gpu_memory_fraction, total), device)
    if corpus is None:
        corpus = load_corpus(cfg.data, use_chinese=cfg.use_chinese, cache_dir=cfg.cache_dir)
    corpus.check_context(cfg.model.block_size, source=cfg.data or corpus.name)
    out_dir = Path(cfg.output_dir).expanduser().resolve()
    ckpt_dir = out_dir / "checkpoint"

    # --- model and optimizer (seeded: the same seed gives the same run on CPU)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    m = cfg.model
    model_args = dict(
        vocab_size=corpus.vocab_size, block_size=m.block_size, n_layer=m.n_layer, n_head=m.n_head,
        n_embd=m.n_embd, dropout=m.dropout, bias=m.bias,
    )
    model = GPT(GPTConfig(**model_args)).to(device)
    bf16_products = uses_bf16_products(cfg, device)
    model.set_bf16_products(bf16_products)
    fused = device.type in ("cuda", "cpu")
    optimizer = torch.optim.AdamW(
        model.optim_groups(cfg.weight_decay), lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
        **({"fused": True} if fused else {}),
    )
    scaler = torch.amp.GradScaler("cuda", enabled=(cfg.precision == "fp16" and device.type == "cuda"))
    autocast = (
        torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision])
        if cfg.precision != "fp32" else contextlib.nullcontext()
    )

    total = cfg.total_steps(len(corpus.train))
    warmup = cfg.warmup_for(total)
    if warmup >= total:  # (only a warmup_steps given can be: the default is a tenth of the run at most)
        warnings.warn(f"warmup_steps {warmup} is not below this run's {total} steps: the learning rate never "
                      f"reaches learning_rate {cfg.learning_rate:g}")
    end = total if stop_after is None else min(total, stop_after)
    sampler = BatchSampler(corpus.train, cfg.batch_size, m.block_size, seed=cfg.seed + 1, device=device)
    eval_batches = _fixed_eval_batches(corpus, cfg, device)

    # --- resume
    step, tokens, best_val, history = 0, 0, None, []
    train_s_before = 0.0
    reporter_state: dict[str, Any] = {}  # what the reporters kept in the checkpoint resumed from
    src = Path(resume_from) if resume_from else reporter.resume_checkpoint()
    if src is None and cfg.resume and (ckpt_dir / CKPT_NAME).is_file():
        src = ckpt_dir
    if src is not None:
        # to the CPU: RNG and sampler states must stay CPU tensors; load_state_dict puts the weights and
        # the optimizer's state on the parameters' device
        state = check_state(load_checkpoint(src, map_location="cpu"), _CKPT_KEYS, src)
        _check_resume_matches(state, cfg, corpus, src, asked=src == ckpt_dir and resume_from is None)
        if state["model_args"] != model_args:
            raise ConfigError(f"resume: checkpoint {src} has model {state['model_args']}, this run wants {model_args}")
        try:
            model.load_state_dict(state["model"])
            load_optimizer_state(optimizer, state["optimizer"])
            if state["scaler"]:  # a run without loss scaling saved {}: resumed with --fp16, the scaler starts afresh
                scaler.load_state_dict(state["scaler"])
            sampler.set_state(state["sampler"])
            _set_rng_state(state["rng"], device)
            step, tokens = int(state["step"]), int(state["tokens"])
        except (TypeError, ValueError, KeyError, RuntimeError, AttributeError, IndexError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(f"resume: checkpoint {src} cannot be resumed from ({first})") from None
        best_val = state.get("best_val_loss")
        history = list(state.get("history", []))
        train_s_before = float(state.get("train_s", 0.0))
        reporter_state = state.get("reporters") or {}

    if src is not None and step >= end:  # resumed at its end (--resume of a finished run): nothing to train
        if cfg.checkpoint and not (out_dir / MODEL_NAME).is_file():  # stopped between its last checkpoint and model
            _save_model(out_dir / MODEL_NAME, model, model_args, corpus, cfg,
                        history[-1].get("val/loss") if history else None, step)
        return _already_done(cfg, step, end, tokens, best_val, history, train_s_before, out_dir, src, corpus, t_start)

    raw_model = model
    if cfg.compile:
        _check_compiler(device)
        restore.enter_context(_recompile_limit(RECOMPILE_LIMIT))
        model = torch.compile(model)

    flops_per_token = raw_model.flops_per_token()
    peak = peak_flops(device, cfg.precision, cfg.matmul_precision)
    sysm = SystemMetrics(device)
    info = {
        "n_params": raw_model.num_params(), "flops_per_token": flops_per_token, "vocab_size": corpus.vocab_size,
        "corpus": corpus.describe(), "corpus_sha256": corpus.sha256, "total_steps": total, "end_step": end, "warmup_steps": warmup, "device": str(device),
        "bf16_products": bf16_products, "start_step": step, "reporter_state": reporter_state,
    }
    result = TrainResult(status="running", steps=step, tokens=tokens, output_dir=str(out_dir), history=history,
                         best_val_loss=best_val)
    try:
        reporter.start(cfg, info)
    except BaseException as exc:  # e.g. W&B refused the run after TensorBoard had opened its file
        _close_after_error(reporter, result, exc, t_start)
        raise
    if src is not None and Path(src).resolve() == ckpt_dir.resolve():  # this run goes on from its own checkpoint
        result.checkpoint_path, result.checkpoint_step = str(ckpt_dir / CKPT_NAME), step
    interrupted: KeyboardInterrupt | None = None
    train_tokens = len(corpus.train)
    loss_sum = torch.zeros((), device=device)
    loss_count = 0
    train_s = 0.0
    check_every = 1 if device.type == "cpu" else cfg.log_interval
    restore.enter_context(_heap_frozen())
    model.train()
    try:
        while step < end:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg, total, warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for _ in range(cfg.gradient_accumulation_steps):
                x, y = sampler.next()
                with autocast:
                    _, loss = model(x, y)
                    loss = loss / cfg.gradient_accumulation_steps
                scaler.scale(loss).backward()
                loss_sum += loss.detach()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += cfg.tokens_per_step
            loss_count += 1
            last = step == end
            do_eval = step % cfg.eval_interval == 0 or last
            do_log = step % cfg.log_interval == 0
            if do_log or do_eval or step % check_every == 0:
                mean_loss = loss_sum.item() / loss_count  # syncs the device: only at these points
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                train_s += time.perf_counter() - t0
                if not math.isfinite(mean_loss):
                    raise Diverged(f"loss became {mean_loss} at step {step} (lr {lr:.3g})")
                if do_log and not do_eval:  # an evaluation's metrics carry these, with its train loss
                    tps = _rate(tokens, train_s + train_s_before)
                    metrics = {
                        "train/loss": mean_loss, "lr": lr, "step": step, "tokens": tokens,
                        "epoch": tokens / train_tokens, "tokens_per_s": tps, **sysm.read(),
                    }
                    if peak:
                        metrics["mfu"] = flops_per_token * tps / peak
                    reporter.log(step, metrics)
                if do_log:
                    loss_sum.zero_()
                    loss_count = 0
            else:
                train_s += time.perf_counter() - t0
            if do_eval:
                # eager, as generate samples: compiled, eval mode, no_grad and the eval batch size broke
                # dynamo's guards and compiled a second graph at the first evaluation (tens of seconds)
                losses = _evaluate(raw_model, eval_batches, autocast)
                if not math.isfinite(losses["val"]):
                    raise Diverged(f"val loss became {losses['val']} at step {step} (lr {lr:.3g})")
                bpc = bits_per_char(losses["val"], corpus)
                tps = _rate(tokens, train_s + train_s_before)
                best_val = losses["val"] if best_val is None else min(best_val, losses["val"])
                metrics = {
                    "train/loss": losses["train"], "val/loss": losses["val"], "val/bpc": bpc,
                    "best/val_loss": best_val, "lr": lr, "step": step, "tokens": tokens,
                    "epoch": tokens / train_tokens, "tokens_per_s": tps, **sysm.read(),
                }
                if peak:
                    metrics["mfu"] = flops_per_token * tps / peak
                history.append({k: metrics[k] for k in ("step", "train/loss", "val/loss", "val/bpc", "lr")})
                saved = None
                if cfg.checkpoint:
                    save_checkpoint(ckpt_dir / CKPT_NAME, {
                        "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scaler": scaler.state_dict(), "sampler": sampler.state(), "rng": _rng_state(device),
                        "step": step, "tokens": tokens, "best_val_loss": best_val, "history": history,
                        "train_s": train_s + train_s_before, "model_args": model_args,
                        "tokenizer": corpus.tokenizer.to_dict(), "config": cfg.to_record(),
                        "corpus_sha256": corpus.sha256,
                        "reporters": getattr(reporter, "checkpoint_state", dict)(),  # optional, as every method
                    })
                    saved = ckpt_dir
                    result.checkpoint_path, result.checkpoint_step = str(ckpt_dir / CKPT_NAME), step
                result.steps, result.tokens = step, tokens
                result.final_val_loss, result.final_val_bpc = losses["val"], bpc
                result.best_val_loss = best_val
                result.best_val_bpc = bits_per_char(best_val, corpus)
                if last and cfg.sample_tokens > 0:  # before the last report: a search's scheduler may end the trial in it
                    raw_model.set_bf16_products(False)  # as `python -m tune_gpt.generate` samples: in float32
                    result.sample = sample_text(raw_model, corpus.tokenizer, cfg.sample_prompt, cfg.sample_tokens,
                                                cfg.seed, device)
                    reporter.sample(result.sample)
                reporter.evaluate(step, metrics, saved)
        result.status = "finished"
    except Diverged as exc:
        result.status = "diverged"
        result.message = str(exc)
    except KeyboardInterrupt as exc:
        # Ended like any run, then raised again: the reporters close what they hold open (TensorBoard
        # writes its events out, W&B finishes the run, the progress bar ends its line). The checkpoint
        # stays the last evaluation's, never a step cut in half.
        result.status, interrupted = "interrupted", exc
    except BaseException as exc:  # out of memory, a full disk, a bug: the logs are closed, then it goes on up
        _close_after_error(reporter, _tally(result, step, tokens, train_s + train_s_before), exc, t_start)
        raise
    _tally(result, step, tokens, train_s + train_s_before)

    if result.status == "finished":
        if cfg.checkpoint:
            model_path = out_dir / MODEL_NAME
            try:
                _save_model(model_path, raw_model, model_args, corpus, cfg, result.final_val_loss, step)
                if result.sample is not None:
                    (out_dir / "sample.txt").write_text(result.sample, encoding="utf-8")
            except BaseException as exc:
                _close_after_error(reporter, result, exc, t_start)
                raise
            result.model_path = str(model_path)
            result.checkpoint_path = str(ckpt_dir / CKPT_NAME)
    result.wall_s = time.perf_counter() - t_start
    if interrupted is None:
        reporter.finish(result)
        return result
    try:
        reporter.finish(result)
    except Exception as exc:  # noqa: BLE001 - Ctrl+C is what the user must hear about, not a log's close
        warnings.warn(f"closing the logs after Ctrl+C failed: {type(exc).__name__}: {exc}")
    interrupted.train_result = result  # type: ignore[attr-defined]  # where the last checkpoint is (the CLI says)
    raise interrupted


MALLOC_MMAP_THRESHOLD = 32 << 20  # glibc's largest dynamic value on 64-bit systems
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)


def _malloc_for_training() -> bool:
    """Keep the training step's tensors in glibc's heap: blocks up to 32 MiB are not mapped and unmapped,
    nor the heap trimmed, at every step. Returns whether it was set (glibc only; a no-op elsewhere).

    glibc serves each block above its mmap threshold (128 KiB at start) with a fresh mmap and unmaps it
    when freed, so each step's activations (0.2-1.5 MiB for the tiny model) cost page faults and zeroing,
    step after step. glibc raises the threshold (and the trim threshold, to twice it) by itself the first
    time a large mapped block is freed: a run that happened to free one (a copy of its corpus) trained
    6-18 % faster than one that did not, such as a search's trial, whose corpus comes from Ray's shared
    memory. Set here, as glibc's own raise would at most (32 MiB; trim 64 MiB), for every run alike.
    Process-wide, and not put back (glibc has no getter); a heap that keeps up to 64 MiB free on top.
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if (sys.platform != "linux" or os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("MALLOC_TRIM_THRESHOLD_")
            or "glibc.malloc.mmap_threshold" in tunables or "glibc.malloc.trim_threshold" in tunables):
        return False  # not glibc, or the user tuned malloc through its environment: theirs stands
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)
                    and libc.mallopt(_M_TRIM_THRESHOLD, 2 * MALLOC_MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


_loops_run = 0  # step loops this process has run (`_heap_frozen`)


@contextlib.contextmanager
def _heap_frozen() -> Iterator[bool]:
    """While the steps run, Python's cyclic garbage collector leaves alone the objects that existed before
    (gc.freeze), and they are given back to it afterwards (gc.unfreeze). Yields whether it froze.

    The step loop allocates enough small objects to set off a full collection every few hundred steps, and
    a full collection walks every object in the process: 0.1 s each in a search's trial, whose worker
    holds Ray, Tune, pyarrow and pandas beside torch (420k objects), with one core's OpenMP partner idle
    meanwhile. A frozen object is never collected, garbage included, so where an earlier run in this
    process may have left some (a Ray worker reused for the next trial, a notebook) it is collected first:
    a cycle holding a model's tensors would otherwise stay for the whole run. Left alone where the caller
    manages the collector itself (it is disabled, or objects are already frozen).
    """
    global _loops_run
    if not gc.isenabled() or gc.get_freeze_count():
        yield False
        return
    if _loops_run:
        gc.collect()
    _loops_run += 1
    gc.freeze()
    try:
        yield True
    finally:
        gc.unfreeze()


CONTEXT_ALLOWANCE = 1 << 30  # bytes left outside a shared GPU's cap for the process's CUDA context
RECOMPILE_LIMIT = 64  # compiled variants of the model kept in one process (torch's default: 8)


def memory_cap(fraction: float, total_bytes: int) -> float:
    """The fraction of the GPU's memory `torch.cuda.set_per_process_memory_fraction` gets for a process
    given `fraction` of the GPU (a search's ``--gpus-per-trial``).

    The cap covers torch's caching allocator only; each process's CUDA context (0.5-1.5 GiB: kernels,
    cuBLAS handles) sits outside it. Four trials capped at exactly 0.25 each would together claim the
    whole GPU plus four contexts, and the last to allocate could meet a real out-of-memory below its own
    cap, decided by its neighbours. A share below the whole GPU leaves `CONTEXT_ALLOWANCE` of it to the
    context (never more than half the share); the whole GPU is capped at all of it.
    """
    fraction = float(fraction)
    if fraction >= 1.0 or total_bytes <= 0:
        return min(fraction, 1.0)
    return max(fraction / 2, fraction - CONTEXT_ALLOWANCE / total_bytes)


@contextlib.contextmanager
def _recompile_limit(limit: int):
    """torch.compile's per-function limit on compiled variants raised to `limit` while a compiled run trains.

    A search's worker process (Ray reuses them: ``reuse_actors``) compiles `GPT.forward` for trial after
    trial; each model shape it has not seen (another n_layer, dropout, batch...) adds a variant, and at
    torch's default of 8 Dynamo logs once and runs every later new shape eagerly: a trial's tokens/s and
    MFU would then depend on which trials ran before it in that process. The variants are kept, not reset:
    a trial ASHA promotes back into a process that compiled it before compiles nothing again."""
    import torch._dynamo

    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"  # (its name before torch 2.6)
    before = getattr(cfg, name)
    setattr(cfg, name, max(before, limit))
    try:
        yield
    finally:
        setattr(cfg, name, before)


_OPTIMIZER_FLAGS = ("fused", "foreach", "capturable", "differentiable")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """`optimizer.load_state_dict`, keeping how this run's optimizer steps (fused, foreach...): torch takes
    those from the checkpoint's parameter groups, so a checkpoint saved where AdamW was not fused (an MPS
    run) resumed on CUDA with fp16 would fail at the first step (GradScaler hands its scale to the fused
    kernel only), and one saved fused would impose the fused kernel where it cannot run. The flags go into
    the saved groups before loading, not after: torch also decides from them where each ``step`` counter
    goes (on the parameter's device for the fused kernel, where it would otherwise stay on the CPU)."""
    flags = [{k: g[k] for k in _OPTIMIZER_FLAGS if k in g} for g in optimizer.param_groups]
    saved = state.get("param_groups") if isinstance(state, dict) else None
    if isinstance(saved, list) and len(saved) == len(flags) and all(isinstance(g, dict) for g in saved):
        state = {**state, "param_groups": [{**g, **own} for g, own in zip(saved, flags)]}
    optimizer.load_state_dict(state)  # (groups that do not match: its own error, which resume reports)


def _cpp_compiler_found() -> bool:
    """Whether Inductor finds a C++ compiler for its CPU kernels, asked as it asks ($CXX, else g++; clang++ on
    macOS); on a torch without that module, the same names looked up on PATH."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler  # (torch.compile imports it anyway)
    except Exception:  # noqa: BLE001 - a torch without it
        return shutil.which(os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")) is not None
    try:
        get_cpp_compiler()
    except Exception:  # noqa: BLE001 - InvalidCxxCompiler, or whatever a torch version raises instead
        return False
    return True


def _check_compiler(device: torch.device) -> None:
    """torch.compile on a GPU builds Triton kernels with the system's C compiler, and on a CPU its C++ kernels
    with a C++ compiler; without one (a CUDA *runtime* image, a slim Python image) the first step failed deep
    in Inductor with a long traceback, and a search retried the trial to no end."""
    if device.type == "cpu":
        if not _cpp_compiler_found():
            cxx = os.environ.get("CXX")
            raise ConfigError(f"--compile: no C++ compiler found ({f'CXX={cxx!r} is none; ' if cxx else ''}Inductor "
                              "builds its CPU kernels with g++ or clang++): install one (apt-get install g++), "
                              "or train without --compile")
        return
    if device.type != "cuda":
        return
    cc = os.environ.get("CC")  # Triton's own order: $CC when set (used as it is), else gcc, else clang
    if cc is not None and not shutil.which(cc):
        raise ConfigError(f"--compile: CC={cc!r} is no compiler found on PATH, and Triton builds its GPU kernels with "
                          "it: fix or unset CC, or train without --compile")
    if cc is None and not (shutil.which("gcc") or shutil.which("clang")):
        raise ConfigError("--compile: no C compiler found (gcc or clang; Triton needs one to build its GPU kernels): "
                          "install one (apt-get install gcc), or train without --compile")


def _tally(result: TrainResult, step: int, tokens: int, train_s: float) -> TrainResult:
    result.steps, result.tokens, result.train_s = step, tokens, train_s
    result.tokens_per_s = _rate(tokens, train_s)
    return result


def _close_after_error(reporter: Reporter, result: TrainResult, exc: BaseException, t_start: float) -> None:
    """A run ended by an exception still ends in its logs: W&B finishes the run as failed (left open, a
    notebook's next train() would start a second run beside it), TensorBoard writes its events out. The
    exception is what the caller must hear about: a failure to close is only warned of."""
    result.status = ("interrupted" if isinstance(exc, KeyboardInterrupt)
                     else "oom" if is_oom(exc) else "errored")  # as the trials and replay_summary.json say it
    result.message = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    result.wall_s = time.perf_counter() - t_start
    try:
        reporter.finish(result)
    except Exception as err:  # noqa: BLE001
        warnings.warn(f"closing the logs after {type(exc).__name__} failed: {type(err).__name__}: {err}")


def bits_per_char(loss: float, corpus: Corpus) -> float:
    """A loss in nats per token as bits per character (comparable across tokenizers)."""
    return loss / math.log(2) / corpus.chars_per_token


def _save_model(path: Path, model: torch.nn.Module, model_args: dict[str, Any], corpus: Corpus, cfg: TrainConfig,
                val_loss: float | None, step: int) -> None:
    """The run's model.pt: what `generate` and a replay load (weights, shape, tokenizer, config)."""
    save_checkpoint(path, {
        "model": model.state_dict(), "model_args": model_args, "tokenizer": corpus.tokenizer.to_dict(),
        "config": cfg.to_record(), "val_loss": val_loss, "step": step,
    })


def _already_done(cfg: TrainConfig, step: int, end: int, tokens: int, best_val: float | None,
                  history: list[dict[str, Any]], train_s: float, out_dir: Path, src: str | Path, corpus: Corpus,
                  t_start: float) -> TrainResult:
    """The result of a run resumed from a checkpoint at its last step, from that checkpoint; no reporter is
    started (the run's logs and W&B run stay as its end left them)."""
    last = history[-1] if history else {}
    model_path = out_dir / MODEL_NAME
    return TrainResult(
        status="finished", steps=step, tokens=tokens, final_val_loss=last.get("val/loss"), best_val_loss=best_val,
        final_val_bpc=last.get("val/bpc"), best_val_bpc=None if best_val is None else bits_per_char(best_val, corpus),
        wall_s=time.perf_counter() - t_start, train_s=train_s, tokens_per_s=_rate(tokens, train_s), output_dir=str(out_dir),
        checkpoint_path=str(Path(src) / CKPT_NAME), checkpoint_step=step,
        model_path=str(model_path) if model_path.is_file() else None, history=history,
        message=f"already at step {step} of {end}: nothing to train")


def is_oom(exc: BaseException) -> bool:
    """True for out-of-memory errors: CUDA's (or another accelerator's), and the CPU allocator's."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("out of memory", "outofmemory", "cublas_status_alloc_failed", "cudnn_status_alloc_failed",
                            "can't allocate memory"))  # torch's DefaultCPUAllocator


def smaller_micro_batch(cfg: TrainConfig) -> TrainConfig | None:
    """Half the micro-batch and twice the accumulation steps: the same tokens per optimizer step.

    An odd micro-batch B goes to its largest divisor d <= B/2 (accumulation times B/d), so the
    effective batch never changes; None when the micro-batch is already 1.
    """
    b = cfg.batch_size
    if b <= 1:
        return None
    new = b // 2 if b % 2 == 0 else max(d for d in range(1, b // 2 + 1) if b % d == 0)
    return TrainConfig.from_flat(
        {"batch_size": new, "gradient_accumulation_steps": cfg.gradient_accumulation_steps * (b // new)}, base=cfg)


def free_accelerator_memory() -> None:
    """Drop what a failed attempt left behind, so that a retry starts from an empty cache."""
    import gc

    gc.collect()
    if "torch._dynamo" in sys.modules:  # a compiled attempt's graphs hold on to its buffers
        torch._dynamo.reset()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def train_with_oom_retry(cfg: TrainConfig, reporter: Reporter | None = None, *, corpus: Corpus | None = None,
                         oom_retry: bool = False, retries: list[dict[str, Any]] | None = None,
                         ) -> tuple[TrainResult, TrainConfig, list[dict[str, Any]]]:
    """`train()`, and on out-of-memory retry with `smaller_micro_batch` from the last checkpoint.

    Returns (result, the config that finished, the retries made). Each retry resumes from the
    run's own last checkpoint (``<output_dir>/checkpoint``) when it wrote one, so no evaluation is
    reported twice. Raises `OutOfMemory` when `oom_retry` is off or the micro-batch is already 1.
    `retries`, when given, is the list the retries are appended to (a caller can read it while training).
    """
    retries = [] if retries is None else retries
    resume_from: Path | None = None
    ckpt_dir = Path(cfg.output_dir).expanduser().resolve() / "checkpoint"
    while True:
        try:
            return train(cfg, reporter, corpus=corpus, resume_from=resume_from), cfg, retries
        except Exception as exc:  # noqa: BLE001 - only OOM is handled; everything else goes up
            if not is_oom(exc):
                raise
            message = " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
        free_accelerator_memory()  # after the except block: the traceback no longer pins the tensors
        smaller = smaller_micro_batch(cfg) if oom_retry else None
        if smaller is None:
            why = ("micro-batch already 1" if oom_retry else "--oom-retry not given")
            raise OutOfMemory(f"{message} (batch_size {cfg.batch_size}, gradient_accumulation_steps "
                              f"{cfg.gradient_accumulation_steps}; {why})", retries, cfg)
        if (ckpt_dir / CKPT_NAME).is_file():
            resume_from = ckpt_dir
        step = 0
        if resume_from is not None:
            try:
                step = int(load_checkpoint(resume_from).get("step", 0))
            except (ConfigError, TypeError, ValueError):
                step = 0
        retries.append({"batch_size": cfg.batch_size, "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
                        "retry_batch_size": smaller.batch_size,
                        "retry_gradient_accumulation_steps": smaller.gradient_accumulation_steps,
                        "resumed_from_step": step, "message": message})
        cfg = smaller


def _rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


def _fixed_eval_batches(corpus: Corpus, cfg: TrainConfig, device: torch.device) -> dict[str, list]:
    """The same windows at every evaluation (and in every trial, whatever its seed or batch size)."""
    out = {}
    for i, (split, data) in enumerate((("train", corpus.train), ("val", corpus.val))):
        s = BatchSampler(data, EVAL_BATCH_SIZE, cfg.model.block_size, seed=EVAL_SEED + i, device=device)
        out[split] = [s.next() for _ in range(cfg.eval_iters)]
    return out


@torch.no_grad()
def _evaluate(model: torch.nn.Module, batches: dict[str, list], autocast: Any) -> dict[str, float]:
    model.eval()
    out = {}
    for split, items in batches.items():
        total = torch.zeros((), device=items[0][0].device)
        for x, y in items:
            with autocast:
                _, loss = model(x, y)
            total += loss.float()
        out[split] = total.item() / len(items)
    model.train()
    return out


def sample_text(model: GPT, tok: CharTokenizer, prompt: str, n: int, seed: int, device: Any,
                temperature: float = 0.8, top_k: int | None = 200) -> str:
    """`prompt` (its line ends as a corpus's: one newline), then `n` generated characters (the model reads unseen
    prompt characters as UNK; the text shows them as typed)."""
    prompt = one_newline(prompt or "\n")
    ids = tok.encode(prompt)
    gen = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    x = torch.tensor([ids], dtype=torch.long, device=device)
    y = model.generate(x, n, temperature=temperature, top_k=top_k, generator=gen, suppress=[tok.unk_id])
    if was_training:
        model.train()
    return prompt + tok.decode(y[0, len(ids):].tolist())


# --------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """``python -m tune_gpt.train`` (kept here for callers of ``tune_gpt.train.main``)."""
    from tune_gpt.cli import train_main

    return train_main(argv)
