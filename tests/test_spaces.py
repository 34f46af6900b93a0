"""Tests for tune_gpt.spaces: both file formats, Ray mapping, and every error."""

from __future__ import annotations

import math
import pickle
import textwrap
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tune_gpt.config import TrainConfig
from tune_gpt.errors import SpaceError
from tune_gpt.spaces import Choice, Grid, Normal, SearchSpace, Uniform, load_space, parse_space

ROOT = Path(__file__).resolve().parents[1]
SPACES = ROOT / "search_spaces"


def write(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def wandb_space(tmp_path: Path, params: str, head: str = "method: random\n") -> SearchSpace:
    body = textwrap.indent(textwrap.dedent(params), "  ")
    return load_space(write(tmp_path, f"{head}parameters:\n{body}"))


def sample(domain, n: int = 2000, seed: int = 0) -> list:
    """Draw `n` values from the Ray domain our Domain builds."""
    np.random.seed(seed)  # sample_from callables use numpy's global generator
    values = domain.to_tune().sample(None, size=n, random_state=np.random.default_rng(seed))
    return list(values)


# ======================================================================= files


def test_seed_sweep_file():
    space = load_space(SPACES / "seed_sweep.yaml")
    assert space.format == "wandb"
    assert space.method == "grid"
    assert space.grid_size() == 9
    assert space.domains["batch_size"] == Grid((8, 16, 32))
    assert space.domains["learning_rate"] == Grid((1e-5, 5e-5, 1e-4))
    assert all(isinstance(v, float) for v in space.domains["learning_rate"].values)
    assert space.fixed == {"model_size": "tiny", "use_chinese": True, "epochs": 3.0, "wandb.project": "gpt-sweep"}
    assert space.fixed["use_chinese"] is True
    assert isinstance(space.fixed["epochs"], float)
    assert any(n.startswith("program: train_single_gpu.py ignored") for n in space.notes)
    tune_space = space.to_tune()
    assert tune_space["batch_size"] == {"grid_search": [8, 16, 32]}
    assert tune_space["learning_rate"] == {"grid_search": [1e-5, 5e-5, 1e-4]}
    assert tune_space["wandb.project"] == "gpt-sweep"
    from ray.tune.search.variant_generator import generate_variants

    points = {(cfg["batch_size"], cfg["learning_rate"]) for _, cfg in generate_variants(tune_space)}
    assert points == {(b, lr) for b in (8, 16, 32) for lr in (1e-5, 5e-5, 1e-4)}


def test_seed_sweep_file_is_the_users_file():
    text = (SPACES / "seed_sweep.yaml").read_text()
    assert text.startswith("program: train_single_gpu.py\nmethod: grid\nparameters:\n")
    assert "    values: [1e-5, 5e-5, 1e-4]\n" in text


@pytest.mark.parametrize("name, lr_bounds, batches, samples, steps", [
    ("lr_batch", (1e-4, 1e-2), (8, 16, 32, 64), 16, 300),
    ("default", (3e-4, 1e-2), (8, 16, 32), 8, 150),
])
def test_native_files(name, lr_bounds, batches, samples, steps):
    space = load_space(SPACES / f"{name}.yaml")
    assert space.format == "native" and space.method == "optuna"
    assert space.metric == "val/loss" and space.mode == "min"
    assert space.num_samples == samples
    assert space.scheduler == {"type": "asha", "grace_period": 2, "reduction_factor": 2}
    assert space.domains["learning_rate"] == Uniform(*lr_bounds, log=True, kind="loguniform")
    assert space.domains["batch_size"] == Choice(batches)
    assert space.fixed["max_steps"] == steps and space.fixed["model_size"] == "tiny"
    assert space.optuna_unsupported() == []
    cfg = TrainConfig.from_flat({**space.fixed, **space.baseline()})
    assert cfg.data is None


def test_default_file_is_shrunk_for_speed():
    space = load_space(SPACES / "default.yaml")
    cfg = TrainConfig.from_flat({**space.fixed, **space.baseline()})
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.block_size) == (2, 4, 64, 64)
    assert (cfg.max_steps, cfg.eval_interval, cfg.eval_iters, cfg.sample_tokens) == (150, 30, 5, 100)
    assert "data" not in space.fixed


def test_lr_batch_file_says_what_it_is_for():
    first = (SPACES / "lr_batch.yaml").read_text().splitlines()[0].lower()
    assert first.startswith("#") and "batch size" in first and "learning rate" in first


# ============================================================ W&B distributions


def test_log_uniform_bounds_are_natural_log_exponents(tmp_path):
    space = wandb_space(tmp_path, """
        learning_rate: {distribution: log_uniform, min: -9.21, max: -4.61}
    """)
    dom = space.domains["learning_rate"]
    assert dom.log and math.isclose(dom.low, math.exp(-9.21)) and math.isclose(dom.high, math.exp(-4.61))
    xs = np.array(sample(dom))
    assert (xs >= math.exp(-9.21)).all() and (xs <= math.exp(-4.61)).all()
    # log-uniform: the median is the geometric middle, e^-6.91 ~ 1e-3
    assert abs(np.log(np.median(xs)) - (-6.91)) < 0.2


def test_int_uniform_includes_max(tmp_path):
    space = wandb_space(tmp_path, """
        n_layer: {distribution: int_uniform, min: 1, max: 3}
        batch_size: {min: 4, max: 6}
    """)
    for key, (lo, hi) in (("model.n_layer", (1, 3)), ("batch_size", (4, 6))):
        dom = space.domains[key]
        assert dom == Uniform(lo, hi, integer=True, kind="int_uniform")
        xs = sample(dom, 500)
        assert set(xs) == set(range(lo, hi + 1))
        assert all(isinstance(x, (int, np.integer)) for x in xs)


def test_min_max_types_pick_the_distribution(tmp_path):
    space = wandb_space(tmp_path, """
        dropout: {min: 0, max: 0.5}
        weight_decay: {min: 0.0, max: 0.2}
        learning_rate: {min: 1e-5, max: 1e-3}
    """)
    assert space.domains["model.dropout"] == Uniform(0.0, 0.5)
    assert space.domains["weight_decay"] == Uniform(0.0, 0.2)
    assert space.domains["learning_rate"] == Uniform(1e-5, 1e-3)


