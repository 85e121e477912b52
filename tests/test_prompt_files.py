"""One prompt-file reader for every command: a blank line is refused everywhere, naming the line."""

from __future__ import annotations

import pytest

from diffdissect.cli import main


@pytest.mark.parametrize("command", [["capture", "--layers", "mid_block"], ["directions", "run"]])
def test_a_blank_line_in_a_prompt_file_is_refused_by_every_command(tmp_path, capsys, command):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\n\na dog\n")
    code = main(
        [*command, "--model", str(tmp_path / "no-model"), "--prompt-file", str(path), "--out", str(tmp_path / "out")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "prompts.txt:2 is an empty prompt" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_missing_prompt_file_is_a_clear_error(tmp_path, capsys):
    code = main(
        [
            "capture",
            "--model",
            str(tmp_path),
            "--layers",
            "mid_block",
            "--prompt-file",
            str(tmp_path / "none.txt"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 2 and "prompt file" in capsys.readouterr().err
