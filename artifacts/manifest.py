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

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
KINDS = ("tokenized", "ref-logps", "train", "model", "eval")


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
    def from_json(cls, data: dict[str, Any], source: Path) -> Manifest:
        try:
            return cls(
                kind=data["kind"],
                fingerprint=data["fingerprint"],
                config=data.get("config", {}),
                inputs=[InputRef(**i) for i in data.get("inputs", [])],
                files=[FileEntry(**f) for f in data.get("files", [])],
                stats=data.get("stats", {}),
                schema_version=data["schema_version"],
                created=data.get("created", ""),
                producer=data.get("producer", {}),
            )
        except (KeyError, TypeError) as exc:
            raise ArtifactError(f"{source}: not a valid dpo manifest ({exc!r})") from None


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
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: unreadable manifest: {exc}") from None
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