W_AND_B_CASES = [
    # spec, expected Domain, check on samples
    ("{distribution: uniform, min: 0.1, max: 0.3}", Uniform(0.1, 0.3),
     lambda xs: min(xs) >= 0.1 and max(xs) <= 0.3),
    ("{distribution: q_uniform, min: 0.0, max: 0.5, q: 0.1}", Uniform(0.0, 0.5, q=0.1, kind="q_uniform"),
     lambda xs: set(np.round(xs, 9)) <= {0.0, 0.1, 0.2, 0.3, 0.4, 0.5} and len(set(np.round(xs, 9))) == 6),
    ("{distribution: log_uniform_values, min: 1e-4, max: 1e-2}",
     Uniform(1e-4, 1e-2, log=True, kind="log_uniform_values"),
     lambda xs: min(xs) >= 1e-4 and max(xs) <= 1e-2 and abs(np.log10(np.median(xs)) + 3) < 0.2),
    ("{distribution: q_log_uniform, min: 0, max: 2, q: 0.5}",
     Uniform(1.0, 7.0, log=True, q=0.5, kind="q_log_uniform"),
     lambda xs: min(xs) >= 1.0 and max(xs) <= 7.0 and all(math.isclose(x * 2, round(x * 2)) for x in xs)),
    ("{distribution: q_log_uniform_values, min: 1e-3, max: 1e-1, q: 1e-3}",
     Uniform(1e-3, 1e-1, log=True, q=1e-3, kind="q_log_uniform_values"),
     lambda xs: min(xs) >= 1e-3 - 1e-12 and max(xs) <= 1e-1 + 1e-12),
    ("{distribution: inv_log_uniform, min: 2, max: 6}",
     Uniform(math.exp(-6), math.exp(-2), log=True, kind="inv_log_uniform"),
     lambda xs: min(xs) >= math.exp(-6) and max(xs) <= math.exp(-2)),
    ("{distribution: inv_log_uniform_values, min: 1e-4, max: 1e-2}",
     Uniform(1e-4, 1e-2, log=True, kind="inv_log_uniform_values"),
     lambda xs: min(xs) >= 1e-4 and max(xs) <= 1e-2 and abs(np.log10(np.median(xs)) + 3) < 0.2),
    ("{distribution: normal, mu: 0.5, sigma: 0.1}", Normal(0.5, 0.1),
     lambda xs: abs(np.mean(xs) - 0.5) < 0.02 and abs(np.std(xs) - 0.1) < 0.02),
    ("{distribution: q_normal, mu: 1, sigma: 0.3, q: 0.25}", Normal(1.0, 0.3, q=0.25, kind="q_normal"),
     lambda xs: all(math.isclose(x * 4, round(x * 4)) for x in xs) and abs(np.mean(xs) - 1) < 0.05),
    ("{distribution: log_normal, mu: -3, sigma: 0.5}", Normal(-3.0, 0.5, log=True, kind="log_normal"),
     lambda xs: min(xs) > 0 and abs(np.log(np.median(xs)) + 3) < 0.1),
    ("{distribution: q_log_normal, mu: 0, sigma: 1, q: 0.5}",
     Normal(0.0, 1.0, q=0.5, log=True, kind="q_log_normal"),
     lambda xs: min(xs) >= 0 and all(math.isclose(x * 2, round(x * 2)) for x in xs)),
    ("{distribution: categorical, values: [0.1, 0.2]}", Choice((0.1, 0.2), kind="categorical"),
     lambda xs: set(xs) == {0.1, 0.2}),
    ("{values: [0.1, 0.2], probabilities: [0.9, 0.1]}",
     Choice((0.1, 0.2), (0.9, 0.1), kind="weighted choice"),
     lambda xs: 0.85 < Counter(xs)[0.1] / len(xs) < 0.95),
]


@pytest.mark.parametrize("spec, expected, check", W_AND_B_CASES, ids=[c[0] for c in W_AND_B_CASES])
def test_wandb_distributions(tmp_path, spec, expected, check):
    space = wandb_space(tmp_path, f"weight_decay: {spec}\n")
    dom = space.domains["weight_decay"]
    assert dom == expected
    xs = [float(x) for x in sample(dom)]
    assert check(xs)
    if not isinstance(dom, Normal):  # normals are unbounded; everything else stays in its domain
        assert all(dom.contains(x) for x in xs[:200])


def test_categorical_w_probabilities_and_beta(tmp_path):
    """W&B's schema names a weighted categorical categorical_w_probabilities: it was an unknown distribution.
    Its beta and q_beta (keys a, b) are refused in one line that says so, not as an unknown key 'a'."""
    space = wandb_space(tmp_path, "batch_size: {distribution: categorical_w_probabilities, values: [8, 16], "
                                  "probabilities: [0.25, 0.75]}\n")
    dom = space.domains["batch_size"]
    assert dom == Choice((8, 16), (0.25, 0.75), kind="weighted choice")
    assert abs(Counter(sample(dom, 20000))[8] / 20000 - 0.25) < 0.01
    with pytest.raises(SpaceError, match=r"parameters.batch_size: distribution categorical_w_probabilities needs "
                                         r"probabilities"):
        wandb_space(tmp_path, "batch_size: {distribution: categorical_w_probabilities, values: [8, 16]}\n")
    with pytest.raises(SpaceError, match=r"parameters.batch_size.probabilities: probabilities cannot be used with "
                                         r"method grid"):
        wandb_space(tmp_path, "batch_size: {distribution: categorical_w_probabilities, values: [8, 16], "
                              "probabilities: [0.5, 0.5]}\n", head="method: grid\n")
    for dist, instead in (("beta", "distribution: uniform"), ("q_beta", "distribution: q_uniform")):
        with pytest.raises(SpaceError) as err:
            wandb_space(tmp_path, f"dropout: {{distribution: {dist}, a: 2, b: 5}}\n")
        msg = str(err.value)
        assert f"parameters.dropout.distribution: W&B's {dist} distribution" in msg and "not supported" in msg
        assert instead in msg and "unknown parameter key" not in msg and "\n" not in msg


def test_a_normal_range_is_checked_two_sigmas_either_side(tmp_path):
    """A normal range is unbounded: its centre alone was checked, and trials drawn far below it failed inside
    Tune (n_layer <= 0, a negative weight decay), each retried to --max-failures. W&B's default normal
    (mu 0, sigma 1) on weight_decay reaches -2 two sigmas down: refused, naming the value."""
    with pytest.raises(SpaceError, match=r"parameters.weight_decay: mu - 2 sigma \(a normal range is unbounded\) -2.0 "
                                         r"cannot be trained: weight_decay: -2.0 is negative"):
        wandb_space(tmp_path, "weight_decay: {distribution: normal}\n")
    with pytest.raises(SpaceError, match=r"n_layer: mu - 2 sigma .* -5 cannot be trained"):
        wandb_space(tmp_path, "n_layer: {distribution: q_normal, mu: 1, sigma: 3, q: 1}\n")
    assert wandb_space(tmp_path, "n_layer: {distribution: q_normal, mu: 4, sigma: 1, q: 1}\n").domains["model.n_layer"]


def test_weighted_choices_and_log_normals_follow_the_searchs_seed(tmp_path):
    """--seed repeats a random search: these two drew from numpy's global generator, which Ray does not seed."""
    space = wandb_space(tmp_path, "  batch_size: {values: [8, 16, 32], probabilities: [0.2, 0.3, 0.5]}\n"
                                  "  weight_decay: {distribution: log_normal, mu: -3, sigma: 1}\n"
                                  "  n_layer: {distribution: q_log_normal, mu: 1, sigma: 0.5, q: 1}\n")

    def draw(global_seed):
        np.random.seed(global_seed)  # not what the search seeds
        return [list(d.to_tune().sample(None, size=50, random_state=np.random.default_rng(7)))
                for d in space.domains.values()]

    first = draw(1)
    assert first == draw(2) and len(set(first[0])) > 1 and all(isinstance(v, int) for v in first[2])


def test_constant_distribution_is_fixed(tmp_path):
    space = wandb_space(tmp_path, "seed: {distribution: constant, value: 7}\n")
    assert space.fixed == {"seed": 7} and space.domains == {}


