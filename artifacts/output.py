"""The life of a stage's output directory: fresh, resumed, already complete, replaced, or refused.

``<out>/.dpo-partial.json`` records which fingerprint a directory is being built for. Only a
directory that carries it (or is empty) is ever written into, and only what an artifact of that
kind consists of is ever deleted: its manifest's files, the entries its stage declares it writes
(``owns``: shard patterns, ``checkpoints/``, ...), and dpo's own markers and temporary files. A
folder holding anything else is refused, naming the file, so a mistyped ``--out`` can never cost a
user a file.

Replacing a complete artifact (``--overwrite``) builds the new one beside it, in
``<out>/.dpo-next/``, so the old one stays readable until the new one is complete. The swap then
follows a journal (``.dpo-next/replaces.json``) so that a crash at any point of it is finished by
the next run of any stage on that folder: the old manifest goes first (the folder is then not an
artifact), then the old entries (the journal is emptied once they are gone), then the new entries
move in, the new manifest last.
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from .errors import ArtifactError
from .faults import fault_point
from .lock import LOCK_NAME
from .manifest import MANIFEST, Manifest, fsync_path, read_manifest, write_json_atomic, write_manifest
from .shards import file_problem

PARTIAL = ".dpo-partial.json"
STAGING = ".dpo-next"
JOURNAL = ".dpo-replaces.json"  # in the staging folder
log = logging.getLogger(__name__)


class OutputState(enum.Enum):
    FRESH = "fresh"
    RESUME = "resume"
    COMPLETE = "complete"


@dataclasses.dataclass(frozen=True)
class Output:
    state: OutputState
    dir: Path  # where the stage writes: the folder itself, or its staging folder when replacing an artifact


def _bookkeeping(relative: str) -> bool:
    """dpo's own markers and temporary files (the lock is never deleted by this module)."""
    return relative in (MANIFEST, PARTIAL, JOURNAL) or ("/" not in relative and relative.startswith(LOCK_NAME))


def is_dpo_file(relative: str) -> bool:
    """A marker, lock or temporary file of dpo's (never part of what an artifact lists)."""
    return _bookkeeping(relative) or relative.endswith(".tmp")


def matches(relative: str, pattern: str) -> bool:
    """Whether ``relative`` is what ``pattern`` declares: ``dir/`` is that whole folder; otherwise a glob
    whose ``*`` stays inside one path segment, so ``*.json`` is a top-level file, never ``notes/a.json``."""
    if pattern.endswith("/"):
        return relative.startswith(pattern)
    parts, wanted = relative.split("/"), pattern.split("/")
    return len(parts) == len(wanted) and all(fnmatch.fnmatchcase(p, w) for p, w in zip(parts, wanted))


def _owned(relative: str, listed: set[str] | None, owns: Sequence[str]) -> bool:
    """Part of an artifact: its manifest's files (``listed``; None when no manifest can tell), the folders
    the stage declares, dpo's markers, and ``X.tmp`` for any of these (an atomic write cut short). The
    stage's file patterns count only where no manifest lists the files (a partial run, or a manifest that
    cannot be read): a file a complete artifact does not list is not the artifact's, whatever its name."""
    name = relative[: -len(".tmp")] if relative.endswith(".tmp") else relative
    for candidate in {relative, name}:
        if _bookkeeping(candidate) or (listed is not None and candidate in listed):
            return True
        for pattern in owns:
            if (pattern.endswith("/") or listed is None) and matches(candidate, pattern):
                return True
    return False


def entries(directory: Path, manifest: Manifest | None, owns: Sequence[str]) -> tuple[list[Path], list[Path]]:
    """(the files an artifact in ``directory`` consists of, any other file found there), ignoring
    the lock and the staging folder. ``manifest``: the complete artifact's (the files it lists are
    the artifact's); without one the stage's patterns say what a partial run wrote."""
    listed = {f.path for f in manifest.files} if manifest is not None else None
    owned, foreign = [], []
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory).as_posix()
        top = relative.split("/", 1)[0]
        if top == STAGING or ("/" not in relative and top.startswith(LOCK_NAME)) or (
                path.is_dir() and not path.is_symlink()):
            continue
        (owned if _owned(relative, listed, owns) else foreign).append(path)
    return owned, foreign


