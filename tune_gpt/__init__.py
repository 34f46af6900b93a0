"""tune_gpt: hyperparameter search for GPT language models on Ray Tune and Optuna.

Importing the package is cheap: torch, ray, wandb and tensorboard load only when
the function that needs them runs.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["TrainConfig", "ModelConfig", "train", "TrainResult", "load_corpus", "__version__"]

_LAZY = {
    "TrainConfig": "tune_gpt.config",
    "ModelConfig": "tune_gpt.config",
    "train": "tune_gpt.train",
    "TrainResult": "tune_gpt.train",
    "load_corpus": "tune_gpt.data",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tune_gpt' has no attribute {name!r}")
