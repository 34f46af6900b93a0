"""Search-space files -> Ray Tune ``param_space``.

Two YAML formats are read (always with a safe loader: plain data, nothing is
built or executed), both into one `SearchSpace`: fixed values plus `Domain`
objects keyed by flat TrainConfig keys (``learning_rate``, ``model.n_layer``).

**W&B sweep configuration** (detected by a ``parameters`` key, or a W&B
``method`` grid/random/bayes), read as W&B documents it, so an existing
``sweep_config.yaml`` runs unchanged: ``method``, ``metric: {name, goal}``,
``parameters`` (``value`` / ``values`` [+ ``probabilities``] / ``min`` +
``max`` / ``distribution`` with ``mu``, ``sigma``, ``q``; nested
``parameters`` flatten to dotted keys; ``categorical_w_probabilities`` is
``values`` + ``probabilities``; ``beta`` and ``q_beta``, in W&B's schema but
not its documentation, are refused), ``early_terminate`` (hyperband ->
ASHA, see `_hyperband_to_asha`), ``run_cap`` (-> ``num_samples``),
``project`` / ``entity`` (-> ``wandb.project`` / ``wandb.entity``). A file W&B
would refuse for want of ``method``, or of ``metric`` with ``bayes`` or
``early_terminate``, is read with a note saying what is used instead;
``program``, ``command``, ``controller`` and the W&B Launch keys ``job``,
``image_uri``, ``apiVersion`` and ``kind`` are ignored with a note.
Distribution semantics follow W&B: ``log_uniform`` bounds are natural-log
exponents (value = exp(U(min, max))), ``*_values`` bounds are values;
``inv_log_uniform`` (log(1/X) ~ U(min, max)) is exactly log-uniform on
[exp(-max), exp(-min)] and ``inv_log_uniform_values`` exactly log-uniform on
[min, max], so both become ``tune.loguniform``. On an integer field
``q_uniform``, ``q_log_uniform`` and ``q_log_uniform_values`` draw
round(x / q) * q, as W&B does (a uniform range's two end values get half the
others' share; Ray's integer samplers give each the same, or floor x on a log
range); ``int_uniform`` is uniform over min..max. With ``method: grid`` every
``values`` list is a grid, ``int_uniform`` is enumerated (min..max) and
``q_uniform`` too (W&B's ``arange(min, max, q)``: from min as written, max
excluded, nothing snapped); any other
distribution under grid is an error.

**Native format**::

    # what the search is for
    name: lr_batch                 # default: the file name
    description: ...
    method: optuna                 # optuna | random | grid
    metric: val/loss
    mode: min                      # min | max
    num_samples: 16
    scheduler: {type: asha, grace_period: 2, reduction_factor: 2}
                                   # asha: grace_period max_t reduction_factor brackets, and
                                   #   pause: true (the default: a trial waits at each rung until it is
                                   #   known to be in the rung's top 1/reduction_factor: Li et al.'s
                                   #   promotions) or false (Ray's ASHA: stops at a rung)
                                   # median: grace_period min_samples_required; none
    fixed:                         # key -> value (dotted or nested mappings)
      model_size: tiny
      model.n_layer: 2
    space:                         # key -> one domain
      learning_rate: {loguniform: [1.0e-4, 1.0e-2]}
      batch_size: {choice: [8, 16, 32]}

Domains: ``{choice: [..]}`` (optionally ``probabilities: [..]`` beside it),
``{grid: [..]}``, ``{uniform: [lo, hi]}``, ``{quniform: [lo, hi, q]}``,
``{loguniform: [lo, hi]}``, ``{qloguniform: [lo, hi, q]}``,
``{randint: [lo, hi]}``, ``{qrandint: [lo, hi, q]}``, ``{lograndint: [lo, hi]}``,
``{normal: [mu, sigma]}``, ``{qnormal: [mu, sigma, q]}``. Every range here,
integer ranges included, contains BOTH bounds (``randint: [2, 8]`` can give 8;
the off-by-one of Ray's exclusive ``randint`` is handled inside).

In both formats quantized bounds are snapped inwards to multiples of ``q``
(with a note; not a W&B grid's ``q_uniform``), integer fields refuse fractional distributions, names go
through `config.resolve_key` (aliases such as ``lr``, ``n_layer``, ``bf16``),
values through `config.coerce`, and numbers written as strings (PyYAML reads
``1e-5`` as text) are read as the numbers they mean. Every error is a
one-line `SpaceError` naming the file and the key.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, NoReturn, Union

import yaml

from tune_gpt import config as cfg
from tune_gpt.errors import ConfigError, SpaceError

__all__ = [
    "Choice", "Grid", "Uniform", "Normal", "Domain", "SearchSpace",
    "load_space", "parse_space", "check_domain_values", "metric_name", "asha_rungs", "hyperband_brackets",
    "METRICS",
]

# Metrics every trial reports (DESIGN.md); an objective must be one of them.
METRICS = (
    "val/loss", "val/bpc", "train/loss", "lr", "tokens_per_s", "mfu", "gpu/mem_gb",
    "gpu/util", "cpu/percent", "rss_gb", "step", "tokens", "epoch",
)
_METRIC_ALIASES = {
    "val_loss": "val/loss", "validation_loss": "val/loss", "valid_loss": "val/loss",
    "eval_loss": "val/loss", "val.loss": "val/loss", "val_bpc": "val/bpc",
    "train_loss": "train/loss", "training_loss": "train/loss", "train.loss": "train/loss",
}
# W&B distributions that draw round(x / q) * q: on an integer field, samplers that round (`Uniform.to_tune`)
_WANDB_ROUNDED = ("q_uniform", "q_log_uniform", "q_log_uniform_values")
_MAX_GRID_VALUES = 10_000  # per parameter, when enumerating int_uniform / q_uniform


# ====================================================================== domains


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return repr(x) if len(repr(x)) <= 10 else f"{x:.6g}"
    return repr(x) if isinstance(x, str) else str(x)


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def _on_grid(value: float, q: float) -> bool:
    return _close(value / q, round(value / q))


@dataclass(frozen=True)
class Choice:
    """One of `values`, uniformly or with `probabilities` (W&B categorical)."""

    values: tuple
    probabilities: tuple[float, ...] | None = None
    kind: str = "choice"

    def to_tune(self) -> Any:
        from ray import tune

        if self.probabilities is None:
            return tune.choice(list(self.values))
        from ray.tune.search.sample import Categorical

        domain = Categorical(list(self.values))  # drawn from the search's seeded generator (--seed repeats it)
        domain.set_sampler(WeightedChoiceSampler(self.values, self.probabilities))
        return domain

    def contains(self, value: Any) -> bool:
        return any(type(value) is type(v) and value == v for v in self.values)

    def center(self) -> Any:
        if self.probabilities is None:
            return self.values[0]
        return self.values[max(range(len(self.values)), key=self.probabilities.__getitem__)]

    @property
    def optuna_ok(self) -> bool:
        return self.probabilities is None

    def describe(self) -> str:
        text = f"choice [{', '.join(_fmt(v) for v in self.values)}]"
        if self.probabilities is not None:
            text += f" p=[{', '.join(_fmt(p) for p in self.probabilities)}]"
        return text


@dataclass(frozen=True)
class Grid:
    """Every one of `values` (a Tune grid_search axis)."""

    values: tuple
    kind: str = "grid"

    def to_tune(self) -> Any:
        from ray import tune

        return tune.grid_search(list(self.values))

    def contains(self, value: Any) -> bool:
        return any(type(value) is type(v) and value == v for v in self.values)

    def center(self) -> Any:
        return self.values[0]

    optuna_ok = False

    def describe(self) -> str:
        return f"grid [{', '.join(_fmt(v) for v in self.values)}]"


@dataclass(frozen=True)
class Uniform:
    """A range [low, high], both bounds included; log-scaled, quantized, integer."""

    low: float
    high: float
    log: bool = False
    q: float | None = None
    integer: bool = False
    kind: str = "uniform"  # the distribution as the file named it

    def to_tune(self) -> Any:
        from ray import tune

        if self.integer:
            lo, hi = int(self.low), int(self.high)
            if self.kind in _WANDB_ROUNDED:  # W&B rounds its draw to q, where Ray's integer samplers floor it
                from ray.tune.search.sample import Integer

                from tune_gpt._searchers import RoundedIntLogUniform, RoundedIntUniform

                q = int(self.q or 1)
                domain = Integer(lo, hi + 1 if q == 1 else hi)  # (as randint / qrandint and their log forms take them)
                domain.set_sampler(RoundedIntLogUniform() if self.log else RoundedIntUniform())
                return domain if q == 1 else domain.quantized(q)
            if self.q is None:  # Ray's randint/lograndint exclude the upper bound
                return tune.lograndint(lo, hi + 1) if self.log else tune.randint(lo, hi + 1)
            q = int(self.q)  # q > 1: Ray's qrandint/qlograndint include it
            return tune.qlograndint(lo, hi, q) if self.log else tune.qrandint(lo, hi, q)
        if self.q is None:
            return tune.loguniform(self.low, self.high) if self.log else tune.uniform(self.low, self.high)
        if self.log:
            return tune.qloguniform(self.low, self.high, self.q)
        return tune.quniform(self.low, self.high, self.q)

    def contains(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not float(value).is_integer():
            return False
        inside = (self.low <= value <= self.high) or _close(value, self.low) or _close(value, self.high)
        return inside and (self.q is None or _on_grid(value, self.q))

    def center(self) -> Any:
        mid = math.sqrt(self.low * self.high) if self.log else (self.low + self.high) / 2
        if self.q is not None:
            mid = min(max(round(mid / self.q) * self.q, self.low), self.high)
            mid = float(f"{mid:.12g}")
        return int(round(mid)) if self.integer else mid

    @property
    def optuna_ok(self) -> bool:
        # Optuna drops q on float log ranges and refuses step != 1 on int log ranges.
        return not (self.log and self.q is not None)

    def describe(self) -> str:
        shape = ("int " if self.integer else "") + ("log-uniform" if self.log else "uniform")
        text = f"{shape} [{_fmt(self.low)}, {_fmt(self.high)}]"
        if self.q is not None:
            text += f" step {_fmt(self.q)}"
        return text if self.kind in ("uniform", "int_uniform") else f"{text} ({self.kind})"


@dataclass(frozen=True)
class Normal:
    """Normal(mu, sigma), or exp of it when `log` (log-normal); optionally quantized."""

    mu: float
    sigma: float
    q: float | None = None
    log: bool = False
    integer: bool = False
    kind: str = "normal"

    def to_tune(self) -> Any:
        from ray import tune

        if self.log:
            from ray.tune.search.sample import Float

            domain = Float(None, None)  # drawn from the search's seeded generator (--seed repeats it)
            domain.set_sampler(LogNormalSampler(self.mu, self.sigma, self.q, self.integer))
            return domain
        if self.q is None:
            return tune.randn(self.mu, self.sigma)
        return tune.qrandn(self.mu, self.sigma, self.q)

    def contains(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.integer and not float(value).is_integer():
            return False
        if self.log and (value < 0 or (value == 0 and self.q is None)):
            return False
        return self.q is None or _on_grid(value, self.q)

    def center(self) -> Any:
        mid = math.exp(self.mu) if self.log else self.mu
        if self.q is not None:
            mid = float(f"{round(mid / self.q) * self.q:.12g}")
        return int(round(mid)) if self.integer else mid

    optuna_ok = False

    def describe(self) -> str:
        text = f"{'log-normal' if self.log else 'normal'} mu={_fmt(self.mu)} sigma={_fmt(self.sigma)}"
        if self.q is not None:
            text += f" step {_fmt(self.q)}"
        return text


Domain = Union[Choice, Grid, Uniform, Normal]


class WeightedChoiceSampler:
    """Ray sampler (and, for searches pickled before, `tune.sample_from` callable): one of `values` with
    `probabilities` (picklable)."""

    def __init__(self, values: tuple, probabilities: tuple[float, ...]) -> None:
        self.values = tuple(values)
        self.probabilities = tuple(probabilities)

    def __call__(self, config: Any = None) -> Any:  # as `tune.sample_from` calls it (a search pickled before)
        return self.sample(None)

    def sample(self, domain: Any, config: Any = None, size: int = 1, random_state: Any = None) -> Any:
        """Ray's sampler interface: drawn from `random_state`, the search's seeded generator."""
        import numpy as np

        rng = random_state if random_state is not None else np.random
        p = np.asarray(self.probabilities, dtype=float)
        picks = [self.values[int(i)] for i in np.atleast_1d(rng.choice(len(self.values), size=size, p=p / p.sum()))]
        return picks if size > 1 else picks[0]

    def __repr__(self) -> str:
        return f"WeightedChoiceSampler({list(self.values)}, p={list(self.probabilities)})"


class LogNormalSampler:
    """Ray sampler (and, for searches pickled before, `tune.sample_from` callable): exp(Normal(mu, sigma)),
    rounded to `q` (picklable)."""

    def __init__(self, mu: float, sigma: float, q: float | None = None, integer: bool = False) -> None:
        self.mu, self.sigma, self.q, self.integer = mu, sigma, q, integer

    def __call__(self, config: Any = None) -> float | int:  # as `tune.sample_from` calls it (a search pickled before)
        return self.sample(None)

    def sample(self, domain: Any, config: Any = None, size: int = 1, random_state: Any = None) -> Any:
        """Ray's sampler interface: drawn from `random_state`, the search's seeded generator."""
        import numpy as np

        rng = random_state if random_state is not None else np.random
        values = []
        for x in np.atleast_1d(rng.normal(self.mu, self.sigma, size=size)):
            value = float(np.exp(x))
            if self.q is not None:
                value = round(value / self.q) * self.q
            values.append(int(round(value)) if self.integer else value)
        return values if size > 1 else values[0]

    def __repr__(self) -> str:
        return f"LogNormalSampler(mu={self.mu}, sigma={self.sigma}, q={self.q})"


# ================================================================= search space


@dataclass
class SearchSpace:
    """A parsed search-space file: fixed values, domains and search settings."""

    source: str
    name: str
    fixed: dict[str, Any]
    domains: dict[str, Domain]
    method: str | None = None
    metric: str | None = None
    mode: str | None = None
    num_samples: int | None = None
    scheduler: dict | None = None
    notes: list[str] = field(default_factory=list)
    format: str = "native"  # "native" | "wandb"
    description: str | None = None
    origins: dict[str, str] = field(default_factory=dict)  # flat key -> where the file sets it

    def where(self, key: str) -> str:
        """The file's own path to `key` (``space.learning_rate``, ``parameters.lr``)."""
        return self.origins.get(key, key)

    def to_tune(self) -> dict[str, Any]:
        """Fixed values and Ray Tune domains, by flat key: a Tuner ``param_space``."""
        out: dict[str, Any] = dict(self.fixed)
        out.update({key: dom.to_tune() for key, dom in self.domains.items()})
        return out

    def baseline(self) -> dict[str, Any]:
        """One point of the space: TrainConfig's default where the domain holds it, else its centre."""
        defaults = _defaults(self.fixed)
        out: dict[str, Any] = {}
        for key, dom in self.domains.items():
            default = defaults.get(key)
            out[key] = default if default is not None and dom.contains(default) else dom.center()
        return out

    def grid_size(self) -> int:
        """Number of grid points (the product of the grid axes; 1 without a grid)."""
        return math.prod(len(d.values) for d in self.domains.values() if isinstance(d, Grid))

    def distinct_points(self) -> int | None:
        """How many different configurations the space holds; None when it searches nothing, or a domain
        is continuous or unbounded. Integer and quantized ranges count both bounds, as they are sampled."""
        if not self.domains:
            return None
        n = 1
        for dom in self.domains.values():
            if isinstance(dom, (Choice, Grid)):
                n *= len(set(map(repr, dom.values)))
            elif isinstance(dom, Uniform) and (dom.integer or dom.q is not None) and not (dom.log and dom.q is not None):
                n *= int(math.floor((dom.high - dom.low) / (dom.q or 1) + 1e-9)) + 1
            else:
                return None
        return n

    def optuna_unsupported(self) -> list[str]:
        """Searched keys OptunaSearch cannot take, as ``"key (distribution)"``."""
        return [f"{key} ({dom.kind})" for key, dom in self.domains.items() if not dom.optuna_ok]

    def describe(self) -> str:
        """A few lines for ``--dry-run``: what is searched, what is fixed, how."""
        fmt = "W&B sweep" if self.format == "wandb" else "native"
        lines = [f"search space {self.name!r} from {self.source} ({fmt} format)"]
        if self.description:
            lines.append(f"  {self.description}")
        method = self.method or "(not set)"
        if self.grid_size() > 1:
            method += f", {self.grid_size()} grid points"
        lines.append(f"method: {method}")
        metric = (f"{self.metric} ({self.mode})" if self.mode else self.metric) if self.metric else "(not set)"
        lines.append(f"metric: {metric}")
        lines.append(f"num_samples: {self.num_samples if self.num_samples is not None else '(not set)'}")
        if self.scheduler is None:
            lines.append("scheduler: (not set)")
        else:
            params = " ".join(f"{k}={_fmt(v)}" for k, v in self.scheduler.items() if k != "type")
            lines.append(f"scheduler: {self.scheduler['type']} {params}".rstrip())
        width = max([len(k) for k in (*self.domains, *self.fixed)] + [8])
        lines.append(f"searched ({len(self.domains)}):")
        lines += [f"  {key:<{width}}  {dom.describe()}" for key, dom in self.domains.items()]
        lines.append(f"fixed ({len(self.fixed)}):")
        lines += [f"  {key:<{width}}  {_fmt(value)}" for key, value in self.fixed.items()]
        unsupported = self.optuna_unsupported()
        if unsupported and self.method not in ("grid", "random"):
            lines.append(f"not searchable by Optuna: {', '.join(unsupported)}")
        if self.notes:
            lines.append("notes:")
            lines += [f"  - {note}" for note in self.notes]
        return "\n".join(lines)


