"""Reading a ``ref-logps`` artifact into tensors indexed by pair ``index``.

Pair ids are dense (0..N-1 across all splits of the tokenized artifact), so the cache loads into
plain tensors of length N and a batch looks its reference values up with one gather. A cache is
only usable with the tokenized artifact it was computed from; both checks (lineage and coverage)
happen here so every consumer gets them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from ..artifacts.manifest import Manifest, read_manifest
from ..artifacts.shards import ArtifactReader
from ..artifacts.errors import ArtifactError
from .arrays import as_numpy

KIND = "ref-logps"
COLUMNS = ("index", "chosen_logps", "rejected_logps", "chosen_num_tokens", "rejected_num_tokens")
# Sums over each pair's first min(nc, nr) label tokens, for LD-DPO; caches from cache-ref version 1 lack them.
SHARED_COLUMNS = ("chosen_shared_logps", "rejected_shared_logps")


@dataclasses.dataclass
class ReferenceLogProbs:
    """Reference values per pair id; entries of pairs outside ``splits`` are NaN and not ``present``."""

    chosen_logps: torch.Tensor  # [N] float32
    rejected_logps: torch.Tensor  # [N] float32
    chosen_num_tokens: torch.Tensor  # [N] float32 (exact: counts are far below 2**24)
    rejected_num_tokens: torch.Tensor  # [N] float32
    present: torch.Tensor  # [N] bool
    splits: tuple[str, ...]
    directory: Path
    fingerprint: str
    model: str  # the reference model's path when the cache was made
    reference_model_identity: dict[str, Any]  # pipeline.modeling.model_identity of that model
    dtype: str
    chosen_shared_logps: torch.Tensor | None = None  # [N] float32, when loaded with shared=True
    rejected_shared_logps: torch.Tensor | None = None

    def lookup(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The reference values (four, or six with the shared-prefix sums) of the pairs ``index``, on its device."""
        cpu = index.detach().to("cpu", torch.long)
        if cpu.numel() and (int(cpu.min()) < 0 or int(cpu.max()) >= len(self.present) or not bool(self.present[cpu].all())):
            bad = [int(i) for i in cpu if i < 0 or i >= len(self.present) or not self.present[i]]
            raise ArtifactError(f"{self.directory}: has no reference log-probs for pair index {bad[:10]}")
        names = COLUMNS[1:] + (SHARED_COLUMNS if self.chosen_shared_logps is not None else ())
        return {name: getattr(self, name)[cpu].to(index.device) for name in names}


def _tokenized(tokenized_manifest: Manifest | str | os.PathLike) -> tuple[Manifest, str]:
    if isinstance(tokenized_manifest, Manifest):
        return tokenized_manifest, "the tokenized artifact"
    return read_manifest(tokenized_manifest, "tokenized"), str(tokenized_manifest)


def load_reference(ref_dir: str | os.PathLike, tokenized_manifest: Manifest | str | os.PathLike,
                   splits: Sequence[str], shared: bool = False, verify: bool = True) -> ReferenceLogProbs:
    """Load the reference log-probs of ``splits``, refusing a cache of other tokens or with gaps.

    ``tokenized_manifest`` is the tokenized artifact's Manifest or its directory. ``shared``: also
    the shared-prefix sums LD-DPO needs (a cache made before they existed is refused).
    """
    tokenized, tok_name = _tokenized(tokenized_manifest)
    reader = ArtifactReader(ref_dir, kind=KIND, verify=verify)
    manifest = reader.manifest
    made_from = [i for i in manifest.inputs if i.kind == "tokenized"]
    if not made_from or made_from[0].fingerprint != tokenized.fingerprint:
        source = f"{made_from[0].path} (fingerprint {made_from[0].fingerprint})" if made_from else "an unknown artifact"
        raise ArtifactError(
            f"{ref_dir}: this reference cache was computed from the tokenized artifact {source}, not from "
            f"{tok_name} (fingerprint {tokenized.fingerprint}). Run `dpo cache-ref --tokenized` on the same "
            "tokenized directory you train on"
        )
    total = sum(tokenized.rows(s) for s in tokenized.splits)
    columns = COLUMNS + (SHARED_COLUMNS if shared else ())
    values = {name: np.full(total, np.nan, dtype=np.float32) for name in columns[1:]}
    present = np.zeros(total, dtype=bool)
    for split in splits:
        if split not in tokenized.splits:
            raise ArtifactError(f"{tok_name} has no split {split!r} (splits: {', '.join(tokenized.splits)})")
        if split not in reader.splits:
            raise ArtifactError(
                f"{ref_dir}: has no reference log-probs for split {split!r} (it has {', '.join(reader.splits) or 'none'}); "
                f"rerun `dpo cache-ref` with --split {split} or without --split"
            )
        if shared:
            _require_shared(reader, split, ref_dir)
        table = reader.read_split(split, columns=list(columns))
        index = as_numpy(table.column("index"))
        if len(index) and (index.min() < 0 or index.max() >= total):
            raise ArtifactError(
                f"{ref_dir}: split {split!r} has pair index {int(index.max())} outside 0..{total - 1} of {tok_name}"
            )
        if len(np.unique(index)) != len(index) or present[index].any():
            raise ArtifactError(f"{ref_dir}: split {split!r} lists a pair index more than once")
        if len(index) != tokenized.rows(split):
            raise ArtifactError(
                f"{ref_dir}: split {split!r} has reference log-probs for {len(index)} pairs but {tok_name} has "
                f"{tokenized.rows(split)}: the cache is incomplete"
            )
        present[index] = True
        for name in columns[1:]:
            values[name][index] = as_numpy(table.column(name), np.float32)
    return ReferenceLogProbs(
        **{name: torch.from_numpy(v) for name, v in values.items()},
        present=torch.from_numpy(present),
        splits=tuple(splits),
        directory=Path(ref_dir),
        fingerprint=manifest.fingerprint,
        model=str(manifest.config.get("model", "")),
        reference_model_identity=dict(manifest.stats.get("model_identity", {})),
        dtype=str(manifest.config.get("dtype", "")),
    )


def _require_shared(reader: ArtifactReader, split: str, ref_dir: str | os.PathLike) -> None:
    for entry in reader.manifest.files_of(split):
        if entry.path.endswith(".parquet") and not set(SHARED_COLUMNS) <= set(pq.read_schema(reader.path(entry.path)).names):
            raise ArtifactError(
                f"{ref_dir}: this reference cache has no {' and '.join(SHARED_COLUMNS)} (the reference's log-probs of "
                "the length both responses share), which --ld-alpha needs: it was made by an earlier dpo cache-ref. "
                f"Recompute it with `dpo cache-ref --tokenized ... --model ... --out {ref_dir} --overwrite`"
            )


def reference_model_mismatch(reference: ReferenceLogProbs, model_path: str | os.PathLike) -> str | None:
    """A warning if ``model_path`` (e.g. the base of a LoRA run) is not the model the cache was made from."""
    from .modeling import model_identity

    recorded = reference.reference_model_identity.get("sampled_digest")
    if not recorded:
        return f"{reference.directory}: records no reference model identity; cannot check it against {model_path}"
    current = model_identity(model_path)["sampled_digest"]
    if current == recorded:
        return None
    return (
        f"the reference log-probs in {reference.directory} were computed with the model at {reference.model} "
        f"(identity {recorded}), but {model_path} has identity {current}: the DPO reference is not the model "
        "being trained from"
    )
