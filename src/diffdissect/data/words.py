"""Words of a text (prompts, captions): lower-case runs of letters and digits, inner hyphens/apostrophes kept."""

from __future__ import annotations

import re

_WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")


def words_of(text: str) -> list[str]:
    return _WORD.findall(text.lower())
