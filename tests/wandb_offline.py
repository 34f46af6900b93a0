"""Read an offline W&B run (``run-*.wandb``) so tests can assert on what was logged.

The file is a LevelDB-style log of protobuf ``Record`` messages: a 7-byte header
(``:W&B``, magic 0xBEE1, version), then 32 KiB blocks of chunks, each with a
4-byte CRC, a 2-byte length and a 1-byte type (full / first / middle / last).
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = 7


@dataclass
class OfflineRun:
    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    group: str = ""
    job_type: str = ""
    project: str = ""
    name: str = ""
    run_id: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None  # None: the run was never finished (no exit record)
    step_metrics: dict[str, str] = field(default_factory=dict)  # define_metric: name or glob -> its x-axis

    @property
    def history_keys(self) -> set[str]:
        return {k for row in self.history for k in row if not k.startswith("_")}


def _records(path: Path):
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, buf = HEADER, b""
    while pos + 7 <= len(data):
        left_in_block = BLOCK - (pos % BLOCK)
        if left_in_block < 7:
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):
            return  # a chunk still being written (wandb-core writes a block out as it fills)
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            pos += BLOCK - (pos % BLOCK) if pos % BLOCK else 0
            continue
        if kind == 1:
            yield chunk
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            yield buf + chunk
            buf = b""


def read_offline_run(run_dir: str | Path, wait: float = 30.0) -> OfflineRun:
    """The run as its file holds it, once the file is complete.

    ``run.finish()`` returns before wandb-core has written the file out: the service is told the run is
    over by a message it does not answer, and it writes the last block (the last history row, the final
    summary, the exit record) when it closes the run's stream. Under load that comes after the caller
    reads, and may meet a block half written. So the file is read again until it ends with its exit
    record, for up to `wait` seconds; a run that was never finished comes back with ``exit_code`` None
    once the wait is over.
    """
    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + wait
    while True:
        try:
            out = _read_once(run_dir)
        except (DecodeError, AssertionError, ValueError):  # read while wandb-core was writing it (empty, half)
            if time.monotonic() >= deadline:
                raise
        else:
            if out.exit_code is not None or time.monotonic() >= deadline:
                return out
        time.sleep(0.2)


def _read_once(run_dir: str | Path) -> OfflineRun:
    from wandb.proto import wandb_internal_pb2 as pb

    run_dir = Path(run_dir)
    files = list(run_dir.glob("run-*.wandb")) if run_dir.is_dir() else [run_dir]
    assert files, f"no run-*.wandb in {run_dir}"
    out = OfflineRun(path=files[0])
    for raw in _records(files[0]):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run  # later run records may carry only what changed: keep what is set
            out.tags = list(r.tags) or out.tags
            out.group = r.run_group or out.group
            out.job_type = r.job_type or out.job_type
            out.project = r.project or out.project
            out.name = r.display_name or out.name
            out.run_id = r.run_id or out.run_id
            for item in r.config.update:
                out.config[item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in rec.config.update:
                out.config[item.key] = json.loads(item.value_json)
        elif kind == "history":
            row = {}
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            out.history.append(row)
        elif kind == "metric":
            m = rec.metric
            if m.step_metric and not m.expanded_from_glob:
                out.step_metrics[m.name or m.glob_name] = m.step_metric
        elif kind == "exit":
            out.exit_code = rec.exit.exit_code
        elif kind == "summary":
            for item in rec.summary.update:  # as W&B applies them: a nested key makes (or replaces) a dict
                *parents, leaf = [item.key] if item.key else list(item.nested_key)
                node = out.summary
                for k in parents:
                    if not isinstance(node.get(k), dict):
                        node[k] = {}
                    node = node[k]
                node[leaf] = json.loads(item.value_json)
    out.config = {k: (v.get("value") if isinstance(v, dict) and "value" in v else v) for k, v in out.config.items()}
    return out


def offline_runs(root: str | Path) -> list[OfflineRun]:
    """Every offline run under `root` (any depth)."""
    return [read_offline_run(p.parent) for p in sorted(Path(root).rglob("offline-run-*/run-*.wandb"))]
