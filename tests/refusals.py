"""Checking a refusal as a user meets it: `dpo ...` in-process, exit code, message, no traceback,
nothing committed, and the user's input files byte-identical afterwards."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from typer.testing import CliRunner


def file_hashes(*paths: str | os.PathLike) -> dict[str, str]:
    """sha256 of every file under ``paths`` (files or folders)."""
    hashes = {}
    for path in map(Path, paths):
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        hashes.update({str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files})
    return hashes


def dpo_in_process(*args: str | os.PathLike):
    """``dpo ARGS`` through the real Typer app in this process (a subprocess costs ~3 s of imports)."""
    from dpo.cli import app

    return CliRunner(env={"COLUMNS": "1000"}).invoke(app, [str(a) for a in args])


def assert_refused(args: list, *expected: str, out: str | os.PathLike, inputs: list, code: int = 2) -> str:
    """Run ``dpo ARGS``; it must exit ``code`` with a message holding every ``expected`` text, print
    no traceback, commit nothing in ``out``, and leave ``inputs`` untouched. Returns the output."""
    before = file_hashes(*inputs)
    result = dpo_in_process(*args)
    text = result.output
    assert result.exit_code == code, f"exit {result.exit_code}, expected {code}:\n{text}\n{result.exception!r}"
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in text
    for part in expected:
        assert part in text, f"{part!r} not in:\n{text}"
    assert not (Path(out) / "manifest.json").exists()
    assert file_hashes(*inputs) == before
    return text
