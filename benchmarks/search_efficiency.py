"""Search efficiency: the best val loss reached against the compute spent, for four ways to search.

    python benchmarks/search_efficiency.py [--steps 300] [--seeds 0 1 2] [--record]

Every search trains the `tiny` preset on tinyshakespeare for a fixed per-trial budget of
`--steps` steps (evaluated every tenth of it), two 1-CPU trials at a time, through
`tune_gpt.search.run_search` — the product, not a simulation:

- grid: the current guide's sweep shape, 3 learning rates x 3 batch sizes (9 trials);
- random: 9 trials drawn from the same region (learning rate log-uniform between the grid's
  lowest and highest, `--learning-rates`; batch size one of the grid's), no early stopping;
- optuna: 9 trials of Optuna's TPE (multivariate) over that region, no early stopping;
- optuna+asha: `--asha-samples` trials of TPE with Ray's ASHA stopping the weak ones early
  (``pause: false``, ``--stop-at-rungs``);
- optuna+asha-pause: the same with ``pause: true``, tune_gpt's default: ASHA's promotion form, trials
  wait at each rung until it is known whether they are in its top 1/reduction_factor
  (tune_gpt/_schedulers.py).

With `--region grid-values` the three searchers draw from the grid's own nine points instead
(learning rate one of the grid's values): what a user gets by changing a W&B grid sweep's
`method: grid` to `bayes` and adding `early_terminate: hyperband`.

Compute is training steps summed over trials (the issue's measure; evaluation is excluded).
Each trial trains with the same seed, so the grid is deterministic and the searches differ by
the searcher's seed only. A search's curve is the best val loss reported so far against the
steps spent so far, over its reports in the order they arrived. The bar: in the median over the
seeds, Optuna+ASHA comes within 1 % of the grid's best val loss having spent <= 40 % of the
grid's steps.

Writes `curves.json`, `search_efficiency.png` and the table to `--out`; `--record` also appends
the table to docs/BENCHMARKS.md and copies the plot to docs/search_efficiency.png. `--curves A.json
B.json` runs nothing: it merges earlier runs of the same settings (e.g. the methods run in two
parts) into one table and plot.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"

LEARNING_RATES = (3e-4, 1e-3, 3e-3)
BATCH_SIZES = (8, 16, 32)
METHODS = ("grid", "random", "optuna", "optuna+asha", "optuna+asha-pause")


def fixed(steps: int, data: str) -> dict:
    return {"data": data, "model_size": "tiny", "max_steps": steps, "eval_interval": max(1, steps // 10),
            "eval_iters": 10, "sample_tokens": 0, "seed": 1337}


REGIONS = ("log-uniform", "grid-values")


def lr_domain(method: str, lrs: tuple, region: str) -> dict:
    """The learning rate's domain in the native space format: the grid's axis, or what the searchers draw from."""
    if method == "grid":
        return {"grid": list(lrs)}
    return {"choice": list(lrs)} if region == "grid-values" else {"loguniform": [min(lrs), max(lrs)]}


def space_file(method: str, steps: int, data: str, samples: int, asha: dict, folder: Path,
               lrs: tuple = LEARNING_RATES, region: str = "log-uniform") -> Path:
    space = {"learning_rate": lr_domain(method, lrs, region),
             "batch_size": {"grid" if method == "grid" else "choice": list(BATCH_SIZES)}}
    doc = {"name": method.replace("+", "_").replace("-", "_"), "method": {"grid": "grid", "random": "random"}.get(method, "optuna"),
           "metric": "val/loss", "mode": "min", "num_samples": 1 if method == "grid" else samples,
           "scheduler": ({"type": "asha", **asha, "pause": method.endswith("-pause")}
                         if method.startswith("optuna+asha") else {"type": "none"}),
           "fixed": fixed(steps, data), "space": space}
    path = folder / f"{doc['name']}.yaml"
    path.write_text(json.dumps(doc, indent=1))  # JSON is YAML
    return path


def curve(experiment: Path) -> dict:
    """The search's reports in arrival order -> cumulative steps and best val loss so far."""
    reports = []
    for trial in sorted(experiment.glob("trial_*")):
        f = trial / "result.json"
        if not f.is_file():
            continue
        params = json.loads((trial / "params.json").read_text())
        for line in f.read_text().splitlines():
            r = json.loads(line)
            reports.append((r["timestamp"], r.get("time_total_s", 0.0), trial.name, r["step"], r["val/loss"], params))
    reports.sort(key=lambda r: (r[0], r[1]))
    last_step: dict[str, int] = {}
    spent, best, best_params, xs, ys = 0, math.inf, None, [], []
    for _, _, name, step, loss, params in reports:
        spent += step - last_step.get(name, 0)
        last_step[name] = step
        if loss < best:
            best, best_params = loss, {k: params[k] for k in ("learning_rate", "batch_size")}
        xs.append(spent)
        ys.append(best)
    lrs = sorted({params["learning_rate"] for *_, params in reports})  # the grid's: its table header
    return {"steps": xs, "best": ys, "trials": len(last_step), "best_params": best_params, "learning_rates": lrs}


