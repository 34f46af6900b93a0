"""A real two-node Ray cluster on this machine: the search joins it with --address and its
trials run on both nodes.

The head and the worker are `ray start --block` processes, each in its own session and
its own --temp-dir, so the test stops exactly them (and their children) afterwards; it
never runs `ray stop`, which would kill every Ray process on the machine, including the
in-process Ray that other tests of this session use (conftest.ray_session).

Token authentication stays on: the cluster gets a fresh token through RAY_AUTH_TOKEN (what
the README's Scaling out section tells users to do on their other nodes), so the test does not depend on
~/.ray/auth_token and a driver without the token is refused.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import tiny_space
from tune_gpt.search import STATUS_FILE

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 90


def _ray_cli() -> str:
    beside = Path(sys.executable).with_name("ray")  # the ray of this interpreter, not a shim's
    found = str(beside) if beside.is_file() else shutil.which("ray")
    if not found:
        pytest.fail("the `ray` command of ray[tune] is not installed next to this Python")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _stop_node(proc: subprocess.Popen, temp_dir: str) -> None:
    """Stop one `ray start --block` node and everything it started, and nothing else."""
    import psutil

    doomed = _descendants(proc.pid)
    for p in psutil.process_iter(["cmdline"]):  # processes re-parented away from the tree
        try:
            if any(temp_dir in part for part in p.info["cmdline"] or ()):
                doomed.append(p)
        except psutil.Error:
            pass
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` shuts its node down on SIGTERM
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    _, alive = psutil.wait_procs(doomed, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything left in the node's own session
    except (ProcessLookupError, PermissionError):
        pass


def _wait_for_nodes(address: str, env: dict, n: int) -> list[str]:
    """The ids of the cluster's live nodes, once there are `n` of them."""
    probe = (
        "import json, sys, time, ray\n"
        f"ray.init(address={address!r}, logging_level='ERROR', log_to_driver=False)\n"
        f"deadline = time.time() + {START_TIMEOUT_S}\n"
        "while True:\n"
        "    ids = [x['NodeID'] for x in ray.nodes() if x['Alive']]\n"
        f"    if len(ids) >= {n} or time.time() > deadline:\n"
        "        break\n"
        "    time.sleep(0.5)\n"
        "print(json.dumps(ids))\n"
    )
    p = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                       timeout=START_TIMEOUT_S + 60)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.fixture
def two_node_cluster():
    """A head and a worker, 1 CPU each, token authentication on; stopped whatever happens."""
    port = _free_port()
    address = f"127.0.0.1:{port}"
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               RAY_USAGE_STATS_ENABLED="0", WANDB_MODE="offline")
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    ray = _ray_cli()
    common = ["--block", "--num-cpus=1", "--num-gpus=0", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    nodes: list[tuple[subprocess.Popen, str]] = []
    try:
        for role in ("head", "worker"):
            # Short folders: Ray's Unix sockets live under --temp-dir and their paths must stay short.
            temp_dir = tempfile.mkdtemp(prefix=f"tg{role[0]}", dir="/tmp")
            where = (["--head", f"--port={port}", "--include-dashboard=false"] if role == "head"
                     else [f"--address={address}"])
            log = open(Path(temp_dir) / f"{role}.log", "w")
            proc = subprocess.Popen([ray, "start", *where, *common, f"--temp-dir={temp_dir}"], env=env,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            log.close()
            nodes.append((proc, temp_dir))
            if role == "head":
                deadline = time.time() + START_TIMEOUT_S
                while True:
                    assert proc.poll() is None, (Path(temp_dir) / "head.log").read_text()[-3000:]
                    try:
                        socket.create_connection(("127.0.0.1", port), timeout=1).close()
                        break
                    except OSError:
                        assert time.time() < deadline, "the head node did not open its port"
                        time.sleep(0.5)
        node_ids = _wait_for_nodes(address, env, 2)
        logs = "\n".join((Path(d) / f"{r}.log").read_text()[-2000:] for (_, d), r in zip(nodes, ("head", "worker")))
        assert len(node_ids) == 2, logs
        yield {"address": address, "env": env, "node_ids": node_ids}
    finally:
        for proc, temp_dir in reversed(nodes):
            _stop_node(proc, temp_dir)
        for _, temp_dir in nodes:
            shutil.rmtree(temp_dir, ignore_errors=True)
            if os.path.exists(temp_dir):  # a late log write from a dying process: once more
                time.sleep(1)
                shutil.rmtree(temp_dir, ignore_errors=True)


def test_search_joins_a_two_node_cluster_and_uses_both_nodes(two_node_cluster, tmp_path, corpus_file):
    c = two_node_cluster
    space = tiny_space(tmp_path, n=4, steps=10, every=5)
    cmd = [sys.executable, "-m", "tune_gpt.search", "--address", c["address"], "--space", str(space),
           "--storage-path", str(tmp_path / "results"), "--data", str(corpus_file), "--cpus-per-trial", "1",
           "--scheduler", "none", "--no-wandb", "--no-report", "-q"]
    p = subprocess.run(cmd, env=c["env"], cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-4000:]
    exp = tmp_path / "results" / "tiny"
    trials = sorted(d for d in exp.iterdir() if (d / "params.json").is_file())
    assert len(trials) == 4
    status = {d.name: json.loads((d / STATUS_FILE).read_text()) for d in trials}  # every trial, either node
    assert all(s["status"] == "finished" for s in status.values()), status
    used = {s["node_id"] for s in status.values()}
    assert used == set(c["node_ids"]), (used, c["node_ids"])  # both nodes trained trials

    # Authentication stays on: a driver with another token is turned away.
    bad = dict(c["env"], RAY_AUTH_TOKEN=secrets.token_hex(32))
    p = subprocess.run([*cmd, "--name", "intruder"], env=bad, cwd=tmp_path, capture_output=True, text=True,
                       timeout=180)
    last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert last.startswith("tune_gpt.search: error: --address") and "RAY_AUTH_MODE=token" in last, last
    assert not (tmp_path / "results" / "intruder").exists()
