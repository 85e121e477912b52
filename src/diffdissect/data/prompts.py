"""Prompt files: the one reader, for every command that takes `--prompt-file`."""

from __future__ import annotations

from pathlib import Path

from diffdissect.errors import SpecError


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt per line, surrounding whitespace removed. A blank line is an error naming it (it would be
    sampled as the empty prompt); blank lines at the end of the file are ignored."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"prompt file {path} does not exist.")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    for number, line in enumerate(lines, 1):
        if not line:
            raise SpecError(f"{path}:{number} is an empty prompt; remove the blank line.")
    return lines