def _refuse_foreign(directory: Path, foreign: list[Path], what: str) -> None:
    if foreign:
        raise ArtifactError(
            f"{directory} holds {len(foreign)} file(s) that are not part of {what}, e.g. {foreign[0]}; "
            "refusing to delete or write over them. Move them away, or choose another --out"
        )


def _remove(directory: Path, files: list[Path]) -> None:
    """Delete ``files``, then the folders under ``directory`` they leave empty."""
    parents = set()
    for path in files:
        path.unlink(missing_ok=True)
        parents.update(p for p in path.parents if p != directory and directory in p.parents)
    for folder in sorted(parents, key=lambda p: len(p.parts), reverse=True):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _move_into(source: Path, target: Path) -> None:
    """Move a file or folder to ``target``, merging into a folder that is already there."""
    if source.is_dir() and target.is_dir():
        for child in source.iterdir():
            _move_into(child, target / child.name)
        source.rmdir()
    else:
        os.replace(source, target)


def existing_manifest(directory: Path) -> Manifest | None:
    return read_manifest(directory) if (directory / MANIFEST).is_file() else None


def _readable_manifest(directory: Path) -> Manifest | None:
    try:
        return existing_manifest(directory)
    except ArtifactError:
        return None


def partial_marker(directory: Path) -> dict:
    try:
        marker = json.loads((directory / PARTIAL).read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def prepare_output(directory: str | os.PathLike, kind: str, fingerprint: str, overwrite: bool,
                   owns: Sequence[str] = ()) -> Output:
    """Decide what a stage does with ``directory``; call while holding its lock, on one rank.

    ``owns``: what the stage writes besides its manifest's files (``*/part-*.parquet``,
    ``checkpoints/`` ...), so a partial run of it can be cleared without touching anything else.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    finish_replacement(directory, owns)
    try:
        manifest = existing_manifest(directory)
    except ArtifactError as exc:
        # An artifact whose manifest cannot be read: what it consists of is unknown, so only what this
        # stage's patterns account for may be replaced (anything else is refused, as for a partial run).
        if not overwrite:
            raise ArtifactError(f"{exc}. To replace what {directory} holds, pass --overwrite") from None
        _refuse_foreign(directory, entries(directory, None, owns)[1], f"a {kind} artifact")
        log.warning("--overwrite: %s has an unreadable %s; building its replacement beside it", directory, MANIFEST)
        return _start(directory / STAGING, kind, fingerprint, owns)
    if manifest is not None:
        if manifest.kind == kind and manifest.fingerprint == fingerprint:
            # The same artifact: a no-op, unless its files are no longer what it lists (sizes are checked on
            # every rerun; hashes too with --overwrite, which then rebuilds a damaged one).
            problem = file_problem(directory, manifest, verify=overwrite)
            if problem is None:
                return Output(OutputState.COMPLETE, directory)
            if not overwrite:
                raise ArtifactError(f"{directory} is complete for this fingerprint but damaged: {problem.split('. ')[0]}. "
                                    "Pass --overwrite to rebuild it")
            log.warning("--overwrite: %s is damaged (%s); rebuilding it beside the old one", directory,
                        problem.split(". ")[0])
            _refuse_foreign(directory, entries(directory, manifest, owns)[1], f"the {kind} artifact it holds")
            return _start(directory / STAGING, kind, fingerprint, owns)
        if not overwrite:
            raise ArtifactError(
                f"{directory} already holds a complete {manifest.kind!r} artifact with fingerprint "
                f"{manifest.fingerprint}, but this run's fingerprint is {fingerprint} (different inputs "
                "or config). Pass --overwrite to replace it, or choose another --out"
            )
        if manifest.kind != kind:
            raise ArtifactError(f"{directory} holds a {manifest.kind!r} artifact; --overwrite replaces an artifact of "
                                f"the same kind ({kind!r}) only. Choose another --out")
        _refuse_foreign(directory, entries(directory, manifest, owns)[1], f"the {kind} artifact it holds")
        log.warning("--overwrite: building the replacement of %s (fingerprint %s) beside it; the old artifact stays "
                    "readable until the new one is complete", directory, manifest.fingerprint)
        return _start(directory / STAGING, kind, fingerprint, owns)
    return _start(directory, kind, fingerprint, owns)


def _start(directory: Path, kind: str, fingerprint: str, owns: Sequence[str]) -> Output:
    """Resume the partial run of this fingerprint in ``directory``, or start one (clearing what an
    earlier partial run of this stage left there, and nothing else)."""
    directory.mkdir(parents=True, exist_ok=True)
    owned, foreign = entries(directory, None, owns)
    if not (directory / PARTIAL).is_file():
        # Only dpo's own temporary files (a run killed while writing its first marker) count as empty.
        written = [p for p in owned if not is_dpo_file(p.relative_to(directory).as_posix())]
        if written or foreign:
            raise ArtifactError(
                f"{directory} is not empty and is not a dpo artifact (no {MANIFEST}, no {PARTIAL}), e.g. it holds "
                f"{(foreign or written)[0]}; refusing to write into it. Choose an empty or new --out"
            )
        _remove(directory, owned)
    else:
        previous = partial_marker(directory)
        if previous.get("kind", kind) != kind:
            raise ArtifactError(
                f"{directory} holds a partial {previous.get('kind')!r} run (another stage's, fingerprint "
                f"{previous.get('fingerprint')}); a {kind} run will not write into it or clear it. Finish or "
                "remove that run, or choose another --out"
            )
        # Checked on resume too: a file that appeared in a partial folder would otherwise be listed in,
        # and later deleted with, the artifact.
        _refuse_foreign(directory, foreign, f"the partial {kind} run it holds")
        if previous.get("fingerprint") == fingerprint:
            return Output(OutputState.RESUME, directory)
        if owned:
            log.warning("%s holds a partial run of another config (%s): starting over", directory,
                        previous.get("fingerprint"))
            _remove(directory, [p for p in owned if p.name != PARTIAL])
    if (directory / STAGING).is_dir():
        shutil.rmtree(directory / STAGING)  # a replacement abandoned before it was complete
    write_json_atomic(directory / PARTIAL, {"kind": kind, "fingerprint": fingerprint})
    return Output(OutputState.FRESH, directory)


def commit_output(directory: str | os.PathLike, manifest: Manifest, work_dir: str | os.PathLike | None = None,
                  owns: Sequence[str] = ()) -> None:
    """Write the manifest (the commit point) and drop the partial marker; a replacement built in the
    staging folder then takes the old artifact's place (its journal is written first, so the swap a
    crash interrupts is finished from it by the next run of any stage)."""
    directory = Path(directory)
    work = Path(work_dir) if work_dir is not None else directory
    if work != directory:
        _write_journal(directory, owns)
    write_manifest(work, manifest)
    (work / PARTIAL).unlink(missing_ok=True)
    if work != directory:
        finish_replacement(directory)


def _write_journal(directory: Path, owns: Sequence[str]) -> None:
    owned = entries(directory, _readable_manifest(directory), owns)[0]
    replaced = [p.relative_to(directory).as_posix() for p in owned if p.name != MANIFEST or p.parent != directory]
    write_json_atomic(directory / STAGING / JOURNAL, replaced)
def finish_replacement(directory: Path, owns: Sequence[str] = ()) -> None:
    """Complete an interrupted swap of a committed replacement into ``directory`` (idempotent)."""
    staging = directory / STAGING
    if not (staging / MANIFEST).is_file():
        return
    journal = staging / JOURNAL
    if not journal.is_file():
        _write_journal(directory, owns)
    (directory / MANIFEST).unlink(missing_ok=True)
    fsync_path(directory)
    fault_point("replace-artifact")
    _remove(directory, [directory / r for r in json.loads(journal.read_text())])
    write_json_atomic(journal, [])  # the old entries are gone: a crash from here on must not delete moved ones
    for entry in sorted(staging.iterdir()):
        if entry.name not in (MANIFEST, JOURNAL):
            _move_into(entry, directory / entry.name)
    os.replace(staging / MANIFEST, directory / MANIFEST)
    journal.unlink()
    staging.rmdir()
    fsync_path(directory)
    log.info("%s: the replacement is complete; the old artifact is gone", directory)
