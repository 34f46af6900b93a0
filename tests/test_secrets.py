"""The W&B API key never lands in a file: search, report and replay with a known fake key, then
every file under the results and output folders is read as bytes (pickles, W&B run files,
checkpoints, TensorBoard events included) and searched for the key and its base64 forms."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY_MODEL, write_space

FAKE_KEY = "f4k3" + "0123456789abcdef" * 2 + "cafe"  # 40 characters, like a real W&B key
SPACE = """
name: secret
method: optuna
num_samples: 2
scheduler: none
fixed:
""" + TINY_MODEL + """\
  max_steps: 10
  eval_interval: 5
  eval_iters: 1
  sample_tokens: 20
space:
  learning_rate: {loguniform: [1.0e-3, 2.0e-2]}
"""


def needles(secret: str) -> dict[str, bytes]:
    """The key as text, UTF-16, and base64 (standard and URL-safe) at each of the three byte alignments."""
    raw = secret.encode()
    out = {"raw": raw, "utf-16-le": secret.encode("utf-16-le"), "hex": raw.hex().encode()}
    for shift in range(3):
        for name, enc in (("b64", base64.b64encode), ("b64url", base64.urlsafe_b64encode)):
            coded = enc(b"\0" * shift + raw)
            out[f"{name}+{shift}"] = coded[4 if shift else 0:-4]  # the part no neighbouring byte can change
    return out


def leaks(root: Path, secret: str) -> list[str]:
    found = []
    pats = needles(secret)
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            try:
                data = p.read_bytes()
            except FileNotFoundError:  # (a live Ray session's log or socket, gone since it was listed)
                continue
            found += [f"{p.relative_to(root)} ({how})" for how, pat in pats.items() if pat in data]
    return found


def test_needles_find_a_key_however_it_is_written(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"token=" + FAKE_KEY.encode())
    (tmp_path / "b.bin").write_bytes(b"xx" + base64.b64encode(b"k=" + FAKE_KEY.encode()) + b"yy")
    (tmp_path / "c.json").write_text('{"clean": true}')
    got = leaks(tmp_path, FAKE_KEY)
    assert any(g.startswith("a.txt") for g in got) and any(g.startswith("b.bin (b64") for g in got)
    assert not any(g.startswith("c.json") for g in got)


URL_TOKEN = "t0k3n" + "fedcba9876543210" * 2  # a corpus URL's token (a presigned or private link)
AWS_SECRET = "awsFAKEs3cret/" + "0123456789abcdef" * 2  # shaped like an AWS secret access key


@pytest.mark.slow
def test_no_secret_is_in_any_file_of_a_search_its_report_its_replay_and_a_run(tmp_path, corpus_file):
    """The W&B API key, and a token in the corpus URL (``--data https://host/corpus.txt?token=...``): the
    search, its trials (params.json, result.json, pickles, W&B and TensorBoard config), the report, the
    download cache and a replay or a single run write the URL with ``***`` for the token. A replay asks for
    the URL again, in one line."""
    from test_data import serving

    started = time.time()
    env = dict(os.environ, WANDB_API_KEY=FAKE_KEY, WANDB_MODE="offline", PYTHONPATH=str(REPO),
               AWS_SECRET_ACCESS_KEY=AWS_SECRET,  # Tune hands it to every trial actor in a runtime env
               WANDB_BASE_URL="http://127.0.0.1:9",  # offline anyway; never the real host
               TUNE_GPT_CACHE=str(tmp_path / "cache"))
    results, out = tmp_path / "results", tmp_path / "out"
    space = write_space(tmp_path / "secret.yaml", SPACE)

    def run(*args: str, rc: int = 0) -> str:
        p = subprocess.run([sys.executable, "-m", *args], env=env, capture_output=True, text=True, timeout=600,
                           cwd=tmp_path)
        assert p.returncode == rc, p.stderr[-3000:]
        assert FAKE_KEY not in p.stdout + p.stderr and URL_TOKEN not in p.stdout + p.stderr
        return p.stdout + p.stderr

    hits: list = []
    with serving({"body": corpus_file.read_bytes()}, hits) as base:
        url = f"{base}/corpus.txt?token={URL_TOKEN}"
        printed = run("tune_gpt.search", "--space", str(space), "--storage-path", str(results), "--data", url)
        exp = results / "secret"
        # the replay command it prints asks for the URL's token where *** stands, as the report's does
        replay = (f"python -m tune_gpt.replay {exp} --data '{base}/corpus.txt?token=***'  # the corpus URL with its "
                  "secret in place of ***")
        assert f"replay the best trial as a final run: {replay}" in printed, printed[-2000:]
        run("tune_gpt.report", str(exp), "--out", str(out / "report"))
        assert replay in (out / "report" / "report.md").read_text()
        said = run("tune_gpt.replay", str(exp), "--max-steps", "10", "--output-dir", str(out / "replay"), rc=2)
        assert said.strip().splitlines()[-1].endswith(
            "corpus.txt?token=***, whose password or token the experiment does not keep: give --data with the "
            "full URL"), said
        run("tune_gpt.replay", str(exp), "--max-steps", "10", "--output-dir", str(out / "replay"), "--data", url)
        run("tune_gpt.train", "--data", url, "--output_dir", str(out / "run"), "--max_steps", "10",
            "--eval_interval", "5", "--eval_iters", "1", "--model_size", "tiny", "--wandb_project", "p")
    assert hits, "the corpus came through the URL"

    assert list((exp / "wandb").glob("offline-run-*")), "the trials' W&B runs are there to be searched"
    assert list((out / "replay" / "wandb").glob("offline-run-*")), "so is the replay's"
    assert list((out / "run" / "wandb").glob("offline-run-*")), "and the single run's"
    assert list(exp.glob("**/*.pkl")) and list(out.glob("**/*.pt"))  # pickles and checkpoints searched too
    assert list((tmp_path / "cache").rglob("*.json")), "the download's record is searched too"
    params = json.loads(next(exp.glob("trial_*/params.json")).read_text())
    assert params["data"] == f"{base}/corpus.txt?token=***"  # the URL is kept, without its token
    for root in (results, out, tmp_path / "cache"):
        assert leaks(root, FAKE_KEY) == []
        assert leaks(root, URL_TOKEN) == []
    # nor in the logs of the Ray the search started (Ray's W&B callback hands the key to its logging actors in
    # a runtime_env, which Ray's runtime-env agent writes into runtime_env_agent.log)
    sessions = [d for d in ray_temp_dir().glob("session_2*") if d.is_dir() and d.stat().st_mtime >= started - 1]
    assert sessions and all((d / "logs").is_dir() for d in sessions), ray_temp_dir()
    for d in sessions:
        assert leaks(d / "logs", FAKE_KEY) == [] and leaks(d / "logs", AWS_SECRET) == []
    for root in (results, out):
        assert leaks(root, AWS_SECRET) == []


def ray_temp_dir() -> Path:
    try:
        from ray._common.utils import get_default_ray_temp_dir
    except ImportError:  # another Ray: its default
        return Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray"
    return Path(get_default_ray_temp_dir())


def test_passwords_in_urls_stay_out_of_the_experiment_file_and_a_resume_asks_for_them(tmp_path, monkeypatch):
    """--optuna-storage postgresql://user:PASSWORD@db/optuna (Optuna's usual form for a shared study) and
    tokens in URLs were saved as given in tune_gpt_experiment.json, whose command the report copies."""
    import json

    import pytest

    from tune_gpt.errors import ConfigError
    from tune_gpt.search import EXPERIMENT_FILE, SearchOptions, _argv_for_resume, _write_experiment_file, plan_search
    from tune_gpt.search import redact

    assert redact("postgresql://alice:s3cr3t@db:5432/optuna") == "postgresql://alice:***@db:5432/optuna"
    assert redact("https://ghp_T0KEN@example.com/corpus.txt") == "https://***@example.com/corpus.txt"
    assert redact("https://h/c.txt?X-Amz-Signature=abc&x=1&access_key=k") == "https://h/c.txt?X-Amz-Signature=***&x=1&access_key=***"
    # userinfo forms urllib now downloads with (curl -u TOKEN:, an empty user, an unencoded '@')
    assert redact("https://ghp_TOK:@h/x") == "https://***@h/x" and redact("https://:PW@h/x") == "https://:***@h/x"
    assert redact("http://alice:p@ss@host/c.txt") == "http://alice:***@host/c.txt"
    # passwords SQLAlchemy and AWS take with '?', '#' or '/' in them; an empty userinfo holds no secret
    assert redact("postgresql://alice:pa?ss@db/optuna") == "postgresql://alice:***@db/optuna"
    assert redact("postgresql://alice:pa#ss@db:5432/optuna") == "postgresql://alice:***@db:5432/optuna"
    assert redact("s3://AKIAFAKE:wJalr/K7MD+ENG@bucket/runs") == "s3://AKIAFAKE:***@bucket/runs"
    assert redact("https://@h/x") == "https://@h/x" and redact("https://h/c.txt?email=a@b.com") == "https://h/c.txt?email=a@b.com"
    assert redact("https://host:8080/c.txt?email=a@b.org") == "https://host:8080/c.txt?email=a@b.org"  # a port, a path
    # digits then '/' are a password where an '@' follows before any '?' (an AWS secret key may begin so)
    assert redact("s3://AKIAFAKE:1234/K7MD+ENG@bucket/runs") == "s3://AKIAFAKE:***@bucket/runs"
    assert redact("postgresql://alice:123/abc@db/optuna") == "postgresql://alice:***@db/optuna"
    assert redact("see https://host:8080/c.txt and x@y.org") == "see https://host:8080/c.txt and x@y.org"
    # outside http(s) (SQLAlchemy's and AWS's URLs) digits are a port only where no '@' follows in the URL
    assert redact("postgresql://alice:123?abc@db/optuna") == "postgresql://alice:***@db/optuna"
    assert redact("postgresql://alice:123/a#b@db/optuna") == "postgresql://alice:***@db/optuna"
    assert redact("redis://h:6379/0 and mail a@b.org") == "redis://h:6379/0 and mail a@b.org"
    # a quote ends a URL; an IPv6 host is no userinfo
    assert redact('"https://host:8080/c.txt","a@b.org"') == '"https://host:8080/c.txt","a@b.org"'
    assert redact("http://[::1]:8080/c.txt?email=a@b.org") == "http://[::1]:8080/c.txt?email=a@b.org"
    assert redact("https://h/c?JSESSIONID=x;jsessionid=y") == "https://h/c?JSESSIONID=***;jsessionid=***"
    # a name that only looks like one is no secret: --resume would ask for such a URL again
    assert redact("https://h/c.txt?author=bob&X-Auth=1") == "https://h/c.txt?author=bob&X-Auth=***"
    # other names a secret goes by, and the ;matrix and #fragment forms
    assert (redact("https://h/c.txt?auth=a&pwd=b&jwt=c&page=2;session_id=d#access_token=e&lang=en")
            == "https://h/c.txt?auth=***&pwd=***&jwt=***&page=2;session_id=***#access_token=***&lang=en")
    assert redact("sqlite:///tmp/optuna.db") == "sqlite:///tmp/optuna.db" and redact("s3://bucket/runs") == "s3://bucket/runs"

    monkeypatch.chdir(tmp_path)
    argv = ["--name", "s", "--optuna-storage", "postgresql://alice:s3cr3t@db/optuna", "--max-steps", "10"]
    plan = plan_search(SearchOptions(name="s", cli_argv=tuple(argv)))
    _write_experiment_file(plan)
    text = (plan.experiment_dir / EXPERIMENT_FILE).read_text()
    assert "s3cr3t" not in text and "postgresql://alice:***@db/optuna" in json.loads(text)["command"]
    with pytest.raises(ConfigError, match=r"^--resume: --optuna-storage held a password or token, which the "
                                          r"experiment file does not keep: give --optuna-storage \.\.\. again"):
        _argv_for_resume(["--resume", "--name", "s"])
    again = _argv_for_resume(["--resume", "--name", "s", "--optuna-storage", "postgresql://alice:s3cr3t@db/optuna"])
    assert again[-2:] == ["--optuna-storage", "postgresql://alice:s3cr3t@db/optuna"]  # given now: it wins


def test_a_search_started_before_urls_were_redacted_resumes_with_the_same_url(tmp_path):
    """An experiment file written before 8d2b367 holds the tokened URL in `fixed`: --resume with that URL
    compares it without the token (the same corpus), and a different URL is refused without printing it."""
    import json

    import pytest

    from tune_gpt.errors import ConfigError
    from tune_gpt.search import SearchOptions, _check_same_search, _search_info, plan_search

    url = "https://host/c.txt?token=OLDSECRET"
    plan = plan_search(SearchOptions(name="s", storage_path=str(tmp_path), overrides={"data": url}))
    saved = _search_info(plan)
    saved["fixed"]["data"] = url  # as an older tune_gpt wrote it
    _check_same_search(plan, json.loads(json.dumps(saved)))  # the same search: no complaint
    saved["fixed"]["data"] = "https://other/c.txt?token=OLDSECRET"
    with pytest.raises(ConfigError) as err:
        _check_same_search(plan, saved)
    assert "data" in str(err.value) and "OLDSECRET" not in str(err.value)


def test_what_the_tools_print_keeps_no_password(monkeypatch, capsys):
    """Printed lines go to logs and saved notebook output: the Ctrl+C resume command (with a word to put the
    secret back), the unreachable W&B host, a bad --optuna-storage."""
    import pytest

    from tune_gpt.cli import resume_command
    from tune_gpt.errors import ConfigError
    from tune_gpt.search import _check_optuna_storage
    from tune_gpt.tracking import resolve_wandb_mode

    cmd = resume_command("tune_gpt.search", ["--data", "https://h/c.txt?token=S3CRET", "--optuna-storage",
                                             "postgresql://alice:PW0rd@db/optuna"])
    assert cmd == ("python -m tune_gpt.search --data 'https://h/c.txt?token=***' --optuna-storage "
                   "'postgresql://alice:***@db/optuna' --resume  # with the password or token where *** stands")
    assert resume_command("tune_gpt.train", ["--max_steps", "5", "--resume"]) == "python -m tune_gpt.train --max_steps 5 --resume"

    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", "http://proxyuser:S3CRET@127.0.0.1:9")
    assert resolve_wandb_mode(None) == "offline"
    said = capsys.readouterr().err
    assert "cannot reach http://proxyuser:***@127.0.0.1:9" in said and "S3CRET" not in said

    with pytest.raises(ConfigError) as err:
        _check_optuna_storage("postgresql+nosuchdriver://alice:PW0rd@127.0.0.1:9/optuna", "x", resume=False)
    assert "alice:***@127.0.0.1" in str(err.value) and "PW0rd" not in str(err.value)


@pytest.mark.slow
def test_the_optuna_storage_password_stays_out_of_rays_pickles_and_a_resume_puts_it_back(tmp_path):
    """Ray pickles the searcher, and with it Optuna's RDB storage, whose URL held the password as typed
    (tuner.pkl, searcher-state-*.pkl). A sqlite URI carries a stand-in secret here (no database server)."""
    db = tmp_path / "optuna.db"
    url = f"sqlite:///file:{db}?mode=rwc&token=S3CRETdbPassw0rd&uri=true"
    space = write_space(tmp_path / "secret.yaml", SPACE)
    env = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "tune_gpt.search", "--space", str(space), "--storage-path", str(tmp_path / "r"),
           "--no-wandb", "--no-report", "--optuna-storage", url]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    exp = tmp_path / "r" / "secret"
    assert list(exp.glob("searcher-state-*.pkl")) and (exp / "tuner.pkl").is_file() and db.is_file()
    assert leaks(exp, "S3CRETdbPassw0rd") == []
    # --resume unpickles the storage with the URL given again (without it: asked for, in one line)
    p = subprocess.run([*cmd[:-2], "--resume"], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 2 and "--optuna-storage held a password or token" in p.stderr, p.stderr[-2000:]
    p = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "S3CRETdbPassw0rd" not in p.stdout + p.stderr and leaks(exp, "S3CRETdbPassw0rd") == []
    import optuna

    assert len(optuna.load_study(study_name="secret", storage=url).trials) >= 2  # the study the search used


def test_credentials_in_the_storage_uri_are_refused(tmp_path):
    """pyarrow takes s3://KEY:SECRET@bucket/...; Ray writes the storage URI into its experiment state and
    each trial's files, so such a URI is refused, in one line without the secret, before anything is made."""
    import pytest

    from tune_gpt.errors import ConfigError
    from tune_gpt.search import SearchOptions, plan_search

    for uri in ("s3://AKIAFAKE:s3cretKey@bucket/runs", "s3://bucket/runs?secret_key=s3cretKey&region=eu-west-1"):
        with pytest.raises(ConfigError) as err:
            plan_search(SearchOptions(storage_path=uri))
        said = str(err.value)
        assert said.startswith("--storage-path s3://") and "AWS_SECRET_ACCESS_KEY" in said, said
        assert "s3cretKey" not in said and "\n" not in said
    plan_search(SearchOptions(storage_path="s3://bucket/runs?region=eu-west-1&endpoint_override=localhost:9000"))


def test_a_url_an_older_version_redacted_more_widely_still_resumes():
    """An experiment file keeps URLs as the version that wrote it redacted them; where that version took more
    (``?sig=***`` for ``?sig=abc;v=2``, ``?author=***``), the URL given again on --resume is the same corpus."""
    from tune_gpt.search import _same_kept

    assert _same_kept("https://h/c.txt?sig=***", "https://h/c.txt?sig=***;v=2")
    assert _same_kept("https://h/c.txt?author=***&page=2", "https://h/c.txt?author=bob&page=2")
    assert not _same_kept("https://u:***@h/c.txt", "https://u:***@h/d.txt")  # another file
    assert not _same_kept("https://h/c.txt", "https://h/d.txt") and _same_kept(0.001, 0.001)
