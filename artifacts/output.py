"""The life of a stage's output directory: fresh, resumed, already complete, or refused.

``<out>/.dpo-partial.json`` records which fingerprint a directory is being built for. Only a
directory that carries it (or is empty) is ever written into, so a mistyped ``--out`` can never
clobber a user's own files; a partial directory of another fingerprint is wiped and rebuilt
(nothing in it was complete, so nothing is lost).
"""

from __future__ import annotations

import enum
import logging
import os
import shutil
from pathlib import Path

from .errors import ArtifactError
from .lock import LOCK_NAME
from .manifest import MANIFEST, Manifest, read_manifest, write_json_atomic, write_manifest

PARTIAL = ".dpo-partial.json"
log = logging.getLogger(__name__)


class OutputState(enum.Enum):
    FRESH = "fresh"
    RESUME = "resume"
    COMPLETE = "complete"


def _clear(directory: Path) -> None:
    for child in directory.iterdir():
        if child.name == LOCK_NAME:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def existing_manifest(directory: Path) -> Manifest | None:
    return read_manifest(directory) if (directory / MANIFEST).is_file() else None


def prepare_output(directory: str | os.PathLike, kind: str, fingerprint: str, overwrite: bool) -> OutputState:
    """Decide what a stage does with ``directory``; call while holding its lock, on one rank."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    manifest = existing_manifest(directory)
    if manifest is not None:
        if manifest.kind == kind and manifest.fingerprint == fingerprint:
            return OutputState.COMPLETE
        if not overwrite:
            raise ArtifactError(
                f"{directory} already holds a complete {manifest.kind!r} artifact with fingerprint "
                f"{manifest.fingerprint}, but this run's fingerprint is {fingerprint} (different inputs "
                "or config). Pass --overwrite to replace it, or choose another --out"
            )
        log.warning("--overwrite: replacing %s (fingerprint %s)", directory, manifest.fingerprint)
        _clear(directory)
    partial = directory / PARTIAL
    if partial.is_file():
        import json

        try:
            previous = json.loads(partial.read_text())
        except json.JSONDecodeError:
            previous = {}
        if previous.get("fingerprint") == fingerprint and previous.get("kind") == kind:
            return OutputState.RESUME
        log.warning("%s holds a partial run of another config (%s): starting over", directory, previous.get("fingerprint"))
        _clear(directory)
    elif any(child.name != LOCK_NAME for child in directory.iterdir()):
        raise ArtifactError(
            f"{directory} is not empty and is not a dpo artifact (no {MANIFEST}, no {PARTIAL}); "
            "refusing to write into it. Choose an empty or new --out"
        )
    write_json_atomic(partial, {"kind": kind, "fingerprint": fingerprint})
    return OutputState.FRESH


def commit_output(directory: str | os.PathLike, manifest: Manifest) -> None:
    """Write the manifest (the commit point) and drop the partial marker."""
    directory = Path(directory)
    write_manifest(directory, manifest)
    (directory / PARTIAL).unlink(missing_ok=True)


def say_complete(directory: str | os.PathLike, manifest_kind: str, fingerprint: str) -> None:
    log.info(
        "%s is already a complete %s artifact with fingerprint %s: nothing to do",
        directory, manifest_kind, fingerprint,
    )
