"""GPU measurements, all in one run (called by benchmarks/gpu.sh).

    python benchmarks/gpu_bench.py OUT_DIR [--dry-run]

1. training speed: tokens/s and MFU of `tiny`, `small` and `medium` in bf16,
   eager and with torch.compile (median over timed steps, evaluations excluded);
2. packing: 1, 2, 4 and 8 concurrent fractional-GPU trials (gpus_per_trial =
   1/n) of `tiny` and `small` through the real search: aggregate tokens/s and
   peak GPU memory per trial.

Writes OUT_DIR/gpu_speed.md, OUT_DIR/gpu_packing.md and OUT_DIR/gpu.json.
``--dry-run`` runs the same code on the CPU with a handful of steps and fp32,
so the tests prove the script works on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


def speed(size: str, compile_: bool, steps: int, dry: bool, data: str) -> dict:
    """One training run in this process; per-step stamps through a reporter."""
    sys.path.insert(0, str(REPO))
    from tune_gpt.config import TrainConfig
    from tune_gpt.data import load_corpus
    from tune_gpt.tracking import Reporter
    from tune_gpt.train import train

    class Stamps(Reporter):
        def __init__(self):
            self.t, self.mfu, self.mem = [], [], 0.0

        def log(self, step, m):
            self.t.append(time.perf_counter())
            if "mfu" in m:
                self.mfu.append(m["mfu"])
            self.mem = max(self.mem, m.get("gpu/max_mem_gb", 0.0))

    flat = {"model_size": size, "max_steps": 100000, "eval_interval": 10**9, "log_interval": 1, "sample_tokens": 0,
            "checkpoint": False, "progress": False, "tensorboard": False, "wandb.enabled": False,
            "compile": compile_, "output_dir": tempfile.mkdtemp(), "data": data}
    if size == "medium":
        flat["batch_size"] = 16
    if dry:
        flat.update({"device": "cpu", "n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 32, "batch_size": 2})
    else:
        flat.update({"device": "cuda", "precision": "bf16"})
    cfg = TrainConfig.from_flat(flat)
    rep = Stamps()
    train(cfg, rep, corpus=load_corpus(data), stop_after=steps)
    warm = min(len(rep.t) // 3, 20)
    dts = sorted(b - a for a, b in zip(rep.t[warm:], rep.t[warm + 1:]))
    med = dts[len(dts) // 2]
    return {"size": size, "compile": compile_, "tokens_per_s": cfg.tokens_per_step / med, "ms_per_step": med * 1e3,
            "mfu": (sorted(rep.mfu)[len(rep.mfu) // 2] if rep.mfu else None), "peak_mem_gb": rep.mem}


def packing(size: str, n: int, steps: int, dry: bool, data: str) -> dict:
    """n concurrent trials, each with 1/n of the GPU, through python -m tune_gpt.search."""
    tmp = Path(tempfile.mkdtemp())
    space = tmp / "pack.yaml"
    fixed = {"model_size": size, "max_steps": steps, "eval_interval": max(1, steps // 2), "eval_iters": 2,
             "sample_tokens": 0, "data": data}
    if dry:
        fixed.update({"model.n_layer": 1, "model.n_embd": 32, "model.n_head": 2, "model.block_size": 32, "batch_size": 2})
    else:
        fixed["precision"] = "bf16"
    space.write_text(json.dumps({"name": "pack", "method": "random", "num_samples": n, "scheduler": {"type": "none"},
                                 "fixed": fixed, "space": {"seed": {"choice": list(range(1, n + 1))}}}))
    cmd = [sys.executable, "-m", "tune_gpt.search", "--space", str(space), "--storage-path", str(tmp / "r"),
           "--max-concurrent", str(n), "--no-wandb", "--no-report", "-q"]
    if dry:
        cmd += ["--cpus-per-trial", "1" if n == 1 else "0.5"]
    else:
        cmd += ["--gpus-per-trial", f"{1 / n:.4f}", "--cpus-per-trial", "1"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, WANDB_MODE="disabled"))
    wall = time.perf_counter() - t0
    if p.returncode:
        return {"size": size, "trials": n, "error": p.stderr.strip().splitlines()[-1:] or ["?"]}
    rows = []
    for d in (tmp / "r" / "pack").iterdir():
        f = d / "result.json"
        if f.is_file():
            last = [json.loads(x) for x in f.read_text().splitlines()][-1]
            rows.append({"start": last["timestamp"] - last["time_total_s"], "end": last["timestamp"],
                         "tokens": last["tokens"], "mem": last.get("gpu/max_mem_gb", 0.0)})
    span = max(r["end"] for r in rows) - min(r["start"] for r in rows)
    return {"size": size, "trials": n, "aggregate_tokens_per_s": sum(r["tokens"] for r in rows) / span,
            "peak_mem_gb_per_trial": max(r["mem"] for r in rows), "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, a few steps: checks the script")
    ap.add_argument("--data", default=str(DATA) if DATA.is_file() else "python-docs")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dry = args.dry_run
    results: dict = {"speed": [], "packing": [], "dry_run": dry, "date": time.strftime("%Y-%m-%d %H:%M")}
    if not dry:
        import torch

        results["gpu"] = torch.cuda.get_device_name(0)
    speed_steps = {"tiny": 300, "small": 200, "medium": 60} if not dry else {"tiny": 8, "small": 8, "medium": 8}
    for size in ("tiny", "small", "medium"):
        for comp in ((False, True) if not dry else (False,)):
            results["speed"].append(speed(size, comp, speed_steps[size], dry, args.data))
            print(json.dumps(results["speed"][-1]), flush=True)
    pack_steps = {"tiny": 400, "small": 150} if not dry else {"tiny": 6, "small": 6}
    for size in (("tiny", "small") if not dry else ("tiny",)):
        for n in ((1, 2, 4, 8) if not dry else (1, 2)):
            results["packing"].append(packing(size, n, pack_steps[size], dry, args.data))
            print(json.dumps(results["packing"][-1]), flush=True)
    (out / "gpu.json").write_text(json.dumps(results, indent=2))
    lines = ["| size | compile | ms/step | tokens/s | MFU | peak GPU mem (GB) |", "|---|---|---|---|---|---|"]
    for r in results["speed"]:
        mfu = f"{r['mfu'] * 100:.1f}%" if r["mfu"] else "n/a"
        lines.append(f"| {r['size']} | {r['compile']} | {r['ms_per_step']:.1f} | {r['tokens_per_s']:,.0f} | {mfu} | {r['peak_mem_gb']:.2f} |")
    (out / "gpu_speed.md").write_text("\n".join(lines) + "\n")
    lines = ["| size | trials sharing the GPU | aggregate tokens/s | vs one trial | peak mem per trial (GB) |",
             "|---|---|---|---|---|"]
    for size in ("tiny", "small"):
        base = next((r.get("aggregate_tokens_per_s") for r in results["packing"] if r["size"] == size and r["trials"] == 1), None)
        for r in (r for r in results["packing"] if r["size"] == size):
            if "error" in r:
                lines.append(f"| {size} | {r['trials']} | error: {r['error'][0]} | | |")
                continue
            gain = f"{r['aggregate_tokens_per_s'] / base:.2f}x" if base else "n/a"
            lines.append(f"| {size} | {r['trials']} | {r['aggregate_tokens_per_s']:,.0f} | {gain} | {r['peak_mem_gb_per_trial']:.2f} |")
    (out / "gpu_packing.md").write_text("\n".join(lines) + "\n")
    print((out / "gpu_speed.md").read_text())
    print((out / "gpu_packing.md").read_text())


if __name__ == "__main__":
    main()
