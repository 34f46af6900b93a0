"""Search overhead and CPU packing on this machine.

    python benchmarks/search_overhead.py [--steps 300] [--rounds 1] [--record]

1. overhead: the same training (tiny preset, nanoGPT's CPU recipe, `--steps`
   steps, evaluations every 100 steps) called directly, then as a one-trial
   search (2 CPUs, no W&B, no scheduler) that starts its own Ray, as
   `python -m tune_gpt.search` does; ray.init is timed apart, Ray's shutdown is
   counted in the search. The search's fixed cost is also read directly: its wall
   time less the trial's own (Tune's time_total_s), which the machine's speed drift
   does not move.
2. packing: two trials at once with 1 CPU each against two trials one after the
   other with 2 CPUs each; aggregate throughput = training tokens of all trials
   / wall time of the training phase (first trial start to last trial end).

With ``--rounds N`` everything runs N times in turn and each ratio is taken
within a round (this VM's speed drifts by more than the gaps measured).
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


def fixed(steps: int, data: str) -> dict:
    return {"data": data, "model_size": "tiny", "batch_size": 12, "learning_rate": 1e-3, "max_steps": steps,
            "eval_interval": 100, "eval_iters": 20, "sample_tokens": 0}


def direct(steps: int, data: str, threads: int) -> dict:
    code = f"""
import json, time, sys
t0 = time.perf_counter()
sys.path.insert(0, {str(REPO)!r})
from tune_gpt.config import TrainConfig
from tune_gpt.train import train
import tempfile
cfg = TrainConfig.from_flat({{**{fixed(steps, data)!r}, "num_threads": {threads}, "progress": False,
    "tensorboard": False, "wandb.enabled": False, "output_dir": tempfile.mkdtemp(), "device": "cpu"}})
r = train(cfg)
print(json.dumps({{"wall_s": time.perf_counter() - t0, "train_wall_s": r.wall_s, "tokens_per_s": r.tokens_per_s}}))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def search(steps: int, data: str, n: int, cpus: float, concurrent: int) -> dict:
    space = Path(tempfile.mkdtemp()) / "bench.yaml"
    space.write_text(json.dumps({"name": "bench", "method": "random", "num_samples": n,
                                 "scheduler": {"type": "none"}, "fixed": fixed(steps, data),
                                 "space": {"seed": {"choice": list(range(1, n + 1))}}}))
    storage = tempfile.mkdtemp()
    code = f"""
import json, time, sys
sys.path.insert(0, {str(REPO)!r})
import tune_gpt.search as S
# Ray started by the search itself, as `python -m tune_gpt.search` does (a cluster started beforehand is one the
# search did not start: its trials would get Tune's runtime env and new workers); ray.init timed apart
init = S._init_ray
took = {{}}
def timed_init(opts):
    t = time.perf_counter()
    try:
        return init(opts)
    finally:
        took["ray_init_s"] = time.perf_counter() - t
S._init_ray = timed_init
t1 = time.perf_counter()
out = S.run_search(S.SearchOptions(space={str(space)!r}, storage_path={storage!r}, cpus_per_trial={cpus},
    max_concurrent={concurrent}, wandb=False, report=False, verbose=0))
t2 = time.perf_counter() - took["ray_init_s"]  # the search's wall less ray.init (its Ray's shutdown counted)
rows = []
import pathlib
for d in pathlib.Path(out.experiment_dir).iterdir():
    f = d / "result.json"
    if f.is_file():
        res = [json.loads(l) for l in f.read_text().splitlines()]
        last = res[-1]
        rows.append({{"start": last["timestamp"] - last["time_total_s"], "end": last["timestamp"],
                      "total": last["time_total_s"], "tokens": last["tokens"], "tokens_per_s": last["tokens_per_s"]}})
span = max(r["end"] for r in rows) - min(r["start"] for r in rows)
print(json.dumps({{"ray_init_s": took["ray_init_s"], "search_s": t2 - t1, "trials": len(rows), "trial_s": span,
    "longest_trial_s": max(r["total"] for r in rows),  # its own wall as Tune measures it (the timestamps are whole seconds)
    "aggregate_tokens_per_s": sum(r["tokens"] for r in rows) / span, "per_trial_tokens_per_s": [r["tokens_per_s"] for r in rows]}}))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, WANDB_MODE="disabled"))
    if p.returncode:
        raise SystemExit(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    import statistics

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat every measurement this many times, in turn; ratios are taken within a round")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    rounds = []
    for _ in range(args.rounds):
        d = direct(args.steps, args.data, threads=2)
        s1 = search(args.steps, args.data, n=1, cpus=2, concurrent=1)
        seq = search(args.steps, args.data, n=2, cpus=2, concurrent=1)
        par = search(args.steps, args.data, n=2, cpus=1, concurrent=2)
        rounds.append({"direct_s": d["wall_s"], "search_s": s1["search_s"], "ray_init_s": s1["ray_init_s"],
                       "overhead": s1["search_s"] / d["wall_s"],
                       "fixed_s": s1["search_s"] - s1["longest_trial_s"],
                       "packing": par["aggregate_tokens_per_s"] / seq["aggregate_tokens_per_s"],
                       "seq": seq["aggregate_tokens_per_s"], "par": par["aggregate_tokens_per_s"]})

    def each(key: str, fmt: str) -> str:
        values = [r[key] for r in rounds]
        med = format(statistics.median(values), fmt)
        return med if len(values) == 1 else f"{med} (rounds: {', '.join(format(v, fmt) for v in values)})"

    table = "\n".join([
        "| measurement (median of rounds) | value |", "|---|---|",
        f"| direct train(), {args.steps} steps, 2 threads (process wall) | {each('direct_s', '.1f')} s |",
        f"| one-trial search, after Ray start-up | {each('search_s', '.1f')} s |",
        f"| Ray start-up (ray.init) | {each('ray_init_s', '.1f')} s |",
        f"| search / direct, within each round | {each('overhead', '.2f')} (bar: <= 1.10) |",
        f"| the search's fixed cost: search wall - the trial's own wall | {each('fixed_s', '.1f')} s |",
        f"| 2 trials one at a time, 2 CPUs each: aggregate tokens/s | {each('seq', ',.0f')} |",
        f"| 2 trials at once, 1 CPU each: aggregate tokens/s | {each('par', ',.0f')} |",
        f"| packing gain, within each round | {each('packing', '.2f')} (bar: >= 1.5) |",
    ])
    print(table)
    if args.record:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from train_speed import _record

        _record("Search overhead and CPU packing", table, " ".join(sys.argv))


if __name__ == "__main__":
    main()
