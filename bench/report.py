"""The sections of bench/RESULTS.md that one bench owns, between ``<!-- NAME:begin -->`` and
``<!-- NAME:end -->``: each bench rewrites its own and keeps the others."""

from __future__ import annotations

from pathlib import Path


def write_section(results: Path, name: str, lines: list[str]) -> None:
    """``results`` with its section ``name`` replaced by ``lines`` (appended where it has none)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = results.read_text() if results.is_file() else ""
    section = "\n".join([begin, *lines, end]) + "\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end) + 1:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    results.write_text(text)
