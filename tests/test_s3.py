"""Shared storage: --storage-path s3://… against an S3-compatible server (moto, on localhost).

The endpoint and the (fake) credentials come from the environment, as they would for a
user: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION. Ray
(through pyarrow) and tune_gpt.report read them; nothing may write them into the results.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_space
from fake_experiment import standard_experiment
from wandb_offline import read_offline_run
from tune_gpt.errors import DataError
from tune_gpt.report import load_results, write_report
from tune_gpt.search import EXPERIMENT_FILE, STATUS_FILE, SearchOptions, experiment_uri, plan_search

BUCKET = "tune-gpt-test"
SECRET = "tuneGptFakeSecret-8c1f0e7d2b9a4f65"  # must never reach a results file
WANDB_KEY = "0123456789abcdef" * 2 + "fa4e0c17"  # a W&B-shaped fake key (40 characters), same rule


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on a free localhost port, a bucket, and the environment pointing at it."""
    try:
        import boto3
        import moto
        import moto.server as moto_server
    except ImportError as exc:
        pytest.fail(f"{exc}: the S3 tests need moto's server: pip install 'moto[server]>=5.2.2'")
    # moto 5.2.0/5.2.1 answer CompleteMultipartUpload with a root tag that pyarrow's S3 client
    # rejects (getmoto/moto#10055), so every upload would hang in retries.
    version = tuple(int(x) for x in re.findall(r"\d+", moto.__version__)[:3])
    assert not (5, 2, 0) <= version < (5, 2, 2), f"moto {moto.__version__}: need moto[server]>=5.2.2"
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "tune-gpt-test-key", "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        try:
            yield env
        finally:
            server.stop()


def _upload(local: Path, uri: str) -> None:
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(uri)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def _download(uri: str, local: Path) -> None:
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(uri)
    pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


# ------------------------------------------------- the report reads a URI (no Ray)


def test_report_reads_an_experiment_in_s3_like_a_local_one(s3, tmp_path, monkeypatch):
    local = standard_experiment(tmp_path / "local")
    uri = f"s3://{BUCKET}/fake-runs/standard"
    _upload(local, uri)
    want, got = load_results(local), load_results(uri)
    assert list(got["trial_id"]) == list(want["trial_id"]) and list(got["status"]) == list(want["status"])
    assert got.drop(columns="trial_dir").equals(want.drop(columns="trial_dir"))
    assert got.attrs["experiment"] == uri and got.attrs["searched"] == want.attrs["searched"]
    assert all(d.startswith(f"{uri}/trainable_") for d in got["trial_dir"])
    # The storage folder above one experiment works too, as it does locally.
    assert load_results(f"s3://{BUCKET}/fake-runs").attrs["experiment"] == uri

    monkeypatch.chdir(tmp_path)
    out = write_report(uri)  # default: ./tune_reports/<name>, since the URI's folder is not local
    assert out == Path("tune_reports") / "standard"
    assert {"report.md", "report.html", "trials.csv"} <= {p.name for p in out.iterdir()}
    assert f"python -m tune_gpt.replay {uri}" in (out / "report.md").read_text()

    with pytest.raises(DataError, match="nothing-here"):
        load_results(f"s3://{BUCKET}/nothing-here")
    # an experiment without tune_gpt's experiment file is named as its folder in storage (replay's W&B group),
    # not as the temporary local copy the report reads
    from tune_gpt.report import _read_experiment

    bare = standard_experiment(tmp_path / "bare", info=False)
    _upload(bare, f"s3://{BUCKET}/fake-runs/renamed")
    assert _read_experiment(f"s3://{BUCKET}/fake-runs/renamed").info["name"] == "renamed"


