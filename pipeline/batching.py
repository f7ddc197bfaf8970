"""Batches of preference pairs: length-grouped formation and the padding collation is built from.

Padding costs compute in proportion to its share of the batch, so batches are formed from pairs
of similar length: fully sorted when the order does not matter (reference log-probs), or sorted
within shuffled "megabatches" when it does (training, where a fully sorted order would feed the
model short sequences first and long ones last).

Pairs travel as Arrow tables (slices of a tokenized split): tokens go from Arrow buffers to padded
tensors through numpy, never through Python lists. pipeline/scoring.py lays batches out per
forward mode with the helpers here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from ..artifacts.errors import DataError, UsageError
from .arrays import arrow_indices, as_numpy
from .tokenization import IGNORE_INDEX

SIDES = ("chosen", "rejected")


def length_grouped_batches(lengths: Sequence[int] | np.ndarray, batch_size: int, *, shuffle: bool = False,
                           seed: int = 0, megabatch_factor: int = 50, drop_last: bool = False) -> list[list[int]]:
    """Positions into ``lengths``, grouped into batches of similar length.

    Without ``shuffle``: sorted longest first (ties by position), so the first batch shows at once
    whether the longest one fits in memory, and the order is reproducible. With ``shuffle``: a
    seeded permutation cut into megabatches of ``batch_size * megabatch_factor``, each sorted by
    length and cut into batches; the batches are shuffled, and the longest is put first.
    """
    flat, starts, order = _grouped(lengths, batch_size, shuffle, seed, megabatch_factor, drop_last)
    return [flat[starts[k]: starts[k] + batch_size].tolist() for k in order]


def full_length_groups(lengths: Sequence[int] | np.ndarray, batch_size: int, *, seed: int,
                       megabatch_factor: int = 50) -> np.ndarray:
    """``length_grouped_batches(..., shuffle=True, drop_last=True)`` as one (batches, batch_size) array:
    8 bytes per pair, where lists of Python ints take about 40 (0.4 GB per rank at 10M pairs)."""
    flat, starts, order = _grouped(lengths, batch_size, True, seed, megabatch_factor, True)
    return flat[starts[order][:, None] + np.arange(batch_size)]


def _grouped(lengths, batch_size: int, shuffle: bool, seed: int, megabatch_factor: int,
             drop_last: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(positions in grouped order, each batch's start in it, the order batches are taken in)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    starts = np.arange(0, n, batch_size, dtype=np.int64)
    if not shuffle:
        flat = np.lexsort((np.arange(n), -lengths))
        order = np.arange(len(starts))
    else:
        rng = np.random.default_rng(seed)
        perm = rng.permutation(n)
        # Each megabatch sorted by length, ties in permutation order (lexsort is stable). A megabatch is
        # a whole number of batches, so batches start every batch_size positions.
        mega = batch_size * max(1, megabatch_factor)
        flat = perm[np.lexsort((-lengths[perm], np.arange(n) // mega))]
        order = np.arange(len(starts))
        rng.shuffle(order)
        if len(order):
            longest_of_batch = np.maximum.reduceat(lengths[flat], starts)
            longest = int(np.argmax(longest_of_batch[order]))  # the first of equals: the earliest in the order
            order[0], order[longest] = order[longest], order[0]
    if drop_last and n % batch_size:
        # Sorted batches put the short remainder last; shuffled ones may have it anywhere.
        order = order[order != len(starts) - 1]
    return flat, starts, order


def token_budget_batches(tokens: np.ndarray, budget: int, indices: np.ndarray | None = None) -> list[list[int]]:
    """Positions into ``tokens`` (each pair's chosen + rejected tokens), longest first, grouped into
    batches of at most ``budget`` tokens: the unit of a packed forward that needs no backward."""
    tokens = np.asarray(tokens, dtype=np.int64)
    order = np.lexsort((np.arange(len(tokens)), -tokens))
    if len(tokens) and tokens[order[0]] > budget:
        at = f"pair index {int(indices[order[0]])}" if indices is not None else f"pair {int(order[0])}"
        raise UsageError(f"{at} has {int(tokens[order[0]])} tokens (chosen + rejected), more than "
                         f"--max-tokens-per-batch {budget} holds: raise --max-tokens-per-batch")
    batches: list[list[int]] = []
    used = budget
    for position in order.tolist():
        if used + tokens[position] > budget:
            batches.append([])
            used = 0
        batches[-1].append(position)
        used += int(tokens[position])
    return batches


def forward_batches(table: pa.Table, batch_size: int, max_tokens: int | None) -> list[list[int]]:
    """Batches of a forward-only pass: ``max_tokens`` per batch when given (packed runs), else
    ``batch_size`` pairs of similar length."""
    if max_tokens is not None:
        tokens = pair_lengths(table, combined=True)
        return token_budget_batches(tokens, max_tokens, pair_indices(table))
    return length_grouped_batches(pair_lengths(table), batch_size)


def pad_token_id(tokenized_stats: Mapping) -> int:
    """The id a tokenized artifact pads with: its tokenizer's pad token, else EOS (GPT-2 has no pad).

    Padding is masked out of attention and labels, so any in-vocabulary id gives the same result.
    """
    info = tokenized_stats.get("tokenizer_info") or {}
    pad = info.get("pad_token_id")
    return int(pad if pad is not None else info.get("eos_token_id") or 0)


def as_table(rows: pa.Table | Sequence[Mapping]) -> pa.Table:
    """Pairs as an Arrow table: a table (or slice) as it is, a list of row dicts converted."""
    return rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(list(rows))


def take_rows(table: pa.Table, positions: Sequence[int] | np.ndarray) -> pa.Table:
    """Rows ``positions`` of a table, in that order, reading only the record batches that hold them.

    A split is many record batches (memory-mapped Arrow files, 8192 rows each); Arrow's own
    Table.take concatenates every chunk of a column first, which copies the whole split into
    memory (and touches every mapped page) for a batch of a few rows.
    """
    positions = np.asarray(positions, dtype=np.int64)
    batches = table.to_batches()
    if len(batches) <= 1:
        return table.take(arrow_indices(positions))
    starts = np.cumsum([0] + [len(b) for b in batches])
    chunk = np.searchsorted(starts, positions, side="right") - 1
    order = np.argsort(chunk, kind="stable")
    pieces = [batches[c].take(arrow_indices(positions[order][chunk[order] == c] - starts[c])) for c in np.unique(chunk)]
    gathered = pa.Table.from_batches(pieces, schema=table.schema).combine_chunks()
    return gathered.take(arrow_indices(np.argsort(order, kind="stable")))


def pair_indices(table: pa.Table) -> np.ndarray:
    """The pairs' ``index`` column as a (writable) int64 array."""
    return np.array(as_numpy(table.column("index")), dtype=np.int64)


def pair_lengths(rows: pa.Table | Sequence[Mapping], combined: bool = False) -> np.ndarray:
    """The padded length a pair needs in a concatenated batch: the longer of its two sides (with
    ``combined``, the tokens of both sides: what it takes in a packed row).

    Read from the length columns a tokenized artifact has, else from the token lists' lengths,
    never by turning tokens into Python objects.
    """
    table = as_table(rows)
    sides = [table.column(f"{side}_length") if f"{side}_length" in table.column_names
             else pc.list_value_length(table.column(f"{side}_input_ids")) for side in SIDES]
    chosen, rejected = (as_numpy(s) for s in sides)
    return chosen + rejected if combined else np.maximum(chosen, rejected)


def sequence_lengths(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(every chosen and rejected sequence's tokens, its label tokens), from the length columns."""
    prompt = as_numpy(table.column("prompt_length"))
    lengths = np.concatenate([as_numpy(table.column("chosen_length")), as_numpy(table.column("rejected_length"))])
    return lengths, lengths - np.concatenate([prompt, prompt])


def scored_label_tokens(table: pa.Table, side: str, positions: Sequence[int] | np.ndarray | None = None,
                        rows_per_chunk: int = 4096) -> np.ndarray:
    """Per pair (of ``positions``, else of all), the label tokens of ``side`` that carry a log-prob:
    labels != -100 past position 0 (position t's logits predict token t + 1), as LabelLogProbs counts
    them. Known before any forward; without a label column (see side_tokens), every position from the
    prompt's end on is scored."""
    labelled = f"{side}_labels" in table.column_names
    table = table.select([f"{side}_labels"] if labelled else [f"{side}_length", "prompt_length"])
    if positions is not None:
        table = take_rows(table, positions)
    if not labelled:
        lengths = as_numpy(table.column(f"{side}_length"))
        return np.maximum(lengths - np.maximum(as_numpy(table.column("prompt_length")), 1), 0)
    counts = []
    for start in range(0, table.num_rows, rows_per_chunk):
        labels, lengths = ragged(table.slice(start, rows_per_chunk), f"{side}_labels")
        position = np.arange(len(labels)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        row = np.repeat(np.arange(len(lengths)), lengths)
        counts.append(np.bincount(row[(labels != IGNORE_INDEX) & (position >= 1)], minlength=len(lengths)))
    return np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64)


def ragged(table: pa.Table, column: str) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (all values in row order, each row's length), as numpy arrays."""
    values = table.column(column)
    return as_numpy(pc.list_flatten(values)), as_numpy(pc.list_value_length(values))


def pad_ragged(flat: np.ndarray, lengths: np.ndarray, value: int, width: int) -> np.ndarray:
    """Rows of ``lengths`` (concatenated in ``flat``) right-padded with ``value`` to ``[n, width]``."""
    out = np.full((len(lengths), width), value, dtype=np.int64)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[rows, np.arange(len(flat)) - starts] = flat
    return out


def padded_length(longest: int, pad_to_multiple_of: int | None) -> int:
    if pad_to_multiple_of and longest % pad_to_multiple_of:
        return longest + pad_to_multiple_of - longest % pad_to_multiple_of
    return max(longest, 1)


def side_tokens(table: pa.Table, side: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input ids, labels, lengths) of one side of every pair, checked to align.

    Labels come from the ``{side}_labels`` column where the table has one, else they are the input
    ids with the first ``prompt_length`` masked, as tokenize makes them (its memory-mapped Arrow
    copies leave the label columns out)."""
    ids, lengths = ragged(table, f"{side}_input_ids")
    if f"{side}_labels" not in table.column_names:
        prompt = np.repeat(as_numpy(table.column("prompt_length")), lengths)
        position = np.arange(len(ids)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        return ids, np.where(position < prompt, IGNORE_INDEX, ids), lengths
    labels, label_lengths = ragged(table, f"{side}_labels")
    bad = np.nonzero(lengths != label_lengths)[0]
    if len(bad):
        i = int(bad[0])
        at = f"pair index {table.column('index')[i].as_py()}" if "index" in table.column_names else f"batch row {i}"
        raise DataError(f"{at}: {side}_labels has {int(label_lengths[i])} entries but {side}_input_ids has "
                        f"{int(lengths[i])}; they must align")
    return ids, labels, lengths


def right_padded(ids: np.ndarray, labels: np.ndarray, lengths: np.ndarray, pad_token_id: int,
                 width: int) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding) of shape ``[n, width]``."""
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    return {"input_ids": torch.from_numpy(pad_ragged(ids, lengths, pad_token_id, width)),
            "attention_mask": torch.from_numpy(mask),
            "labels": torch.from_numpy(pad_ragged(labels, lengths, IGNORE_INDEX, width))}
