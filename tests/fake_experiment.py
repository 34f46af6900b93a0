"""Write a Ray Tune experiment folder by hand (no Ray): the layout tune_gpt.report reads.

Mirrors what Ray 2.60 wrote for a real run (checked against one): per trial folder
``params.json``, ``result.json`` (one JSON line per report, Ray's fields included),
``progress.csv``, ``checkpoint_00000N/ckpt.pt``, Ray's ``error.txt`` / ``error.pkl`` for a
trial that raised, and our ``tune_gpt_status.json`` for one that ended on its own; at the
top ``experiment_state-<date>.json`` (trial states, relative folders), ``tuner.pkl``,
a searcher state, and search.py's ``tune_gpt_experiment.json``.
"""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATE = "2026-01-02_03-04-05"
EXP_HASH = "a1b2c"


@dataclass
class FakeTrial:
    learning_rate: float
    batch_size: int
    status: str  # finished | early-stopped | diverged | errored | oom | running | pending | paused
    val_losses: list[float] = field(default_factory=list)  # one per evaluation
    n_layer: int = 2
    total_steps: int = 30
    eval_interval: int = 10
    error: str | None = None  # errored: exception text; diverged/oom: the status file's message
    status_file: bool | None = None  # None: as search.py does (finished, diverged, oom)
    extra: dict[str, Any] = field(default_factory=dict)


RAY_TRACEBACK = """Failure # 1 (occurred at 2026-01-02_03-05-00)
\x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=9523, ip=192.0.2.2, actor_id=cb563d3d07d5, repr=trainable)
  File "/usr/lib/python3/site-packages/ray/tune/trainable/trainable.py", line 329, in train
    raise skipped from exception_cause(skipped)
  File "/usr/lib/python3/site-packages/ray/tune/trainable/function_trainable.py", line 249, in _trainable_func
    output = fn()
             ^^^^
  File "/work/tune_gpt/search.py", line 310, in trainable
    result = train(cfg, TuneReporter(), corpus=corpus)
{error}
"""


def params_for(t: FakeTrial) -> dict[str, Any]:
    """A flat config as search.py puts in params.json: searched, fixed and runtime keys."""
    return {
        "learning_rate": t.learning_rate, "batch_size": t.batch_size, "model.n_layer": t.n_layer,
        "model_size": "tiny", "max_steps": t.total_steps, "eval_interval": t.eval_interval, "seed": 1337,
        "num_threads": 1, "device": "cpu", "output_dir": "/somewhere/else/out", "progress": False,
        "checkpoint": True, "tensorboard": True, "cache_dir": None, "wandb.project": "tune_gpt",
        "wandb.mode": "offline", "wandb.enabled": True, **t.extra,
    }


def _records(t: FakeTrial, trial_id: str, config: dict) -> list[dict[str, Any]]:
    out, best = [], math.inf
    for i, v in enumerate(t.val_losses):
        step = (i + 1) * t.eval_interval
        if math.isfinite(v):
            best = min(best, v)
        rec = {
            "val/loss": v, "val/bpc": v / math.log(2), "train/loss": v + 0.05, "best/val_loss": best,
            "lr": t.learning_rate, "step": step, "tokens": step * t.batch_size * 32, "epoch": step / 100,
            "tokens_per_s": 1000.0 * t.batch_size, "total_steps": t.total_steps,
            "timestamp": 1767322000 + i, "checkpoint_dir_name": f"checkpoint_{i:06d}", "should_checkpoint": True,
            "done": False, "training_iteration": i + 1, "trial_id": trial_id, "date": DATE,
            "time_this_iter_s": 2.0, "time_total_s": 2.0 * (i + 1), "pid": 1234, "hostname": "vm",
            "node_ip": "192.0.2.2", "config": config, "time_since_restore": 2.0 * (i + 1),
            "iterations_since_restore": i + 1,
        }
        if not math.isfinite(v):
            rec["diverged"] = 1
        out.append(rec)
    return out


