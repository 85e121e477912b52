"""Names that become file names: layers, labels, prompts and run names never leave the directory they are put in."""

from __future__ import annotations

import hashlib
import re

_UNSAFE = re.compile(r"[^A-Za-z0-9._@=+,-]")
MAX_NAME = 120


def safe_name(text: str) -> str:
    """`text` as one plain file name: separators and other unsafe characters become ``_``, no leading dot, at most
    MAX_NAME characters. A name that had to change gets a short digest of the original, so two different texts never
    share a file. Plain names (``mid_block@t=25-pool-topk-k32-x8``) are returned unchanged."""
    text = str(text)
    clean = _UNSAFE.sub("_", text).lstrip(".") or "_"
    if clean == text and len(text) <= MAX_NAME and text not in (".", ".."):
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{clean[: MAX_NAME - 9]}-{digest}"