def steps_to_reach(c: dict, target: float) -> float:
    """Steps spent when the search first reported a val loss <= target (inf: never)."""
    return next((s for s, b in zip(c["steps"], c["best"]) if b <= target), math.inf)


def run_all(args: argparse.Namespace, out: Path) -> dict:
    import ray

    from tune_gpt.search import SearchOptions, run_search

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    asha = {"grace_period": args.grace_period, "reduction_factor": args.reduction_factor}
    curves: dict[str, dict] = {}
    try:
        for method in args.methods:
            seeds = [0] if method == "grid" else args.seeds  # the grid has nothing random in it
            for seed in seeds:
                samples = (args.asha_samples if method.startswith("optuna+asha")
                           else len(args.learning_rates) * len(BATCH_SIZES))
                space = space_file(method, args.steps, args.data, samples, asha, out, tuple(args.learning_rates),
                                   args.region)
                t0 = time.perf_counter()
                res = run_search(SearchOptions(space=str(space), name=f"{space.stem}_s{seed}", storage_path=str(out / "runs"),
                                               seed=seed, cpus_per_trial=1, wandb=False,  # two at a time: 2 CPUs
                                               report=False, verbose=0))
                c = curve(Path(res.experiment_dir))
                c["wall_s"] = time.perf_counter() - t0
                c["lr_domain"] = lr_domain(method, tuple(args.learning_rates), args.region)
                curves[f"{method}/{seed}"] = c
                print(f"{method:12s} seed {seed}: best {c['best'][-1]:.4f} after {c['steps'][-1]:,} steps "
                      f"({c['trials']} trials, {c['wall_s']:.0f} s) {c['best_params']}", flush=True)
    finally:
        ray.shutdown()
    return curves


def merge_curves(curves: dict, more: dict, source: str) -> dict:
    """Two runs' curves in one; their grids must have ended alike (the grid is deterministic), else the
    runs had different settings and cannot share a table."""
    a, b = curves.get("grid/0"), more.get("grid/0")
    if b is None:
        raise SystemExit(f"{source}: no grid curve in it")
    if a is not None and (abs(a["best"][-1] - b["best"][-1]) > 1e-6 or a["steps"][-1] != b["steps"][-1]):
        raise SystemExit(f"{source}: its grid ended at {b['best'][-1]:.4f} after {b['steps'][-1]} steps, another run's at "
                         f"{a['best'][-1]:.4f} after {a['steps'][-1]}: not the same settings")
    regions = {json.dumps(c.get("lr_domain")) for k, c in {**curves, **more}.items() if not k.startswith("grid/")}
    if len(regions) > 1:
        raise SystemExit(f"{source}: its searchers drew learning rates from another region than the other runs' "
                         f"({' vs '.join(sorted(regions))}): not the same settings")
    return {**curves, **more}


