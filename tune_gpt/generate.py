"""Sample text from a saved model: ``python -m tune_gpt.generate --checkpoint PATH --prompt TEXT``.

PATH is a ``model.pt`` / ``ckpt.pt`` file or a folder holding one (a run's
output folder, a replay's, or a trial's checkpoint).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

from tune_gpt.cli import OneLineParser, run_main
from tune_gpt.errors import ConfigError


def find_model(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if p.is_file():
        return p
    for cand in (p / "model.pt", p / "checkpoint" / "ckpt.pt", p / "ckpt.pt"):
        if cand.is_file():
            return cand
    raise ConfigError(f"checkpoint: no model.pt or ckpt.pt at {path}")


def generate(checkpoint: str | Path, prompt: str = "\n", max_new_tokens: int = 200, *, temperature: float = 0.8,
             top_k: int | None = 200, seed: int = 1337, device: str = "cpu", num_samples: int = 1) -> list[str]:
    """Return `num_samples` continuations of `prompt` (prompt included)."""
    if max_new_tokens < 0 or num_samples < 1 or temperature <= 0 or (top_k is not None and top_k < 0):
        raise ConfigError("max_new_tokens must be >= 0, num_samples >= 1, temperature > 0 and top_k >= 0")
    path = find_model(checkpoint)  # before torch loads: a wrong path is answered at once
    from tune_gpt.train import available_device, load_checkpoint, model_from_checkpoint, sample_text

    device = str(available_device(device))  # not a load error when the device is missing here
    top_k = top_k or None  # 0: no top-k filter
    state = load_checkpoint(path, map_location=device)
    model, tok = model_from_checkpoint(state, device, source=path)
    unknown = tok.unknown_chars(prompt)
    if unknown:
        warnings.warn(f"prompt characters never seen in training are replaced: {''.join(sorted(unknown))!r}")
    return [sample_text(model, tok, prompt, max_new_tokens, seed + i, device, temperature, top_k) for i in range(num_samples)]


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m tune_gpt.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="model.pt, ckpt.pt, or a folder holding one")
    parser.add_argument("--prompt", default="\n", help="text to continue")
    parser.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top_k", "--top-k", type=int, default=200, help="sample among the k likeliest (0: all)")
    parser.add_argument("--num_samples", "--num-samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", default="cpu")

    def _run() -> int:
        args = parser.parse_args(argv)
        for text in generate(args.checkpoint, args.prompt, args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k, seed=args.seed, device=args.device, num_samples=args.num_samples):
            print(text)
            print("-" * 40)
        return 0

    return run_main(_run, prog="tune_gpt.generate")


if __name__ == "__main__":
    sys.exit(main())