def make_experiment(root: Path, trials: list[FakeTrial], *, name: str = "fake", space: dict | None = None,
                    metric: str = "val/loss", mode: str = "min", info: bool = True, state: bool = True) -> Path:
    """Write `trials` as Ray's experiment folder ``root/name``; return it."""
    exp = Path(root) / name
    exp.mkdir(parents=True, exist_ok=False)
    (exp / ".validate_storage_marker").write_text("")
    (exp / "tuner.pkl").write_bytes(b"\x80\x05N.")
    (exp / f"searcher-state-{DATE}.pkl").write_bytes(b"\x80\x05N.")
    trial_data = []
    for i, t in enumerate(trials):
        trial_id = f"{EXP_HASH}_{i:05d}"
        config = params_for(t)
        tag = f"{i}_batch_size={t.batch_size},learning_rate={t.learning_rate:.4f}"
        rel = f"trainable_{trial_id}_{tag}_{DATE}"
        ray_status = {"finished": "TERMINATED", "early-stopped": "TERMINATED", "diverged": "TERMINATED",
                      "errored": "ERROR", "oom": "ERROR", "running": "RUNNING", "pending": "PENDING",
                      "paused": "PAUSED"}[t.status]
        meta = {"stub": False, "trainable_name": "trainable", "trial_id": trial_id, "config": config,
                "experiment_tag": tag, "status": ray_status, "relative_logdir": rel if t.status != "pending" else None}
        runtime = {"start_time": 1767322000.0, "num_failures": int(ray_status == "ERROR"),
                   "error_filename": "error.txt" if ray_status == "ERROR" else None,
                   "last_result": {"trial_id": trial_id}, "last_result_time": -math.inf}
        trial_data.append([json.dumps(meta, indent=2), json.dumps(runtime, indent=2)])
        if t.status == "pending":
            continue
        d = exp / rel
        d.mkdir()
        (d / "params.json").write_text(json.dumps(config, indent=2))
        (d / "params.pkl").write_bytes(b"\x80\x05N.")
        recs = _records(t, trial_id, config)
        (d / "result.json").write_text("".join(json.dumps(r) + "\n" for r in recs))
        if recs:
            keys = [k for k in recs[0] if k != "config"]
            with open(d / "progress.csv", "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
                w.writeheader()
                w.writerows(recs)
        for r in recs:
            ck = d / r["checkpoint_dir_name"]
            ck.mkdir()
            (ck / "ckpt.pt").write_bytes(b"fake checkpoint")
        (d / "events.out.tfevents.1767322000.vm").write_bytes(b"")
        if t.status in ("errored", "oom"):
            (d / "error.txt").write_text(RAY_TRACEBACK.format(error=t.error or "RuntimeError: failed"))
            (d / "error.pkl").write_bytes(b"\x80\x05N.")
        write_status = t.status_file if t.status_file is not None else t.status in ("finished", "diverged", "oom")
        if write_status:
            msg = {"finished": "", "diverged": t.error or "loss became nan", "oom": t.error or "out of memory",
                   "errored": (t.error or "").strip().splitlines()[-1] if t.error else ""}.get(t.status, "")
            (d / "tune_gpt_status.json").write_text(json.dumps(
                {"status": t.status, "message": msg, "total_steps": t.total_steps,
                 "steps": recs[-1]["step"] if recs else 0}))
    if state:
        (exp / f"experiment_state-{DATE}.json").write_text(json.dumps(
            {"trial_data": trial_data, "runner_data": {"_metric": metric}, "stats": {"start_time": 1767322000.0}},
            indent=2))
    if info:
        (exp / "tune_gpt_experiment.json").write_text(json.dumps({
            "name": name, "metric": metric, "mode": mode, "space": space or {}, "num_samples": len(trials),
            "command": f"python -m tune_gpt.search --name {name}",
        }, indent=2))
    return exp


# --------------------------------------------------------------- fixtures

STANDARD_SPACE = {
    "learning_rate": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
    "batch_size": {"type": "choice", "values": [8, 16, 32]},
    "model.n_layer": {"type": "choice", "values": [2, 4, 6]},
}

# trial index -> (lr, bs, n_layer, status, val losses, error)
STANDARD = [
    FakeTrial(2e-3, 16, "finished", [2.5, 2.0, 1.60], n_layer=6),                         # 0: best
    FakeTrial(1.5e-3, 16, "finished", [2.5, 1.9, 1.70], n_layer=4),                       # 1: same cell as 0
    FakeTrial(5e-4, 8, "finished", [2.6, 2.1, 1.80], n_layer=2),                          # 2
    FakeTrial(6e-3, 32, "finished", [2.4, 1.75, 1.78], n_layer=4),                        # 3: best before final
    FakeTrial(4e-4, 32, "early-stopped", [2.9], n_layer=2),                               # 4: ASHA stopped it
    FakeTrial(8e-3, 8, "diverged", [2.7, math.inf], n_layer=6,
              error="loss became nan at step 20 (lr too high?)"),                         # 5
    FakeTrial(9e-3, 16, "errored", [], n_layer=2,
              error="RuntimeError: boom in trial: bad shape\nsecond line of the message"),  # 6
    FakeTrial(3e-3, 32, "oom", [2.8], n_layer=4,
              error="torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"),  # 7
    FakeTrial(1e-3, 8, "running", [2.55, 2.2], n_layer=2),                                # 8
    FakeTrial(2e-4, 8, "pending", [], n_layer=2),                                         # 9: no folder yet
]


def trial_id(i: int) -> str:
    return f"{EXP_HASH}_{i:05d}"


def standard_experiment(root: Path, **kw: Any) -> Path:
    return make_experiment(root, STANDARD, name=kw.pop("name", "standard"), space=STANDARD_SPACE, **kw)


def lr_dominant_experiment(root: Path, n: int = 16, seed: int = 0) -> Path:
    """Finished trials whose val loss depends mostly on the learning rate (optimum near 3e-3)."""
    rng = random.Random(seed)
    trials = []
    for _ in range(n):
        lr = 10 ** rng.uniform(-4, -2)
        bs = rng.choice([8, 16, 32])
        final = 1.5 + 0.5 * (math.log10(lr) + 2.5) ** 2 + 0.01 * (bs == 8) + rng.gauss(0, 0.003)
        trials.append(FakeTrial(lr, bs, "finished", [final + 0.8, final + 0.3, final],
                                n_layer=rng.choice([2, 4, 6])))
    return make_experiment(root, trials, name="lr_dominant", space=STANDARD_SPACE)
