"""Sharded Parquet: a shard is committed by an atomic rename, the manifest lists them all.

Shard names carry their position and count (``train/part-00003-of-00016.parquet``). A shard file
that exists under its final name is complete; a crash leaves at most a ``.tmp`` that the next
run overwrites. Files are written deterministically (same rows, same bytes) so a resumed run is
byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Sequence
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


def arrow_copy_path(relative: str) -> str:
    """Where a shard's uncompressed Arrow IPC copy lies: readers memory-map it, so the ranks of a node
    share one copy in the page cache and a batch reads only its own rows."""
    return relative.removesuffix(".parquet") + ".arrow"


def shard_bounds(num_rows: int, rows_per_shard: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges; at least one (possibly empty) shard so every split has a file."""
    if num_rows == 0:
        return [(0, 0)]
    return [(s, min(s + rows_per_shard, num_rows)) for s in range(0, num_rows, rows_per_shard)]


ROW_GROUP_ROWS = 8192
# The CPUs this process may run on (a Slurm job's cgroup, taskset), not the machine's.
CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
# Hashing threads besides the one that waits for the digests (see Hashing).
VERIFY_THREADS = min(8, CPUS) - 1
COMPRESSION = "zstd"


def write_shard(root: Path, relative: str, table: pa.Table) -> FileEntry:
    writer = ShardWriter(root, relative, table.schema)
    writer.write(table)
    return writer.commit()


