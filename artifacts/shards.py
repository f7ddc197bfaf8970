"""Sharded Parquet: a shard is committed by an atomic rename, the manifest lists them all.

Shard names carry their position and count (``train/part-00003-of-00016.parquet``). A shard file
that exists under its final name is complete; a crash leaves at most a ``.tmp`` that the next
run overwrites. Files are written deterministically (same rows, same bytes) so a resumed run is
byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import ArtifactError
from .faults import fault_point
from .fingerprint import sha256_file
from .manifest import FileEntry, Manifest, fsync_path, read_manifest, resolve_inside


def shard_path(split: str, index: int, count: int) -> str:
    return f"{split}/part-{index:05d}-of-{count:05d}.parquet"


def shard_bounds(num_rows: int, rows_per_shard: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges; at least one (possibly empty) shard so every split has a file."""
    if num_rows == 0:
        return [(0, 0)]
    return [(s, min(s + rows_per_shard, num_rows)) for s in range(0, num_rows, rows_per_shard)]


def write_shard(root: Path, relative: str, table: pa.Table) -> FileEntry:
    target = root / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    # Fixed writer options: the bytes depend only on the rows, so reruns are byte-identical.
    pq.write_table(table, tmp, compression="zstd", row_group_size=max(1, min(table.num_rows, 8192)))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    fault_point("shard-write")
    os.replace(tmp, target)
    fsync_path(target.parent)
    return FileEntry(path=relative, rows=table.num_rows, bytes=target.stat().st_size, sha256=sha256_file(target))


def committed_shard(root: Path, relative: str) -> FileEntry | None:
    """The entry of a shard a previous run committed, or None if it must be (re)written."""
    target = root / relative
    if not target.is_file():
        return None
    try:
        rows = pq.ParquetFile(target).metadata.num_rows
    except (pa.ArrowInvalid, OSError):
        return None  # torn by a crash that beat the rename's durability: redo it
    return FileEntry(path=relative, rows=rows, bytes=target.stat().st_size, sha256=sha256_file(target))


def file_entry(root: Path, relative: str) -> FileEntry:
    target = root / relative
    return FileEntry(path=relative, rows=None, bytes=target.stat().st_size, sha256=sha256_file(target))


def file_problem(root: Path, manifest: Manifest, verify: bool = True) -> str | None:
    """The first listed file of an artifact that is missing, of another size or (``verify``) with another
    sha256 than its manifest says, as a sentence; None when every file is as listed."""
    for entry in manifest.files:
        path = resolve_inside(root, entry.path)
        if not path.is_file():
            return f"{entry.path} is listed in the manifest but {'is a folder, not a file' if path.is_dir() else 'missing'}"
        if path.stat().st_size != entry.bytes:
            return f"{entry.path} has {path.stat().st_size} bytes, the manifest says {entry.bytes}"
        if verify and sha256_file(path) != entry.sha256:
            return (f"{entry.path} fails its sha256 check: it is not the file the manifest lists (changed or corrupt). "
                    "Rerun the stage that made it, with --overwrite")
    return None


class ArtifactReader:
    """Reads a complete artifact through its manifest's file list, never by globbing.

    The manifest is checked against its schema first; then every listed file must exist with the
    listed size and, unless ``verify`` is off (``--no-verify``), the listed sha256, before any of
    it is used: a file replaced by another valid file of the same size is refused, not read.
    """

    def __init__(self, root: str | os.PathLike, kind: str | None = None, verify: bool = True):
        self.root = Path(root)
        self.manifest: Manifest = read_manifest(self.root, kind)
        self._check_files(verify)

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    @property
    def splits(self) -> list[str]:
        return self.manifest.splits

    def _check_files(self, verify: bool) -> None:
        problem = file_problem(self.root, self.manifest, verify)
        if problem is not None:
            raise ArtifactError(f"{self.root}: {problem}")

    def path(self, relative: str) -> Path:
        """The checked path of a file the manifest lists."""
        if not any(f.path == relative for f in self.manifest.files):
            raise ArtifactError(f"{self.root}: lists no file {relative!r}")
        return resolve_inside(self.root, relative)

    def read_json(self, relative: str) -> Any:
        """A listed JSON file's content; one that is not UTF-8 JSON is a damaged artifact (under --no-verify
        nothing else has looked inside it)."""
        path = self.path(relative)
        try:
            return json.loads(path.read_bytes().decode("utf-8"))
        except ValueError as exc:
            raise ArtifactError(f"{path}: not readable UTF-8 JSON ({exc}); rerun the stage that made it") from None

    def read_file(self, entry: FileEntry, columns: list[str] | None = None) -> pa.Table:
        """One listed Parquet file, checked against the manifest's row count."""
        path = resolve_inside(self.root, entry.path)
        try:
            table = pq.read_table(path, columns=columns)
        except (pa.ArrowException, OSError) as exc:
            raise ArtifactError(f"{path}: not a readable Parquet file ({exc}); rerun the stage that made it") from None
        if entry.rows is not None and table.num_rows != entry.rows:
            raise ArtifactError(f"{self.root}: {entry.path} has {table.num_rows} rows, the manifest says {entry.rows}")
        return table

    def read_split(self, split: str, columns: list[str] | None = None) -> pa.Table:
        entries = [f for f in self.manifest.files_of(split) if f.path.endswith(".parquet")]
        if not entries:
            raise ArtifactError(f"{self.root}: has no split {split!r} (splits: {', '.join(self.splits) or 'none'})")
        tables = [self.read_file(entry, columns) for entry in entries]
        return pa.concat_tables(tables) if len(tables) > 1 else tables[0]
