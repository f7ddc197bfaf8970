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
from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Any

FINGERPRINT_CHARS = 16


def semantic_config(config: Any) -> dict[str, Any]:
    """The fields of a config dataclass that change a stage's output.

    A field opts out with ``field(metadata={"semantic": False})``.
    """
    return {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if f.metadata.get("semantic", True)
    }


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
