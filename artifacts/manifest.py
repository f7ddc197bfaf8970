"""The manifest: what makes a directory an artifact.

``manifest.json`` is written last and atomically. A directory without one is not an artifact:
readers refuse it and a rerun of the stage resumes or redoes it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

from .errors import ArtifactError
from .faults import fault_point

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
KINDS = ("tokenized", "ref-logps", "train", "model", "eval", "comparison")


@dataclasses.dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the artifact folder, '/'-separated
    rows: int | None
    bytes: int
    sha256: str

    @property
    def split(self) -> str | None:
        head, sep, _ = self.path.partition("/")
        return head if sep else None


@dataclasses.dataclass(frozen=True)
class InputRef:
    kind: str
    path: str
    fingerprint: str


@dataclasses.dataclass
class Manifest:
    kind: str
    fingerprint: str
    config: dict[str, Any]
    inputs: list[InputRef] = dataclasses.field(default_factory=list)
    files: list[FileEntry] = dataclasses.field(default_factory=list)
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    created: str = ""
    producer: dict[str, str] = dataclasses.field(default_factory=dict)

    def files_of(self, split: str) -> list[FileEntry]:
        return [f for f in self.files if f.split == split]

    @property
    def splits(self) -> list[str]:
        seen: dict[str, None] = {}
        for f in self.files:
            if f.split is not None and f.path.endswith(".parquet"):
                seen[f.split] = None
        return list(seen)

    def rows(self, split: str) -> int:
        return sum(f.rows or 0 for f in self.files_of(split))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any, source: Path) -> Manifest:
        """A manifest checked against its schema: a missing or mistyped field is an ArtifactError
        naming the file and the field, before anything the manifest points at is read."""
        fields = _Fields(data, source)
        kind = fields.get("kind", str)
        if kind not in KINDS:
            raise ArtifactError(f"{source}: field 'kind' is {kind!r}, not one of {', '.join(KINDS)}")
        return cls(
            kind=kind,
            fingerprint=fields.get("fingerprint", str),
            config=fields.get("config", dict),
            inputs=[InputRef(**_Fields(item, source, f"inputs[{i}]").all(INPUT_FIELDS))
                    for i, item in enumerate(fields.get("inputs", list))],
            files=[FileEntry(**_Fields(item, source, f"files[{i}]").all(FILE_FIELDS))
                   for i, item in enumerate(fields.get("files", list))],
            stats=fields.get("stats", dict),
            schema_version=fields.get("schema_version", int),
            created=fields.get("created", str, required=False) or "",
            producer=fields.get("producer", dict, required=False) or {},
        )


INPUT_FIELDS = {"kind": str, "path": str, "fingerprint": str}
FILE_FIELDS = {"path": str, "rows": (int, type(None)), "bytes": int, "sha256": str}


class _Fields:
    """Typed access to one JSON object of a manifest, naming the file and the field on any mismatch."""

    def __init__(self, data: Any, source: Path, where: str = ""):
        if not isinstance(data, dict):
            raise ArtifactError(f"{source}: {where or 'the manifest'} must be a JSON object, not {type(data).__name__}")
        self.data, self.source, self.prefix = data, source, f"{where}." if where else ""

    def get(self, name: str, types: type | tuple[type, ...], required: bool = True) -> Any:
        if name not in self.data:
            if required:
                raise ArtifactError(f"{self.source}: field '{self.prefix}{name}' is missing: not a valid dpo manifest "
                                    "(rerun the stage that wrote it, with --overwrite)")
            return None
        value = self.data[name]
        # bool is an int to Python, never to a manifest.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
            expected = " or ".join(t.__name__ for t in _as_tuple(types))
            raise ArtifactError(f"{self.source}: field '{self.prefix}{name}' must be {expected}, "
                                f"not {type(value).__name__} ({value!r:.60}): not a valid dpo manifest")
        return value

    def all(self, schema: dict[str, type | tuple[type, ...]]) -> dict[str, Any]:
        return {name: self.get(name, types) for name, types in schema.items()}


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def resolve_inside(root: Path, relative: str) -> Path:
    """``root/relative``, refusing paths that lead outside ``root`` (absolute, '..', symlinks)."""
    if not relative or os.path.isabs(relative) or "\\" in relative:
        raise ArtifactError(f"{root / MANIFEST}: file path {relative!r} is not relative to the artifact")
    target = (root / relative).resolve()
    if not target.is_relative_to(root.resolve()):
        raise ArtifactError(f"{root / MANIFEST}: file path {relative!r} leads outside the artifact folder")
    return target


def write_text_atomic(path: Path, text: str) -> None:
    """tmp file, fsync, rename, fsync the directory: a reader sees the old file or the new, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    fault_point("atomic-replace")
    os.replace(tmp, path)
    fsync_path(path.parent)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def fsync_path(path: Path) -> None:
    """Flush a file, or a directory's entries (a rename is durable only once its directory is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(root: Path, manifest: Manifest) -> None:
    from .. import __version__

    if manifest.kind not in KINDS:
        raise ValueError(f"unknown artifact kind {manifest.kind!r}")
    for entry in manifest.files:
        resolve_inside(root, entry.path)
    # An input artifact given as a relative path is recorded absolute: whoever reads this manifest (export
    # finding the tokenized artifact, status checking its inputs) may run from another directory.
    manifest.inputs = [dataclasses.replace(i, path=os.path.abspath(i.path))
                       if i.kind in KINDS and not os.path.isabs(i.path) and os.path.isdir(i.path) else i
                       for i in manifest.inputs]
    manifest.created = manifest.created or dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    manifest.producer = manifest.producer or {"name": "dpo", "version": __version__}
    write_json_atomic(root / MANIFEST, manifest.to_json())


def read_manifest(root: str | os.PathLike, kind: str | None = None) -> Manifest:
    """The manifest of a complete artifact, or an ArtifactError that says what is wrong."""
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise ArtifactError(f"{root}: no such artifact directory")
    if not path.is_file():
        raise ArtifactError(
            f"{root}: no {MANIFEST}, so this is not a complete artifact "
            "(the stage that writes it did not finish: rerun it to resume)"
        )
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: unreadable manifest, not UTF-8 JSON ({exc}); rerun the stage that wrote it "
                            "with --overwrite") from None
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read the manifest ({exc.strerror})") from None
    manifest = Manifest.from_json(data, path)
    if manifest.schema_version > SCHEMA_VERSION:
        raise ArtifactError(
            f"{path}: schema_version {manifest.schema_version} is newer than this dpo reads "
            f"({SCHEMA_VERSION}); upgrade dpo"
        )
    if kind is not None and manifest.kind != kind:
        raise ArtifactError(f"{root}: is a {manifest.kind!r} artifact, expected {kind!r}")
    for entry in manifest.files:
        resolve_inside(root, entry.path)
    return manifest