def _defaults(fixed: Mapping[str, Any]) -> dict[str, Any]:
    """TrainConfig's flat values given `fixed` (plain defaults if `fixed` alone is invalid)."""
    try:
        return cfg.TrainConfig.from_flat(fixed).to_flat()
    except ConfigError:
        return cfg.TrainConfig().to_flat()


# ====================================================================== loading


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader that also refuses a key written twice in one mapping."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in getattr(node, "value", []):
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                ident = (key_node.tag, key_node.value)
                if ident in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r}", key_node.start_mark
                    )
                seen.add(ident)
        return super().construct_mapping(node, deep=deep)


_WANDB_METHOD = {"grid": "grid", "random": "random", "optuna": "bayes"}  # --search -> the W&B method it means


def load_space(path: str | Path, search: str | None = None) -> SearchSpace:
    """Read a search-space YAML file (W&B sweep or native format) and validate it. `search` (``--search``:
    grid, random, optuna): a W&B sweep is read as if its file said that method (optuna: bayes), which decides
    what its `values` are (grid axes, or choices to sample) and how many runs it makes; a native file is read
    as it is."""
    source = str(path)
    p = Path(path)
    if not p.exists():
        raise SpaceError(f"{source}: no such file")
    if p.is_dir():
        raise SpaceError(f"{source}: is a directory, not a search-space file")
    if not p.is_file():
        raise SpaceError(f"{source}: not a regular file (a search space is a YAML file)")
    if p.stat().st_size > 10_000_000:
        raise SpaceError(f"{source}: {p.stat().st_size:,} bytes is far too large for a search-space file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpaceError(_one_line(f"{source}: cannot read: {exc}")) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: plain data only
    except yaml.MarkedYAMLError as exc:
        raise SpaceError(_yaml_message(source, exc)) from None
    except yaml.YAMLError as exc:
        raise SpaceError(_one_line(f"{source}: YAML error: {exc}")) from None
    space = parse_space(data, source)
    wandb_method = _WANDB_METHOD.get(search or "")
    if (wandb_method and space.format == "wandb" and isinstance(data, Mapping)
            and (space.method == "grid") != (wandb_method == "grid")):  # what the values are changes
        flag = f"--search {search}"
        try:
            space = parse_space({**data, "method": wandb_method}, source)
        except SpaceError as exc:
            raise SpaceError(f"{flag}: {exc}" + ("; use --search optuna or random" if wandb_method == "grid"
                                                  else "")) from None
        space.notes.insert(0, f"method: {wandb_method} instead of the file's {data.get('method') or '(not set)'} "
                              f"({flag}): its `values` are {'grid axes' if wandb_method == 'grid' else 'choices'}")
    return space


def _yaml_message(source: str, exc: Any) -> str:
    mark = exc.problem_mark or exc.context_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "YAML"
    problem = exc.problem or str(exc)
    tag = re.search(r"the tag '([^']+)'", problem)
    if tag:
        name = tag.group(1).replace("tag:yaml.org,2002:", "!!")
        return _one_line(f"{source}: {where}: YAML tag {name} is not allowed "
                         "(search-space files hold plain data; nothing is constructed or run)")
    if problem.startswith("duplicate key"):
        return _one_line(f"{source}: {where}: {problem} (each key may appear once in a mapping)")
    context = f" {exc.context}" if exc.context else ""
    return _one_line(f"{source}: {where}: YAML syntax error: {problem}{context}")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _suggest(word: Any, candidates: Any) -> str:
    word, names = str(word), [str(c) for c in candidates]
    prefixed = [c for c in names if len(word) >= 3 and (c.startswith(word) or word.startswith(c))]
    close = prefixed or difflib.get_close_matches(word, names, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _leaf_hint(name: str) -> str:
    """For a dotted name with no close field: the field its last part names. A W&B sweep's groups
    (``optimizer: {parameters: {lr: ...}}``) are rarely TrainConfig's sections, so the whole name is far from
    every field while its leaf is an alias or a near miss."""
    if "." not in name:
        return ""
    group, leaf = name.rsplit(".", 1)
    names = {**{k.rsplit(".", 1)[-1]: k for k in cfg.FIELD_TYPES}, **cfg.ALIASES}  # name -> its flat key
    close = difflib.get_close_matches(leaf.strip().replace("-", "_"), list(names), n=1, cutoff=0.6)
    if not close:
        return ""
    sections = sorted({k.split(".")[0] for k in cfg.FIELD_TYPES if "." in k})
    where = "" if group in sections else f" TrainConfig's sections are {', '.join(sections[:-1])} and {sections[-1]}"
    return f" (did you mean {names[close[0]]!r}?{where})"


def _field_kind(key: str) -> str:
    """'int', 'float', 'bool' or 'str' for flat TrainConfig key `key`."""
    return str(cfg.FIELD_TYPES[key][0]).split("|")[0].strip()


def _typename(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return repr(value)


# ====================================================================== parsing


# W&B's top-level keys that say how W&B runs a sweep, not what it searches: ignored, with a note saying why.
_WANDB_IGNORED = {
    "program": "tune_gpt runs its own trainer", "command": "tune_gpt runs its own trainer",
    "controller": "tune_gpt runs its own trainer", "job": "a W&B Launch job; tune_gpt runs its own trainer",
    "image_uri": "a W&B Launch image; tune_gpt runs its own trainer",
    "apiVersion": "the version of W&B's sweep format", "kind": "W&B's kind of file",
}
_WANDB_TOP = (
    "name", "description", "project", "entity", "method", "metric", "parameters", "early_terminate", "run_cap",
    *_WANDB_IGNORED,
)
_NATIVE_TOP = ("name", "description", "method", "metric", "mode", "num_samples", "scheduler", "fixed", "space")
_NATIVE_ONLY = ("space", "fixed", "num_samples", "scheduler", "mode")
# A key of the other format -> what this format calls it.
_EQUIVALENT = {
    "wandb": {"num_samples": "run_cap", "space": "parameters", "fixed": "parameters",
              "mode": "metric.goal", "scheduler": "early_terminate"},
    "native": {"run_cap": "num_samples", "early_terminate": "scheduler", "program": "nothing: tune_gpt "
               "runs its own trainer", "project": "fixed: {wandb.project: ...}",
               "entity": "fixed: {wandb.entity: ...}"},
}

_WANDB_DISTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # name: (required keys, optional keys)
    "constant": (("value",), ()),
    "categorical": (("values",), ("probabilities",)),
    "categorical_w_probabilities": (("values", "probabilities"), ()),  # (W&B's schema: categorical with them)
    "int_uniform": (("min", "max"), ()),
    "uniform": (("min", "max"), ()),
    "q_uniform": (("min", "max"), ("q",)),
    "log_uniform": (("min", "max"), ()),
    "log_uniform_values": (("min", "max"), ()),
    "q_log_uniform": (("min", "max"), ("q",)),
    "q_log_uniform_values": (("min", "max"), ("q",)),
    "inv_log_uniform": (("min", "max"), ()),
    "inv_log_uniform_values": (("min", "max"), ()),
    "normal": ((), ("mu", "sigma")),
    "q_normal": ((), ("mu", "sigma", "q")),
    "log_normal": ((), ("mu", "sigma")),
    "q_log_normal": ((), ("mu", "sigma", "q")),
}
# In W&B's schema (params.py draws them) but not in its documentation: refused, with what to write instead.
_WANDB_UNSUPPORTED = {"beta": "distribution: uniform with min: 0, max: 1",
                      "q_beta": "distribution: q_uniform with min: 0, max: 1 and q"}
_WANDB_SPEC_KEYS = ("value", "values", "probabilities", "min", "max", "distribution", "mu", "sigma", "q", "parameters")

_NATIVE_DOMAINS: dict[str, tuple[str, ...]] = {
    "choice": (), "grid": (),
    "uniform": ("low", "high"), "quniform": ("low", "high", "q"),
    "loguniform": ("low", "high"), "qloguniform": ("low", "high", "q"),
    "randint": ("low", "high"), "qrandint": ("low", "high", "q"), "lograndint": ("low", "high"),
    "normal": ("mu", "sigma"), "qnormal": ("mu", "sigma", "q"),
}

_SCHEDULERS: dict[str, tuple[str, ...]] = {
    "asha": ("grace_period", "max_t", "reduction_factor", "brackets", "pause"),
    "median": ("grace_period", "min_samples_required"),
    "none": (),
}


def parse_space(data: Any, source: str = "<space>") -> SearchSpace:
    """Validate an already-loaded YAML mapping (either format) into a `SearchSpace`."""
    return _Parser(source).parse(data)


class _Parser:
    """Builds one SearchSpace; every failure names `source` and a key path."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.fixed: dict[str, Any] = {}
        self.domains: dict[str, Domain] = {}
        self.origin: dict[str, str] = {}  # flat key -> where the file sets it
        self.notes: list[str] = []

    # ------------------------------------------------------------ helpers
    def fail(self, where: str, what: str) -> NoReturn:
        raise SpaceError(_one_line(f"{self.source}: {where}: {what}" if where else f"{self.source}: {what}"))

    def num(self, value: Any, where: str) -> int | float:
        """A number, also from text such as ``"1e-5"`` (PyYAML's reading of 1e-5)."""
        if isinstance(value, bool):
            self.fail(where, f"expected a number, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float):
            if not math.isfinite(value):
                self.fail(where, f"expected a finite number, got {value!r}")
            return value
        if isinstance(value, str):
            text = value.strip()
            try:
                return int(text)
            except ValueError:
                pass
            try:
                out = float(text)
            except ValueError:
                self.fail(where, f"expected a number, got {value!r}")
            if not math.isfinite(out):
                self.fail(where, f"expected a finite number, got {value!r}")
            return out
        self.fail(where, f"expected a number, got {_typename(value)}")

    def whole(self, value: Any, where: str) -> int:
        x = self.num(value, where)
        if not float(x).is_integer():
            self.fail(where, f"expected a whole number, got {_fmt(value)}")
        return int(x)

    def positive_int(self, value: Any, where: str) -> int:
        x = self.whole(value, where)
        if x <= 0:
            self.fail(where, f"must be a positive whole number, got {x}")
        return x

    def text(self, value: Any, where: str) -> str:
        if isinstance(value, (Mapping, list, tuple)) or value is None:
            self.fail(where, f"expected text, got {_typename(value)}")
        return str(value)

    def mapping(self, value: Any, where: str, hint: str = "") -> Mapping:
        if not isinstance(value, Mapping):
            self.fail(where, f"expected a mapping{hint}, got {_typename(value)}")
        return value

    def check_keys(self, given: Mapping, allowed: tuple[str, ...], where: str, what: str = "key") -> None:
        for key in given:
            if key not in allowed:
                self.fail(f"{where}.{key}" if where else str(key),
                          f"unknown {what} {key!r}{_suggest(key, allowed)} (valid: {', '.join(allowed)})")

    def resolve(self, name: Any, where: str) -> str:
        if not isinstance(name, str):
            self.fail(where, f"parameter names must be text, got {name!r}")
        try:
            return cfg.resolve_key(name)[0]
        except ConfigError as exc:
            self.fail(where, str(exc) + ("" if "did you mean" in str(exc) else _leaf_hint(name)))

    def value(self, key: str, name: str, value: Any, where: str) -> Any:
        """`value` for flat key `key` (written as `name`), coerced to the field's type."""
        if isinstance(value, (Mapping, list, tuple)):
            self.fail(where, f"{key} needs a single value, got {_typename(value)}")
        try:
            if name.strip().replace("-", "_") in ("bf16", "fp16"):
                value = cfg.resolve_key(name, value)[1]
            return cfg.coerce(key, value)
        except ConfigError as exc:
            msg = str(exc)
            self.fail(where, msg[len(key) + 2:] if msg.startswith(f"{key}: ") else msg)

    def claim(self, key: str, where: str, searched: bool) -> None:
        if key in self.origin:
            was_searched = key in self.domains
            if was_searched != searched:
                how = f"both fixed ({self.origin[key] if not was_searched else where}) and searched " \
                      f"({self.origin[key] if was_searched else where})"
            else:
                how = f"given twice ({self.origin[key]} and {where})"
            self.fail(where, f"{key} is {how}; set each key once")
        self.origin[key] = where

    def add_fixed(self, key: str, value: Any, where: str) -> None:
        self.claim(key, where, searched=False)
        self.fixed[key] = value
        if key in cfg.RUNTIME_KEYS:
            self.notes.append(f"{where}: {key} says where a run executes; the search may override it")

    def add_domain(self, key: str, domain: Domain, where: str) -> None:
        if key in cfg.RUNTIME_KEYS or key in cfg.WANDB_KEYS:
            self.fail(where, f"{key} can be fixed but not searched (it does not change what is trained)")
        self.claim(key, where, searched=True)
        self.domains[key] = domain

    def values_list(self, key: str, name: str, values: Any, where: str) -> tuple:
        if not isinstance(values, list):
            self.fail(where, f"expected a list of values, got {_typename(values)}")
        if not values:
            self.fail(where, "the list of values is empty")
        out = tuple(self.value(key, name, v, f"{where}[{i}]") for i, v in enumerate(values))
        for i, v in enumerate(out):
            if any(type(v) is type(w) and v == w for w in out[:i]):
                self.fail(f"{where}[{i}]", f"{_fmt(v)} is listed twice")
        return out

    def probabilities(self, probs: Any, n: int, where: str) -> tuple[float, ...]:
        if not isinstance(probs, list):
            self.fail(where, f"expected a list of probabilities, got {_typename(probs)}")
        if len(probs) != n:
            self.fail(where, f"{len(probs)} probabilities for {n} values; give one per value")
        out = tuple(float(self.num(p, f"{where}[{i}]")) for i, p in enumerate(probs))
        for i, p in enumerate(out):
            if p < 0:
                self.fail(f"{where}[{i}]", f"probability {_fmt(p)} is negative")
        if not math.isclose(sum(out), 1.0, abs_tol=1e-6):
            self.fail(where, f"probabilities sum to {sum(out):.6g}, not 1")
        return out

    def numeric_field(self, key: str, what: str, where: str) -> str:
        kind = _field_kind(key)
        if kind not in ("int", "float"):
            self.fail(where, f"{what} needs a numeric parameter, but {key} takes {kind} values; use values: [...]")
        return kind

    def bounds(self, lo: Any, hi: Any, where: str, lo_name: str = "min", hi_name: str = "max") -> tuple:
        a = self.num(lo, f"{where}.{lo_name}")
        b = self.num(hi, f"{where}.{hi_name}")
        if a > b:
            self.fail(where, f"{lo_name} {_fmt(a)} > {hi_name} {_fmt(b)}")
        if a == b:
            self.fail(where, f"{lo_name} {_fmt(a)} == {hi_name} {_fmt(b)}: a range needs {lo_name} < {hi_name} "
                             "(to fix the value, give it as a single value)")
        return a, b

    def positive_bounds(self, a: float, b: float, where: str, lo_name: str = "min") -> None:
        if a <= 0:
            self.fail(where, f"a log range needs bounds > 0, got {lo_name} {_fmt(a)}")

    def q(self, value: Any, where: str, integer: bool) -> float | int:
        q = self.num(value, where)
        if q <= 0:
            self.fail(where, f"q must be > 0, got {_fmt(q)}")
        if integer:
            if not float(q).is_integer():
                self.fail(where, f"q {_fmt(q)} must be a whole number for an integer parameter")
            return int(q)
        return q

    def sigma(self, value: Any, where: str) -> float:
        s = float(self.num(value, where))
        if s <= 0:
            self.fail(where, f"sigma must be > 0, got {_fmt(s)}")
        return s

    def snap(self, lo: float, hi: float, q: float, integer: bool, where: str, log: bool = False) -> tuple:
        """Bounds moved inwards onto multiples of q (what Ray samples; a note if moved)."""
        k_lo = math.ceil(lo / q - 1e-9)
        k_hi = math.floor(hi / q + 1e-9)
        if log and k_lo <= 0:  # (a low end just above 0 fell within the tolerance of 0: no log range)
            k_lo = 1
        if k_lo > k_hi:
            self.fail(where, f"no multiple of q {_fmt(q)} lies between {_fmt(lo)} and {_fmt(hi)}"
                      + (" above 0" if log else ""))
        if k_lo == k_hi:
            self.fail(where, f"only one multiple of q {_fmt(q)} lies between {_fmt(lo)} and {_fmt(hi)}: "
                      f"{_fmt(k_lo * q)}; fix the value instead of searching it")
        if integer:
            new_lo, new_hi = int(k_lo * q), int(k_hi * q)
        else:
            new_lo, new_hi = float(f"{k_lo * q:.12g}"), float(f"{k_hi * q:.12g}")
        if not (_close(new_lo, lo) and _close(new_hi, hi)):
            self.notes.append(f"{where}: bounds snapped to multiples of q {_fmt(q)}: "
                              f"[{_fmt(new_lo)}, {_fmt(new_hi)}]")
        return new_lo, new_hi

    def exp(self, x: float, where: str) -> float:
        try:
            out = math.exp(x)
        except OverflowError:
            self.fail(where, f"exp({_fmt(x)}) is too large (log_uniform bounds are natural-log exponents)")
        if out <= 0.0:
            self.fail(where, f"exp({_fmt(x)}) underflows to 0 (log_uniform bounds are natural-log exponents)")
        return out

    def exponent_bounds(self, dist: str, lo: float, hi: float, where: str) -> None:
        """W&B's log_uniform, q_log_uniform and inv_log_uniform take natural-log exponents (W&B deprecates
        them for that, pointing to the *_values forms). Bounds that are small positive numbers are values
        written for the other form: a learning rate range 1e-5..1e-2 read as exponents samples ~1.0 (W&B
        does the same, with a "Malformed sweep config" warning). Refused, with what was meant."""
        inv = dist.startswith("inv_")  # W&B: exp(-x), x uniform in [min, max]
        if 0 < lo < hi <= 1:
            low, high = (math.exp(-hi), math.exp(-lo)) if inv else (math.exp(lo), math.exp(hi))
            e_lo, e_hi = (-math.log(hi), -math.log(lo)) if inv else (math.log(lo), math.log(hi))
            self.fail(f"{where}.distribution", f"{dist} takes natural-log exponents: min {_fmt(lo)}, max {_fmt(hi)} "
                      f"sample values between {_fmt(low)} and {_fmt(high)} ({'exp of minus' if inv else 'exp of'} the "
                      f"bounds); for values between {_fmt(lo)} and {_fmt(hi)} write {dist}_values, or give the "
                      f"exponents (min {_fmt(e_lo)}, max {_fmt(e_hi)})")
        self.notes.append(f"{where}: {dist} takes natural-log exponents (W&B deprecates it for {dist}_values): "
                          f"min {_fmt(lo)} and max {_fmt(hi)} mean values "
                          + ("exp(-max)..exp(-min)" if inv else "exp(min)..exp(max)"))

    def integer_only(self, key: str, kind: str, dist: str, where: str, instead: str) -> None:
        if kind == "int":
            self.fail(where, f"{dist} gives fractional values but {key} takes whole numbers (use {instead})")

    # ------------------------------------------------------------- entry
    def parse(self, data: Any) -> SearchSpace:
        if data is None:
            self.fail("", "empty file (expected a W&B sweep or a native search space)")
        if not isinstance(data, Mapping):
            self.fail("", f"the top level must be a mapping of keys, got {_typename(data)}")
        if not data:
            self.fail("", "empty mapping (expected a W&B sweep or a native search space)")
        is_wandb = "parameters" in data or (
            not any(k in data for k in _NATIVE_ONLY) and data.get("method") in ("grid", "random", "bayes")
        )
        space = self.parse_wandb(data) if is_wandb else self.parse_native(data)
        self.check_method(space)
        self.validate(space)
        return space

    def top_keys(self, data: Mapping, allowed: tuple[str, ...], fmt: str, home: str) -> None:
        fmt_id = "wandb" if fmt.startswith("W&B") else "native"
        for key in data:
            if key in allowed:
                continue
            hint = _suggest(key, allowed)
            if key in _EQUIVALENT[fmt_id]:
                hint = f" (this format uses {_EQUIVALENT[fmt_id][key]})"
            if not hint and isinstance(key, str):
                try:
                    cfg.resolve_key(key)
                    hint = f" (a training setting: put it under {home})"
                except ConfigError:
                    pass
            if not hint and fmt_id == "wandb" and "parameters" not in data and _suggest(key, _NATIVE_ONLY):
                # e.g. a native file whose `space:` is misspelt: without it, `method: random` reads as W&B
                hint = (f"{_suggest(key, _NATIVE_ONLY)[:-1]} A file with method: but neither space: nor "
                        "parameters: is read as a W&B sweep)")
            self.fail(str(key), f"unknown top-level key {key!r} in a {fmt} file{hint}")

    def metric(self, name: Any, where: str) -> str:
        text = self.text(name, where).strip()
        if text in METRICS:
            return text
        if text in _METRIC_ALIASES:
            self.notes.append(f"{where}: {text!r} read as tune_gpt's {_METRIC_ALIASES[text]!r}")
            return _METRIC_ALIASES[text]
        self.fail(where, f"{text!r} is not a metric tune_gpt reports{_suggest(text, METRICS)} "
                         f"(choose from {', '.join(METRICS)})")

    # -------------------------------------------------------------- W&B
    def parse_wandb(self, data: Mapping) -> SearchSpace:
        self.top_keys(data, _WANDB_TOP, "W&B sweep", "parameters:")
        method = None
        if "method" in data:
            method = self.text(data["method"], "method")
            if method not in ("grid", "random", "bayes"):
                self.fail("method", f"unknown method {method!r}{_suggest(method, ('grid', 'random', 'bayes'))} "
                                    "(choose from grid, random, bayes)")
        for key, why in _WANDB_IGNORED.items():
            if key in data:
                shown = data[key] if isinstance(data[key], (str, int, float)) else "..."
                self.notes.append(f"{key}: {shown} ignored ({why})")
        name = self.text(data["name"], "name") if "name" in data else None
        description = self.text(data["description"], "description") if "description" in data else None

        metric = mode = None
        if "metric" in data:
            m = self.mapping(data["metric"], "metric", " {name, goal}")
            self.check_keys(m, ("name", "goal", "target", "impute", "impute_while_running"), "metric")
            if "name" not in m:
                self.fail("metric", "needs a name (e.g. name: val/loss)")
            metric = self.metric(m["name"], "metric.name")
            goal = self.text(m.get("goal", "minimize"), "metric.goal")
            if goal not in ("minimize", "maximize"):
                self.fail("metric.goal", f"unknown goal {goal!r}{_suggest(goal, ('minimize', 'maximize'))} "
                                         "(minimize or maximize)")
            mode = "min" if goal == "minimize" else "max"
            for extra in ("target", "impute", "impute_while_running"):
                if extra in m:
                    self.notes.append(f"metric.{extra} ignored (W&B controller setting)")

        num_samples = self.positive_int(data["run_cap"], "run_cap") if "run_cap" in data else None

        if "parameters" not in data:
            self.fail("parameters", "a W&B sweep needs parameters")
        params = self.mapping(data["parameters"], "parameters", " of parameter specs")
        if not params:
            self.fail("parameters", "no parameters given")
        self.wandb_params(params, "parameters", "", method)

        for top, key in (("project", "wandb.project"), ("entity", "wandb.entity")):
            if top in data:
                self.add_fixed(key, self.value(key, key, data[top], top), top)

        scheduler = self.early_terminate(data["early_terminate"]) if "early_terminate" in data else None
        # What W&B would refuse, run with tune_gpt's defaults: said, not refused (the defaults are sensible)
        if "method" not in data:
            self.notes.append("method: not set (W&B requires one): `values` are read as choices, and the search "
                              "is --search's (default optuna)")
        needs = [what for what, given in (("method: bayes", method == "bayes"),
                                          ("early_terminate: hyperband", scheduler is not None)) if given]
        if metric is None and needs:
            self.notes.append(f"metric: not set, which W&B refuses with {' and '.join(needs)}: val/loss (minimize) "
                              "is used (--metric and --mode choose another)")
        return SearchSpace(
            source=self.source, name=name or self._stem(), fixed=self.fixed, domains=self.domains,
            method=method, metric=metric, mode=mode, num_samples=num_samples, scheduler=scheduler,
            notes=self.notes, format="wandb", description=description,
        )

    def wandb_params(self, params: Mapping, where: str, prefix: str, method: str | None) -> None:
        for pname, spec in params.items():
            path = f"{where}.{pname}"
            if not isinstance(pname, str):
                self.fail(path, f"parameter names must be text, got {pname!r}")
            if not isinstance(spec, Mapping):
                self.fail(path, f"expected a parameter spec such as {{value: ...}} or {{values: [...]}}, "
                                f"got {_typename(spec)}")
            if "parameters" in spec:
                if len(spec) != 1:
                    other = next(k for k in spec if k != "parameters")
                    self.fail(f"{path}.{other}", "a parameter with nested parameters takes no other keys")
                nested = self.mapping(spec["parameters"], f"{path}.parameters", " of parameter specs")
                if not nested:
                    self.fail(f"{path}.parameters", "no parameters given")
                self.wandb_params(nested, f"{path}.parameters", f"{prefix}{pname}.", method)
                continue
            self.wandb_param(prefix + pname, spec, path, method)

    def wandb_param(self, name: str, spec: Mapping, path: str, method: str | None) -> None:
        key = self.resolve(name, path)
        named = spec.get("distribution")
        if isinstance(named, str) and named in _WANDB_UNSUPPORTED:  # (before its keys a, b read as unknown ones)
            self.fail(f"{path}.distribution", f"W&B's {named} distribution (keys a, b) is not supported; for a value "
                                              f"between 0 and 1 use {_WANDB_UNSUPPORTED[named]}, or values: [...]")
        self.check_keys(spec, _WANDB_SPEC_KEYS, path, "parameter key")
        if "distribution" in spec:
            dist = self.text(spec["distribution"], f"{path}.distribution")
            if dist not in _WANDB_DISTS:
                self.fail(f"{path}.distribution", f"unknown distribution {dist!r}{_suggest(dist, _WANDB_DISTS)} "
                                                  f"(valid: {', '.join(_WANDB_DISTS)})")
        elif "value" in spec:
            dist = "constant"
        elif "values" in spec:
            dist = "categorical"
        elif "min" in spec or "max" in spec:
            if "min" not in spec or "max" not in spec:
                self.fail(path, f"needs both min and max (only {'min' if 'min' in spec else 'max'} given)")
            lo = self.num(spec["min"], f"{path}.min")
            hi = self.num(spec["max"], f"{path}.max")
            ints = isinstance(lo, int) and isinstance(hi, int)
            if not ints and _field_kind(key) == "int":
                if not (float(lo).is_integer() and float(hi).is_integer()):
                    self.fail(path, f"min {_fmt(lo)} / max {_fmt(hi)} are not both whole numbers, "
                                    f"but {key} takes whole numbers")
                ints = True
            dist = "int_uniform" if ints else "uniform"
        elif any(k in spec for k in ("mu", "sigma", "q", "probabilities")):
            given = next(k for k in ("mu", "sigma", "q", "probabilities") if k in spec)
            self.fail(path, f"{given} given without a distribution (or values)")
        else:
            self.fail(path, "needs one of value, values, min/max, distribution or parameters")
        required, optional = _WANDB_DISTS[dist]
        for k in spec:
            if k != "distribution" and k not in required + optional:
                self.fail(f"{path}.{k}", f"{k!r} is not used by distribution {dist}")
        for k in required:
            if k not in spec:
                self.fail(path, f"distribution {dist} needs {k}")

        if dist == "constant":
            self.add_fixed(key, self.value(key, name, spec["value"], f"{path}.value"), path)
            return
        if dist in ("categorical", "categorical_w_probabilities"):
            values = self.values_list(key, name, spec["values"], f"{path}.values")
            probs = None
            if "probabilities" in spec:
                probs = self.probabilities(spec["probabilities"], len(values), f"{path}.probabilities")
            if method == "grid":
                if probs is not None:
                    self.fail(f"{path}.probabilities", "probabilities cannot be used with method grid")
                self.add_domain(key, Grid(values), path)
            else:
                self.add_domain(key, Choice(values, probs, "categorical" if probs is None else "weighted choice"),
                                path)
            return
        if method == "grid" and dist == "q_uniform":  # W&B's grid steps from min as written: nothing to snap
            self.add_domain(key, self.wandb_grid(key, dist, None, spec, path), path)
            return
        n_notes = len(self.notes)
        domain = self.wandb_distribution(key, dist, spec, path)  # validates the spec in any case
        if method == "grid":
            del self.notes[n_notes:]  # the grid enumerates the written bounds, not snapped ones
            domain = self.wandb_grid(key, dist, domain, spec, path)
        self.add_domain(key, domain, path)

    def wandb_distribution(self, key: str, dist: str, spec: Mapping, path: str) -> Domain:
        kind = self.numeric_field(key, f"distribution {dist}", path)
        integer = kind == "int"
        if dist in ("normal", "q_normal", "log_normal", "q_log_normal"):
            mu = float(self.num(spec.get("mu", 0), f"{path}.mu"))
            sigma = self.sigma(spec.get("sigma", 1), f"{path}.sigma")
            q = None
            if dist.startswith("q_"):
                q = self.q(spec.get("q", 1), f"{path}.q", integer)
            else:
                self.integer_only(key, kind, dist, path, f"q_{dist}")
            return Normal(mu, sigma, q, log="log" in dist, integer=integer, kind=dist)

        lo, hi = self.bounds(spec["min"], spec["max"], path)
        if dist == "int_uniform":
            lo, hi = self.whole(lo, f"{path}.min"), self.whole(hi, f"{path}.max")
            return Uniform(lo, hi, integer=True, kind=dist)
        if dist == "uniform":
            self.integer_only(key, kind, dist, path, "int_uniform or q_uniform")
            return Uniform(float(lo), float(hi), kind=dist)
        if dist == "q_uniform":
            q = self.q(spec.get("q", 1), f"{path}.q", integer)
            lo, hi = self.snap(lo, hi, q, integer, path)
            return Uniform(lo, hi, q=None if integer and q == 1 else q, integer=integer, kind=dist)
        if dist in ("log_uniform", "q_log_uniform", "inv_log_uniform"):
            self.exponent_bounds(dist, lo, hi, path)
        if dist in ("log_uniform", "q_log_uniform"):  # bounds are natural-log exponents
            lo, hi = self.exp(lo, f"{path}.min"), self.exp(hi, f"{path}.max")
        elif dist in ("inv_log_uniform",):  # log(1/X) ~ U(min, max)  <=>  X log-uniform on [e^-max, e^-min]
            lo, hi = self.exp(-hi, f"{path}.max"), self.exp(-lo, f"{path}.min")
        else:  # *_values: the bounds are values
            self.positive_bounds(lo, hi, path)
        if dist.startswith("q_"):
            q = self.q(spec.get("q", 1), f"{path}.q", integer)
            lo, hi = self.snap(lo, hi, q, integer, path, log=True)
            return Uniform(lo, hi, log=True, q=None if integer and q == 1 else q, integer=integer, kind=dist)
        self.integer_only(key, kind, dist, path, f"q_{dist.removeprefix('inv_')} with q: 1")
        return Uniform(float(lo), float(hi), log=True, kind=dist)

    def wandb_grid(self, key: str, dist: str, domain: Domain | None, spec: Mapping, path: str) -> Grid:
        """W&B's grid enumerates int_uniform (min..max) and q_uniform (arange(min, max, q), from min as written,
        max left out, nothing snapped: min 1 max 5 q 3 is [1, 4]). `domain`: the int_uniform's."""
        if dist == "int_uniform":
            assert isinstance(domain, Uniform)
            count = int(domain.high) - int(domain.low) + 1
            values: list = list(range(int(domain.low), int(domain.high) + 1)) if count <= _MAX_GRID_VALUES else []
        elif dist == "q_uniform":
            integer = self.numeric_field(key, f"distribution {dist}", path) == "int"
            lo, hi = self.bounds(spec["min"], spec["max"], path)
            q = self.q(spec.get("q", 1), f"{path}.q", integer)
            count = max(0, math.ceil((hi - lo) / q))
            values = [lo + i * q for i in range(count)] if count <= _MAX_GRID_VALUES else []
            values = [float(f"{v:.12g}") if isinstance(v, float) else v for v in values]
        else:
            self.fail(path, f"method grid cannot enumerate the continuous distribution {dist} "
                            "(use values: [...], int_uniform or q_uniform)")
        if count > _MAX_GRID_VALUES:
            self.fail(path, f"method grid would enumerate {count} values (at most {_MAX_GRID_VALUES})")
        if not values:
            self.fail(path, "method grid: the range holds no values")
        return Grid(tuple(self.value(key, key, v, path) for v in values), kind=f"grid ({dist})")

    def early_terminate(self, et: Any) -> dict:
        where = "early_terminate"
        et = self.mapping(et, where, " {type: hyperband, ...}")
        self.check_keys(et, ("type", "min_iter", "max_iter", "s", "eta", "strict"), where)
        kind = self.text(et.get("type", ""), f"{where}.type")
        if kind != "hyperband":
            self.fail(f"{where}.type", f"unsupported early_terminate type {kind!r} (only hyperband)")
        eta = self.num(et.get("eta", 3), f"{where}.eta")
        if eta <= 1:
            self.fail(f"{where}.eta", f"eta must be > 1, got {_fmt(eta)}")
        if "strict" in et:
            self.notes.append(f"{where}.strict ignored (ASHA has no strict mode)")
        if "min_iter" in et and "max_iter" in et:  # as W&B reads it: max_iter (with s) wins
            self.notes.append(f"{where}.min_iter ignored: with max_iter given, W&B's brackets come from max_iter and s")
        elif "min_iter" in et:
            if "s" in et:
                self.notes.append(f"{where}.s ignored: it goes with max_iter (W&B ignores it with min_iter too)")
            min_iter = self.positive_int(et["min_iter"], f"{where}.min_iter")
            return _hyperband_to_asha(eta, min_iter=min_iter, notes=self.notes)
        if "max_iter" in et:
            if "s" not in et:
                self.fail(where, "max_iter needs s (the number of brackets before max_iter)")
            max_iter = self.positive_int(et["max_iter"], f"{where}.max_iter")
            s = self.positive_int(et["s"], f"{where}.s")
            if max_iter / eta < 1:
                self.fail(where, f"max_iter {max_iter} / eta {_fmt(eta)} < 1 leaves no bracket")
            return _hyperband_to_asha(eta, max_iter=max_iter, s=s, notes=self.notes)
        self.fail(where, "hyperband needs min_iter, or max_iter with s")

    # ------------------------------------------------------------ native
    def parse_native(self, data: Mapping) -> SearchSpace:
        self.top_keys(data, _NATIVE_TOP, "native search-space", "fixed: or space:")
        method = None
        if "method" in data:
            method = self.text(data["method"], "method")
            if method not in ("optuna", "random", "grid"):
                self.fail("method", f"unknown method {method!r}{_suggest(method, ('optuna', 'random', 'grid'))} "
                                    "(choose from optuna, random, grid)")
        name = self.text(data["name"], "name") if "name" in data else None
        description = self.text(data["description"], "description") if "description" in data else None
        metric = self.metric(data["metric"], "metric") if "metric" in data else None
        mode = None
        if "mode" in data:
            mode = self.text(data["mode"], "mode")
            mode = {"minimize": "min", "maximize": "max"}.get(mode, mode)
            if mode not in ("min", "max"):
                self.fail("mode", f"unknown mode {mode!r}{_suggest(mode, ('min', 'max'))} (min or max)")
        num_samples = self.positive_int(data["num_samples"], "num_samples") if "num_samples" in data else None
        scheduler = self.native_scheduler(data["scheduler"]) if "scheduler" in data else None
        if "fixed" in data and data["fixed"] is not None:
            self.native_fixed(self.mapping(data["fixed"], "fixed", " of key: value"), "fixed", "")
        if "space" in data and data["space"] is not None:
            self.native_space(self.mapping(data["space"], "space", " of key: domain"), "space", "")
        if not self.domains and not self.fixed:
            self.fail("space", "nothing to search (give space: and/or fixed:)")
        return SearchSpace(
            source=self.source, name=name or self._stem(), fixed=self.fixed, domains=self.domains,
            method=method, metric=metric, mode=mode, num_samples=num_samples, scheduler=scheduler,
            notes=self.notes, format="native", description=description,
        )

    def native_scheduler(self, raw: Any) -> dict:
        where = "scheduler"
        if isinstance(raw, str):
            raw = {"type": raw}
        sched = self.mapping(raw, where, " {type: asha, ...}")
        if "type" not in sched:
            self.fail(where, "needs a type (asha, median or none)")
        kind = self.text(sched["type"], f"{where}.type")
        if kind not in _SCHEDULERS:
            self.fail(f"{where}.type", f"unknown scheduler type {kind!r}{_suggest(kind, _SCHEDULERS)} "
                                       f"(choose from {', '.join(_SCHEDULERS)})")
        self.check_keys(sched, ("type",) + _SCHEDULERS[kind], where, f"{kind} setting")
        out: dict[str, Any] = {"type": kind}
        for key in _SCHEDULERS[kind]:
            if key not in sched:
                continue
            if key == "pause":
                if not isinstance(sched[key], bool):
                    self.fail(f"{where}.{key}", f"must be true or false, got {sched[key]!r}")
                out[key] = sched[key]
            elif key == "reduction_factor":
                rf = self.num(sched[key], f"{where}.{key}")
                if rf <= 1:
                    self.fail(f"{where}.{key}", f"must be > 1, got {_fmt(rf)}")
                out[key] = rf
            else:
                out[key] = self.positive_int(sched[key], f"{where}.{key}")
        if out.get("pause") and out.get("brackets", 1) != 1:
            self.fail(f"{where}.brackets", "pause: true runs one bracket; drop brackets")
        if "grace_period" in out and "max_t" in out and out["grace_period"] > out["max_t"]:
            self.fail(f"{where}.grace_period", f"grace_period {out['grace_period']} > max_t {out['max_t']}")
        return out

    def native_fixed(self, fixed: Mapping, where: str, prefix: str) -> None:
        for name, value in fixed.items():
            path = f"{where}.{name}"
            if not isinstance(name, str):
                self.fail(path, f"parameter names must be text, got {name!r}")
            if isinstance(value, Mapping):  # nested section: model: {n_layer: 2}
                self.native_fixed(value, path, f"{prefix}{name}.")
                continue
            key = self.resolve(prefix + name, path)
            self.add_fixed(key, self.value(key, prefix + name, value, path), path)

    def native_space(self, space: Mapping, where: str, prefix: str) -> None:
        for name, spec in space.items():
            path = f"{where}.{name}"
            if not isinstance(name, str):
                self.fail(path, f"parameter names must be text, got {name!r}")
            if not isinstance(spec, Mapping):
                self.fail(path, f"expected a domain such as {{choice: [...]}} or {{loguniform: [lo, hi]}}, "
                                f"got {_typename(spec)} (fixed values go under fixed:)")
            kinds = [k for k in spec if k in _NATIVE_DOMAINS]
            if not kinds and not any(k == "probabilities" for k in spec):
                if all(isinstance(v, Mapping) for v in spec.values()) and spec:
                    self.native_space(spec, path, f"{prefix}{name}.")  # nested section
                    continue
                if not spec:
                    self.fail(path, f"empty domain: give one of {', '.join(_NATIVE_DOMAINS)} "
                                    "(e.g. {loguniform: [1e-4, 1e-2]})")
                bad = next(iter(spec))
                self.fail(f"{path}.{bad}", f"unknown domain {bad!r}{_suggest(bad, _NATIVE_DOMAINS)} "
                                           f"(valid: {', '.join(_NATIVE_DOMAINS)})")
            self.native_domain(prefix + name, spec, path)

    def native_domain(self, name: str, spec: Mapping, path: str) -> None:
        key = self.resolve(name, path)
        kinds = [k for k in spec if k in _NATIVE_DOMAINS]
        for k in spec:
            if k not in _NATIVE_DOMAINS and not (k == "probabilities" and kinds == ["choice"]):
                self.fail(f"{path}.{k}", f"unknown domain {k!r}{_suggest(k, _NATIVE_DOMAINS)} "
                                         f"(valid: {', '.join(_NATIVE_DOMAINS)})")
        if len(kinds) != 1:
            self.fail(path, f"give exactly one domain, got {', '.join(kinds) or 'none'}")
        kind = kinds[0]
        args = spec[kind]
        where = f"{path}.{kind}"
        if kind in ("choice", "grid"):
            values = self.values_list(key, name, args, where)
            if kind == "grid":
                self.add_domain(key, Grid(values), path)
            else:
                probs = None
                if "probabilities" in spec:
                    probs = self.probabilities(spec["probabilities"], len(values), f"{path}.probabilities")
                self.add_domain(key, Choice(values, probs, "choice" if probs is None else "weighted choice"), path)
            return
        names = _NATIVE_DOMAINS[kind]
        if not isinstance(args, list) or len(args) != len(names):
            got = repr(args) if isinstance(args, list) else _typename(args)
            self.fail(where, f"{kind} takes [{', '.join(names)}], got {got}")
        field_kind = self.numeric_field(key, kind, where)
        integer = kind in ("randint", "qrandint", "lograndint") or (
            field_kind == "int" and kind in ("quniform", "qloguniform", "qnormal"))
        if kind in ("normal", "qnormal"):
            if kind == "normal":
                self.integer_only(key, field_kind, kind, where, "qnormal with q: 1")
            mu = float(self.num(args[0], f"{where}[0]"))
            sigma = self.sigma(args[1], f"{where}[1]")
            q = self.q(args[2], f"{where}[2]", integer) if kind == "qnormal" else None
            self.add_domain(key, Normal(mu, sigma, q, integer=integer, kind=kind), path)
            return
        lo, hi = self.bounds(args[0], args[1], where, "low", "high")
        log = kind in ("loguniform", "qloguniform", "lograndint")
        if log:
            self.positive_bounds(lo, hi, where, "low")
        if kind in ("uniform", "loguniform"):
            self.integer_only(key, field_kind, kind, where, "randint" if kind == "uniform" else "lograndint")
            self.add_domain(key, Uniform(float(lo), float(hi), log=log, kind=kind), path)
            return
        if kind in ("randint", "lograndint"):
            lo, hi = self.whole(lo, f"{where}[0]"), self.whole(hi, f"{where}[1]")
            self.add_domain(key, Uniform(lo, hi, log=log, integer=True, kind=kind), path)
            return
        q = self.q(args[2], f"{where}[2]", integer)
        if integer:
            lo, hi = self.whole(lo, f"{where}[0]"), self.whole(hi, f"{where}[1]")
        lo, hi = self.snap(lo, hi, q, integer, where, log=log)
        self.add_domain(key, Uniform(lo, hi, log=log, q=None if integer and q == 1 else q,
                                     integer=integer, kind=kind), path)

    # --------------------------------------------------------- finishing
    def _stem(self) -> str:
        return Path(self.source).stem if self.source != "<space>" else "space"

    def check_method(self, space: SearchSpace) -> None:
        if space.method == "grid":
            for key, dom in space.domains.items():
                if not isinstance(dom, Grid):
                    self.fail(self.origin[key], f"method grid needs every searched key to be a grid, "
                                                f"but {key} is {dom.describe()}")
        if space.method in ("optuna", "bayes"):
            for key, dom in space.domains.items():
                if isinstance(dom, Grid):
                    self.fail(self.origin[key], f"method {space.method} cannot search a grid ({key}); "
                                                "use choice, or method: grid")

    def validate(self, space: SearchSpace) -> None:
        """The fixed values plus the baseline point must make a valid TrainConfig, and so must
        every value a searched key can take (`check_domain_values`)."""
        space.origins = dict(self.origin)
        point = {**space.fixed, **space.baseline()}
        try:
            cfg.TrainConfig.from_flat(point)
        except ConfigError as exc:
            self.fail("", f"{exc} (with the fixed values and the space's baseline point)")
        check_domain_values(space)


# ================================================================ value checks

_ENUMERATE_INT_RANGE = 64  # integer ranges up to this many values are checked value by value
_MAX_COMBINATIONS = 512  # searched keys are checked together when there are at most this many combinations


def _candidates(dom: Domain) -> list[tuple[Any, str]]:
    """(value, what it is) pairs a domain can produce, worth checking against TrainConfig."""
    if isinstance(dom, (Choice, Grid)):
        return [(v, "value") for v in dom.values]
    if isinstance(dom, Uniform):
        if dom.integer:
            lo, hi, q = int(dom.low), int(dom.high), int(dom.q or 1)
            if not dom.log and (hi - lo) // q + 1 <= _ENUMERATE_INT_RANGE:
                return [(v, "value") for v in range(lo, hi + 1, q)]
            return [(lo, "low end"), (hi, "high end")]
        return [(dom.low, "low end"), (dom.high, "high end")]
    if isinstance(dom, Normal):  # unbounded: its centre is the baseline; two sigmas either side are checked
        return [(replace(dom, mu=dom.mu + sign * 2 * dom.sigma).center(), f"mu {c} 2 sigma (a normal range is unbounded)")
                for sign, c in ((-1, "-"), (1, "+"))]  # (beyond them: 2.3 % of the draws on each side)
    return []


def check_domain_values(space: SearchSpace, fixed: Mapping[str, Any] | None = None) -> None:
    """Raise SpaceError when a value a searched key can take makes an invalid TrainConfig.

    Each discrete value, each range end (every value of a small integer range) is checked with
    the other keys at the baseline; then, when there are at most a few hundred, every combination
    (``n_embd`` and ``n_head`` searched together). `fixed` defaults to the file's fixed values;
    the search passes them with the command line's on top. The message names the file, the key
    and the value, so a bad trial is refused before any trial runs.
    """
    fixed = dict(space.fixed if fixed is None else fixed)
    base = space.baseline()
    cands = {key: _candidates(dom) for key, dom in space.domains.items()}
    for key, values in cands.items():
        for value, what in values:
            try:
                cfg.TrainConfig.from_flat({**fixed, **base, key: value})
            except ConfigError as exc:
                raise SpaceError(_one_line(f"{space.source}: {space.where(key)}: {what} {_fmt(value)} cannot be "
                                           f"trained: {exc}")) from None
    keys = [k for k, v in cands.items() if v]
    if len(keys) < 2 or math.prod(len(cands[k]) for k in keys) > _MAX_COMBINATIONS:
        return
    import itertools

    for combo in itertools.product(*(cands[k] for k in keys)):
        point = dict(zip(keys, (v for v, _ in combo)))
        try:
            cfg.TrainConfig.from_flat({**fixed, **base, **point})
        except ConfigError as exc:
            named = [k for k in keys if k in str(exc) or k.split(".")[-1] in str(exc)] or keys
            shown = ", ".join(f"{space.where(k)}={_fmt(point[k])}" for k in named)
            raise SpaceError(_one_line(f"{space.source}: the combination {shown} cannot be trained: {exc}")) from None


def metric_name(text: Any) -> str | None:
    """tune_gpt's name for a metric (aliases such as ``val_loss`` accepted), or None if it reports no such metric."""
    t = str(text).strip()
    if t in METRICS:
        return t
    return _METRIC_ALIASES.get(t)


def _hyperband_to_asha(eta: float, *, min_iter: int | None = None, max_iter: int | None = None,
                       s: int | None = None, notes: list[str]) -> dict:
    """Map W&B's hyperband stopping onto ASHA, one bracket (tune_gpt's default form, which pauses a trial at a
    rung until the rung ranks it; W&B, like Ray's form, ``--stop-at-rungs``, decides as a run arrives).

    W&B counts iterations as reports of the metric, as ASHA's
    ``training_iteration`` does (tune_gpt reports once per evaluation). At each
    bracket W&B keeps the runs in the best 1/eta, as ASHA keeps the best
    1/reduction_factor at each rung, so ``reduction_factor = eta``, ``brackets = 1``.
    The brackets are where W&B's documentation puts them (``min_iter: 3, eta: 3``:
    3, 9, 27): ASHA judges a trial at its 3rd report. W&B's own code
    (``hyperband_stop_runs``) reads ``history[band]``, the report after it: it
    judges one evaluation later than its documentation says.

    * ``min_iter``: W&B brackets at int(min_iter * eta^k), k = 0, 1, ... without end;
      ASHA rungs at grace_period * rf^k up to max_t, so ``grace_period =
      min_iter`` and max_t is left out for the search to set to the number of
      evaluations a trial makes. With a fractional eta (2.5: W&B's 1, 2, 6, 15)
      ASHA's rungs (1, 2.5, 6.25, 15.6) would judge at reports 1, 3, 7, 16:
      ``whole_rungs`` makes the search give ASHA W&B's (`hyperband_brackets`).
    * ``max_iter`` + ``s``: W&B brackets at int(max_iter / eta^k), k = 1..s
      (those >= 1), and its runs go on to their own end: max_iter places the
      brackets, it stops no run. ASHA gets ``grace_period`` = the lowest bracket,
      ``max_t`` = the highest + 1, its rungs (grace_period * eta^k < max_t: W&B's
      brackets when max_iter is a multiple of eta^s; else ``rungs``, W&B's
      brackets as they are) and ``stop_last_trials: false`` (ASHA would
      otherwise end every trial at max_t, the best one too).
    """
    if min_iter is not None:
        whole = not float(eta).is_integer()  # else min_iter * eta^k is whole already: Ray's rungs are W&B's
        shown = ", ".join(map(str, hyperband_brackets(min_iter, eta, 100)[:5]))
        notes.append(f"early_terminate: hyperband min_iter={min_iter} eta={_fmt(eta)} -> ASHA "
                     f"grace_period={min_iter} reduction_factor={_fmt(eta)} (max_t: set by the search)"
                     + (f", rungs at W&B's brackets int(min_iter * eta^k): {shown}, ..." if whole else ""))
        return {"type": "asha", "grace_period": min_iter, "reduction_factor": eta, "brackets": 1,
                **({"whole_rungs": True} if whole else {})}
    assert max_iter is not None and s is not None
    bands, band = [], float(max_iter)
    for _ in range(s):
        band /= eta
        if band < 1:
            break
        bands.append(int(band))
    grace, last, bands = min(bands), max(bands) + 1, sorted(set(bands))
    # Ray's rungs, grace_period * eta^k, are W&B's brackets where max_iter is a multiple of eta^s; else (max_iter
    # 50, s 3, eta 3: W&B's 1, 5, 16 against 1, 3, 9) ASHA is given W&B's
    exact = asha_rungs(grace, eta, last) == [float(b) for b in bands]
    notes.append(f"early_terminate: hyperband max_iter={max_iter} s={s} eta={_fmt(eta)} (brackets at "
                 f"{bands}) -> ASHA grace_period={grace} reduction_factor={_fmt(eta)}, "
                 + (f"rungs below {last}" if exact else f"rungs at W&B's brackets {bands}")
                 + "; trials past the last rung run to their end, as W&B's do")
    return {"type": "asha", "grace_period": grace, "max_t": last, "reduction_factor": eta, "brackets": 1,
            "stop_last_trials": False, **({} if exact else {"rungs": bands})}


def asha_rungs(grace_period: float, reduction_factor: float, max_t: float) -> list[float]:
    """Ray's ASHA rungs for one bracket (ray.tune.schedulers.async_hyperband): grace_period * rf^k below max_t."""
    n = int(math.log(max_t / grace_period) / math.log(reduction_factor) + 1) if max_t > grace_period else 0
    return [grace_period * reduction_factor ** k for k in range(n) if grace_period * reduction_factor ** k < max_t]


def hyperband_brackets(min_iter: int, eta: float, below: int) -> list[int]:
    """W&B's hyperband brackets from `min_iter`, those below `below`: int(min_iter * eta^k), the product taken
    step by step as W&B's hyperband_stopping.py takes it, each bracket once (eta < 2 repeats the first ones)."""
    out: list[int] = []
    band = float(min_iter)
    while int(band) < below:
        if int(band) not in out:
            out.append(int(band))
        band *= eta
    return out
