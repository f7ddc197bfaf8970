"""Scoring pairs: rows of a tokenized split in, per-pair (chosen, rejected) log-probs out.

cache-ref, train and evaluate all score pairs the same way: lay a batch out for the model (a
forward mode), run LabelLogProbs on it, and split the result back into chosen and rejected with
the token and padding counts that throughput and padding statistics need. Forward modes are
registered in FORWARDS; adding one (a packed layout, say) is one class here.

- ``concatenated``: chosen rows then rejected rows in one ``[2B, T]`` batch: one forward.
- ``separate``: two forwards, each side padded to its own longest row: less peak memory, same values.
- ``packed``: every sequence of the batch in one row without padding, each attending only to itself
  (``--packing``); its first batch is checked against ``concatenated`` before it is trusted.

Asked ``with_shared``, scoring also sums each response's first ``k = min(nc, nr)`` label tokens
(k counted per pair, as TRL's LD-DPO counts it), for the length-desensitised losses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar

import numpy as np
import pyarrow as pa
import torch

from ..artifacts.errors import UsageError
from .batching import SIDES, as_table, pair_indices, padded_length, right_padded, side_tokens
from .logprobs import SequenceLogProbs
from .packing import layout
from .profiling import NULL_TIMER
from .tokenization import IGNORE_INDEX

# (input_ids, attention_mask, labels, with_wpo_term=..., shared_tokens=...) -> SequenceLogProbs:
# LabelLogProbs, or the DDP / DeepSpeed wrapper around it that Accelerate returns.
Module = Callable[..., SequenceLogProbs]


@dataclasses.dataclass
class PairScores:
    chosen: SequenceLogProbs  # [B] each
    rejected: SequenceLogProbs
    tokens: int  # real tokens the model ran on
    slots: int  # token positions it ran on, padding included


def _split(both: SequenceLogProbs, n: int) -> tuple[SequenceLogProbs, SequenceLogProbs]:
    def part(sl: slice) -> SequenceLogProbs:
        return SequenceLogProbs(both.logps[sl], both.num_tokens[sl],
                                None if both.wpo_term is None else both.wpo_term[sl],
                                None if both.shared_logps is None else both.shared_logps[sl])

    return part(slice(0, n)), part(slice(n, None))


def _label_counts(labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scored label tokens per row, counted as LabelLogProbs scores them (next-token labels)."""
    return ((labels[:, 1:] != IGNORE_INDEX) & attention_mask[:, 1:].bool()).sum(dim=1)


def _counts(masks: Sequence[torch.Tensor]) -> tuple[int, int]:
    return int(sum(int(m.sum()) for m in masks)), int(sum(m.numel() for m in masks))


