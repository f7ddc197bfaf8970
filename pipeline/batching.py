"""Batches of preference pairs: length-grouped formation and right-padded collation.

Padding costs compute in proportion to its share of the batch, so batches are formed from pairs
of similar length: fully sorted when the order does not matter (reference log-probs), or sorted
within shuffled "megabatches" when it does (training, where a fully sorted order would feed the
model short sequences first and long ones last).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .errors import DataError
from .logprobs import IGNORE_INDEX

SIDES = ("chosen", "rejected")


def length_grouped_batches(lengths: Sequence[int] | np.ndarray, batch_size: int, *, shuffle: bool = False,
                           seed: int = 0, megabatch_factor: int = 50, drop_last: bool = False) -> list[list[int]]:
    """Positions into ``lengths``, grouped into batches of similar length.

    Without ``shuffle``: sorted longest first (ties by position), so the first batch shows at once
    whether the longest one fits in memory, and the order is reproducible. With ``shuffle``: a
    seeded permutation cut into megabatches of ``batch_size * megabatch_factor``, each sorted by
    length and cut into batches; the batches are shuffled, and the longest is put first.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    if not shuffle:
        order = np.lexsort((np.arange(n), -lengths))
        batches = [order[s: s + batch_size].tolist() for s in range(0, n, batch_size)]
    else:
        rng = np.random.default_rng(seed)
        perm = rng.permutation(n)
        mega = batch_size * max(1, megabatch_factor)
        batches = []
        for s in range(0, n, mega):
            group = perm[s: s + mega]
            group = group[np.argsort(-lengths[group], kind="stable")]
            batches.extend(group[b: b + batch_size].tolist() for b in range(0, len(group), batch_size))
        rng.shuffle(batches)
        if batches:
            longest = max(range(len(batches)), key=lambda i: (int(lengths[batches[i]].max()), -i))
            batches[0], batches[longest] = batches[longest], batches[0]
    if drop_last and batches and len(batches[-1]) < batch_size:
        # Sorted batches put the short remainder last; shuffled ones may have it anywhere.
        batches = [b for b in batches if len(b) == batch_size]
    return batches


def pad_token_id(tokenized_stats: Mapping) -> int:
    """The id a tokenized artifact pads with: its tokenizer's pad token, else EOS (GPT-2 has no pad).

    Padding is masked out of attention and labels, so any in-vocabulary id gives the same result.
    """
    info = tokenized_stats.get("tokenizer_info") or {}
    pad = info.get("pad_token_id")
    return int(pad if pad is not None else info.get("eos_token_id") or 0)


def pair_lengths(rows: Sequence[Mapping]) -> np.ndarray:
    """The padded length a pair needs in a concatenated batch: the longer of its two sides."""
    return np.array([max(len(r["chosen_input_ids"]), len(r["rejected_input_ids"])) for r in rows], dtype=np.int64)


def _pad(sequences: list, value: int, length: int) -> torch.Tensor:
    out = np.full((len(sequences), length), value, dtype=np.int64)
    for i, seq in enumerate(sequences):
        out[i, : len(seq)] = seq
    return torch.from_numpy(out)


def _padded_length(longest: int, pad_to_multiple_of: int | None) -> int:
    if pad_to_multiple_of and longest % pad_to_multiple_of:
        return longest + pad_to_multiple_of - longest % pad_to_multiple_of
    return max(longest, 1)


def _side(rows: Sequence[Mapping], side: str) -> tuple[list, list]:
    ids, labels = [], []
    for i, row in enumerate(rows):
        a, b = row[f"{side}_input_ids"], row[f"{side}_labels"]
        if len(a) != len(b):
            at = f"pair index {row['index']}" if "index" in row else f"batch row {i}"
            raise DataError(
                f"{at}: {side}_labels has {len(b)} entries but {side}_input_ids has {len(a)}; they must align"
            )
        ids.append(a)
        labels.append(b)
    return ids, labels


def _batch(ids: list, labels: list, pad_token_id: int, length: int) -> dict[str, torch.Tensor]:
    input_ids = _pad(ids, pad_token_id, length)
    mask = torch.zeros_like(input_ids)
    for i, seq in enumerate(ids):
        mask[i, : len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": _pad(labels, IGNORE_INDEX, length)}


def collate_pairs(rows: Sequence[Mapping], pad_token_id: int, mode: str = "concatenated",
                  pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded tensors for a batch of B pairs.

    ``concatenated``: ``input_ids``, ``attention_mask``, ``labels`` of shape [2B, T], chosen rows
    first then rejected, padded to one length (one forward for both sides). ``separate``: the same
    three per side, prefixed ``chosen_`` and ``rejected_``, each padded to its own longest row.
    Labels are -100 on padding; ``index`` [B] is included when the rows carry it.
    """
    if mode not in ("concatenated", "separate"):
        raise ValueError(f"mode must be 'concatenated' or 'separate', not {mode!r}")
    if not rows:
        raise ValueError("collate_pairs needs at least one row")
    sides = {side: _side(rows, side) for side in SIDES}
    batch: dict[str, torch.Tensor] = {}
    if mode == "concatenated":
        ids = sides["chosen"][0] + sides["rejected"][0]
        labels = sides["chosen"][1] + sides["rejected"][1]
        length = _padded_length(max(len(s) for s in ids), pad_to_multiple_of)
        batch.update(_batch(ids, labels, pad_token_id, length))
    else:
        for side, (ids, labels) in sides.items():
            length = _padded_length(max(len(s) for s in ids), pad_to_multiple_of)
            batch.update({f"{side}_{k}": v for k, v in _batch(ids, labels, pad_token_id, length).items()})
    if all("index" in r for r in rows):
        batch["index"] = torch.tensor([int(r["index"]) for r in rows], dtype=torch.long)
    return batch