def test_credentials_in_an_experiment_uri_are_refused_and_its_query_is_kept(s3, tmp_path, monkeypatch, capsys):
    """pyarrow takes s3://KEY:SECRET@bucket/…: report and replay read such a URI and wrote it, secret and all,
    into report.md's replay command and replay_summary.json (the search refuses it as --storage-path). And
    the replay command dropped the query that reaches a MinIO/Ceph endpoint (?endpoint_override=…)."""
    from tune_gpt.replay import main as replay_main
    from tune_gpt.report import main as report_main

    _upload(standard_experiment(tmp_path / "local"), f"s3://{BUCKET}/creds/standard")
    monkeypatch.chdir(tmp_path)
    for uri in (f"s3://{s3['AWS_ACCESS_KEY_ID']}:{SECRET}@{BUCKET}/creds/standard",
                f"s3://{BUCKET}/creds/standard?secret_key={SECRET}&region=us-east-1"):
        for main in (report_main, lambda argv: replay_main([*argv, "--no-wandb"])):
            assert main([uri]) == 2
            err = capsys.readouterr().err
            assert len(err.strip().splitlines()) == 1 and SECRET not in err, err
            assert "credentials in the URI would be written into the report" in err and "AWS_SECRET_ACCESS_KEY" in err
    assert not (tmp_path / "tune_reports").exists()  # refused before anything was read or written

    host_port = s3["AWS_ENDPOINT_URL"].removeprefix("http://")
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the endpoint only in the URI, as for MinIO
    uri = f"s3://{BUCKET}/creds/standard?endpoint_override={host_port}&scheme=http"
    out = write_report(uri)
    assert f"python -m tune_gpt.replay '{uri}'" in (out / "report.md").read_text()
    assert load_results(uri).attrs["experiment"] == uri


def test_the_resume_hint_of_a_remote_search_interrupted_before_it_saved_anything():
    """A signal before the experiment file is written (the corpus, Ray's start-up) has nothing to resume, in
    S3 as on disk; once written, the hint names the experiment. Storage is not looked up at the signal."""
    from tune_gpt.search import _resume_hint

    plan = plan_search(SearchOptions(storage_path="s3://bucket/runs"))
    assert _resume_hint(plan) == "the search had not started; nothing was saved"
    plan.written = True
    assert _resume_hint(plan).startswith("the search state is saved in s3://bucket/runs/default; resume it with:")
    resumed = plan_search(SearchOptions(storage_path="s3://bucket/runs", resume=True))
    assert "resume it with" in _resume_hint(resumed)


def test_experiment_uri_keeps_a_query_string_at_the_end():
    plan = plan_search(SearchOptions(storage_path="s3://b/p/?endpoint_override=localhost:9000&scheme=http",
                                     name="exp"))
    assert experiment_uri(plan) == "s3://b/p/exp?endpoint_override=localhost:9000&scheme=http"


# ---------------------------------------------------------- the search, end to end


