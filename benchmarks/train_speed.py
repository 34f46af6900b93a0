"""Training speed on nanoGPT's CPU recipe: tune_gpt's train() against a nanoGPT-style loop.

    python benchmarks/train_speed.py [--steps 300] [--data ../shared/data/tinyshakespeare.txt]
                                     [--nanogpt PATH_TO_NANOGPT_CHECKOUT] [--record]

Both sides train the same model (tiny preset: 4 layers, 4 heads, width 128,
context 64, batch 12, lr 1e-3, warmup 100, beta2 0.99, dropout 0, no compile)
on the same corpus, one after the other in fresh processes, and report the
median milliseconds per training step (evaluations excluded) and tokens/s.
tune_gpt runs twice a round: with its defaults ("tune_gpt": on a CPU with AMX
or AVX512-BF16 its linear layers multiply in bfloat16, accumulating in float32)
and in float32 throughout ("tune_gpt-highest", `--matmul_precision highest`,
the arithmetic of nanoGPT's loop on a CPU).

The reference ("nanogpt-loop") reproduces the choices of nanoGPT's train.py
that matter on a CPU: batches cut from a np.memmap row by row and stacked,
torch.optim.AdamW without `fused` (nanoGPT fuses only on CUDA), a GradScaler
that is disabled, and `loss.item()` every step (its CPU recipe logs every
step). It uses tune_gpt's GPT module, which is nanoGPT's model op for op. With
``--nanogpt DIR`` the real nanoGPT train.py in DIR is timed as well (its
"time X ms" lines).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
RECIPE = dict(batch_size=12, block_size=64, n_layer=4, n_head=4, n_embd=128, lr=1e-3, warmup=100,
              min_lr=1e-4, beta2=0.99, weight_decay=0.1, grad_clip=1.0)


def bench_tune_gpt(data: str, steps: int, warmup: int, matmul_precision: str = "auto") -> dict:
    """Time tune_gpt.train.train() itself, with a reporter that stamps every step.

    ``matmul_precision="auto"`` is the default (bfloat16 products in the linear layers on a CPU
    with AMX or AVX512-BF16); ``"highest"`` is float32 throughout, as nanoGPT's loop on a CPU.
    """
    sys.path.insert(0, str(REPO))
    from tune_gpt.config import TrainConfig
    from tune_gpt.data import load_corpus
    from tune_gpt.tracking import Reporter
    from tune_gpt.train import train

    class Stamps(Reporter):
        def __init__(self):
            self.t: list[float] = []

        def log(self, step, metrics):
            self.t.append(time.perf_counter())

    corpus = load_corpus(data)
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig.from_flat({
            "data": data, "model_size": "tiny", "batch_size": RECIPE["batch_size"], "learning_rate": RECIPE["lr"],
            "warmup_steps": RECIPE["warmup"], "min_lr": RECIPE["min_lr"], "beta2": RECIPE["beta2"],
            "max_steps": 2000, "eval_interval": 10**9, "log_interval": 1, "sample_tokens": 0,
            "checkpoint": False, "progress": False, "tensorboard": False, "wandb.enabled": False,
            "output_dir": out, "device": "cpu", "matmul_precision": matmul_precision,
        })
        rep = Stamps()
        train(cfg, rep, corpus=corpus, stop_after=steps)
    dts = [b - a for a, b in zip(rep.t, rep.t[1:])][warmup:]
    return _summary("tune_gpt" if matmul_precision == "auto" else f"tune_gpt-{matmul_precision}", dts)


def bench_tune_gpt_fp32(data: str, steps: int, warmup: int) -> dict:
    """tune_gpt with float32 matmuls throughout (``--matmul_precision highest``)."""
    return bench_tune_gpt(data, steps, warmup, "highest")


def nanogpt_data(data: str):
    """nanoGPT's data path: (chars, get_batch() for training, the validation ids).

    Like nanoGPT's prepare.py + train.py: a char vocabulary, the first 90% written
    to train.bin, and every batch cut from a freshly opened np.memmap row by row.
    """
    import numpy as np
    import torch

    text = Path(data).read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    n = len(ids)
    tmp = tempfile.mkdtemp()
    ids[: int(n * 0.9)].tofile(os.path.join(tmp, "train.bin"))
    B, T = RECIPE["batch_size"], RECIPE["block_size"]

    def get_batch():
        d = np.memmap(os.path.join(tmp, "train.bin"), dtype=np.uint16, mode="r")  # re-opened per batch, as nanoGPT
        ix = torch.randint(len(d) - T, (B,))
        x = torch.stack([torch.from_numpy((d[i : i + T]).astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy((d[i + 1 : i + 1 + T]).astype(np.int64)) for i in ix])
        return x, y

    return chars, get_batch, ids[int(n * 0.9):]


def bench_nanogpt_loop(data: str, steps: int, warmup: int) -> dict:
    """nanoGPT's CPU training loop, reproduced (see the module docstring)."""
    import torch

    sys.path.insert(0, str(REPO))
    from tune_gpt.model import GPT, GPTConfig

    chars, get_batch, _ = nanogpt_data(data)
    T = RECIPE["block_size"]

    torch.manual_seed(1337)
    model = GPT(GPTConfig(vocab_size=len(chars), block_size=T, n_layer=RECIPE["n_layer"], n_head=RECIPE["n_head"],
                          n_embd=RECIPE["n_embd"], dropout=0.0, bias=False))
    opt = torch.optim.AdamW(model.optim_groups(RECIPE["weight_decay"]), lr=RECIPE["lr"], betas=(0.9, RECIPE["beta2"]))
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    X, Y = get_batch()
    stamps = []
    for it in range(steps):
        lr = RECIPE["lr"] * (it + 1) / (RECIPE["warmup"] + 1) if it < RECIPE["warmup"] else RECIPE["lr"]
        for g in opt.param_groups:
            g["lr"] = lr
        _, loss = model(X, Y)
        X, Y = get_batch()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), RECIPE["grad_clip"])
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        loss.item()
        stamps.append(time.perf_counter())
    dts = [b - a for a, b in zip(stamps, stamps[1:])][warmup:]
    return _summary("nanogpt-loop", dts)


