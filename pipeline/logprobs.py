"""Summed log-probabilities of label tokens, without a [B, T, V] float32 log-softmax.

The output layer is by far the widest matmul of a causal LM, and on DPO data most positions carry
no label (the prompt) or no token (padding). So the model's body runs on the whole batch, and the
output layer runs only on the hidden states whose next token is a label, in chunks of rows: each
chunk's logits are cast to float32, the label logit gathered and a logsumexp subtracted, then the
chunk is dropped. A plain linear head goes further (_LinearLabelLogProb): on the CPU it works through
the vocabulary in cache-sized blocks, so no [rows, vocab] logits are written out to memory at all,
and the rows go in one call (up to CALL_ROWS). With gradients on, its forward already knows the
gradient of log p(target) with respect to the logits (one-hot minus softmax, up to per-row scales):
it keeps the exponentiated logits for as many rows as KEEP_BYTES holds (in reused LogitBuffers), so
backward is two matmuls per block instead of recomputing the logits and the softmax; the rows past
that budget are recomputed in backward (activation checkpointing), so training never holds more than
KEEP_BYTES of [N, vocab].

Models whose head is more than a linear layer (logit soft-capping, logit scaling) get the same
transform applied here; any other architecture is caught by a one-time check against the model's
own forward on the first batch, and then falls back to the full forward (correct, just slower).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .packing import PackedLayout
from .profiling import NULL_TIMER
from .tokenization import IGNORE_INDEX

# float32 logits per chunk. 64 MiB keeps a 128k-vocab chunk at ~130 rows (still a wide matmul) and a
# 512-vocab one unchunked; on the 16M-parameter GPT-2-vocab bench model a train step peaks at 1.96 GB
# instead of 2.73 GB with 256 MiB chunks, at the same loss.
CHUNK_BYTES = 64 << 20
# float32 exp-logits (the logit gradients but for per-row scales) kept from forward to backward per forward
# call (the rest is recomputed). 256 MiB holds 1,335 label rows of a 50k vocabulary, about every row of a
# bench training step (8 pairs): its output layer's forward and backward took 0.85x the time of keeping 666
# rows in two chunks (in-process, interleaved, at 860 and 1,400 rows); the step's peak went from 1.80-1.83
# to 1.88-1.95 GiB (2 runs each).
KEEP_BYTES = 4 * CHUNK_BYTES
# Vocabulary columns per block of the output layer on the CPU: each block's float32 logits go from the
# matmul that writes them to the max, exp and sum that read them while still in cache (a [rows, vocab]
# matmul writes out to memory at a fraction of the rate). From about 170 rows up a block is BLOCK_COLUMNS
# wide: narrower blocks ran the matmul faster than ones sized to 4 MiB of logits (in-process, interleaved,
# without gradients: 700 rows 214 -> 130 ms, 1,142 rows 214 -> 198 ms on the bench model; 1,520 -> 1,132 ms
# for 700 rows of a 152k x 896 layer), and forward plus kept backward took 0.87-0.95x the time at 700-4,096
# rows (about even at 350). Fewer rows get wider blocks, up to BLOCK_BYTES of logits: there the per-block
# overhead is what counts (16 and 64 rows ran 15% slower in 768-column blocks).
BLOCK_COLUMNS = 768
BLOCK_BYTES = 512 << 10
# Rows per call of the output layer on the CPU. Taller is faster (on the bench model 758-row calls ran
# their blocks at 1.4x the FLOP/s of 333-row ones) but a call's per-row, per-block statistics grow with
# its rows (8 bytes x rows x vocab / BLOCK_COLUMNS: 104 MB at 65k rows of a 152k vocabulary, 6.5 MB at
# this cap). The cap bounds what a pass without gradients holds; training keeps every call's until backward.
CALL_ROWS = 4096
log = logging.getLogger(__name__)


@dataclasses.dataclass
class SequenceLogProbs:
    logps: torch.Tensor  # [B] float32: sum over label positions of log p(y_t | y_<t)
    num_tokens: torch.Tensor  # [B] int64: number of label positions
    wpo_term: torch.Tensor | None = None  # [B] float32: mean over label positions of log p(y_t) - logsumexp_v 2 log p(v)
    shared_logps: torch.Tensor | None = None  # [B] float32: the sum over the first ``shared_tokens`` label positions


def _unwrap_hf(model: nn.Module) -> tuple[nn.Module, bool]:
    """The transformers model inside ``model`` and whether the body/head split is allowed.

    PEFT's LoRA-style adapters live inside the base model's own modules, so its body and head run
    them (and ``disable_adapter()`` switches them off); prompt-learning adapters prepend virtual
    tokens in PeftModel.forward, which only the full forward reproduces.
    """
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and hasattr(model, "peft_config"):
        active = getattr(model, "active_adapter", None)
        config = model.peft_config.get(active) if isinstance(active, str) else None
        return get_base(), not (config is not None and config.is_prompt_learning)
    return model, True


def _logit_transform(config) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What the architecture's CausalLM forward does to ``lm_head``'s output, if anything."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    cap = getattr(text, "final_logit_softcapping", None)  # Gemma 2/3
    scale = getattr(text, "logit_scale", None)  # Cohere multiplies
    divisor = getattr(text, "logits_scaling", None)  # Granite divides
    steps: list[Callable[[torch.Tensor], torch.Tensor]] = []
    if isinstance(scale, (int, float)) and scale != 1:
        steps.append(lambda x: x * scale)
    if isinstance(divisor, (int, float)) and divisor != 1:
        steps.append(lambda x: x / divisor)
    if isinstance(cap, (int, float)) and cap > 0:
        steps.append(lambda x: torch.tanh(x / cap) * cap)
    if not steps:
        return None

    def transform(x: torch.Tensor) -> torch.Tensor:
        for step in steps:
            x = step(x)
        return x

    return transform


def _token_logps(head: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor, targets: torch.Tensor,
                 with_wpo: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row log p(target) (and the WPO weight term) of one chunk, in float32, through any head."""
    logits = head(rows).float()
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    if not with_wpo:
        return logp, None
    # logsumexp_v(2 log p(v)) = logsumexp_v(2 z_v) - 2 lse: the log of the sum of squared probabilities.
    return logp, logp - (torch.logsumexp(2.0 * logits, dim=-1) - 2.0 * lse)


