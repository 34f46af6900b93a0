from __future__ import annotations

import pytest

from tune_gpt.config import MODEL_PRESETS, TrainConfig
from tune_gpt.errors import ConfigError


def test_presets_fill_model_fields_and_overrides_win():
    cfg = TrainConfig.from_flat({"model_size": "small", "n_layer": 8})
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.block_size) == (8, 6, 384, 256)
    medium = TrainConfig(model_size="medium")
    assert (medium.model.n_layer, medium.model.n_embd, medium.model.block_size) == (12, 768, 1024)
    assert set(MODEL_PRESETS) >= {"tiny", "small", "medium"}


def test_defaults_are_nanogpt_cpu_recipe():
    cfg = TrainConfig()
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.block_size) == (4, 4, 128, 64)
    assert (cfg.batch_size, cfg.learning_rate, cfg.beta2, cfg.weight_decay, cfg.model.dropout) == (12, 1e-3, 0.99, 0.1, 0.0)
    assert cfg.total_steps(1_000_000) == 2000 and cfg.warmup_for(2000) == 100 and cfg.final_min_lr == pytest.approx(1e-4)


def test_aliases_strings_and_switches_are_converted():
    cfg = TrainConfig.from_flat({"lr": "1e-5", "bs": "16", "bf16": True, "wandb_project": "p", "use_chinese": "true"})
    assert cfg.learning_rate == 1e-5 and cfg.batch_size == 16 and cfg.precision == "bf16"
    assert cfg.wandb.project == "p" and cfg.use_chinese is True


def test_flat_round_trip():
    cfg = TrainConfig.from_flat({"model_size": "small", "dropout": 0.1, "epochs": 2, "wandb_entity": "me"})
    assert TrainConfig.from_flat(cfg.to_flat()) == cfg


def test_changing_preset_on_a_base_drops_the_old_shape():
    base = TrainConfig(model_size="tiny")
    cfg = TrainConfig.from_flat({"model_size": "small"}, base=base)
    assert cfg.model.n_embd == 384


def test_unknown_key_names_the_closest():
    with pytest.raises(ConfigError, match=r"'lerning_rate'.*'learning_rate'"):
        TrainConfig.from_flat({"lerning_rate": 1e-3})


@pytest.mark.parametrize(
    "flat, key",
    [
        ({"learning_rate": -1e-3}, "learning_rate"),
        ({"batch_size": 0}, "batch_size"),
        ({"model_size": "huge"}, "model_size"),
        ({"n_embd": 130, "n_head": 4}, "n_embd"),
        ({"dropout": 1.5}, "dropout"),
        ({"batch_size": "many"}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"precision": "fp8"}, "precision"),
        ({"matmul_precision": "low"}, "matmul_precision"),
        ({"epochs": 0}, "epochs"),
        ({"use_chinese": "maybe"}, "use_chinese"),
        ({"learning_rate": "nan"}, "learning_rate"),
        ({"device": "tpu"}, "device"),
        ({"min_lr": 1.0}, "min_lr"),
    ],
)
def test_invalid_values_name_the_key(flat, key):
    with pytest.raises(ConfigError, match=key):
        TrainConfig.from_flat(flat)


def test_budget_first_reached_wins():
    cfg = TrainConfig.from_flat({"epochs": 1, "max_steps": 10_000})
    assert cfg.total_steps(768 * 50) == 50
    cfg = TrainConfig.from_flat({"max_tokens": 768 * 7})
    assert cfg.total_steps(10**9) == 7
    cfg = TrainConfig.from_flat({"epochs": 0.5, "batch_size": 10, "gradient_accumulation_steps": 2, "block_size": 10})
    assert cfg.tokens_per_step == 200 and cfg.total_steps(1000) == 3


def test_warmup_default_is_capped_for_short_runs():
    cfg = TrainConfig()
    assert cfg.warmup_for(50) == 5
    assert TrainConfig(warmup_steps=30).warmup_for(50) == 30
