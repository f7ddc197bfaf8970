"""Padding-free packing: many sequences in one row, each with its own positions, none seeing another.

A packed batch is one row of every chosen and rejected sequence back to back. Each sequence's
``position_ids`` restart at 0, and attention must never cross from one sequence into another.
transformers 5.x can be told where sequences start (``cu_seq_lens_q``/``_k``, as its flash-attention
path reads them); what it does with them depends on the attention implementation:

- ``flash_attention_*`` (GPU): varlen kernels, exact and the fastest; used as they are.
- anything else: ``dpo_varlen`` below, registered with transformers' AttentionInterface: one
  causal SDPA call per sequence, on views of the packed row, so nothing is padded and no sequence
  sees another. transformers' own alternative for sdpa/eager, a block-diagonal mask it derives from
  position_ids, is exact only when no cache object exists (``use_cache=False``; with the default
  cache its second sequence attends to the first) and computes the whole row x row product to throw
  most of it away; bench/packing_attention.py measures both against the padded forward.

A model whose attention does not go through AttentionInterface cannot be told any of this, so
``--packing`` refuses it; and every packed run checks its first batch against the unpacked
computation before trusting the layout (pipeline/scoring.py).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..artifacts.errors import UsageError
from .config import at_least, option

VARLEN = "dpo_varlen"
PACKING_HELP = ("Lay each batch's sequences out in one row without padding, each attending only to itself (the "
                "first batch is checked against the padded computation). Same values, less compute.")
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PackingConfig:
    """Packing for the forward-only passes (cache-ref, evaluate), where a batch may be sized in tokens."""

    PANEL: ClassVar[str] = "Batching"

    packing: bool = option(False, semantic=False, help=PACKING_HELP)
    max_tokens_per_batch: int | None = option(None, semantic=False, check=at_least(2), help=(
        "With --packing: fill each batch with pairs (longest first) up to this many tokens, chosen and rejected "
        "together, instead of --batch-size pairs. A pair longer than this is an error."))

    def check(self) -> None:
        if self.max_tokens_per_batch is not None and not self.packing:
            raise UsageError("--max-tokens-per-batch sizes packed batches: add --packing (without it, --batch-size "
                             "pairs make a batch)")


@dataclasses.dataclass
class PackedLayout:
    """Where each sequence of a packed row lies; ``attention_kwargs`` is what the model forward needs."""

    position_ids: torch.Tensor  # [1, T], restarting at 0 in every sequence
    sequence_ids: torch.Tensor  # [1, T], the sequence each token belongs to
    cu_seqlens: torch.Tensor  # [n + 1] int32, the starts of the sequences and the row's end
    max_length: int
    num_sequences: int

    def to(self, device: torch.device) -> PackedLayout:
        return dataclasses.replace(self, position_ids=self.position_ids.to(device),
                                   sequence_ids=self.sequence_ids.to(device), cu_seqlens=self.cu_seqlens.to(device))

    def attention_kwargs(self) -> dict:
        return {"position_ids": self.position_ids, "cu_seq_lens_q": self.cu_seqlens, "cu_seq_lens_k": self.cu_seqlens,
                "max_length_q": self.max_length, "max_length_k": self.max_length}


def layout(lengths: list[int] | torch.Tensor) -> PackedLayout:
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    starts = torch.cumsum(lengths, 0) - lengths
    total = int(lengths.sum())
    sequence_ids = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    position_ids = torch.arange(total) - torch.repeat_interleave(starts, lengths)
    cu = torch.cat([starts, lengths.sum().reshape(1)]).to(torch.int32)
    return PackedLayout(position_ids.unsqueeze(0), sequence_ids.unsqueeze(0), cu, int(lengths.max()), len(lengths))


def varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     cu_seq_lens_q: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Causal attention of each sequence of a packed row ([1, heads, T, dim]) with itself only.

    One causal SDPA call per sequence, on views of the row (``split``: no copy in, and its backward
    is one ``cat``), and one ``cat`` of the outputs. Gathering the sequences into one padded batch
    instead (three index_selects in and one out per layer, index_adds in backward, and attention
    over each sequence padded to the longest) made the bench model's body take 1.10x as long on
    cache-ref's packed batches and 1.09x (forward and backward) on train's. An unpacked call (no
    ``cu_seq_lens_q``) is plain SDPA, so the implementation is safe to leave set.
    """
    if cu_seq_lens_q is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    lengths = torch.diff(cu_seq_lens_q).tolist()
    gqa = key.shape[1] != query.shape[1]
    outs = [F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=scaling, enable_gqa=gqa)
            for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))]
    # [1, h, n_i, d] each -> [1, T, h, d], the layout transformers' attention functions return
    return torch.cat([out.transpose(1, 2) for out in outs], 1), None


def enable_packing(model: torch.nn.Module) -> str:
    """Make ``model`` (a transformers model) attend within packed sequences; returns the implementation used."""
    from transformers.modeling_utils import AttentionInterface

    if VARLEN not in AttentionInterface._global_mapping:
        AttentionInterface.register(VARLEN, varlen_attention)
    current = getattr(model.config, "_attn_implementation", None) or "eager"
    can_set = getattr(model, "_can_set_attn_implementation", lambda: False)()
    if current.startswith("flash_attention"):
        return current
    if not can_set:
        raise UsageError(
            f"--packing: {type(model).__name__} does not route its attention through transformers' AttentionInterface, "
            "so packed sequences cannot be kept apart; run without --packing"
        )
    model.set_attn_implementation(VARLEN)
    log.debug("packing: %s attends within each sequence (%s)", type(model).__name__, VARLEN)
    return VARLEN
