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
# a query (or ;matrix, or #fragment) parameter whose name says it holds a secret
_SECRET_QUERY = re.compile(r"([?&;#][^=&;#\s]*(?:pass|pwd|secret|token|key|sig|credential|auth|jwt|session|bearer|ticket)"
                           r"[^=&;#\s]*=)[^&;#\s]*", re.I)


def redact(text: str) -> str:
    """`text` with the secrets a URL may carry left out: the password of ``scheme://user:password@``
    (``--optuna-storage postgresql://user:PASSWORD@db/optuna``), a lone userinfo (``https://TOKEN@host``),
    and query values named like a secret (``?X-Amz-Signature=...``, ``&access_key=...``, ``?auth=...``,
    ``;jwt=...``, ``#access_token=...``)."""
    text = re.sub(r"(\w[\w+.-]*://)([^/@:\s]+):([^/@\s]+)@", rf"\1\2:{REDACTED}@", text)
    text = re.sub(r"(\w[\w+.-]*://)([^/@:\s]+)@", rf"\1{REDACTED}@", text)
    return _SECRET_QUERY.sub(rf"\1{REDACTED}", text)


def redact_flat(flat: dict[str, Any]) -> dict[str, Any]:
    """A flat config (``TrainConfig.to_flat()``, a trial's config) as it may be written down: every URL
    value redacted (``data`` is the one that takes URLs), the rest as it is."""
    return {k: redact(v) if isinstance(v, str) and "://" in v else v for k, v in flat.items()}


def is_redacted(value: Any) -> bool:
    """Whether `value` is a URL that lost a secret to `redact` (it cannot be fetched as it is)."""
    return isinstance(value, str) and "://" in value and REDACTED in value