class ForwardMode:
    """How a batch of pairs is laid out for the model and scored."""

    name: ClassVar[str]

    def collate(self, pairs: pa.Table, pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def score(self, module: Module, batch: Mapping[str, torch.Tensor], with_wpo_term: bool,
              with_shared: bool = False) -> PairScores:
        raise NotImplementedError


class Concatenated(ForwardMode):
    """``input_ids``, ``attention_mask``, ``labels`` of shape [2B, T], chosen rows first, one length."""

    name = "concatenated"

    def collate(self, pairs, pad_token_id, pad_to_multiple_of=None):
        (cids, clab, clen), (rids, rlab, rlen) = (side_tokens(pairs, side) for side in SIDES)
        lengths = np.concatenate([clen, rlen])
        width = padded_length(int(lengths.max()), pad_to_multiple_of)
        return right_padded(np.concatenate([cids, rids]), np.concatenate([clab, rlab]), lengths, pad_token_id, width)

    def score(self, module, batch, with_wpo_term, with_shared=False):
        n = batch["input_ids"].shape[0] // 2
        shared = None
        if with_shared:
            counts = _label_counts(batch["labels"], batch["attention_mask"])
            shared = torch.minimum(counts[:n], counts[n:]).repeat(2)
        both = module(batch["input_ids"], batch["attention_mask"], batch["labels"], with_wpo_term=with_wpo_term,
                      shared_tokens=shared)
        chosen, rejected = _split(both, n)
        return PairScores(chosen, rejected, *_counts([batch["attention_mask"]]))


class Separate(ForwardMode):
    """The same three tensors per side, prefixed ``chosen_`` / ``rejected_``, each side its own length."""

    name = "separate"

    def collate(self, pairs, pad_token_id, pad_to_multiple_of=None):
        batch = {}
        for side in SIDES:
            ids, labels, lengths = side_tokens(pairs, side)
            width = padded_length(int(lengths.max()), pad_to_multiple_of)
            batch.update({f"{side}_{k}": v for k, v in right_padded(ids, labels, lengths, pad_token_id, width).items()})
        return batch

    def score(self, module, batch, with_wpo_term, with_shared=False):
        shared = None
        if with_shared:
            shared = torch.minimum(*(_label_counts(batch[f"{side}_labels"], batch[f"{side}_attention_mask"])
                                     for side in SIDES))
        chosen, rejected = (
            module(batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"], batch[f"{side}_labels"],
                   with_wpo_term=with_wpo_term, shared_tokens=shared)
            for side in SIDES
        )
        return PairScores(chosen, rejected, *_counts([batch[f"{side}_attention_mask"] for side in SIDES]))


class Packed(ForwardMode):
    """One row of every chosen then every rejected sequence, no padding (pipeline/packing.py).

    Each sequence's first token gets no label: in a row, the position before it is the end of the
    previous sequence, which must not score it (unpacked, nothing precedes it)."""

    name = "packed"

    def collate(self, pairs, pad_token_id, pad_to_multiple_of=None):
        (cids, clab, clen), (rids, rlab, rlen) = (side_tokens(pairs, side) for side in SIDES)
        lengths = np.concatenate([clen, rlen])
        labels = np.concatenate([clab, rlab])
        labels[np.cumsum(lengths) - lengths] = IGNORE_INDEX
        return {"input_ids": torch.from_numpy(np.concatenate([cids, rids])).unsqueeze(0),
                "labels": torch.from_numpy(labels).unsqueeze(0), "packed": layout(lengths)}

    def score(self, module, batch, with_wpo_term, with_shared=False):
        packed = batch["packed"]
        n = packed.num_sequences // 2
        shared = None
        if with_shared:
            scored = batch["labels"][0, 1:] != IGNORE_INDEX
            counts = torch.bincount(packed.sequence_ids[0, 1:][scored], minlength=packed.num_sequences)
            shared = torch.minimum(counts[:n], counts[n:]).repeat(2)
        both = module(batch["input_ids"], None, batch["labels"], with_wpo_term=with_wpo_term, packed=packed,
                      shared_tokens=shared)
        chosen, rejected = _split(both, n)
        tokens = batch["input_ids"].numel()
        return PairScores(chosen, rejected, tokens, tokens)


FORWARDS: dict[str, ForwardMode] = {mode.name: mode for mode in (Concatenated(), Separate(), Packed())}


def forward_mode(forward: str, packing: bool) -> str:
    """The forward mode a stage runs: ``--packing`` wins over ``--forward``."""
    return Packed.name if packing else forward


def collate_pairs(rows: pa.Table | Sequence[Mapping], pad_token_id: int, mode: str = "concatenated",
                  pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded tensors for a batch of B pairs in forward mode ``mode`` (labels -100 on padding);
    ``index`` [B] is included when the rows carry it."""
    if mode not in FORWARDS:
        raise ValueError(f"mode must be one of {', '.join(FORWARDS)}, not {mode!r}")
    pairs = as_table(rows)
    if pairs.num_rows == 0:
        raise ValueError("collate_pairs needs at least one row")
    batch = FORWARDS[mode].collate(pairs, pad_token_id, pad_to_multiple_of)
    if "index" in pairs.column_names:
        batch["index"] = torch.from_numpy(pair_indices(pairs))
    return batch


class PairScorer:
    """Scores batches of pairs with ``module`` on ``device`` in one forward mode.

    ``agree``: where every rank scores its first batch at the same time (training), the collective
    over which the packed layout's first-batch check is agreed, so that no rank goes on alone.
    """

    # A packed first batch may differ from the padded computation by float rounding only.
    PACKING_TOLERANCE = 1e-4

    def __init__(self, module: Module, mode: str, pad_token_id: int, device: torch.device | str,
                 with_wpo_term: bool = False, agree=None, with_shared: bool = False):
        if mode not in FORWARDS:
            raise ValueError(f"mode must be one of {', '.join(FORWARDS)}, not {mode!r}")
        self.module = module
        self.mode = FORWARDS[mode]
        self.pad_token_id = pad_token_id
        self.device = torch.device(device)
        self.with_wpo_term = with_wpo_term
        self.agree = agree
        self.with_shared = with_shared
        self.timer = NULL_TIMER  # a stage that reports where its time goes sets its own
        self._checked = mode != Packed.name

    def __call__(self, rows: pa.Table | Sequence[Mapping]) -> PairScores:
        scores = self._score(rows, self.mode)
        if not self._checked:
            self._check_packing(rows, scores)
        return scores

    def _score(self, rows, mode: ForwardMode) -> PairScores:
        with self.timer.phase("data"):
            batch = collate_pairs(rows, self.pad_token_id, mode.name)
            batch = {k: v.to(self.device) for k, v in batch.items()}
        return mode.score(self.module, batch, self.with_wpo_term, self.with_shared)

    @torch.no_grad()
    def _check_packing(self, rows, packed: PairScores) -> None:
        """The first packed batch against the padded computation of the same pairs."""
        padded = self._score(rows, FORWARDS[Concatenated.name])
        error = 0.0
        for got, want in ((packed.chosen, padded.chosen), (packed.rejected, padded.rejected)):
            scale = want.logps.detach().abs().clamp(min=1.0)
            error = max(error, float(((got.logps.detach() - want.logps) / scale).abs().max()))
            if not torch.equal(got.num_tokens, want.num_tokens):
                error = float("inf")
        failed = error > self.PACKING_TOLERANCE
        if self.agree is not None:
            failed = self.agree.any(failed)
        if failed:
            raise UsageError(
                f"--packing: this model does not keep packed sequences apart (relative log-prob error {error:.3g} "
                "against the padded computation on the first batch); run without --packing"
            )
        self._checked = True
