"""Secrets a URL may carry, left out of what tune_gpt writes.

A corpus URL (``--data https://host/corpus.txt?token=...``, a presigned ``?X-Amz-Signature=...``) or an
Optuna storage URL (``postgresql://user:PASSWORD@db/optuna``) can hold a password or token. Files the tool
writes (the experiment file, each trial's ``params.json`` and ``result.json``, checkpoints, the W&B and
TensorBoard config, the download cache's record) keep the URL with the secret replaced by ``***``; the run
itself uses the URL as given. Where a redacted URL is needed again (``--resume``, a replay), the command
asks for it.
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "***"  # stands for a password or token left out of a file
# A query (;matrix, #fragment) parameter holds a secret when its name contains one of these...
_SECRET_IN_NAME = re.compile(r"pass|pwd|secret|token|key|sig|credential|jwt|bearer|sessionid|oauth|authcode", re.I)
# ...or has one of these as a whole word (``auth`` and ``X-Auth``, not ``author``)
_SECRET_WORDS = {"auth", "authorization", "session", "ticket"}
_PARAM = re.compile(r"([?&;#])([^=&;#\s]*)=([^&;#\s]*)")
# scheme://user[:password]@host : the password may hold an unencoded '@', '?', '#' or '/' (SQLAlchemy takes
# postgresql://alice:pa?ss@db/optuna; AWS secret keys hold '/'): it runs to the first '@' that a host and
# then '/', '?', '#' or the end follow. Digits after the ':' may be a port instead (no userinfo then):
# - in an http(s) URL, where a path without '@' follows (https://host:8080/c.txt?email=a@b.org; a quote or
#   '<' '>' ends the URL, as in "https://host:8080/c.txt","a@b.org");
# - in any other (postgresql://, s3://, redis://...), only where no '@' follows in the URL at all: SQLAlchemy
#   and AWS read postgresql://alice:123?abc@db and s3://KEY:12/AbC@bucket as passwords.
# Else they are a password: a leaked secret costs more than a URL that --resume asks for again.
# (A userinfo holds no '[' or ']': http://[::1]:8080/... is a host.)
_END = "\\s\"'<>`"  # what ends a URL in text (whitespace, quotes, angle brackets)
_WEB_PORT = rf"\d+(?:[?#{_END}]|$|/[^@?#{_END}]*(?:[?#{_END}]|$))"
_OTHER_PORT = rf"\d+(?=[^@{_END}]*(?:[{_END}]|$))"
_USERINFO_TAIL = rf"([^/?#@\[\]\s:]*)(?::(?!{{port}})(\S*?))?@(?=[^@/\s]*(?:[/?#\s]|$))"
_USERINFO_WEB = re.compile(r"(?<![\w+.-])((?i:https?)://)" + _USERINFO_TAIL.format(port=_WEB_PORT))
_USERINFO_OTHER = re.compile(r"(?<![\w+.-])((?!(?i:https?)://)\w[\w+.-]*://)"
                             + _USERINFO_TAIL.format(port=_OTHER_PORT))


def redact(text: str) -> str:
    """`text` with the secrets a URL may carry left out: the password of ``scheme://user:password@``
    (``--optuna-storage postgresql://user:PASSWORD@db/optuna``), a lone userinfo (``https://TOKEN@host``,
    ``https://TOKEN:@host``), and query values named like a secret (``?X-Amz-Signature=...``,
    ``&access_key=...``, ``?auth=...``, ``;jwt=...``, ``#access_token=...``)."""

    def userinfo(m: re.Match) -> str:
        scheme, user, password = m.group(1), m.group(2), m.group(3)
        if password:
            return f"{scheme}{user}:{REDACTED}@"
        return f"{scheme}{REDACTED}@" if user else m.group(0)  # a token as the user; an empty userinfo holds none

    def param(m: re.Match) -> str:
        name = m.group(2)
        words = {w.lower() for w in re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+", name)}
        secret = _SECRET_IN_NAME.search(name) or words & _SECRET_WORDS or name.lower() in _SECRET_WORDS
        return f"{m.group(1)}{name}={REDACTED}" if secret else m.group(0)

    return _PARAM.sub(param, _USERINFO_WEB.sub(userinfo, _USERINFO_OTHER.sub(userinfo, text)))


def redact_flat(flat: dict[str, Any]) -> dict[str, Any]:
    """A flat config (``TrainConfig.to_flat()``, a trial's config) as it may be written down: every URL
    value redacted (``data`` is the one that takes URLs), the rest as it is."""
    return {k: redact(v) if isinstance(v, str) and "://" in v else v for k, v in flat.items()}


def refuse_credentials(uri: str, flag: str | None, written: str) -> None:
    """A storage URI with credentials in it (``s3://KEY:SECRET@bucket/…``, ``?secret_key=…``), refused in
    one line that shows it without them: pyarrow would take them, but the URI is written down (`written`
    says where). `flag` names where the URI was given (None: the command's first argument)."""
    if redact(uri) != uri:
        from tune_gpt.errors import ConfigError

        raise ConfigError(f"{flag + ' ' if flag else ''}{redact(uri)}: credentials in the URI would be written into "
                          f"{written}; give them in the environment (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                          "or a profile) instead")


def is_redacted(value: Any) -> bool:
    """Whether `value` is a URL that lost a secret to `redact` (it cannot be fetched as it is)."""
    return isinstance(value, str) and "://" in value and REDACTED in value