def test_q_distributions_on_integer_fields_give_integers(tmp_path):
    space = wandb_space(tmp_path, """
        batch_size: {distribution: q_log_uniform_values, min: 8, max: 64, q: 8}
        n_embd: {distribution: q_uniform, min: 60, max: 130, q: 32}
        n_layer: {distribution: q_log_uniform_values, min: 2, max: 12}
    """)
    assert space.domains["batch_size"] == Uniform(8, 64, log=True, q=8, integer=True, kind="q_log_uniform_values")
    assert space.domains["model.n_embd"] == Uniform(64, 128, q=32, integer=True, kind="q_uniform")
    assert space.domains["model.n_layer"] == Uniform(2, 12, log=True, integer=True, kind="q_log_uniform_values")
    assert any("snapped" in n and "[64, 128]" in n for n in space.notes)
    assert set(sample(space.domains["model.n_embd"], 300)) == {64, 96, 128}
    bs = sample(space.domains["batch_size"], 500)
    assert set(bs) <= {8, 16, 24, 32, 40, 48, 56, 64} and {8, 64} <= set(bs)
    layers = sample(space.domains["model.n_layer"], 2000)
    assert min(layers) == 2 and max(layers) == 12


def _wandb_rounded(lo: float, hi: float, q: float, log: bool) -> dict[int, float]:
    """W&B's probability of each value of round(x / q) * q, x uniform (log-uniform) on [lo, hi]: its
    params.py draws q_uniform and q_log_uniform(_values) so."""
    f = math.log if log else float
    out = {}
    for k in range(round(lo / q), round(hi / q) + 1):
        a, b = max(lo, (k - 0.5) * q), min(hi, (k + 0.5) * q)
        if b > a:
            out[k * q] = (f(b) - f(a)) / (f(hi) - f(lo))
    return out


def _frequencies_match(xs: list, expected: dict, tol: float = 0.01) -> None:
    counts = Counter(int(x) for x in xs)
    assert set(counts) == set(expected), (sorted(counts), sorted(expected))
    for value, p in expected.items():
        assert abs(counts[value] / len(xs) - p) < tol, (value, counts[value] / len(xs), p)


def test_integer_q_log_uniform_rounds_as_w_and_b_does(tmp_path):
    """W&B draws round(exp(U(log min, log max)) / q) * q; Ray's integer log-uniform floors, which gave the
    low end 1.7 times W&B's share (batch size 16 of 16..256 step 16: 25 % of the trials against 15 %)."""
    from optuna.distributions import IntDistribution
    from ray.tune.search.optuna import OptunaSearch

    space = wandb_space(tmp_path, """
        batch_size: {distribution: q_log_uniform_values, min: 16, max: 256, q: 16}
        n_layer: {distribution: q_log_uniform_values, min: 2, max: 12}
        n_embd: {distribution: q_log_uniform, min: 4.1588830833596715, max: 5.545177444479562, q: 32}
    """)
    for key, (lo, hi, q) in {"batch_size": (16, 256, 16), "model.n_layer": (2, 12, 1),
                             "model.n_embd": (64, 256, 32)}.items():
        domain = pickle.loads(pickle.dumps(space.domains[key].to_tune()))  # Tune ships param_space to workers
        xs = domain.sample(None, size=20000, random_state=np.random.default_rng(0))
        _frequencies_match(list(xs), _wandb_rounded(lo, hi, q, log=True))
    converted = OptunaSearch.convert_search_space({"n_layer": space.domains["model.n_layer"].to_tune()})
    assert converted["n_layer"] == IntDistribution(2, 12, log=True)  # TPE still searches it, as before
    assert space.optuna_unsupported() == ["batch_size (q_log_uniform_values)", "model.n_embd (q_log_uniform)"]


def test_integer_q_uniform_rounds_as_w_and_b_does(tmp_path):
    """W&B draws round(U(min, max) / q) * q, so the end values get half the others' share (n_layer 2..8 step 2:
    1/6, 1/3, 1/3, 1/6); Ray's qrandint gave each a quarter. int_uniform stays uniform over min..max, as W&B's."""
    from optuna.distributions import IntDistribution
    from ray.tune.search.optuna import OptunaSearch

    space = wandb_space(tmp_path, """
        n_layer: {distribution: q_uniform, min: 2, max: 8, q: 2}
        warmup_steps: {distribution: q_uniform, min: 1, max: 4}
        batch_size: {distribution: int_uniform, min: 4, max: 7}
    """)
    for key, (lo, hi, q) in {"model.n_layer": (2, 8, 2), "warmup_steps": (1, 4, 1)}.items():
        domain = pickle.loads(pickle.dumps(space.domains[key].to_tune()))
        xs = domain.sample(None, size=20000, random_state=np.random.default_rng(0))
        _frequencies_match(list(xs), _wandb_rounded(lo, hi, q, log=False))
    _frequencies_match(sample(space.domains["batch_size"], 20000), {4: 0.25, 5: 0.25, 6: 0.25, 7: 0.25})
    converted = OptunaSearch.convert_search_space({k: d.to_tune() for k, d in space.domains.items()})
    assert converted == {"model.n_layer": IntDistribution(2, 8, step=2), "warmup_steps": IntDistribution(1, 4),
                         "batch_size": IntDistribution(4, 7)}


def test_wandb_grid_enumerates_int_and_q_uniform(tmp_path):
    space = wandb_space(tmp_path, """
        n_layer: {min: 2, max: 4}
        dropout: {distribution: q_uniform, min: 0, max: 0.3, q: 0.1}
    """, head="method: grid\n")
    assert space.domains["model.n_layer"].values == (2, 3, 4)
    assert space.domains["model.dropout"].values == (0.0, 0.1, 0.2)  # W&B: arange(min, max, q)
    assert space.grid_size() == 9


def test_wandb_grid_takes_q_uniform_as_w_and_b_does_without_snapping(tmp_path):
    """W&B's grid lists np.arange(min, max, q) from min as written: min 1 max 5 q 3 is [1, 4] and min 1 max 2 q 3
    is [1]. Both were refused, the bounds first snapped to multiples of q as for sampling."""
    space = wandb_space(tmp_path, """
        n_layer: {distribution: q_uniform, min: 1, max: 5, q: 3}
        warmup_steps: {distribution: q_uniform, min: 1, max: 2, q: 3}
        dropout: {distribution: q_uniform, min: 0.05, max: 0.3, q: 0.1}
    """, head="method: grid\n")
    assert space.domains["model.n_layer"] == Grid((1, 4), kind="grid (q_uniform)")
    assert space.domains["warmup_steps"].values == (1,)
    assert space.domains["model.dropout"].values == (0.05, 0.15, 0.25)
    assert not any("snapped" in n for n in space.notes)
    with pytest.raises(SpaceError, match=r"parameters.n_layer.q: q 1.5 must be a whole number"):
        wandb_space(tmp_path, "n_layer: {distribution: q_uniform, min: 1, max: 5, q: 1.5}\n", head="method: grid\n")


# ========================================================= keys, values, nesting


def test_nested_parameters_flatten_to_dotted_keys(tmp_path):
    space = wandb_space(tmp_path, """
        model:
          parameters:
            n_layer: {values: [2, 4]}
            n_embd: {value: 64}
        wandb:
          parameters:
            group: {value: sweep-a}
    """)
    assert space.domains == {"model.n_layer": Choice((2, 4), kind="categorical")}
    assert space.fixed == {"model.n_embd": 64, "wandb.group": "sweep-a"}


