"""Content fingerprints that chain from stage to stage.

A fingerprint hashes the stage name, the stage's own version constant, the semantic part of its
config and the fingerprints of its inputs. It is the cache key of the stage (as in DVC and HF
datasets): stable across machines, Python runs and dict orderings, blind to settings that do not
change the result (num_proc, log level, progress bars).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import PurePath
from typing import Any

FINGERPRINT_CHARS = 16


def leaf_values(config: Any, semantic: bool = True) -> Iterator[tuple[dataclasses.Field, Any, bool]]:
    """(field, value, semantic) for every option of a config dataclass, in declaration order.

    A field whose metadata says ``group`` holds a nested config dataclass, whose options are
    yielded in its place; a field opts out of the fingerprint with ``metadata={"semantic": False}``
    (a group's opt-out covers all its options), and one marked ``omit_if_default`` counts only
    when it is set to something other than its default.
    """
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        inner = semantic and f.metadata.get("semantic", True)
        if f.metadata.get("group"):
            yield from leaf_values(value, inner)
        else:
            yield f, value, inner and not omitted(f, value)


def omitted(field: dataclasses.Field, value: Any) -> bool:
    """Whether an ``omit_if_default`` field holds its default, and so stays out of fingerprints.

    Options added after runs exist are marked so: a run that does not use one keeps the
    fingerprint it had before the option existed.
    """
    if not field.metadata.get("omit_if_default"):
        return False
    if field.default is not dataclasses.MISSING:
        default = field.default
    elif field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
    else:
        return False
    return canonical(value) == canonical(default)


def semantic_config(config: Any) -> dict[str, Any]:
    """The options of a config dataclass that change a stage's output (see leaf_values)."""
    return {f.name: value for f, value, semantic in leaf_values(config) if semantic}


def canonical(value: Any) -> Any:
    """A JSON-ready value whose serialisation does not depend on ordering or Python types."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return canonical(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (str, bytes)):
        return value.decode() if isinstance(value, bytes) else value
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(canonical(v) for v in value)
    if isinstance(value, Sequence):
        return [canonical(v) for v in value]
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return repr(value)
        # 1.0 and 1 must not hash differently just because YAML and a flag typed them differently.
        return int(value) if value.is_integer() else value
    if hasattr(value, "value") and hasattr(value, "name"):  # enum
        return canonical(value.value)
    return value


def hash_json(value: Any) -> str:
    text = json.dumps(canonical(value), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def fingerprint(stage: str, version: int, config: Any, inputs: Sequence[str] = ()) -> str:
    """The fingerprint of one stage run. ``config`` is a config dataclass or a plain mapping."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = semantic_config(config)
    payload = {"stage": stage, "version": version, "config": config, "inputs": list(inputs)}
    return hash_json(payload)[:FINGERPRINT_CHARS]


def sha256_file(path: str | PurePath, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()