@pytest.mark.slow
def test_search_writes_to_s3_and_the_report_reads_it_back(s3, tmp_path, corpus_file):
    storage = f"s3://{BUCKET}/runs"
    uri = f"{storage}/tiny"
    env = dict(os.environ, **s3, WANDB_MODE="offline", WANDB_API_KEY=WANDB_KEY)
    cmd = [sys.executable, "-m", "tune_gpt.search", "--space", str(tiny_space(tmp_path, n=2, steps=10, every=5)),
           "--storage-path", storage, "--data", str(corpus_file), "--scheduler", "none", "-q"]
    p = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-4000:]
    assert f"results in {uri}" in p.stdout and "trials table: tune_reports/tiny/trials.csv" in p.stdout
    (replay,) = [line.split(": ", 1)[1] for line in p.stdout.splitlines() if line.startswith("replay the best trial")]
    assert replay == f"python -m tune_gpt.replay {uri}"
    # the command it prints works: the trial replayed from the bucket, into a local folder, reproduced
    r = subprocess.run([sys.executable, "-m", "tune_gpt.replay", uri, "--check", "--no-wandb"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "check: MATCH" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    (summary,) = (tmp_path / "tune_reports" / "tiny").glob("replay-*-check/replay_summary.json")
    summary = json.loads(summary.read_text())
    assert summary["experiment"] == uri and summary["match"] and summary["steps"] == 10
    assert (tmp_path / "tune_reports" / "tiny" / "report.html").is_file()
    assert not (tmp_path / "tune_results").exists()  # nothing went to the local default

    df = load_results(uri)
    assert len(df) == 2 and set(df["status"]) == {"finished"} and df["best_val_loss"].notna().all()
    assert df.attrs["experiment"] == uri and df.attrs["space_known"]  # tune_gpt_experiment.json is there

    got = tmp_path / "downloaded"
    _download(uri, got)  # everything: checkpoints, Ray's pickles, W&B runs, TensorBoard events
    trials = [d for d in got.iterdir() if (d / "params.json").is_file()]
    assert len(trials) == 2 and (got / EXPERIMENT_FILE).is_file() and (got / "tuner.pkl").is_file()
    for d in trials:
        assert json.loads((d / STATUS_FILE).read_text())["status"] == "finished"
        assert any(d.glob("checkpoint_*/ckpt.pt"))
        # its offline W&B run, complete: Tune's last upload ran before the callback closed the runs
        (run,) = [read_offline_run(r, wait=0) for r in (d / "wandb").glob("offline-run-*")]
        assert run.exit_code == 0 and run.summary["trial_status"] == "finished", run.path
        assert [row["step"] for row in run.history] == [5, 10]
    files = [f for f in got.rglob("*") if f.is_file()]
    assert any(f.suffix == ".pkl" for f in files) and any(".wandb" in f.name for f in files)
    for f in files:
        data = f.read_bytes()
        assert SECRET.encode() not in data, f"the secret key was written into {f.relative_to(got)}"
        assert WANDB_KEY.encode() not in data, f"the W&B key was written into {f.relative_to(got)}"

    # The same name again needs --resume; --resume finds the experiment in the bucket.
    p = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--resume" in p.stderr and uri in p.stderr, p.stderr[-2000:]
    p = subprocess.run([*cmd, "--name", "missing", "--resume"], env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and f"no experiment to resume at {storage}/missing" in p.stderr, p.stderr[-2000:]
    p = subprocess.run([*cmd, "--resume", "--no-report"], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    assert load_results(uri).equals(df)  # finished trials were not run again


def _reported_in(uri: str) -> int:
    """How many trials of the experiment at `uri` have a non-empty result.json in storage."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return sum(1 for i in infos if i.base_name == "result.json" and i.size)


@pytest.mark.slow
def test_sigusr1_interrupts_a_search_in_s3(s3, tmp_path, corpus_file):
    """Ray's graceful stop (SIGUSR1, which SLURM's --signal=USR1 sends before a job's time limit) is an
    interruption in S3 as on disk: the exit status and the --resume line, not the search's end. It was
    told from Tune's saved trial states, which were read only from a local folder: in S3 the stopped search
    was summarised as finished (exit 0) and its Optuna trials closed."""
    storage = f"s3://{BUCKET}/usr1"
    space = tiny_space(tmp_path, n=2, steps=100000, every=10)
    cmd = [sys.executable, "-m", "tune_gpt.search", "--space", str(space), "--storage-path", storage,
           "--data", str(corpus_file), "--scheduler", "none", "--no-wandb", "--no-report"]
    proc = subprocess.Popen(cmd, env=dict(os.environ, **s3), cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and _reported_in(f"{storage}/tiny") < 2:
            time.sleep(0.5)
        assert proc.poll() is None and _reported_in(f"{storage}/tiny") == 2, "no 2 trials reported in storage"
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    last = [ln for ln in err.strip().splitlines() if ln.strip()][-1]
    assert proc.returncode == 128 + signal.SIGUSR1, err[-3000:]
    assert "interrupted" in last and f"the search state is saved in {storage}/tiny" in last and "--resume" in last, last