def test_a_group_that_is_no_section_names_the_field_its_leaf_means(tmp_path):
    """W&B sweeps often group parameters (optimizer: {parameters: {lr: ...}}); TrainConfig's only sections are
    model and wandb, so optimizer.lr is unknown, and the message named no field to write instead."""
    cases = [
        (P + "  optimizer:\n    parameters:\n      lr: {values: [0.001, 0.01]}\n",
         "parameters.optimizer.parameters.lr: unknown parameter 'optimizer.lr' (did you mean 'learning_rate'? "
         "TrainConfig's sections are model and wandb)"),
        (P + "  optimizer:\n    parameters:\n      weight_decai: {value: 0.1}\n",
         "unknown parameter 'optimizer.weight_decai' (did you mean 'weight_decay'?"),
        ("space: {optim: {lr: {loguniform: [1.0e-4, 1.0e-2]}}}\n",
         "space.optim.lr: unknown parameter 'optim.lr' (did you mean 'learning_rate'? TrainConfig's sections"),
    ]
    for text, expected in cases:
        with pytest.raises(SpaceError) as err:
            load_space(write(tmp_path, text))
        assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_aliases_and_switches(tmp_path):
    space = wandb_space(tmp_path, """
        lr: {values: [1e-3, 3e-3]}
        bs: {value: 16}
        n_layer: {value: 3}
        weight-decay: {value: 0.05}
        wandb_project: {value: my-proj}
        bf16: {values: [true, false]}
    """)
    assert space.domains["learning_rate"].values == (1e-3, 3e-3)
    assert space.domains["precision"].values == ("bf16", "fp32")
    assert space.fixed == {"batch_size": 16, "model.n_layer": 3, "weight_decay": 0.05, "wandb.project": "my-proj"}


def test_top_level_project_entity_and_run_cap(tmp_path):
    space = load_space(write(tmp_path, """
        name: my sweep
        description: a test
        project: proj
        entity: team
        command: [python, train.py]
        method: bayes
        metric: {name: val/bpc, goal: maximize}
        run_cap: 12
        parameters:
          lr: {distribution: log_uniform_values, min: 1e-4, max: 1e-2}
    """))
    assert (space.name, space.method, space.metric, space.mode, space.num_samples) == \
        ("my sweep", "bayes", "val/bpc", "max", 12)
    assert space.fixed == {"wandb.project": "proj", "wandb.entity": "team"}
    assert any(n.startswith("command:") for n in space.notes)
    assert space.description == "a test"


def test_w_and_b_launch_keys_are_ignored_with_a_note(tmp_path):
    """apiVersion, kind, job and image_uri are valid in W&B's schema (a sweep on W&B Launch): they were refused
    as unknown top-level keys, so such a sweep file did not run unchanged."""
    space = load_space(write(tmp_path, """
        apiVersion: v1
        kind: sweep
        job: team/proj/job-train:latest
        image_uri: registry.example.com/train:1
        method: random
        parameters: {lr: {values: [0.001, 0.01]}}
    """))
    assert space.fixed == {} and set(space.domains) == {"learning_rate"}
    for key, shown in (("apiVersion", "v1"), ("kind", "sweep"), ("job", "team/proj/job-train:latest"),
                       ("image_uri", "registry.example.com/train:1")):
        assert any(n.startswith(f"{key}: {shown} ignored") for n in space.notes), (key, space.notes)


def test_metric_aliases_and_default_goal(tmp_path):
    space = load_space(write(tmp_path, """
        method: random
        metric: {name: val_loss}
        parameters: {lr: {values: [0.001]}}
    """))
    assert (space.metric, space.mode) == ("val/loss", "min")
    assert any("val_loss" in n for n in space.notes)


def test_what_w_and_b_would_refuse_runs_with_a_note_saying_what_is_used(tmp_path):
    """W&B's schema requires method, and W&B refuses bayes or hyperband stopping without a metric; tune_gpt
    runs such a file with val/loss minimised (or --search's method), and said nothing of it."""
    params = "parameters: {lr: {values: [0.001, 0.01]}}\n"
    bare = load_space(write(tmp_path, params + "early_terminate: {type: hyperband, min_iter: 1}\n"))
    assert bare.method is None and bare.metric is None
    assert any(n.startswith("method: not set (W&B requires one)") and "--search" in n for n in bare.notes), bare.notes
    assert any(n.startswith("metric: not set, which W&B refuses with early_terminate: hyperband: val/loss")
               for n in bare.notes), bare.notes
    bayes = load_space(write(tmp_path, "method: bayes\n" + params, "bayes.yaml"))
    assert [n for n in bayes.notes if n.startswith("metric:")] == [
        "metric: not set, which W&B refuses with method: bayes: val/loss (minimize) is used "
        "(--metric and --mode choose another)"]
    assert "metric: not set" in bayes.describe()  # what --dry-run prints
    told = load_space(write(tmp_path, "method: bayes\nmetric: {name: val/loss}\n" + params, "told.yaml"))
    random = load_space(write(tmp_path, "method: random\n" + params, "random.yaml"))  # W&B runs it as it is
    assert not [n for n in told.notes + random.notes if n.startswith(("method:", "metric:"))]


def test_numbers_written_as_text(tmp_path):
    """PyYAML reads 1e-5 as a string; it must count as the number everywhere."""
    space = load_space(write(tmp_path, """
        method: random
        parameters:
          learning_rate: {distribution: log_uniform_values, min: 1e-5, max: 1e-3}
          weight_decay: {value: 1e-2}
          dropout: {distribution: q_normal, mu: 1e-1, sigma: 5e-2, q: 1e-2}
          beta2: {values: [9.9e-1, 9.5e-1]}
        early_terminate: {type: hyperband, min_iter: 2, eta: 2e0}
        run_cap: 1e1
    """))
    assert space.domains["learning_rate"] == Uniform(1e-5, 1e-3, log=True, kind="log_uniform_values")
    assert space.fixed["weight_decay"] == 0.01
    assert space.domains["model.dropout"] == Normal(0.1, 0.05, q=0.01, kind="q_normal")
    assert space.domains["beta2"].values == (0.99, 0.95)
    assert space.scheduler["reduction_factor"] == 2.0 and space.num_samples == 10


def test_native_nested_fixed_and_space_and_weighted_choice(tmp_path):
    space = load_space(write(tmp_path, """
        fixed:
          model: {n_layer: 2}
          lr: "1e-3"
        space:
          model:
            n_head: {choice: [2, 4]}
          batch_size: {randint: [4, 6]}
          dropout: {choice: [0.0, 0.1], probabilities: [0.25, 0.75]}
          n_embd: {qrandint: [64, 256, 64]}
          block_size: {lograndint: [16, 64]}
          weight_decay: {quniform: [0.0, 0.2, 0.05]}
          beta2: {normal: [0.95, 0.01]}
    """))
    assert space.fixed == {"model.n_layer": 2, "learning_rate": 1e-3}
    assert space.domains["model.n_head"] == Choice((2, 4))
    assert space.domains["batch_size"] == Uniform(4, 6, integer=True, kind="randint")
    assert set(sample(space.domains["batch_size"], 300)) == {4, 5, 6}  # randint's high is included
    assert set(sample(space.domains["model.n_embd"], 300)) == {64, 128, 192, 256}
    blocks = sample(space.domains["model.block_size"], 3000)
    assert min(blocks) == 16 and max(blocks) == 64
    assert space.domains["model.dropout"].probabilities == (0.25, 0.75)
    base = space.baseline()
    assert base["model.dropout"] == 0.0  # tiny's dropout lies in the choice: kept
    assert base["model.n_head"] == 4 and base["batch_size"] == 5  # tiny's 4 kept; default 12 outside: middle


# ====================================================== early_terminate -> ASHA


def _asha_rungs(scheduler: dict, max_t: int | None = None) -> list[int]:
    from ray.tune.schedulers import ASHAScheduler

    params = {k: v for k, v in scheduler.items() if k != "type"}
    params.setdefault("max_t", max_t)
    asha = ASHAScheduler(metric="val/loss", mode="min", **params)
    assert len(asha._brackets) == 1
    return sorted(milestone for milestone, _ in asha._brackets[0]._rungs)


