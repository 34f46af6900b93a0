"""Shared fixtures: offline W&B, a small corpus made here, tiny configs."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TUNE_GPT_CACHE", str(Path(os.environ.get("PYTEST_CACHE_ROOT", "/tmp")) / "tune_gpt_test_cache"))

REPO = Path(__file__).resolve().parents[1]
WORDS = (
    "the quick brown fox jumps over a lazy dog while seven wizards quietly hex "
    "a jovial king and the river runs to the sea under pale stars"
).split()


def make_text(n_chars: int = 60_000, seed: int = 0) -> str:
    """Pseudo-English with structure a tiny model can learn within a few dozen steps."""
    rng = random.Random(seed)
    out, size = [], 0
    while size < n_chars:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + ".\n"
        out.append(line)
        size += len(line)
    return "".join(out)[:n_chars]


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("corpus") / "words.txt"
    p.write_text(make_text(), encoding="utf-8")
    return p


def tiny_flat(**overrides) -> dict:
    """A config small enough that a run takes about a second on one core."""
    flat = {
        "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 32, "model.block_size": 32,
        "batch_size": 8, "max_steps": 40, "eval_interval": 10, "eval_iters": 2, "log_interval": 5,
        "learning_rate": 3e-3, "sample_tokens": 40, "progress": False, "num_threads": 1,
    }
    flat.update(overrides)
    return flat


@pytest.fixture
def tiny_cfg(corpus_file, tmp_path):
    from tune_gpt.config import TrainConfig

    def make(**overrides):
        overrides.setdefault("output_dir", str(tmp_path / "out"))
        return TrainConfig.from_flat(tiny_flat(data=str(corpus_file), **overrides))

    return make


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session: 2 CPUs, and 1 *logical* GPU so that
    fractional-GPU trials can be scheduled on a CPU-only machine."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False,
                 configure_logging=True, logging_level="ERROR")
    yield ray
    ray.shutdown()


def write_space(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


# The smallest GPT that still learns the test corpus: a line of every test search space.
TINY_MODEL = """\
  model.n_layer: 1
  model.n_head: 2
  model.n_embd: 16
  model.block_size: 16
"""

TINY_SPACE = """
name: tiny
method: optuna
num_samples: {n}
scheduler: {{type: asha, grace_period: 1, reduction_factor: 2}}
fixed:
""" + TINY_MODEL + """\
  max_steps: {steps}
  eval_interval: {every}
  eval_iters: 2
  sample_tokens: 20
space:
  learning_rate: {{loguniform: [1.0e-3, 2.0e-2]}}
  batch_size: {{choice: [4, 8]}}
"""


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (connections are refused at once)."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def tiny_space(tmp_path: Path, n: int = 4, steps: int = 20, every: int = 5) -> Path:
    return write_space(tmp_path / "tiny.yaml", TINY_SPACE.format(n=n, steps=steps, every=every))


@pytest.fixture(scope="session")
def finished_search(ray_session, tmp_path_factory, corpus_file):
    """A finished 4-trial CPU search (Optuna + ASHA, W&B offline), shared by the search/replay tests."""
    from tune_gpt.search import SearchOptions, run_search

    tmp = tmp_path_factory.mktemp("search")
    return run_search(SearchOptions(space=str(tiny_space(tmp, n=4)), storage_path=str(tmp / "results"),
                                    overrides={"data": str(corpus_file)}, verbose=0))