class LogitBuffers:
    """Reusable flat float32 buffers (rows x vocab elements) for the exp-logits a training forward keeps for backward.

    On the CPU a fresh buffer of this size (tens to hundreds of MiB, past glibc's default mmap
    threshold, or any allocator's that returns such blocks to the kernel) is mapped and page-faulted
    in on every allocation: on the bench model that made the output layer's forward run at 64 instead
    of 86 GFLOP/s. A buffer is lent out for one call of the output layer and given back after that
    call's backward; one that is never given back (a graph dropped without backward) is simply freed
    by its last owner. Only a pass with gradients keeps anything, so a buffer is never made under
    inference_mode."""

    def __init__(self, limit: int):
        self.limit = limit  # buffers held while idle
        self._idle: list[torch.Tensor] = []

    def take(self, rows: int, vocab: int, device: torch.device, at_least: int) -> torch.Tensor:
        """A flat buffer of at least ``rows * vocab`` elements (``_kept_block`` lays the blocks out in it)."""
        for i, buffer in enumerate(self._idle):
            if buffer.device == device and buffer.numel() >= rows * vocab:
                return self._idle.pop(i)
        return torch.empty(max(rows, at_least) * vocab, device=device, dtype=torch.float32)

    def give(self, buffer: torch.Tensor) -> None:
        if len(self._idle) < self.limit:
            self._idle.append(buffer)