def summarise(curves: dict, steps: int, lrs: tuple = LEARNING_RATES) -> tuple[str, dict]:
    """The table and the bar's figures. The grid's learning rates come from its own trials; `lrs`
    only stands in for curves.json files written before curves recorded them."""
    grid = curves["grid/0"]
    lrs = tuple(grid.get("learning_rates") or lrs)
    grid_best, grid_steps = grid["best"][-1], grid["steps"][-1]
    target = grid_best * 1.01
    rows, figures = [], {}
    for method in METHODS:
        runs = [c for k, c in curves.items() if k.split("/")[0] == method]
        if not runs:
            continue
        reach = [steps_to_reach(c, target) / grid_steps for c in runs]
        med = statistics.median(reach)
        figures[method] = {"median_fraction_to_reach": med, "fractions": reach}
        best = [c["best"][-1] for c in runs]
        rows.append(f"| {method} | {len(runs)} | {statistics.median(best):.4f} ({min(best):.4f}–{max(best):.4f}) | "
                    f"{statistics.median(c['steps'][-1] for c in runs) / grid_steps:.0%} | "
                    + (f"{med:.0%}" if math.isfinite(med) else "not reached")
                    + f" ({', '.join('—' if not math.isfinite(r) else f'{r:.0%}' for r in reach)}) |")
    searched = sorted({json.dumps(c["lr_domain"]) for k, c in curves.items() if not k.startswith("grid/") and c.get("lr_domain")})
    table = "\n".join([
        f"per trial: tiny preset, {steps} steps, evaluation every {max(1, steps // 10)}; grid = "
        f"{len(lrs)} learning rates {list(lrs)} x batch sizes {list(BATCH_SIZES)} = "
        f"{grid_steps:,} steps; grid best {grid_best:.4f} at {grid['best_params']}; target (within 1 %) {target:.4f}"
        + (f"; the searchers' learning rate: {', '.join(searched)}" if searched else ""),
        "",
        "| method | seeds | best val loss, median (range) | steps spent / grid's | steps to reach the target / grid's, median (each seed) |",
        "|---|---|---|---|---|", *rows,
    ])
    for method in ("optuna+asha", "optuna+asha-pause"):
        asha = figures.get(method)
        if asha:
            ok = asha["median_fraction_to_reach"] <= 0.40
            table += (f"\n\nbar ({method}: within 1 % of the grid's best having spent <= 40 % of its steps, median): "
                      f"{'met' if ok else 'NOT met'} ({asha['median_fraction_to_reach']:.0%})")
    return table, figures


def plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"grid": "black", "random": "tab:orange", "optuna": "tab:blue", "optuna+asha": "tab:green",
               "optuna+asha-pause": "tab:red"}
    grid = curves["grid/0"]
    fig, ax = plt.subplots(figsize=(8, 5))
    seen = set()
    for key, c in curves.items():
        method = key.split("/")[0]
        ax.step(c["steps"], c["best"], where="post", color=colours[method], lw=2.2 if method == "grid" else 1.2,
                alpha=1.0 if method == "grid" else 0.75, label=None if method in seen else method)
        seen.add(method)
    target = grid["best"][-1] * 1.01
    ax.axhline(target, color="grey", ls="--", lw=1, label="grid best + 1 %")
    ax.axvline(0.4 * grid["steps"][-1], color="grey", ls=":", lw=1, label="40 % of the grid's steps")
    lo = min(min(c["best"]) for c in curves.values())
    ax.set_ylim(lo - 0.05, target + 0.6)
    ax.set_xlabel("training steps spent (summed over trials)")
    ax.set_ylabel("best val loss so far")
    ax.set_title("Search efficiency: tiny GPT on tinyshakespeare")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="per-trial budget in training steps")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--asha-samples", type=int, default=16)
    ap.add_argument("--grace-period", type=int, default=2, help="ASHA: evaluations before a trial can be stopped")
    ap.add_argument("--reduction-factor", type=float, default=3)
    ap.add_argument("--learning-rates", type=float, nargs="+", default=list(LEARNING_RATES),
                    help="the grid's learning rates; the other methods search log-uniformly between their min and max")
    ap.add_argument("--region", default="log-uniform", choices=REGIONS,
                    help="what the searchers draw learning rates from: log-uniform between the grid's lowest and "
                         "highest, or the grid's own values")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--out", default=None, help="folder for curves.json, the plot and the runs (default: a temp dir)")
    ap.add_argument("--curves", nargs="+", metavar="CURVES_JSON",
                    help="run nothing: merge these runs' curves.json (same settings, matching grids), tabulate and plot")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    if "grid" not in args.methods:
        ap.error("--methods must include grid (the reference)")
    out = Path(args.out or tempfile.mkdtemp(prefix="search_efficiency_"))
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_MODE", "disabled")
    if args.curves:
        curves: dict = {}
        for f in args.curves:
            curves = merge_curves(curves, json.loads(Path(f).read_text()), f)
    else:
        curves = run_all(args, out)
    (out / "curves.json").write_text(json.dumps(curves, indent=1))
    table, _ = summarise(curves, args.steps, tuple(args.learning_rates))
    plot(curves, out / "search_efficiency.png")
    (out / "table.md").write_text(table + "\n")
    print(table)
    print(f"curves, plot and runs in {out}")
    if args.record:
        from train_speed import _record

        shutil.copy(out / "search_efficiency.png", REPO / "docs" / "search_efficiency.png")
        _record("Search efficiency", table + "\n\n![best val loss against steps spent](search_efficiency.png)",
                "benchmarks/search_efficiency.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