class ShardWriter:
    """One shard written from pieces as they come, a row group at a time, so memory holds one row
    group, not the shard. Fixed writer options and row groups of ROW_GROUP_ROWS (the whole table
    when smaller): the bytes depend only on the rows, never on how they were cut into pieces, so
    reruns are byte-identical. ``arrow_copy``: also an uncompressed Arrow IPC copy (arrow_copy_path)
    of the ``copy_columns`` (all when None): readers map the copy and derive what it leaves out."""

    def __init__(self, root: Path, relative: str, schema: pa.Schema, arrow_copy: bool = False,
                 copy_columns: Sequence[str] | None = None):
        self.root, self.relative, self.schema = root, relative, schema
        self.copy_columns = list(copy_columns) if copy_columns is not None else schema.names
        self.target = root / relative
        self.tmp = self.target.with_name(self.target.name + ".tmp")
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.rows = 0
        self.writer: pq.ParquetWriter | None = None
        self.copy: pa.ipc.RecordBatchFileWriter | None = None
        # The files are opened here, not by the writers, so that they can be closed even where a writer's
        # own close fails (its footer on a full disk).
        self.sink: pa.NativeFile | None = None
        self.copy_sink: pa.NativeFile | None = None
        if arrow_copy:
            self.copy_target = root / arrow_copy_path(relative)
            self.copy_tmp = self.copy_target.with_name(self.copy_target.name + ".tmp")
            self.copy_target.parent.mkdir(parents=True, exist_ok=True)
            self.copy_sink = pa.OSFile(str(self.copy_tmp), "wb")
            self.copy = pa.ipc.new_file(self.copy_sink, pa.schema([schema.field(n) for n in self.copy_columns]))

    def write(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.pending_rows += table.num_rows
        while self.pending_rows >= ROW_GROUP_ROWS:
            rows = pa.concat_tables(self.pending).combine_chunks()
            if self.writer is None:
                self.target.parent.mkdir(parents=True, exist_ok=True)
                self.sink = pa.OSFile(str(self.tmp), "wb")
                self.writer = pq.ParquetWriter(self.sink, self.schema, compression=COMPRESSION)
            self.writer.write_table(rows.slice(0, ROW_GROUP_ROWS), row_group_size=ROW_GROUP_ROWS)
            if self.copy is not None:
                self.copy.write_table(rows.slice(0, ROW_GROUP_ROWS).select(self.copy_columns))
            self.pending = [rows.slice(ROW_GROUP_ROWS)]
            self.pending_rows -= ROW_GROUP_ROWS
            self.rows += ROW_GROUP_ROWS

    def discard(self) -> None:
        """Close and remove what was written of a shard that will not be committed (a stop, a full disk, a
        bad record mid-shard): no file stays open, so nothing holds the folder's file system busy."""
        for writer, sink, tmp in ((self.writer, self.sink, self.tmp),
                                  (self.copy, self.copy_sink, getattr(self, "copy_tmp", None))):
            with contextlib.suppress(OSError, pa.ArrowException):  # closing writes a footer: a full disk refuses it
                if writer is not None:
                    writer.close()
            if sink is not None:
                sink.close()
            if tmp is not None:
                tmp.unlink(missing_ok=True)

    def commit(self) -> FileEntry:
        """Write what is left, then make the shard durable under its final name (an atomic rename)."""
        rest = pa.concat_tables(self.pending).combine_chunks() if self.pending else self.schema.empty_table()
        self.rows += rest.num_rows
        if self.writer is None:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self.sink = pa.OSFile(str(self.tmp), "wb")
            pq.write_table(rest, self.sink, compression=COMPRESSION, row_group_size=max(1, rest.num_rows))
            self.sink.close()
        else:
            if rest.num_rows:
                self.writer.write_table(rest, row_group_size=ROW_GROUP_ROWS)
            self.writer.close()
            self.sink.close()
        if self.copy is not None:
            # The copy is durable under its name before the shard is: a committed shard has its copy.
            if rest.num_rows:
                self.copy.write_table(rest.select(self.copy_columns))
            self.copy.close()
            self.copy_sink.close()
            with open(self.copy_tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(self.copy_tmp, self.copy_target)
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        fault_point("shard-write")
        os.replace(self.tmp, self.target)
        fsync_path(self.target.parent)
        return FileEntry(path=self.relative, rows=self.rows, bytes=self.target.stat().st_size,
                         sha256=sha256_file(self.target))


def committed_shard(root: Path, relative: str, copy_columns: Sequence[str] | None = None) -> FileEntry | None:
    """The entry of a shard a previous run committed, or None if it must be (re)written: also when
    ``copy_columns`` are given and its Arrow copy does not hold exactly those (a partial run of an
    earlier version, whose copies would not concatenate with this one's)."""
    target = root / relative
    if not target.is_file():
        return None
    try:
        rows = pq.ParquetFile(target).metadata.num_rows
        if copy_columns is not None:
            # Only the footer's schema is needed: a plain read, closed here, maps nothing.
            with pa.OSFile(str(root / arrow_copy_path(relative))) as source:
                if pa.ipc.open_file(source).schema.names != list(copy_columns):
                    return None
    except (pa.ArrowInvalid, OSError):
        return None  # torn by a crash that beat the rename's durability: redo it
    return FileEntry(path=relative, rows=rows, bytes=target.stat().st_size, sha256=sha256_file(target))


def file_entry(root: Path, relative: str) -> FileEntry:
    target = root / relative
    return FileEntry(path=relative, rows=None, bytes=target.stat().st_size, sha256=sha256_file(target))


def file_problem(root: Path, manifest: Manifest, verify: bool = True) -> str | None:
    """The first listed file of an artifact that is missing, of another size or (``verify``) with another
    sha256 than its manifest says, as a sentence; None when every file is as listed."""
    problem = size_problem(root, manifest)
    if problem is not None or not verify:
        return problem
    return digest_problem(manifest, Hashing(listed_paths(root, manifest)).result())


def size_problem(root: Path, manifest: Manifest) -> str | None:
    """The first listed file that is missing or of another size than the manifest says."""
    for entry in manifest.files:
        path = resolve_inside(root, entry.path)
        if not path.is_file():
            return f"{entry.path} is listed in the manifest but {'is a folder, not a file' if path.is_dir() else 'missing'}"
        if path.stat().st_size != entry.bytes:
            return f"{entry.path} has {path.stat().st_size} bytes, the manifest says {entry.bytes}"
    return None


def listed_paths(root: Path, manifest: Manifest) -> list[Path]:
    return [resolve_inside(root, entry.path) for entry in manifest.files]


def digest_problem(manifest: Manifest, digests: list[str]) -> str | None:
    for entry, digest in zip(manifest.files, digests):
        if digest != entry.sha256:
            return (f"{entry.path} fails its sha256 check: it is not the file the manifest lists (changed or corrupt). "
                    "Rerun the stage that made it, with --overwrite")
    return None


class Hashing:
    """The sha256 of files, computed on daemon threads from the moment it is made, and by the thread
    that asks for the result, from then on.

    Each file is hashed in 1 MiB reads (memory stays flat) and hashlib releases the GIL on them, so a
    large artifact's files are hashed on several cores at once. One core is left to the stage, which
    goes on loading its model meanwhile (on 2 cores, a second hashing thread slowed the model's loading
    by about as much as it sped up the hashing); once it needs the data it hashes what is left instead
    of waiting. Daemon threads: a stage that stops (an error, a pre-emption) exits at once instead of
    finishing the hashing of gigabytes it will not read.
    """

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self.digests: list[str | None] = [None] * len(paths)
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._next = iter(range(len(paths)))
        self._lock = threading.Lock()
        self._running = min(VERIFY_THREADS, len(paths))
        for _ in range(self._running):
            threading.Thread(target=self._work, name="dpo-verify", daemon=True).start()

    def _work(self) -> None:
        try:
            while self.error is None:
                with self._lock:
                    k = next(self._next, None)
                if k is None:
                    break
                self.digests[k] = sha256_file(self.paths[k])
        except BaseException as exc:  # re-raised in the thread that asks for the result
            self.error = exc
        finally:
            with self._lock:
                self._running -= 1
                if self._running == 0:
                    self.done.set()

    def result(self) -> list[str]:
        with self._lock:
            self._running += 1
        self._work()
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.digests


class ArtifactReader:
    """Reads a complete artifact through its manifest's file list, never by globbing.

    The manifest is checked against its schema and every listed file must exist with the listed size
    when the reader opens. Unless ``verify`` is off (``--no-verify``), every file must also have the
    listed sha256 before any of it is used: a file replaced by another valid file of the same size is
    refused, not read. ``in_background``: the hashing runs on while the stage goes on (loading its
    model), and every read of a file waits for it (``verified``); else the reader opens verified.
    """

    def __init__(self, root: str | os.PathLike, kind: str | None = None, verify: bool = True,
                 in_background: bool = False):
        self.root = Path(root)
        self.manifest: Manifest = read_manifest(self.root, kind)
        problem = size_problem(self.root, self.manifest)
        if problem is not None:
            raise ArtifactError(f"{self.root}: {problem}")
        self._hashing = Hashing(listed_paths(self.root, self.manifest)) if verify else None
        if not in_background:
            self.verified()

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    @property
    def splits(self) -> list[str]:
        return self.manifest.splits

    def verified(self) -> ArtifactReader:
        """Waits for the sha256 check of every listed file; raises ArtifactError naming the first that fails."""
        if self._hashing is not None:
            try:
                problem = digest_problem(self.manifest, self._hashing.result())
            except OSError as exc:
                problem = f"{exc.filename or 'a listed file'} could not be read to check its sha256 ({exc.strerror or exc})"
            if problem is not None:
                raise ArtifactError(f"{self.root}: {problem}")
            self._hashing = None
        return self

    def path(self, relative: str) -> Path:
        """The checked path of a file the manifest lists."""
        self.verified()
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
        """One listed Parquet file, checked against the manifest's row count: memory-mapped from its
        Arrow IPC copy when the manifest lists one (no decompression, nothing copied until a row is
        read), else read from the Parquet file into memory."""
        self.verified()
        path = resolve_inside(self.root, entry.path)
        copy = arrow_copy_path(entry.path)
        mapped = any(f.path == copy for f in self.manifest.files)
        try:
            if mapped:
                path = resolve_inside(self.root, copy)
                table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
                table = table.select(columns) if columns is not None else table
            else:
                table = pq.read_table(path, columns=columns)
        except (pa.ArrowException, OSError) as exc:
            raise ArtifactError(f"{path}: not a readable {'Arrow IPC' if mapped else 'Parquet'} file ({exc}); rerun the "
                                "stage that made it") from None
        if entry.rows is not None and table.num_rows != entry.rows:
            raise ArtifactError(f"{self.root}: {entry.path} has {table.num_rows} rows, the manifest says {entry.rows}")
        return table

    def read_split(self, split: str, columns: list[str] | None = None) -> pa.Table:
        entries = [f for f in self.manifest.files_of(split) if f.path.endswith(".parquet")]
        if not entries:
            raise ArtifactError(f"{self.root}: has no split {split!r} (splits: {', '.join(self.splits) or 'none'})")
        tables = [self.read_file(entry, columns) for entry in entries]
        return pa.concat_tables(tables) if len(tables) > 1 else tables[0]
