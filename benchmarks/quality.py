"""Quality on nanoGPT's CPU recipe: tune_gpt's train() against nanoGPT's loop, 2000 steps each.

    python benchmarks/quality.py [--steps 2000] [--seed 1337] [--record]

Prints, for each side, the validation loss on the whole validation split
(non-overlapping windows of 64) after training; for tune_gpt also the val loss
it reports itself (its fixed evaluation windows). The nanoGPT side is the loop
of benchmarks/train_speed.py (nanoGPT's batches, unfused AdamW, its schedule).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from train_speed import DEFAULT_DATA, RECIPE, _record, nanogpt_data  # noqa: E402


def full_val_loss(model, val_ids) -> float:
    import torch

    T = RECIPE["block_size"]
    val = torch.as_tensor(val_ids, dtype=torch.long)
    n = (len(val) - 1) // T
    x, y = val[: n * T].view(n, T), val[1 : n * T + 1].view(n, T)
    total = 0.0
    model.eval()
    with torch.no_grad():
        for i in range(0, n, 256):
            _, loss = model(x[i : i + 256], y[i : i + 256])
            total += loss.item() * len(x[i : i + 256])
    return total / n


def tune_gpt_side(data: str, steps: int, seed: int) -> dict:
    from tune_gpt.data import load_corpus
    from tune_gpt.train import load_checkpoint, model_from_checkpoint

    out = tempfile.mkdtemp()
    p = subprocess.run([sys.executable, "-m", "tune_gpt.train", "--data", data, "--max_steps", str(steps),
                        "--seed", str(seed), "--output_dir", out, "--wandb_mode", "disabled", "--no-progress",
                        "--sample_tokens", "0"], capture_output=True, text=True, cwd=REPO)
    if p.returncode:
        raise SystemExit(p.stderr[-2000:])
    reported = float(p.stderr.rsplit("best val loss ", 1)[1].split(",")[0])
    model, _ = model_from_checkpoint(load_checkpoint(Path(out) / "model.pt"))
    corpus = load_corpus(data)
    return {"name": "tune_gpt", "reported_val_loss": reported, "full_val_loss": full_val_loss(model, corpus.val)}


def nanogpt_side(data: str, steps: int, seed: int) -> dict:
    import torch

    from tune_gpt.model import GPT, GPTConfig

    chars, get_batch, val_ids = nanogpt_data(data)
    T = RECIPE["block_size"]

    def get_lr(it):
        lr, warm, floor = RECIPE["lr"], RECIPE["warmup"], RECIPE["min_lr"]
        if it < warm:
            return lr * (it + 1) / (warm + 1)
        r = (it - warm) / (steps - warm)
        return floor + 0.5 * (1 + math.cos(math.pi * r)) * (lr - floor)

    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=len(chars), block_size=T, n_layer=4, n_head=4, n_embd=128))
    opt = torch.optim.AdamW(model.optim_groups(RECIPE["weight_decay"]), lr=RECIPE["lr"], betas=(0.9, RECIPE["beta2"]))
    X, Y = get_batch()
    for it in range(steps):
        for g in opt.param_groups:
            g["lr"] = get_lr(it)
        _, loss = model(X, Y)
        X, Y = get_batch()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), RECIPE["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"name": "nanogpt-loop", "reported_val_loss": None, "full_val_loss": full_val_loss(model, val_ids)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    rows = [tune_gpt_side(args.data, args.steps, args.seed), nanogpt_side(args.data, args.steps, args.seed)]
    lines = ["| loop | reported val loss | val loss on the whole validation split |", "|---|---|---|"]
    for r in rows:
        rep = f"{r['reported_val_loss']:.4f}" if r["reported_val_loss"] is not None else "n/a"
        lines.append(f"| {r['name']} | {rep} | {r['full_val_loss']:.4f} |")
    table = "\n".join(lines)
    print(table)
    print(json.dumps(rows))
    if args.record:
        _record(f"Quality after {args.steps} steps (seed {args.seed})", table, " ".join(sys.argv))


if __name__ == "__main__":
    main()