def test_hyperband_min_iter_maps_to_asha(tmp_path):
    space = load_space(write(tmp_path, """
        method: bayes
        metric: {name: val/loss, goal: minimize}
        early_terminate: {type: hyperband, min_iter: 3}
        parameters: {lr: {min: 0.0001, max: 0.01}}
    """))
    assert space.scheduler == {"type": "asha", "grace_period": 3, "reduction_factor": 3, "brackets": 1}
    # W&B brackets at 3 * 3^k: ASHA's rungs are the same points up to max_t
    assert _asha_rungs(space.scheduler, max_t=81) == [3, 9, 27, 81]


def test_hyperband_as_w_and_b_reads_it_s_with_min_iter_and_both_iters(tmp_path):
    """W&B's schema accepts s beside min_iter (its code then ignores s), and max_iter wins when both are given:
    such files were refused, so a sweep file that runs on W&B did not run unchanged."""
    head = "method: random\nparameters: {lr: {min: 0.0001, max: 0.01}}\n"
    space = load_space(write(tmp_path, head + "early_terminate: {type: hyperband, min_iter: 1, eta: 2, s: 3}\n"))
    assert space.scheduler == {"type": "asha", "grace_period": 1, "reduction_factor": 2, "brackets": 1}
    assert any("early_terminate.s ignored" in n for n in space.notes)
    both = load_space(write(tmp_path, head + "early_terminate: {type: hyperband, min_iter: 1, max_iter: 27, s: 2, "
                                             "eta: 3}\n", "both.yaml"))
    assert both.scheduler["grace_period"] == 3 and both.scheduler["max_t"] == 10  # max_iter's brackets: 3, 9
    assert any("early_terminate.min_iter ignored" in n for n in both.notes)