def _vocab_blocks(rows: int, vocab: int, device: torch.device) -> list[tuple[int, int]]:
    """Column ranges of the vocabulary that the output layer computes one at a time: BLOCK_COLUMNS (or
    for a few rows up to BLOCK_BYTES of float32 logits) each on the CPU, the whole vocabulary elsewhere."""
    if device.type != "cpu":
        return [(0, vocab)]
    width = max(BLOCK_COLUMNS, BLOCK_BYTES // (4 * max(rows, 1)))
    return [(start, min(vocab, start + width)) for start in range(0, vocab, width)]


def _block_logits(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, start: int, end: int,
                  out: torch.Tensor | None) -> torch.Tensor:
    """float32 logits of vocabulary columns [start, end): written into ``out`` ([rows, end - start]) by a
    float32 matmul, or (``out`` None: autocast, a lower-precision model) cast into a new tensor."""
    block_bias = None if bias is None else bias[start:end]
    if out is None:
        return nn.functional.linear(rows, weight[start:end], block_bias).float()
    logits = torch.mm(rows, weight[start:end].t(), out=out)
    return logits if block_bias is None else logits.add_(block_bias)


class _LinearLabelLogProb(torch.autograd.Function):
    """log p(target) of each row through a plain linear output layer, one vocabulary block at a time.

    Each block's logits z_b stay in the CPU's cache from the matmul that writes them to the max, exp
    and sum that read them: e_b = exp(z_b - m_b) with the block's row max m_b, s_b = sum e_b. Then with
    M = max_b m_b, c_b = exp(m_b - M) and S = sum_b c_b s_b, log p(target) = z_target - M - log S, and
    with g = d loss / d logp per row, d loss / d z_b = -(g/S) c_b e_b + g onehot. Backward is therefore
    per block e_b @ W_b and e_b^T @ rows with the per-row scale -(g/S) c_b on the small side, plus the
    one-hot part: g W[target] for the rows and g rows added into W's target rows. The first
    ``keep_rows`` rows' e_b stay in a flat buffer, block after block (_kept_block), until backward;
    backward recomputes the other rows' blocks (activation checkpointing) with the forward's m_b."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                keep_rows: int, buffers: LogitBuffers | None, buffer_rows: int) -> torch.Tensor:
        n, vocab = rows.shape[0], weight.shape[0]
        keep_rows = min(keep_rows, n)
        all_kept = keep_rows == n > 0
        blocks = _vocab_blocks(n, vocab, rows.device)
        dtype = _matmul_dtype(rows, weight)
        kept = None
        if keep_rows:
            kept = (buffers.take(keep_rows, vocab, rows.device, buffer_rows) if buffers is not None
                    else torch.empty(keep_rows * vocab, device=rows.device, dtype=torch.float32))
        peaks = torch.empty(n, len(blocks), device=rows.device, dtype=torch.float32)
        sums = torch.empty_like(peaks)
        target_logits = torch.full((n,), float("nan"), device=rows.device)  # stays NaN for an id past the vocabulary
        scratch = _BlockScratch(rows, blocks)
        for b, (start, end) in enumerate(blocks):
            kept_block = None if kept is None else _kept_block(kept, keep_rows, start, end)
            if dtype != torch.float32:
                out = None
            else:
                out = kept_block if all_kept else scratch.view(end - start)
            logits = _block_logits(rows, weight, bias, start, end, out)
            hits = _targets_in(targets, start, end)
            target_logits[hits] = logits[hits, targets[hits] - start]
            peak = logits.amax(dim=-1, keepdim=True)
            peaks[:, b] = peak.squeeze(-1)
            sums[:, b] = logits.sub_(peak).exp_().sum(dim=-1)
            if kept_block is not None and logits.data_ptr() != kept_block.data_ptr():
                kept_block.copy_(logits[:keep_rows])
        top = peaks.amax(dim=-1, keepdim=True)
        scales = (peaks - top).exp_()
        total = (sums * scales).sum(dim=-1)
        ctx.blocks, ctx.peaks, ctx.scales, ctx.total, ctx.buffers = blocks, peaks, scales, total, buffers
        ctx.kept, ctx.keep_rows, ctx.matmul_dtype = kept, keep_rows, dtype
        ctx.save_for_backward(rows, weight, bias, targets)
        ctx.backward_done = False
        return target_logits - top.squeeze(-1) - total.log()

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor):
        if ctx.backward_done:
            raise RuntimeError("the output layer's log-prob gradients cannot be backpropagated twice (retain_graph)")
        ctx.backward_done = True
        rows, weight, bias, targets = ctx.saved_tensors
        kept, ctx.kept = ctx.kept, None
        dtype, n, keep_rows = ctx.matmul_dtype, rows.shape[0], ctx.keep_rows
        all_kept = keep_rows == n > 0
        grad = grad_logp.float()
        # Per row and block: d loss / d z_b = row_scales[:, b] * e_b, besides the one-hot part.
        row_scales = (-grad / ctx.total).unsqueeze(-1) * ctx.scales
        needs_rows, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_rows = torch.zeros(n, rows.shape[1], device=rows.device, dtype=torch.float32) if needs_rows else None
        grad_weight = torch.empty_like(weight) if needs_weight else None
        grad_bias = torch.empty_like(bias) if bias is not None and needs_bias else None
        low_rows, low_weight = rows.to(dtype), weight.to(dtype)
        low_bias = None if bias is None else bias.to(dtype)
        scratch = None if all_kept else _BlockScratch(rows, ctx.blocks)
        with torch.autocast(rows.device.type, enabled=False):
            for b, (start, end) in enumerate(ctx.blocks):
                kept_block = None if kept is None else _kept_block(kept, keep_rows, start, end)
                if all_kept:
                    shifted = kept_block
                else:
                    # The rows past keep_rows are recomputed into the block, after the kept ones.
                    out = scratch.view(end - start) if dtype == torch.float32 else None
                    rest = _block_logits(low_rows[keep_rows:], low_weight, low_bias, start, end,
                                         None if out is None else out[keep_rows:])
                    rest = rest.sub_(ctx.peaks[keep_rows:, b: b + 1]).exp_()
                    if kept_block is None:
                        shifted = rest
                    elif out is None:
                        shifted = torch.cat([kept_block, rest])
                    else:
                        shifted = out
                        shifted[:keep_rows].copy_(kept_block)
                scale = row_scales[:, b: b + 1]
                if dtype == torch.float32:
                    block_grad, rows_scale = shifted, scale
                else:
                    # A lower-precision matmul gets d loss / d z_b itself, one-hot part included, made in
                    # float32: g/S and c_b can fall outside float16's range, and g (1 - p) of a confident
                    # target would be lost rebuilding it from -g p and g after rounding.
                    block_grad = shifted * scale
                    hits = _targets_in(targets, start, end)
                    block_grad[hits, targets[hits] - start] += grad[hits]
                    block_grad, rows_scale = block_grad.to(dtype), None
                if grad_rows is not None:
                    part = block_grad @ low_weight[start:end]
                    if rows_scale is None:
                        grad_rows.add_(part)
                    else:
                        grad_rows.addcmul_(part, rows_scale)
                if grad_weight is not None:
                    scaled_rows = low_rows if rows_scale is None else rows * rows_scale
                    if grad_weight.dtype == dtype:
                        torch.mm(block_grad.t(), scaled_rows, out=grad_weight[start:end])
                    else:
                        grad_weight[start:end] = block_grad.t() @ scaled_rows
                if grad_bias is not None:
                    grad_bias[start:end] = block_grad.sum(0) if rows_scale is None else block_grad.t() @ scale.squeeze(-1)
        if dtype == torch.float32:
            # The one-hot part of d loss / d z: g at each row's target (in lower precision it is in the blocks).
            target_grad = grad.unsqueeze(-1)
            if grad_rows is not None:
                grad_rows.addcmul_(weight[targets].float(), target_grad)
            if grad_weight is not None:
                grad_weight.index_add_(0, targets, (rows.float() * target_grad).to(grad_weight.dtype))
            if grad_bias is not None:
                grad_bias.index_add_(0, targets, grad.to(grad_bias.dtype))
        if kept is not None and ctx.buffers is not None:
            ctx.buffers.give(kept)
        return (None if grad_rows is None else grad_rows.to(rows.dtype), grad_weight, grad_bias,
                None, None, None, None)


def _kept_block(kept: torch.Tensor, rows: int, start: int, end: int) -> torch.Tensor:
    """Vocabulary block [start, end) of a chunk's kept exp-logits: the blocks lie one after another in the
    flat buffer, each a contiguous [rows, end - start] matrix, so the forward's matmul writes a block
    where backward reads it (no copy out of a cache-sized scratch, no row stride of a whole vocabulary)."""
    return kept[rows * start: rows * end].view(rows, end - start)


def _targets_in(targets: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """The rows whose target lies in vocabulary columns [start, end)."""
    return ((targets >= start) & (targets < end)).nonzero(as_tuple=True)[0]


def _matmul_dtype(rows: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the output layer's matmul runs in: autocast's, else the wider of the operands'."""
    if torch.is_autocast_enabled(rows.device.type):
        return torch.get_autocast_dtype(rows.device.type)
    return torch.promote_types(rows.dtype, weight.dtype)


class _BlockScratch:
    """One block's float32 logits, reused for every block of a chunk (the last one may be narrower);
    made on first use, so a lower-precision matmul (which makes its own) never allocates it."""

    def __init__(self, rows: torch.Tensor, blocks: list[tuple[int, int]]):
        self.rows, self.device = rows.shape[0], rows.device
        self.width = max(end - start for start, end in blocks)
        self.flat: torch.Tensor | None = None

    def view(self, width: int) -> torch.Tensor:
        if self.flat is None:
            self.flat = torch.empty(self.rows * self.width, device=self.device, dtype=torch.float32)
        return self.flat[: self.rows * width].view(self.rows, width)


class LabelLogProbs(nn.Module):
    """``forward(input_ids, attention_mask, labels)`` -> per-sequence summed label log-probs.

    ``labels`` are unshifted as in transformers (``labels[t] == input_ids[t]`` on response tokens,
    -100 elsewhere); position t's logits predict token t+1. Sequences are right-padded.

    ``head_path``: "auto" runs body + output layer on label rows after a one-time check against
    the full forward; "body" skips the check; "full" always runs the model's own forward.
    """

    def __init__(self, model: nn.Module, head_path: str = "auto", chunk_bytes: int = CHUNK_BYTES,
                 keep_bytes: int = KEEP_BYTES):
        super().__init__()
        if head_path not in ("auto", "body", "full"):
            raise ValueError(f"head_path must be auto, body or full, not {head_path!r}")
        self.model = model
        self.chunk_bytes = chunk_bytes
        self.keep_bytes = keep_bytes
        self.logit_buffers = LogitBuffers(limit=keep_bytes // chunk_bytes + 1)
        self.timer = NULL_TIMER  # a stage that reports where its time goes sets its own
        hf, splittable = _unwrap_hf(model)
        self._hf = [hf]  # a list so the same module is not registered twice under two names
        body = getattr(hf, "base_model", None)
        out = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
        if not splittable or body is None or body is hf or out is None:
            head_path = "full"
        self.head_path = head_path
        self._transform = _logit_transform(hf.config) if hasattr(hf, "config") else None
        # A ZeRO-3 partitioned head all-gathers its weight on every call, a collective: every rank
        # must call it equally often, so it gets one call per forward whatever the rank's row count.
        self._one_head_call = out is not None and hasattr(getattr(out, "weight", None), "ds_id")

    @property
    def hf_model(self) -> nn.Module:
        return self._hf[0]

    def _head(self, rows: torch.Tensor) -> torch.Tensor:
        logits = self.hf_model.get_output_embeddings()(rows)
        return self._transform(logits) if self._transform is not None else logits

    def _plain_linear_head(self) -> nn.Linear | None:
        """The output layer when _LinearLabelLogProb may run through it: a plain linear layer with
        nothing applied to its logits, outside ZeRO-3 (whose partitioned weight exists only inside
        the module's own calls), and without hooks (which only a call of the module runs)."""
        out = self.hf_model.get_output_embeddings()
        hooked = bool(getattr(out, "_forward_hooks", None) or getattr(out, "_forward_pre_hooks", None))
        if type(out) is nn.Linear and not hooked and self._transform is None and not self._one_head_call:
            return out
        return None

    def _chunk_rows(self, vocab: int, rows: int) -> int:
        if self._one_head_call:
            return max(1, rows)
        return max(1, self.chunk_bytes // (4 * vocab))

    def _kept_rows_budget(self, vocab: int) -> int:
        """Rows whose float32 exp-logits keep_bytes holds, per forward."""
        return self.keep_bytes // (4 * vocab)

    def _head_chunks(self, rows: int, vocab: int, step: int, grad: bool, linear: nn.Linear | None,
                     device: torch.device) -> list[tuple[int, int, int]]:
        """(start, stop, keep_rows) row ranges for the output layer: the first keep_rows rows of a range
        keep their exp-logits for backward (up to keep_bytes in all). Where the output layer holds
        [rows, vocab] logits, a range is ``step`` rows, kept whole or not at all. On the CPU a plain
        linear head works in vocabulary blocks and holds none, so the rows go in calls of CALL_ROWS
        (a taller matmul, fewer passes), each keeping its leading rows while keep_bytes lasts."""
        budget = self._kept_rows_budget(vocab) if linear is not None and grad else 0
        blocked = linear is not None and device.type == "cpu"
        chunks: list[tuple[int, int, int]] = []
        start = 0
        while start < rows or (not chunks and self._one_head_call):
            stop = min(rows, start + (CALL_ROWS if blocked else step))
            size = stop - start
            keep_rows = min(budget, size) if blocked else (size if size <= budget else 0)
            budget -= keep_rows
            chunks.append((start, stop, keep_rows))
            start = stop
        return chunks

    def vocab_size(self) -> int:
        """Rows of the output layer: token ids at or above it cannot be scored."""
        out = self.hf_model.get_output_embeddings()
        weight = getattr(out, "weight", None)
        # ZeRO-3 partitions weights to empty tensors outside forward; its ds_shape keeps the real one.
        shape = getattr(weight, "ds_shape", None) or (weight.shape if weight is not None else None)
        return int(shape[0]) if shape is not None and len(shape) == 2 and shape[0] > 0 else self.hf_model.config.vocab_size

    def _label_rows(self, input_ids, attention_mask, labels, use_body: bool, packed: PackedLayout | None = None):
        """(rows to score, their targets, their sequence ids, head, scored-position mask) for every label position.

        In a packed row a sequence's first token carries no label, so no position scores a token
        of the next sequence; the sequence of a scored position is that of its target."""
        targets = labels[:, 1:]
        mask = targets != IGNORE_INDEX
        if attention_mask is not None:
            mask &= attention_mask[:, 1:].bool()
        extra = packed.attention_kwargs() if packed is not None else {}
        with self.timer.phase("forward_body"):
            if use_body:
                out = self.hf_model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                               **extra)
                hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
                rows, head = hidden[:, :-1][mask], self._head
            else:
                logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra).logits
                rows, head = logits[:, :-1][mask], nn.Identity()
        sequences = packed.sequence_ids[:, 1:][mask] if packed is not None else mask.nonzero(as_tuple=True)[0]
        return rows, targets[mask], sequences, head, mask

    def _verify_body_path(self, input_ids, attention_mask) -> None:
        """Compare the body/head split with the model's forward on a short slice of the first row."""
        length = int(attention_mask[0].sum()) if attention_mask is not None else input_ids.shape[1]
        ids = input_ids[:1, : max(2, min(length, 32))]
        mask = torch.ones_like(ids)
        with torch.no_grad():
            fast = self._scores(ids, mask, ids, use_body=True)[0]
            full = self._scores(ids, mask, ids, use_body=False)[0]
        tol = 1e-3 if next(self.model.parameters()).dtype == torch.float32 else 5e-2
        err = (fast - full).abs().max().item() if fast.numel() else 0.0
        agreed = torch.tensor([1 if err <= tol * max(1.0, full.abs().max().item()) else 0], device=input_ids.device)
        if self._one_head_call and torch.distributed.is_initialized():
            # Ranks check different rows but must take one path: under ZeRO-3 every forward is
            # collective (and all ranks run this first forward together, so the reduce is safe).
            torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
        if not agreed.item():
            log.warning(
                "%s: its head is not a plain linear layer (log-prob error %.3g on a check); "
                "computing log-probs through the full forward instead", type(self.hf_model).__name__, err,
            )
            self.head_path = "full"
        else:
            self.head_path = "body"

    def _scores(self, input_ids, attention_mask, labels, use_body: bool, with_wpo: bool = False,
                packed: PackedLayout | None = None):
        rows, targets, seq, head, mask = self._label_rows(input_ids, attention_mask, labels, use_body, packed)
        vocab = self.vocab_size()
        step = self._chunk_rows(vocab, rows.shape[0])
        grad = torch.is_grad_enabled() and rows.requires_grad
        linear = self._plain_linear_head() if use_body and not with_wpo else None
        logps, terms = [], []
        with self.timer.phase("forward_head"):
            # Kept exp-logits buffers are made for the most rows a call keeps, so they serve every call.
            buffer_rows = min(self._kept_rows_budget(vocab), CALL_ROWS) if rows.device.type == "cpu" else step
            for start, stop, keep_rows in self._head_chunks(rows.shape[0], vocab, step, grad, linear, rows.device):
                chunk, chunk_targets = rows[start:stop], targets[start:stop]
                if linear is not None:
                    logp = _LinearLabelLogProb.apply(chunk, linear.weight, linear.bias, chunk_targets, keep_rows,
                                                     self.logit_buffers, buffer_rows)
                    term = None
                elif grad:
                    logp, term = checkpoint(_token_logps, head, chunk, chunk_targets, with_wpo, use_reentrant=False)
                else:
                    logp, term = _token_logps(head, chunk, chunk_targets, with_wpo)
                logps.append(logp)
                terms.append(term)
        if logps:
            tok = torch.cat(logps)
        else:
            tok = rows.new_zeros(0, dtype=torch.float32)
        wpo = torch.cat(terms) if with_wpo and terms else (tok.new_zeros(0) if with_wpo else None)
        return tok, wpo, seq, mask

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor,
                with_wpo_term: bool = False, packed: PackedLayout | None = None,
                shared_tokens: torch.Tensor | None = None) -> SequenceLogProbs:
        """Per-sequence sums: one per row, or with ``packed`` one per sequence of the packed row.

        ``shared_tokens`` [sequences]: also sum each sequence's first that many label positions
        (LD-DPO's S_k)."""
        if self.head_path == "auto":
            self._verify_body_path(input_ids, attention_mask if packed is None else None)
        tok, wpo, seq, mask = self._scores(input_ids, attention_mask, labels, self.head_path == "body", with_wpo_term,
                                           packed)
        batch = packed.num_sequences if packed is not None else input_ids.shape[0]
        num_tokens = mask.sum(dim=1) if packed is None else torch.bincount(seq, minlength=batch)
        logps = tok.new_zeros(batch).index_add(0, seq, tok)
        wpo_term = None
        if with_wpo_term:
            wpo_term = tok.new_zeros(batch).index_add(0, seq, wpo) / num_tokens.clamp(min=1).to(tok.dtype)
        shared = None
        if shared_tokens is not None:
            # Each label position's rank within its sequence: ``tok`` holds them in row order, sequence by sequence.
            first = torch.cumsum(num_tokens, 0) - num_tokens
            rank = torch.arange(len(seq), device=seq.device) - first[seq]
            keep = rank < shared_tokens.to(rank.device)[seq]
            shared = tok.new_zeros(batch).index_add(0, seq, torch.where(keep, tok, torch.zeros_like(tok)))
        return SequenceLogProbs(logps=logps, num_tokens=num_tokens, wpo_term=wpo_term, shared_logps=shared)