def bench_real_nanogpt(nanogpt: str, data: str, steps: int, warmup: int) -> dict:
    """Run a nanoGPT checkout's own train.py on the CPU recipe and parse its step times."""
    root = Path(nanogpt).resolve()
    ds = root / "data" / "shakespeare_char"
    if not (ds / "train.bin").is_file():
        subprocess.run([sys.executable, "prepare.py"], cwd=ds, check=True, capture_output=True)
    cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
           "--eval_iters=20", "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4",
           "--n_head=4", "--n_embd=128", f"--max_iters={steps}", "--lr_decay_iters=2000", "--dropout=0.0",
           "--eval_interval=100000", "--always_save_checkpoint=False"]
    p = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    times = [float(m) / 1000 for m in re.findall(r"time ([0-9.]+)ms", p.stdout)]
    return _summary("nanogpt", times[warmup:])


def _summary(name: str, dts: list[float]) -> dict:
    med = statistics.median(dts)
    return {"name": name, "steps_timed": len(dts), "median_ms": med * 1000,
            "tokens_per_s": RECIPE["batch_size"] * RECIPE["block_size"] / med,
            "mean_ms": statistics.fmean(dts) * 1000}


def paired_speedups(rows: list[dict], name: str = "tune_gpt") -> list[float]:
    """nanogpt-loop ms / `name`'s ms for each round (the runs made back to back).

    The machine's speed drifts by more than the gap being measured, so the best of each side
    can pair a lucky run with an unlucky one; the median of the rounds' own ratios is steadier.
    """
    ref = [r["median_ms"] for r in rows if r["name"] == "nanogpt-loop"]
    ours = [r["median_ms"] for r in rows if r["name"] == name]
    return [a / b for a, b in zip(ref, ours)]


def _child(kind: str, args: argparse.Namespace) -> dict:
    """Each measurement in a fresh process, so neither side inherits the other's warm state."""
    code = (f"import json, sys; sys.path.insert(0, {str(REPO / 'benchmarks')!r}); import train_speed as b; "
            f"print(json.dumps(b.bench_{kind}({args.data!r}, {args.steps}, {args.warmup})))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, WANDB_MODE="disabled"))
    if p.returncode:
        raise SystemExit(f"{kind} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20, help="first steps left out of the median")
    ap.add_argument("--rounds", type=int, default=2, help="alternate the two sides this many times")
    ap.add_argument("--nanogpt", help="a nanoGPT checkout to time as well")
    ap.add_argument("--record", action="store_true", help="append the table to docs/BENCHMARKS.md")
    args = ap.parse_args()
    rows = []
    for _ in range(args.rounds):
        rows.append(_child("nanogpt_loop", args))
        rows.append(_child("tune_gpt", args))
        rows.append(_child("tune_gpt_fp32", args))
    if args.nanogpt:
        rows.append(bench_real_nanogpt(args.nanogpt, args.data, args.steps, args.warmup))
    best: dict[str, dict] = {}
    for r in rows:
        if r["name"] not in best or r["median_ms"] < best[r["name"]]["median_ms"]:
            best[r["name"]] = r
    ref = best["nanogpt-loop"]["median_ms"]
    lines = ["| loop | median ms/step | tokens/s | speed-up vs nanogpt-loop |", "|---|---|---|---|"]
    for r in best.values():
        lines.append(f"| {r['name']} | {r['median_ms']:.1f} | {r['tokens_per_s']:,.0f} | {ref / r['median_ms']:.2f}x |")
    lines.append("")
    for name in ("tune_gpt", "tune_gpt-highest"):
        pairs = paired_speedups(rows, name)
        lines.append(f"{name}'s speed-up round by round (against the nanogpt-loop run of the same round): "
                     f"{', '.join(f'{p:.2f}x' for p in pairs)}; median **{statistics.median(pairs):.2f}x**  ")
    table = "\n".join(lines)
    print(table)
    print("all rounds: " + ", ".join(f"{r['name']} {r['median_ms']:.1f} ms" for r in rows))
    if args.record:
        _record("Training speed (CPU, nanoGPT's recipe)", table, " ".join(sys.argv))


def _record(title: str, table: str, command: str) -> None:
    import torch

    doc = REPO / "docs" / "BENCHMARKS.md"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    block = (f"\n### {title} — {time.strftime('%Y-%m-%d')}\n\n`python {command}`  \n"
             f"machine: {os.cpu_count()} cores, {cpu}, torch {torch.__version__}\n\n{table}\n")
    with open(doc, "a", encoding="utf-8") as f:
        f.write(block)
    print(f"recorded in {doc}")


if __name__ == "__main__":
    main()
