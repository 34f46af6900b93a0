"""The GPU benchmark script runs end to end on the CPU in --dry-run mode (no GPU needed)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import REPO


@pytest.mark.slow
def test_gpu_sh_dry_run_writes_its_tables(tmp_path, corpus_file):
    out = tmp_path / "gpu"
    env = dict(os.environ, WANDB_MODE="disabled")
    p = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), str(out), "--dry-run", "--data", str(corpus_file)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    res = json.loads((out / "gpu.json").read_text())
    assert res["dry_run"] is True
    assert {r["size"] for r in res["speed"]} == {"tiny", "small", "medium"}
    assert all(r["tokens_per_s"] > 0 for r in res["speed"])
    assert [(r["size"], r["trials"]) for r in res["packing"]] == [("tiny", 1), ("tiny", 2)]
    assert all(r.get("aggregate_tokens_per_s", 0) > 0 for r in res["packing"]), res["packing"]
    assert "tokens/s" in (out / "gpu_speed.md").read_text() and "aggregate" in (out / "gpu_packing.md").read_text()