def test_hyperband_min_iter_with_a_fractional_eta_judges_at_w_and_b_s_whole_brackets(tmp_path):
    """W&B's brackets from min_iter are int(min_iter * eta^k) (hyperband_stopping.py): min_iter 1, eta 2.5 gives
    1, 2, 6, 15. ASHA's rungs were 1, 2.5, 6.25, 15.6, so it judged a trial at its reports 1, 3, 7 and 16."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from tune_gpt.search import _scheduler

    space = load_space(write(tmp_path, """
        method: random
        metric: {name: val/loss, goal: minimize}
        early_terminate: {type: hyperband, min_iter: 1, eta: 2.5}
        parameters: {lr: {min: 0.0001, max: 0.01}}
    """))
    assert any("rungs at W&B's brackets int(min_iter * eta^k): 1, 2, 6, 15, 39, ..." in n for n in space.notes)
    plan = SimpleNamespace(scheduler={**space.scheduler, "pause": False}, max_evals=20, metric="val/loss", mode="min")
    asha = _scheduler(plan)  # Ray's form (--stop-at-rungs)
    asha.set_search_properties("val/loss", "min")
    trial = Trial("__fake", stub=True)
    asha.on_trial_add(None, trial)
    for it in range(1, 20):  # the loss is the report's number, so each rung records where it judged the trial
        assert asha.on_trial_result(None, trial, {"training_iteration": it, "val/loss": float(it)}) == \
            TrialScheduler.CONTINUE
    assert sorted(-v for _, recorded in asha._brackets[0]._rungs for v in recorded.values()) == [1, 2, 6, 15]
    assert _scheduler(SimpleNamespace(**{**vars(plan), "scheduler": space.scheduler | {"pause": True}})).rungs == \
        [1, 2, 6, 15]  # the promotion form (the default) pauses at the same reports
    whole = load_space(write(tmp_path, "method: random\nparameters: {lr: {min: 0.0001, max: 0.01}}\n"
                                       "early_terminate: {type: hyperband, min_iter: 2, eta: 3}\n", "whole.yaml"))
    assert "whole_rungs" not in whole.scheduler  # min_iter * eta^k is whole already: Ray's rungs are W&B's


@pytest.mark.parametrize("max_iter, s, eta, bands", [(27, 2, 3, [3, 9]), (81, 3, 3, [3, 9, 27]), (16, 2, 2, [4, 8]),
                                                      (50, 3, 3, [1, 5, 16]), (20, 2, 2.5, [3, 8])])
def test_hyperband_max_iter_maps_to_asha(tmp_path, max_iter, s, eta, bands):
    space = load_space(write(tmp_path, f"""
        method: random
        early_terminate: {{type: hyperband, max_iter: {max_iter}, s: {s}, eta: {eta}}}
        parameters: {{lr: {{min: 0.0001, max: 0.01}}}}
    """))
    # max_iter a multiple of eta^s: Ray's rungs are W&B's brackets; else (50 / 3^k: 16, 5, 1 where Ray's would be
    # 1, 3, 9) ASHA is given W&B's brackets
    exact = max_iter % eta ** s == 0
    assert space.scheduler == {"type": "asha", "grace_period": bands[0], "max_t": bands[-1] + 1,
                               "reduction_factor": eta, "brackets": 1, "stop_last_trials": False,
                               **({} if exact else {"rungs": bands})}
    if exact:
        assert _asha_rungs(space.scheduler) == bands  # the decisions happen where W&B's did, and only there
    # max_iter places W&B's brackets and stops no run: past the last rung a trial goes on to its end
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from tune_gpt.search import _scheduler

    plan = SimpleNamespace(scheduler=space.scheduler, max_evals=5 * max_iter)
    asha = _scheduler(plan)
    asha.set_search_properties("val/loss", "min")
    trial = Trial("__fake", stub=True)
    asha.on_trial_add(None, trial)
    for it in range(1, 5 * max_iter):  # always the best so far: never cut at a rung
        action = asha.on_trial_result(None, trial, {"training_iteration": it, "val/loss": 10.0 / it})
        assert action == TrialScheduler.CONTINUE, (it, action)
    # each rung records the trial at the report it judges it (Ray's form, --stop-at-rungs; the promotion form,
    # the default, pauses at the same ones)
    assert sorted(it for _, recorded in asha._brackets[0]._rungs for it in
                  [round(-10.0 / v) for v in recorded.values()]) == bands  # (stored negated for min)
    promoting = _scheduler(SimpleNamespace(scheduler={**space.scheduler, "pause": True}, max_evals=5 * max_iter,
                                           metric="val/loss", mode="min"))
    assert promoting.rungs == bands


# ============================================================ Ray / Optuna mapping


def _many_domains(tmp_path) -> SearchSpace:
    return load_space(write(tmp_path, """
        method: random
        parameters:
          learning_rate: {distribution: log_uniform_values, min: 1e-4, max: 1e-2}
          min_lr: {distribution: uniform, min: 1e-5, max: 1e-4}
          batch_size: {values: [8, 16]}
          n_layer: {min: 2, max: 6}
          n_embd: {distribution: q_log_uniform_values, min: 64, max: 256, q: 64}
          dropout: {distribution: normal, mu: 0.1, sigma: 0.05}
          weight_decay: {values: [0.0, 0.1], probabilities: [0.5, 0.5]}
          beta2: {distribution: log_normal, mu: -0.05, sigma: 0.01}
          grad_clip: {distribution: q_uniform, min: 0.5, max: 2, q: 0.5}
          warmup_steps: {distribution: q_log_uniform_values, min: 10, max: 100}
    """))


def test_to_tune_returns_ray_domains(tmp_path):
    from ray.tune.search.sample import Categorical, Float, Integer

    tune_space = _many_domains(tmp_path).to_tune()
    expected = {  # a weighted choice and a log-normal too, so that they draw from the search's seeded generator
        "learning_rate": Float, "min_lr": Float, "batch_size": Categorical, "model.n_layer": Integer,
        "model.n_embd": Integer, "model.dropout": Float, "weight_decay": Categorical, "beta2": Float,
        "grad_clip": Float, "warmup_steps": Integer,
    }
    for key, cls in expected.items():
        assert type(tune_space[key]) is cls, key
    assert tune_space["model.n_layer"].lower == 2 and tune_space["model.n_layer"].upper == 7  # Ray excludes upper
    pickle.loads(pickle.dumps(tune_space))  # Tune ships param_space to workers


def test_baseline_lies_inside_every_domain(tmp_path):
    space = _many_domains(tmp_path)
    base = space.baseline()
    assert set(base) == set(space.domains)
    for key, dom in space.domains.items():
        assert dom.contains(base[key]), (key, base[key])
    assert base["learning_rate"] == 1e-3  # TrainConfig's default lies inside: kept
    assert base["batch_size"] == 8  # default 12 is not a choice: the first one
    assert math.isclose(base["min_lr"], 5.5e-5)  # default None: the middle
    assert base["model.n_layer"] == 4  # tiny's 4 is inside
    assert base["model.n_embd"] == 128 and base["warmup_steps"] == 32
    TrainConfig.from_flat({**space.fixed, **base})


def test_baseline_centres():
    assert Uniform(1e-4, 1e-2, log=True).center() == pytest.approx(1e-3)
    assert Uniform(2, 9, integer=True).center() in (5, 6)
    assert Normal(-3.0, 1.0, log=True).center() == pytest.approx(math.exp(-3))
    assert Normal(0.3, 1.0, q=0.25).center() == 0.25
    assert Choice(("a", "b"), (0.2, 0.8)).center() == "b"
    assert Grid((3, 1)).center() == 3


def test_optuna_unsupported_matches_optuna(tmp_path):
    from ray.tune.search.optuna import OptunaSearch

    space = _many_domains(tmp_path)
    unsupported = space.optuna_unsupported()
    assert unsupported == ["model.n_embd (q_log_uniform_values)", "model.dropout (normal)",
                           "weight_decay (weighted choice)", "beta2 (log_normal)"]
    bad = {u.split(" ")[0] for u in unsupported}
    tune_space = space.to_tune()
    converted = OptunaSearch.convert_search_space({k: v for k, v in tune_space.items() if k not in bad})
    assert set(converted) == set(space.domains) - bad
    assert converted["model.n_layer"].high == 6  # inclusive max survives the conversion
    for key in ("model.n_embd", "model.dropout"):
        with pytest.raises(ValueError):
            OptunaSearch.convert_search_space({key: tune_space[key]})


def test_describe_mentions_everything(tmp_path):
    space = _many_domains(tmp_path)
    text = load_space(SPACES / "seed_sweep.yaml").describe()
    assert "9 grid points" in text and "wandb.project" in text and "train_single_gpu.py" in text
    assert "not searchable by Optuna" not in space.describe()  # method random: Optuna is not used
    space.method = "bayes"
    text = space.describe()
    assert "not searchable by Optuna: model.n_embd" in text
    assert all(key in text for key in space.domains)


def test_parse_space_from_a_mapping():
    space = parse_space({"space": {"lr": {"loguniform": ["1e-4", "1e-2"]}}}, "inline")
    assert space.name == "inline" and space.domains["learning_rate"].low == 1e-4
    with pytest.raises(SpaceError, match=r"^inline: space\.lr\.loguniform: a log range needs bounds > 0"):
        parse_space({"space": {"lr": {"loguniform": [0, 1]}}}, "inline")


# ======================================================================= errors

P = "method: random\nparameters:\n"  # W&B head
ERRORS = [
    # id, file text, fragments the one-line message must contain
    ("yaml-syntax", "parameters:\n  lr: [1, 2\n  bs: 3\n", ["line 3", "YAML syntax error"]),
    ("yaml-python-tag", "!!python/object/apply:os.system ['echo hacked']\n",
     ["line 1", "!!python/object/apply:os.system", "not allowed"]),
    ("yaml-python-tag-nested", P + "  lr: {value: !!python/object/apply:os.system ['echo x']}\n",
     ["line 3", "!!python/object/apply:os.system"]),
    ("yaml-duplicate-key", P + "  lr: {value: 0.1}\n  lr: {value: 0.2}\n", ["line 4", "duplicate key 'lr'"]),
    ("native-key-in-wandb", P + "  lr: {value: 0.1}\nnum_samples: 4\n", ["num_samples:", "run_cap"]),
    ("wandb-key-in-native", "run_cap: 4\nspace: {lr: {choice: [0.1]}}\n", ["run_cap:", "num_samples"]),
    ("top-level-list", "- a\n- b\n", ["top level must be a mapping", "a list"]),
    ("top-level-scalar", "hello\n", ["top level must be a mapping"]),
    ("empty-file", "", ["empty file"]),
    ("only-comments", "# nothing here\n", ["empty file"]),
    ("unknown-top-wandb", P + "  lr: {value: 0.1}\nmetrc: {name: val/loss}\n", ["metrc:", "'metric'"]),
    ("unknown-top-native", "spaces: {lr: {choice: [0.1]}}\n", ["spaces:", "'space'"]),
    # a misspelt space: leaves method: random, which makes it a W&B file: the message says so
    ("misspelt-space-reads-as-wandb", "method: random\nsapce: {lr: {loguniform: [1e-4, 1e-2]}}\n",
     ["sapce:", "did you mean 'space'?", "neither space: nor parameters: is read as a W&B sweep"]),
    ("native-empty-domain", "space: {lr: {}}\n", ["space.lr:", "empty domain", "loguniform"]),
    ("top-level-training-key", "learning_rate: 0.1\nspace: {bs: {choice: [8]}}\n",
     ["learning_rate:", "fixed: or space:"]),
    ("unknown-parameter", P + "  learnin_rate: {value: 0.1}\n", ["parameters.learnin_rate:", "'learning_rate'"]),
    ("unknown-nested-parameter", P + "  model:\n    parameters:\n      n_layers: {value: 2}\n",
     ["parameters.model.parameters.n_layers:", "model.n_layer"]),
    ("unknown-distribution", P + "  lr: {distribution: log_unifrom, min: 0, max: 1}\n",
     ["parameters.lr.distribution:", "'log_uniform'"]),
    ("min-gt-max", P + "  learning_rate: {min: 0.1, max: 0.01}\n", ["parameters.learning_rate:", "min 0.1 > max 0.01"]),
    ("min-eq-max", P + "  lr: {distribution: uniform, min: 0.1, max: 0.1}\n", ["parameters.lr:", "min 0.1 == max 0.1"]),
    ("native-low-gt-high", "space: {lr: {uniform: [0.1, 0.01]}}\n", ["space.lr.uniform:", "low 0.1 > high 0.01"]),
    ("log-values-zero", P + "  lr: {distribution: log_uniform_values, min: 0, max: 0.1}\n",
     ["parameters.lr:", "bounds > 0"]),
    ("log-values-negative", P + "  lr: {distribution: inv_log_uniform_values, min: -1, max: 0.1}\n",
     ["parameters.lr:", "bounds > 0"]),
    ("native-loguniform-zero", "space: {lr: {loguniform: [0, 0.1]}}\n", ["space.lr.loguniform:", "bounds > 0"]),
    ("empty-values", P + "  bs: {values: []}\n", ["parameters.bs.values:", "empty"]),
    ("values-not-list", P + "  bs: {values: 8}\n", ["parameters.bs.values:", "expected a list"]),
    ("values-mapping", P + "  bs: {values: {a: 8}}\n", ["parameters.bs.values:", "expected a list"]),
    ("native-choice-empty", "space: {bs: {choice: []}}\n", ["space.bs.choice:", "empty"]),
    ("string-for-number", P + "  lr: {min: abc, max: 0.1}\n", ["parameters.lr.min:", "expected a number"]),
    ("mapping-for-value", P + "  lr: {value: {a: 1}}\n", ["parameters.lr.value:", "single value"]),
    ("list-inside-values", P + "  bs: {values: [[8, 16]]}\n", ["parameters.bs.values[0]:", "single value"]),
    ("text-in-int-values", P + "  bs: {values: [8, big]}\n", ["parameters.bs.values[1]:", "expected an integer"]),
    ("spec-not-mapping", P + "  bs: 8\n", ["parameters.bs:", "parameter spec"]),
    ("prob-length", P + "  bs: {values: [8, 16], probabilities: [1.0]}\n",
     ["parameters.bs.probabilities:", "1 probabilities for 2 values"]),
    ("prob-sum", P + "  bs: {values: [8, 16], probabilities: [0.5, 0.6]}\n",
     ["parameters.bs.probabilities:", "sum to 1.1"]),
    ("prob-negative", P + "  bs: {values: [8, 16], probabilities: [1.5, -0.5]}\n",
     ["parameters.bs.probabilities[1]:", "negative"]),
    ("q-zero", P + "  lr: {distribution: q_uniform, min: 0, max: 1, q: 0}\n", ["parameters.lr.q:", "q must be > 0"]),
    ("q-negative", "space: {dropout: {quniform: [0, 0.5, -0.1]}}\n", ["space.dropout.quniform[2]:", "q must be > 0"]),
    ("sigma-zero", P + "  dropout: {distribution: normal, mu: 0.1, sigma: 0}\n",
     ["parameters.dropout.sigma:", "sigma must be > 0"]),
    ("sigma-negative-native", "space: {dropout: {normal: [0.1, -1]}}\n", ["space.dropout.normal[1]:", "sigma"]),
    ("unknown-method-wandb", "method: bayesian\nparameters: {lr: {value: 0.1}}\n", ["method:", "'bayes'"]),
    ("unknown-method-native", "method: optuner\nspace: {lr: {choice: [0.1]}}\n", ["method:", "'optuna'"]),
    ("unknown-goal", P + "  lr: {value: 0.1}\nmetric: {name: val/loss, goal: minimise}\n",
     ["metric.goal:", "'minimize'"]),
    ("unknown-metric", P + "  lr: {value: 0.1}\nmetric: {name: accuracy}\n", ["metric.name:", "not a metric"]),
    ("unknown-scheduler", "scheduler: {type: hyperbnd}\nspace: {lr: {choice: [0.1]}}\n",
     ["scheduler.type:", "unknown scheduler type"]),
    ("unknown-scheduler-key", "scheduler: {type: asha, grace: 2}\nspace: {lr: {choice: [0.1]}}\n",
     ["scheduler.grace:", "'grace_period'"]),
    ("run-cap-zero", P + "  lr: {value: 0.1}\nrun_cap: 0\n", ["run_cap:", "positive whole number"]),
    ("run-cap-text", P + "  lr: {value: 0.1}\nrun_cap: many\n", ["run_cap:", "expected a number"]),
    ("num-samples-negative", "num_samples: -1\nspace: {lr: {choice: [0.1]}}\n",
     ["num_samples:", "positive whole number"]),
    ("num-samples-fraction", "num_samples: 2.5\nspace: {lr: {choice: [0.1]}}\n", ["num_samples:", "whole number"]),
    ("spec-without-keys", P + "  lr: {}\n", ["parameters.lr:", "needs one of value, values"]),
    ("spec-unknown-key", P + "  lr: {valu: 0.1}\n", ["parameters.lr.valu:", "'value'"]),
    ("spec-only-min", P + "  lr: {min: 0.1}\n", ["parameters.lr:", "both min and max"]),
    ("spec-key-not-for-distribution", P + "  lr: {distribution: uniform, min: 0, max: 1, mu: 3}\n",
     ["parameters.lr.mu:", "not used by distribution uniform"]),
    ("fixed-and-searched-wandb", P + "  lr: {value: 0.1}\n  learning_rate: {values: [0.1, 0.2]}\n",
     ["parameters.learning_rate:", "both fixed (parameters.lr) and searched"]),
    ("fixed-and-searched-native", "fixed: {lr: 0.1}\nspace: {learning_rate: {choice: [0.1, 0.2]}}\n",
     ["space.learning_rate:", "both fixed (fixed.lr) and searched"]),
    ("fixed-twice", P + "  lr: {value: 0.1}\n  learning_rate: {value: 0.2}\n",
     ["parameters.learning_rate:", "given twice"]),
    ("project-twice", P + "  wandb_project: {value: a}\nproject: b\n", ["project:", "wandb.project", "given twice"]),
    ("grid-continuous", "method: grid\nparameters:\n  lr: {distribution: log_uniform_values, min: 1e-4, max: 1e-2}\n",
     ["parameters.lr:", "method grid cannot enumerate the continuous distribution log_uniform_values"]),
    ("grid-probabilities", "method: grid\nparameters:\n  bs: {values: [8, 16], probabilities: [0.5, 0.5]}\n",
     ["parameters.bs.probabilities:", "method grid"]),
    ("native-grid-with-choice", "method: grid\nspace: {bs: {choice: [8, 16]}}\n", ["space.bs:", "method grid"]),
    ("native-optuna-with-grid", "method: optuna\nspace: {bs: {grid: [8, 16]}}\n", ["space.bs:", "cannot search a grid"]),
    ("bool-field-text", P + "  use_chinese: {value: maybe}\n", ["parameters.use_chinese.value:", "true or false"]),
    ("bool-field-number", P + "  use_chinese: {values: [true, 2]}\n",
     ["parameters.use_chinese.values[1]:", "true or false"]),
    ("bool-field-range", P + "  use_chinese: {min: 0, max: 1}\n", ["parameters.use_chinese:", "numeric parameter"]),
    ("text-field-range", "space: {model_size: {uniform: [0, 1]}}\n", ["space.model_size.uniform:", "numeric"]),
    ("int-field-uniform", P + "  batch_size: {distribution: uniform, min: 8, max: 64}\n",
     ["parameters.batch_size:", "whole numbers", "int_uniform"]),
    ("int-field-float-bounds", P + "  batch_size: {min: 8.5, max: 64}\n",
     ["parameters.batch_size:", "min 8.5 / max 64 are not both whole numbers"]),
    ("native-int-field-loguniform", "space: {n_embd: {loguniform: [64, 256]}}\n",
     ["space.n_embd.loguniform:", "lograndint"]),
    ("invalid-train-config", P + "  n_head: {value: 3}\n  lr: {values: [0.1, 0.2]}\n",
     ["model.n_embd: 128 is not divisible by model.n_head=3", "baseline"]),
    ("invalid-fixed-value", "fixed: {batch_size: 0}\n", ["batch_size: must be positive"]),
    # W&B samples exp(-x): these bounds give 0.905..0.990, and the values 0.01..0.1 need exponents 2.3..4.6
    ("inv-log-uniform-values-as-exponents", P + "  weight_decay: {distribution: inv_log_uniform, min: 0.01, max: 0.1}\n",
     ["between 0.904837 and 0.99005", "exponents (min 2.30259, max 4.60517)"]),
    ("et-unknown-type", P + "  lr: {value: 0.1}\nearly_terminate: {type: envelope}\n",
     ["early_terminate.type:", "only hyperband"]),
    ("et-max-iter-without-s", P + "  lr: {value: 0.1}\nearly_terminate: {type: hyperband, max_iter: 27}\n",
     ["early_terminate:", "needs s"]),
    ("et-eta-one", P + "  lr: {value: 0.1}\nearly_terminate: {type: hyperband, min_iter: 1, eta: 1}\n",
     ["early_terminate.eta:", "> 1"]),
    ("et-unknown-key", P + "  lr: {value: 0.1}\nearly_terminate: {type: hyperband, min_iters: 1}\n",
     ["early_terminate.min_iters:", "'min_iter'"]),
    ("searched-runtime-key", P + "  device: {values: [cpu, cuda]}\n", ["parameters.device:", "not searched"]),
    ("native-unknown-domain", "space: {lr: {logunifrom: [1e-4, 1e-2]}}\n", ["space.lr.logunifrom:", "'loguniform'"]),
    ("native-wrong-arity", "space: {lr: {uniform: [0.1]}}\n", ["space.lr.uniform:", "takes [low, high], got [0.1]"]),
    ("native-scalar-in-space", "space: {lr: 0.1}\n", ["space.lr:", "fixed:"]),
    ("native-two-domains", "space: {lr: {uniform: [0.1, 0.2], choice: [0.1]}}\n", ["space.lr:", "exactly one domain"]),
    ("q-no-multiple", "space: {n_embd: {qrandint: [65, 70, 32]}}\n", ["space.n_embd.qrandint:", "no multiple of q"]),
    ("duplicate-values", P + "  bs: {values: [8, 16, 8]}\n", ["parameters.bs.values[2]:", "listed twice"]),
    ("log-uniform-overflow", P + "  lr: {distribution: log_uniform, min: 1, max: 1000}\n",
     ["parameters.lr.max:", "too large"]),
    ("no-parameters", "method: random\n", ["parameters:", "needs parameters"]),
]


@pytest.mark.parametrize("text, fragments", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_errors_name_file_and_key(tmp_path, text, fragments):
    path = write(tmp_path, text, "bad.yaml")
    with pytest.raises(SpaceError) as info:
        load_space(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: "), msg
    assert "\n" not in msg and "Traceback" not in msg, msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)


def test_the_read_as_wandb_hint_is_only_given_where_method_alone_made_it_wandb(tmp_path):
    """With parameters: the file is a W&B sweep whatever its other keys: a misspelt native key is unknown there."""
    with pytest.raises(SpaceError) as info:
        load_space(write(tmp_path, P + "  lr: {value: 0.1}\nschedular: {type: asha}\n"))
    msg = str(info.value)
    assert "unknown top-level key 'schedular' in a W&B sweep file" in msg and "read as a W&B sweep" not in msg


def test_python_tag_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = write(tmp_path, f"!!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(SpaceError):
        load_space(path)
    assert not marker.exists()


@pytest.mark.parametrize("make, fragment", [
    (lambda p: p / "missing.yaml", "no such file"),
    (lambda p: p, "is a directory"),
    (lambda p: (p / "bin.yaml").write_bytes(b"\xff\xfe\x00bad") and p / "bin.yaml", "cannot read"),
])
def test_file_errors(tmp_path, make, fragment):
    path = make(tmp_path)
    with pytest.raises(SpaceError) as info:
        load_space(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: ") and fragment in msg and "\n" not in msg


@pytest.mark.parametrize("space, points", [
    ({"lr": {"choice": [1e-3, 1e-2]}, "bs": {"choice": [8, 16, 32]}}, 6),
    ({"n_layer": {"randint": [2, 8]}}, 7),  # both bounds included
    ({"dropout": {"quniform": [0.0, 0.2, 0.05]}, "bs": {"grid": [8, 16]}}, 10),
    ({"lr": {"choice": [1e-3]}, "dropout": {"uniform": [0.0, 0.2]}}, None),  # continuous: no count
    ({"lr": {"normal": [1e-3, 1e-4]}}, None),
    ({"n_layer": {"lograndint": [2, 6]}}, 5),  # a log-scaled integer range is still finite
])
def test_distinct_points_counts_discrete_spaces_only(space, points):
    assert parse_space({"space": space}, "inline").distinct_points() == points
    assert parse_space({"fixed": {"lr": 1e-3}}, "inline").distinct_points() is None  # searches nothing


@pytest.mark.parametrize("dist", ["log_uniform", "q_log_uniform", "inv_log_uniform"])
def test_exponent_distributions_given_values_are_refused_with_what_was_meant(tmp_path, dist):
    """W&B's log_uniform takes natural-log exponents: min 1e-5, max 1e-2 sample ~1.0 (W&B runs it, with a
    "Malformed sweep config" warning). Such bounds are values written for log_uniform_values: refused."""
    path = write(tmp_path, f"""
        method: random
        metric: {{name: val/loss, goal: minimize}}
        parameters: {{learning_rate: {{distribution: {dist}, min: 0.00001, max: 0.01}}}}
    """)
    with pytest.raises(SpaceError) as err:
        load_space(path)
    msg = str(err.value)
    assert "parameters.learning_rate.distribution" in msg and f"write {dist}_values" in msg and "\n" not in msg
    inv = dist.startswith("inv_")  # W&B samples exp(-x) for it: the exponents change sign and order
    assert ("min 4.60517, max 11.5129" if inv else "min -11.5129, max -4.60517") in msg  # those that mean the values
    lo, hi = (4.6, 11.5) if inv else (-11.5, -4.6)
    ok = load_space(write(tmp_path, f"""
        method: random
        metric: {{name: val/loss, goal: minimize}}
        parameters: {{learning_rate: {{distribution: {dist}, min: {lo}, max: {hi}{", q: 0.00001" if dist.startswith("q_") else ""}}}}}
    """))
    assert any("natural-log exponents" in n for n in ok.notes)


def test_quantized_bounds_snap_to_a_range_that_can_be_sampled(tmp_path):
    """A log range whose low end lay within rounding of 0 snapped to 0, which Ray refused with a traceback
    when the search started; a range that holds one multiple of q was searched as a range of one value."""
    space = load_space(write(tmp_path, "space:\n  weight_decay: {qloguniform: [1.0e-12, 0.1, 0.01]}\n"))
    assert space.domains["weight_decay"].low == 0.01  # the first multiple of q above 0
    with pytest.raises(SpaceError, match=r"dropout.quniform: only one multiple of q 0.1 lies between 0.1 and 0.15: "
                                         r"0.1; fix the value instead of searching it"):
        load_space(write(tmp_path, "space:\n  dropout: {quniform: [0.1, 0.15, 0.1]}\n"))
    with pytest.raises(SpaceError, match=r"no multiple of q 0.5 lies between 0.1 and 0.4 above 0"):
        load_space(write(tmp_path, "space:\n  weight_decay: {qloguniform: [0.1, 0.4, 0.5]}\n"))
