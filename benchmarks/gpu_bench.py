"""GPU measurements, all in one run (called by benchmarks/gpu.sh).

    python benchmarks/gpu_bench.py OUT_DIR [--dry-run] [--data PATH]

1. resume on the GPU: a run stopped at step 30 and resumed to 60 against one run to 60 (does a
   checkpoint written on the GPU resume there, and to the same losses);
2. training speed: tokens/s and MFU of `tiny`, `small` and `medium` in bf16, eager, then with
   torch.compile (median over timed steps, evaluations excluded; MFU from that median);
3. packing: 1, 2, 4 and 8 processes training `tiny` (then `small`) on the GPU at once, each with
   its memory capped to 1/n as a search's trial with ``--gpus-per-trial 1/n`` is: aggregate training
   tokens/s over the window in which all of them trained, and peak GPU memory per process. Ray only
   places a search's trials; what sharing the GPU costs is measured here without it (the lent GPU
   machines have no Ray, and Ray's own overhead is measured on the CPU, benchmarks/search_overhead.py).

Every row is written to OUT_DIR/gpu.json, OUT_DIR/gpu_speed.md and OUT_DIR/gpu_packing.md as soon
as it is measured, so a run cut short by gpu.sh's time limit keeps what it measured; a row that
fails records its error and the next one runs. ``--dry-run`` runs the same code on the CPU with a
handful of steps and fp32, so the tests prove the script works on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
sys.path.insert(0, str(REPO))


def _cfg(size: str, dry: bool, data: str, **over):
    from tune_gpt.config import TrainConfig

    flat = {"model_size": size, "sample_tokens": 0, "progress": False, "tensorboard": False, "wandb.enabled": False,
            "output_dir": tempfile.mkdtemp(), "data": data}
    if size == "medium":
        flat["batch_size"] = 16
    elif size == "small":
        flat["batch_size"] = 64  # nanoGPT's shakespeare_char batch for this shape (the CPU recipe's 12 starves a GPU)
    if dry:
        flat.update({"device": "cpu", "n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 32, "batch_size": 2})
    else:
        flat.update({"device": "cuda", "precision": "bf16"})
    flat.update(over)
    return TrainConfig.from_flat(flat)


def resume_check(dry: bool, data: str) -> dict:
    """Stop at 30, resume to 60; against an uninterrupted 60. Evaluated every 10 steps. Dropout 0.1 (tiny has
    none), so that the resumed run draws from the restored RNG (on a GPU, the CUDA generator's state)."""
    from tune_gpt.config import TrainConfig
    from tune_gpt.data import load_corpus
    from tune_gpt.train import train

    corpus = load_corpus(data)
    over = {"max_steps": 60, "eval_interval": 10, "eval_iters": 4, "checkpoint": True, "dropout": 0.1}
    whole = train(_cfg("tiny", dry, data, **over), corpus=corpus)
    again = train(_cfg("tiny", dry, data, **over), corpus=corpus)  # the same run again: the kernels' own noise
    cfg = _cfg("tiny", dry, data, **over)
    train(cfg, corpus=corpus, stop_after=30)
    resumed = train(TrainConfig.from_flat({"resume": True}, base=cfg), corpus=corpus)
    a = [h["val/loss"] for h in whole.history if h.get("step", 0) > 30]
    b = [h["val/loss"] for h in resumed.history if h.get("step", 0) > 30]
    # Two uninterrupted runs of the same seed differ on a GPU by the kernels' nondeterminism (flash
    # attention's backward), growing with the steps: the floor max_abs_diff is read against, at the same steps.
    c = [h["val/loss"] for h in again.history if h.get("step", 0) > 30]
    return {"check": "resume", "steps": resumed.steps, "val_losses_whole": a, "val_losses_resumed": b,
            "max_abs_diff": max((abs(x - y) for x, y in zip(a, b)), default=None), "same_count": len(a) == len(b),
            "noise_floor": max((abs(x - y) for x, y in zip(a, c)), default=None) if len(a) == len(c) else None}


def speed(size: str, compile_: bool, steps: int, dry: bool, data: str) -> dict:
    """One training run in this process, timed between logs every `log_every` steps (each log syncs)."""
    import torch

    from tune_gpt.data import load_corpus
    from tune_gpt.tracking import Reporter
    from tune_gpt.train import peak_flops, train

    class Stamps(Reporter):
        def __init__(self):
            self.t, self.mem, self.flops_per_token = [], 0.0, 0.0

        def start(self, cfg, info):
            self.flops_per_token = info["flops_per_token"]  # the model's own count, as train() uses for its mfu

        def log(self, step, m):
            self.t.append((step, time.perf_counter()))
            self.mem = max(self.mem, m.get("gpu/max_mem_gb", 0.0))

    log_every = 1 if dry else 10
    if compile_ and hasattr(torch, "_dynamo"):
        torch._dynamo.reset()  # each compiled row compiles afresh, as its own run would
    cfg = _cfg(size, dry, data, max_steps=100000, eval_interval=10**9, log_interval=log_every, checkpoint=False,
               compile=compile_)
    rep = Stamps()
    train(cfg, rep, corpus=load_corpus(data), stop_after=steps)
    warm = max(1, len(rep.t) // 3)  # the first intervals hold compilation and warm-up
    per_step = sorted((t2 - t1) / (s2 - s1) for (s1, t1), (s2, t2) in zip(rep.t[warm:], rep.t[warm + 1:]))
    med = per_step[len(per_step) // 2]
    tps = cfg.tokens_per_step / med
    peak = peak_flops(torch.device(cfg.device), cfg.precision, cfg.matmul_precision)
    return {"size": size, "compile": compile_, "tokens_per_s": tps, "ms_per_step": med * 1e3,
            "mfu": rep.flops_per_token * tps / peak if peak else None, "peak_mem_gb": rep.mem}


class _Deadline(Exception):
    """A packing worker's training time is up."""


def pack_worker(spec: dict) -> dict:
    """One of the n processes sharing the GPU: trains for `seconds` of wall time with its memory capped to
    1/n (as a search's trial with --gpus-per-trial 1/n does), stamping (time, tokens) at every log."""
    from tune_gpt.data import load_corpus
    from tune_gpt.tracking import Reporter
    from tune_gpt.train import train

    class Stamps(Reporter):
        def __init__(self):
            self.stamps, self.mem, self.end = [], 0.0, None

        def start(self, cfg, info):  # model built: wait for the common start, so that all n train together
            self.end = _common_start(spec) + spec["seconds"]

        def log(self, step, m):
            self.stamps.append((time.time(), m["tokens"]))
            self.mem = max(self.mem, m.get("gpu/max_mem_gb", 0.0))
            if time.time() > self.end:
                raise _Deadline

    over = {"max_steps": 10**7, "eval_interval": 10**9, "log_interval": 1 if spec["dry"] else 10, "checkpoint": False}
    if spec["dry"]:
        over["num_threads"] = 1
    else:  # as a trial: its share of the GPU's memory, and of the CPU's cores (as --cpus-per-trial gives)
        over["gpu_memory_fraction"] = 1.0 / spec["n"]
        over["num_threads"] = max(1, (os.cpu_count() or 1) // spec["n"])
    rep = Stamps()
    try:
        train(_cfg(spec["size"], spec["dry"], spec["data"], **over), rep, corpus=load_corpus(spec["data"]))
    except _Deadline:
        pass
    return {"stamps": rep.stamps, "mem": rep.mem}


def _common_start(spec: dict) -> float:
    """Wait for the n workers to be ready, then until the start they all compute alike: `start_at`, or half
    a second after the last one got ready where that is later (imports on a loaded machine can outlast any
    fixed lead). A worker that never gets ready (it crashed) holds the others `wait_s` at most."""
    ready = Path(spec["barrier"])
    (ready / f"ready-{os.getpid()}").touch()
    give_up = time.time() + spec.get("wait_s", 120.0)
    while len(stamps := [f.stat().st_mtime for f in ready.glob("ready-*")]) < spec["n"] and time.time() < give_up:
        time.sleep(0.05)
    start = max(spec["start_at"], max(stamps) + 0.5)
    time.sleep(max(0.0, start - time.time()))
    return max(time.time(), start)


_WORKERS: list = []  # the packing processes running now


def _kill(procs: list) -> None:
    """Kill the process groups of the workers still running."""
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, 9)
            except ProcessLookupError:
                pass


def _on_sigterm(signum, frame) -> None:
    _kill(_WORKERS)
    raise SystemExit(128 + signum)


def _tokens_at(stamps: list, t: float) -> float:
    """Tokens trained by time `t`, interpolated between a worker's stamps."""
    for (t1, k1), (t2, k2) in zip(stamps, stamps[1:]):
        if t1 <= t <= t2:
            return k1 + (k2 - k1) * (t - t1) / (t2 - t1) if t2 > t1 else k2
    return stamps[-1][1] if t > stamps[-1][0] else stamps[0][1]


def packing(size: str, n: int, seconds: float, dry: bool, data: str, out: Path) -> dict:
    """n processes training at once, each capped to 1/n of the GPU's memory: aggregate tokens/s over the
    window in which all n were past their warm-up and still training (a sum of each one's own rate would
    count time the others had not started yet: CUDA start-up and imports take seconds). One deadline for
    all n (a hung worker cannot hold the run for n times its own limit); a failed worker's stderr is kept
    in `out`/pack_<size>_<n>_<i>.log."""
    # a common start, late enough for every worker to have imported torch and built its model
    barrier = out / f"pack_{size}_{n}.ready"
    shutil.rmtree(barrier, ignore_errors=True)
    barrier.mkdir(parents=True)
    spec = {"size": size, "n": n, "seconds": seconds, "dry": dry, "data": data, "barrier": str(barrier),
            "start_at": time.time() + (8.0 if dry else 12.0)}
    logs = [(out / f"pack_{size}_{n}_{i}.out", out / f"pack_{size}_{n}_{i}.log") for i in range(n)]
    procs = []
    for stdout_path, stderr_path in logs:  # (files, not pipes: n workers polled at once cannot fill a pipe)
        with open(stdout_path, "w") as o, open(stderr_path, "w") as e:
            procs.append(subprocess.Popen([sys.executable, __file__, "--pack-worker", json.dumps(spec)], stdout=o,
                                          stderr=e, text=True, cwd=REPO, start_new_session=True))
    _WORKERS[:] = procs  # gpu.sh's time limit (SIGTERM) kills them too: their sessions are their own
    deadline = spec["start_at"] + 120 + seconds + 120  # (the wait for the others, its training, its end)
    try:
        # all n watched at once: the first to fail ends the row (the others would wait for it at the barrier)
        while any(p.poll() is None for p in procs) and not any(p.returncode for p in procs) \
                and time.time() < deadline:
            time.sleep(0.2)
    finally:
        _kill(procs)
        shutil.rmtree(barrier, ignore_errors=True)
    codes = [p.wait() for p in procs]  # (killed ones: negative)
    try:
        failed = [i for i, c in enumerate(codes) if c > 0]
        if failed:
            err = logs[failed[0]][1].read_text()
            return {"size": size, "trials": n,
                    "error": [f"{(err.strip().splitlines() or ['?'])[-1]} (stderr: {logs[failed[0]][1].name})"]}
        if any(codes):
            i = next(i for i, c in enumerate(codes) if c)
            why = (f"still running {seconds + 240:.0f} s after the planned start: killed" if codes[i] == -9
                   else f"ended by signal {-codes[i]}")
            return {"size": size, "trials": n, "error": [f"worker {i} {why} (stderr: {logs[i][1].name})"]}
        outs = [json.loads(o.read_text().strip().splitlines()[-1]) for o, _ in logs]
        for _, e in logs:  # a worker's stderr is kept where it failed only
            e.unlink(missing_ok=True)
    finally:
        for o, _ in logs:
            o.unlink(missing_ok=True)
    kept = [o["stamps"][len(o["stamps"]) // 5:] for o in outs]  # the first fifth: warm-up
    if any(len(k) < 2 for k in kept):
        return {"size": size, "trials": n, "error": ["too few logged steps to time"]}
    lo, hi = max(k[0][0] for k in kept), min(k[-1][0] for k in kept)
    if hi - lo < seconds / 3:
        return {"size": size, "trials": n, "error": [f"the {n} processes trained together for {max(0.0, hi - lo):.1f} s only"]}
    total = sum(_tokens_at(k, hi) - _tokens_at(k, lo) for k in kept)
    return {"size": size, "trials": n, "aggregate_tokens_per_s": total / (hi - lo), "window_s": hi - lo,
            "peak_mem_gb_per_trial": max(o["mem"] for o in outs)}


def _attempt(what: dict, fn, *args) -> dict:
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - one row's failure is a finding; the next row still runs
        traceback.print_exc()
        return {**what, "error": [f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"]}


def write_tables(out: Path, results: dict) -> None:
    part = out / "gpu.json.part"  # replaced whole: a SIGTERM mid-write leaves the previous complete file
    part.write_text(json.dumps(results, indent=2))
    os.replace(part, out / "gpu.json")
    lines = ["| size | compile | ms/step | tokens/s | MFU | peak GPU mem (GB) |", "|---|---|---|---|---|---|"]
    for r in results["speed"]:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['compile']} | error: {r['error'][0]} | | | |")
            continue
        mfu = f"{r['mfu'] * 100:.1f}%" if r["mfu"] else "n/a"
        lines.append(f"| {r['size']} | {r['compile']} | {r['ms_per_step']:.1f} | {r['tokens_per_s']:,.0f} | {mfu} "
                     f"| {r['peak_mem_gb']:.2f} |")
    for r in results["checks"]:
        lines.append("")
        lines.append(f"resume check: {json.dumps(r)}")
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


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--pack-worker":
        print(json.dumps(pack_worker(json.loads(sys.argv[2]))), flush=True)
        return
    import signal

    signal.signal(signal.SIGTERM, _on_sigterm)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, a few steps: checks the script")
    ap.add_argument("--data", default=str(DATA) if DATA.is_file() else "python-docs")
    args = ap.parse_args()
    if Path(args.data).is_file():
        args.data = str(Path(args.data).resolve())  # the packing workers run in the repository's folder
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dry = args.dry_run
    results: dict = {"speed": [], "packing": [], "checks": [], "dry_run": dry, "data": args.data,
                     "date": time.strftime("%Y-%m-%d %H:%M")}
    if not dry:
        import torch

        results["gpu"] = torch.cuda.get_device_name(0)
        results["torch"] = torch.__version__

    def add(kind: str, row: dict) -> None:
        results[kind].append(row)
        print(json.dumps(row), flush=True)
        write_tables(out, results)

    add("checks", _attempt({"check": "resume"}, resume_check, dry, args.data))
    speed_steps = {"tiny": 300, "small": 200, "medium": 60} if not dry else {"tiny": 8, "small": 8, "medium": 8}
    for size in ("tiny", "small", "medium"):  # eager
        add("speed", _attempt({"size": size, "compile": False}, speed, size, False, speed_steps[size], dry, args.data))
    pack_seconds = 15.0 if not dry else 4.0
    for size in (("tiny", "small") if not dry else ("tiny",)):
        for n in ((1, 2, 4, 8) if not dry else (1, 2)):
            add("packing", _attempt({"size": size, "trials": n}, packing, size, n, pack_seconds, dry, args.data, out))
    # compiled last (slow to start, and it needs a C compiler): the rows a time limit would cut
    for size in (("tiny", "small", "medium") if not dry else ()):
        add("speed", _attempt({"size": size, "compile": True}, speed, size, True, speed_steps[size], dry, args.data))
    print((out / "gpu_speed.md").read_text())
    print((out / "gpu_packing.md").read_text())


if __name__ == "__main__":
    main()
