"""Sample text from a saved model: ``python -m tune_gpt.generate --checkpoint PATH --prompt TEXT``.

PATH is a ``model.pt`` / ``ckpt.pt`` file or a folder holding one (a run's
output folder, a replay's, or a trial's checkpoint).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Iterator, TextIO

from tune_gpt.cli import OneLineParser, run_main
from tune_gpt.config import check_text
from tune_gpt.errors import ConfigError


def find_model(path: str | Path) -> Path:
    """The model file `path` names: a file, or in a folder the newest of its final model (model.pt) and its
    last checkpoint (a run stopped early in a folder an earlier run used leaves that run's model.pt behind,
    older than its own checkpoint). A trial's folder: its latest checkpoint_NNNNNN."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    found = [c for c in (p / "model.pt", p / "checkpoint" / "ckpt.pt", p / "ckpt.pt") if c.is_file()]
    if not found and p.is_dir():  # a Tune trial's folder: its checkpoints are checkpoint_000000, _000001, ...
        found = sorted(p.glob("checkpoint_*/ckpt.pt"))[-1:]
    if not found:
        raise ConfigError(f"checkpoint: no model.pt or ckpt.pt at {path}")
    return max(found, key=lambda c: c.stat().st_mtime_ns)


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, num_samples: int = 1) -> None:
    """One line naming the first bad sampling setting."""
    if max_new_tokens < 0:
        raise ConfigError(f"--max_new_tokens: must be >= 0, got {max_new_tokens}")
    if num_samples < 1:
        raise ConfigError(f"--num_samples: must be >= 1, got {num_samples}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ConfigError(f"--temperature: must be a number > 0, got {temperature} (for the likeliest character "
                          f"each time, use --top_k 1)")
    if top_k is not None and top_k < 0:
        raise ConfigError(f"--top_k: must be >= 0 (0: no filter), got {top_k}")


def generate(checkpoint: str | Path, prompt: str = "\n", max_new_tokens: int = 200, *, temperature: float = 0.8,
             top_k: int | None = 200, seed: int = 1337, device: str = "cpu", num_samples: int = 1) -> list[str]:
    """Return `num_samples` continuations of `prompt` (prompt included); sample i uses seed `seed` + 1000 i."""
    return list(iter_samples(checkpoint, prompt, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                             device=device, num_samples=num_samples))


def iter_samples(checkpoint: str | Path, prompt: str = "\n", max_new_tokens: int = 200, *, temperature: float = 0.8,
                 top_k: int | None = 200, seed: int = 1337, device: str = "cpu", num_samples: int = 1) -> Iterator[str]:
    """`generate`'s samples, each as soon as it is made (the command prints it then, not after the last)."""
    check_sampling(max_new_tokens, temperature, top_k, num_samples)
    check_text("--prompt", prompt)
    if not 0 <= seed < 2**63 - 1000 * num_samples:  # sample i uses seed + 1000 i
        raise ConfigError(f"--seed: {seed} is outside [0, 2**63 - 1000 * num_samples)")
    path = find_model(checkpoint)  # before torch loads: a wrong path is answered at once
    from tune_gpt.train import auto_device, available_device, load_checkpoint, model_from_checkpoint, sample_text

    device = str(available_device(auto_device() if device == "auto" else device))  # missing here: one line
    top_k = top_k or None  # 0: no top-k filter
    state = load_checkpoint(path, map_location=device)
    model, tok = model_from_checkpoint(state, device, source=path)
    from tune_gpt.data import one_newline

    unknown = tok.unknown_chars(one_newline(prompt))
    if unknown:
        warnings.warn(f"prompt characters never seen in training are replaced: {''.join(sorted(unknown))!r}")
    for i in range(num_samples):
        yield sample_text(model, tok, prompt, max_new_tokens, seed + 1000 * i, device, temperature, top_k)


@contextlib.contextmanager
def _escaping_what_cannot_be_encoded(stream: TextIO) -> Iterator[None]:
    """Characters `stream`'s encoding lacks (PYTHONIOENCODING=ascii, a C locale) written as ``\\xe9``, not a
    UnicodeEncodeError once the sampling is done; the stream as it was afterwards (main may run in a notebook)."""
    errors = getattr(stream, "errors", None)
    if errors in (None, "backslashreplace") or not hasattr(stream, "reconfigure"):
        yield
        return
    stream.reconfigure(errors="backslashreplace")
    try:
        yield
    finally:
        stream.reconfigure(errors=errors)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m tune_gpt.generate", description=__doc__.splitlines()[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="model.pt, ckpt.pt, or a folder holding one (a run's, a replay's, a trial's)")
    parser.add_argument("--prompt", default="\n", help="text to continue")
    parser.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=200, help="characters to add")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="below 1: safer, above 1: more varied (--top_k 1: always the likeliest)")
    parser.add_argument("--top_k", "--top-k", type=int, default=200, help="sample among the k likeliest (0: all)")
    parser.add_argument("--num_samples", "--num-samples", type=int, default=1, help="continuations to print")
    parser.add_argument("--seed", type=int, default=1337, help="the same seed gives the same text")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps, or auto (a GPU when there is one)")

    def _run() -> int:
        args = parser.parse_args(argv)
        texts = iter_samples(args.checkpoint, args.prompt, args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k, seed=args.seed, device=args.device, num_samples=args.num_samples)
        with _escaping_what_cannot_be_encoded(sys.stdout):
            try:
                for text in texts:
                    print(text)
                    print("-" * 40, flush=True)
            except BrokenPipeError:
                # The reader stopped (`| head -1`): no traceback, and none again when Python flushes stdout at
                # exit (Python's documented idiom). 141 (128 + SIGPIPE) is what a shell reports for a command
                # the closed pipe ended, `yes | head -1` too: the samples asked for were not all delivered,
                # which `set -o pipefail` can see, as for any other command.
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                return 141
        return 0

    return run_main(_run, prog="tune_gpt.generate")


if __name__ == "__main__":
    sys.exit(main())
