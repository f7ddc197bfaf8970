"""LabelLogProbs against the textbook computation.

The yardstick: logits = model(input_ids).logits in float32, log_softmax over the vocabulary,
gather at the shifted labels, sum where the label is not -100. Each sequence is run ALONE and
UNPADDED, so the yardstick cannot share a padding bug with the code under test.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM, LlamaForCausalLM

import pytest

from dpo.pipeline.scoring import PairScorer, collate_pairs
from dpo.pipeline.logprobs import LabelLogProbs, LogitBuffers, _LinearLabelLogProb

from conftest import DEMO_MODEL


def textbook(model, ids: list[int], labels: list[int]) -> tuple[float, int, float]:
    """(sum of label log-probs, label count, WPO term) of one unpadded sequence, in float32."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logp = F.log_softmax(logits[:-1], dim=-1)
    targets = torch.tensor(labels[1:])
    keep = targets != -100
    picked = logp[keep].gather(-1, targets[keep, None]).squeeze(-1)
    # WPO (Zhou et al. 2024): log p(y_t) - log sum_v p(v)^2, averaged over label positions.
    wpo = (picked - torch.logsumexp(2 * logp[keep], dim=-1)).mean() if keep.any() else torch.tensor(0.0)
    return picked.sum().item(), int(keep.sum()), wpo.item()


def random_pairs(n: int, vocab: int, seed: int = 0, max_len: int = 60) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        prompt = int(torch.randint(1, 20, (), generator=g))
        row = {"index": i}
        for side in ("chosen", "rejected"):
            length = prompt + int(torch.randint(1, max_len - 20, (), generator=g))
            ids = torch.randint(3, vocab, (length,), generator=g).tolist()
            row[f"{side}_input_ids"] = ids
            row[f"{side}_labels"] = [-100] * prompt + ids[prompt:]
        rows.append(row)
    return rows


def run_batches(wrapper, rows, batch_size, mode="concatenated", with_wpo=False):
    out = {}
    for s in range(0, len(rows), batch_size):
        chunk = rows[s: s + batch_size]
        batch = collate_pairs(chunk, pad_token_id=0, mode=mode)
        with torch.no_grad():
            if mode == "concatenated":
                res = wrapper(batch["input_ids"], batch["attention_mask"], batch["labels"], with_wpo_term=with_wpo)
                b = len(chunk)
                sides = {"chosen": (res, slice(0, b)), "rejected": (res, slice(b, 2 * b))}
            else:
                sides = {}
                for side in ("chosen", "rejected"):
                    res = wrapper(batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"],
                                  batch[f"{side}_labels"], with_wpo_term=with_wpo)
                    sides[side] = (res, slice(0, len(chunk)))
        for side, (res, sl) in sides.items():
            for row, logp, n, *w in zip(chunk, res.logps[sl], res.num_tokens[sl],
                                        *( [res.wpo_term[sl]] if with_wpo else [])):
                out[(row["index"], side)] = (logp.item(), int(n), w[0].item() if w else None)
    return out


def use_vocab_blocks(monkeypatch, columns: int | None) -> None:
    """Make the output layer work through the vocabulary ``columns`` at a time (None: its default)."""
    from dpo.pipeline import logprobs

    if columns is not None:
        monkeypatch.setattr(logprobs, "BLOCK_BYTES", 0)
        monkeypatch.setattr(logprobs, "BLOCK_COLUMNS", columns)


def demo_model():
    return AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()


def test_matches_textbook_at_batch_sizes_1_and_8_with_padding():
    model = demo_model()
    rows = random_pairs(12, model.config.vocab_size)
    wrapper = LabelLogProbs(model)
    for batch_size in (1, 8):
        got = run_batches(wrapper, rows, batch_size, with_wpo=True)
        for row in rows:
            for side in ("chosen", "rejected"):
                want, count, wpo = textbook(model, row[f"{side}_input_ids"], row[f"{side}_labels"])
                logp, n, w = got[(row["index"], side)]
                assert n == count
                assert abs(logp - want) <= 1e-5 * abs(want), (batch_size, row["index"], side, logp, want)
                assert abs(w - wpo) <= 1e-5 * max(1.0, abs(wpo))
    assert wrapper.head_path == "body"


def test_vocab_blocks_are_narrow_for_many_rows_and_wide_for_few():
    """On the CPU, BLOCK_COLUMNS per block from ~170 rows up (wider blocks ran the matmul slower), wider for a
    few rows (up to BLOCK_BYTES of logits: per-block overhead), the whole vocabulary in one block elsewhere;
    the blocks always tile the vocabulary in order."""
    from dpo.pipeline.logprobs import BLOCK_BYTES, BLOCK_COLUMNS, _vocab_blocks

    cpu, vocab = torch.device("cpu"), 50257
    for rows, width in ((700, BLOCK_COLUMNS), (4096, BLOCK_COLUMNS), (64, BLOCK_BYTES // (4 * 64)), (1, vocab)):
        blocks = _vocab_blocks(rows, vocab, cpu)
        assert [start for start, _ in blocks] == list(range(0, vocab, width)), rows
        assert all(end == min(vocab, start + width) for start, end in blocks), rows
    assert BLOCK_BYTES // (4 * 64) > BLOCK_COLUMNS
    assert _vocab_blocks(700, vocab, torch.device("cuda")) == [(0, vocab)]


def label_logps(model, ids: list[int], labels: list[int]) -> torch.Tensor:
    """Each label token's log-prob, in order, of one unpadded sequence."""
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
    targets = torch.tensor(labels[1:])
    keep = targets != -100
    return logp[keep].gather(-1, targets[keep, None]).squeeze(-1)


@pytest.mark.parametrize("mode", ["concatenated", "separate"])
def test_shared_prefix_sums_match_textbook(mode):
    """LD-DPO's S_k: each response's first k = min(nc, nr) label log-probs summed, k per pair; the
    shorter response's is its whole sum. Gradients flow through it."""
    model = demo_model()
    rows = random_pairs(5, model.config.vocab_size, seed=4)
    scores = PairScorer(LabelLogProbs(model), mode, pad_token_id=0, device="cpu", with_shared=True)(rows)
    for i, row in enumerate(rows):
        chosen, rejected = (label_logps(model, row[f"{s}_input_ids"], row[f"{s}_labels"]) for s in ("chosen", "rejected"))
        k = min(len(chosen), len(rejected))
        for got, want in ((scores.chosen, chosen), (scores.rejected, rejected)):
            assert abs(got.shared_logps[i].item() - want[:k].sum().item()) <= 1e-5 * abs(want[:k].sum().item())
    assert (scores.chosen.num_tokens != scores.rejected.num_tokens).all()  # every pair has a tail to leave out
    shorter = torch.minimum(scores.chosen.num_tokens, scores.rejected.num_tokens) == scores.chosen.num_tokens
    torch.testing.assert_close(scores.chosen.shared_logps[shorter], scores.chosen.logps[shorter])
    scores.chosen.shared_logps.sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


def test_concatenated_and_separate_agree():
    model = demo_model()
    rows = random_pairs(6, model.config.vocab_size, seed=1)
    wrapper = LabelLogProbs(model)
    a = run_batches(wrapper, rows, 3, "concatenated")
    b = run_batches(wrapper, rows, 3, "separate")
    for key in a:
        assert a[key][1] == b[key][1]
        assert abs(a[key][0] - b[key][0]) <= 1e-5 * abs(a[key][0])


@pytest.mark.parametrize("through, columns, call_rows", [("module call", None, None), ("plain linear", None, None),
                                                        ("plain linear", 100, None), ("plain linear", 100, 6)])
def test_output_layer_runs_only_on_label_positions_in_chunks(through, columns, call_rows, monkeypatch):
    """Through the head module's own call (taken when it has a hook) or its weight (a plain linear layer,
    whole or in vocabulary blocks, in one call or in calls of at most CALL_ROWS rows)."""
    from dpo.pipeline import logprobs

    use_vocab_blocks(monkeypatch, columns)
    if call_rows is not None:
        monkeypatch.setattr(logprobs, "CALL_ROWS", call_rows)
    model = demo_model()
    rows = random_pairs(4, model.config.vocab_size, seed=2)
    batch = collate_pairs(rows, pad_token_id=0)
    seen = []
    if through == "module call":
        hook = model.lm_head.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    else:
        apply = logprobs._LinearLabelLogProb.apply
        monkeypatch.setattr(logprobs._LinearLabelLogProb, "apply",
                            lambda rows, *args: seen.append(tuple(rows.shape)) or apply(rows, *args))
    wrapper = LabelLogProbs(model, head_path="body", chunk_bytes=4 * model.config.vocab_size * 7)
    with torch.no_grad():
        res = wrapper(batch["input_ids"], batch["attention_mask"], batch["labels"])
    if through == "module call":
        hook.remove()
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    assert all(len(shape) == 2 for shape in seen)  # [rows, hidden], never [B, T, hidden]
    if through == "module call":
        assert all(shape[0] <= 7 for shape in seen)  # [rows, vocab] logits: in chunks
    elif call_rows is not None:
        assert [shape[0] for shape in seen[:-1]] == [call_rows] * (len(seen) - 1) and seen[-1][0] <= call_rows
    else:
        assert len(seen) == 1  # on the CPU in vocabulary blocks, with nothing kept for backward: one call
    assert sum(shape[0] for shape in seen) == labelled == int(res.num_tokens.sum())
    assert labelled < batch["input_ids"].numel() / 2  # the prompts and padding were skipped
    expected = run_batches(LabelLogProbs(model, head_path="full"), rows, 4)
    for i, row in enumerate(rows):
        assert abs(res.logps[i].item() - expected[(row["index"], "chosen")][0]) <= 1e-5 * abs(res.logps[i].item())


@pytest.mark.parametrize("columns, call_rows", [(None, None), (100, None), (100, 6)])
@pytest.mark.parametrize("kept_chunks", [0, 1, 100])  # recomputed in backward, 5 rows kept, all kept
def test_kept_logit_gradients_match_textbook(kept_chunks, columns, call_rows, monkeypatch):
    """Training keeps d logp / d logits from forward for as many rows as keep_bytes holds and
    recomputes the rest: the gradients are the textbook ones either way, whole or in vocabulary blocks."""
    from dpo.pipeline import logprobs

    use_vocab_blocks(monkeypatch, columns)
    if call_rows is not None:
        monkeypatch.setattr(logprobs, "CALL_ROWS", call_rows)
    kept, apply = [], _LinearLabelLogProb.apply
    monkeypatch.setattr(logprobs._LinearLabelLogProb, "apply",
                        lambda *args: kept.append((args[0].shape[0], args[4])) or apply(*args))
    model = demo_model()
    rows = random_pairs(3, model.config.vocab_size, seed=4)
    batch = collate_pairs(rows, pad_token_id=0)
    chunk = 4 * model.config.vocab_size * 5
    wrapper = LabelLogProbs(model, head_path="body", chunk_bytes=chunk, keep_bytes=kept_chunks * chunk)
    weights = torch.linspace(0.5, 1.5, batch["input_ids"].shape[0])  # a distinct upstream gradient per sequence
    (wrapper(batch["input_ids"], batch["attention_mask"], batch["labels"]).logps * weights).sum().backward()
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    # On the CPU in vocabulary blocks nothing holds [rows, vocab]: calls of CALL_ROWS, keeping rows while 5 per
    # chunk of keep_bytes last.
    step = call_rows or labelled
    calls = [min(step, labelled - start) for start in range(0, labelled, step)]
    budget = 5 * kept_chunks
    expected = []
    for size in calls:
        expected.append((size, min(size, budget)))
        budget -= expected[-1][1]
    assert kept == expected and labelled > 10 and (call_rows is None or len(calls) > 2)
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    total = 0.0
    for i in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][i].sum())
        logp = F.log_softmax(model(input_ids=batch["input_ids"][i: i + 1, :n]).logits[0, :-1].float(), dim=-1)
        targets = batch["labels"][i, 1:n]
        keep = targets != -100
        total = total + weights[i] * logp[keep].gather(-1, targets[keep, None]).sum()
    total.backward()
    for name, p in model.named_parameters():
        assert (ours[name] - p.grad).norm() <= 1e-5 * p.grad.norm(), name


@pytest.mark.parametrize("columns", [None, 3])
@pytest.mark.parametrize("keep", [6, 2, 0])  # all rows' exp-logits kept for backward, the first two, none
@pytest.mark.parametrize("buffers", [None, LogitBuffers(limit=2)])
def test_linear_head_gradients_with_a_head_bias_and_a_frozen_head(keep, buffers, columns, monkeypatch):
    use_vocab_blocks(monkeypatch, columns)  # 11 columns: blocks of 3, 3, 3 and 2
    torch.manual_seed(0)
    rows, targets = torch.randn(6, 8, requires_grad=True), torch.randint(0, 11, (6,))
    head = torch.nn.Linear(8, 11)
    ours_logp = _LinearLabelLogProb.apply(rows, head.weight, head.bias, targets, keep, buffers, 4)
    textbook_logp = F.log_softmax(head(rows), -1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(ours_logp, textbook_logp)
    upstream = torch.randn(6)
    ours = torch.autograd.grad((ours_logp * upstream).sum(), [rows, head.weight, head.bias])
    theirs = torch.autograd.grad((textbook_logp * upstream).sum(), [rows, head.weight, head.bias])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
    head.requires_grad_(False)  # a LoRA run's frozen head: only the rows get a gradient
    logp = _LinearLabelLogProb.apply(rows, head.weight, None, targets, keep, buffers, 4)
    (grad_rows,) = torch.autograd.grad((logp * upstream).sum(), [rows])
    theirs = torch.autograd.grad((F.log_softmax(rows @ head.weight.t(), -1).gather(-1, targets[:, None]).squeeze(-1)
                                  * upstream).sum(), [rows])[0]
    torch.testing.assert_close(grad_rows, theirs)


@pytest.mark.parametrize("columns", [None, 4096])
@pytest.mark.parametrize("vocab, upstream, zero_weights, tolerance", [(70000, 1.0, True, 0.05), (8000, 1e-2, False, 2e-3)])
def test_linear_head_float16_gradients_stay_in_range(vocab, upstream, zero_weights, tolerance, columns, monkeypatch):
    """float16 holds neither a flat softmax's 1/s (s is about the vocabulary size: past 65504) nor a
    small g/s: its matmuls get the scaled gradient, as the textbook computes it."""
    use_vocab_blocks(monkeypatch, columns)
    torch.manual_seed(0)
    head = torch.nn.Linear(8, vocab, bias=False)
    if zero_weights:
        torch.nn.init.zeros_(head.weight)
    rows, targets = torch.randn(4, 8), torch.randint(0, vocab, (4,))
    half_rows, half_weight = rows.half().requires_grad_(), head.weight.detach().half().requires_grad_()
    logp = _LinearLabelLogProb.apply(half_rows, half_weight, None, targets, 4, None, 4)
    (logp * upstream).sum().backward()
    full_rows, full_weight = half_rows.detach().float().requires_grad_(), half_weight.detach().float().requires_grad_()
    textbook = F.log_softmax(full_rows @ full_weight.t(), -1).gather(-1, targets[:, None]).sum() * upstream
    textbook.backward()
    for ours, theirs in ((half_rows.grad, full_rows.grad), (half_weight.grad, full_weight.grad)):
        assert torch.isfinite(ours).all()
        assert (ours.float() - theirs).norm() <= tolerance * theirs.norm()


def test_linear_head_buffers_are_reused_only_once_given_back():
    """A chunk's buffer is lent until its backward: a second forward before it must not write into it."""
    torch.manual_seed(0)
    buffers = LogitBuffers(limit=2)
    head = torch.nn.Linear(8, 11)
    rows, targets = torch.randn(6, 8, requires_grad=True), torch.randint(0, 11, (6,))
    other = torch.randn(6, 8, requires_grad=True)
    first = _LinearLabelLogProb.apply(rows, head.weight, head.bias, targets, 6, buffers, 6)
    second = _LinearLabelLogProb.apply(other, head.weight, head.bias, targets, 6, buffers, 6)
    (grad_rows,) = torch.autograd.grad(first.sum(), [rows])
    textbook = F.log_softmax(head(rows), -1).gather(-1, targets[:, None]).sum()
    torch.testing.assert_close(grad_rows, torch.autograd.grad(textbook, [rows])[0])
    assert len(buffers._idle) == 1  # the first chunk's buffer came back after its backward
    second.sum().backward()
    assert len(buffers._idle) == 2
    idle = list(buffers._idle)
    again = _LinearLabelLogProb.apply(rows, head.weight, head.bias, targets, 2, buffers, 6)  # keeps 2 of 6 rows
    assert len(buffers._idle) == 1 and any(buffers._idle[0] is b for b in idle)  # it took an idle buffer
    torch.testing.assert_close(again, first.detach())
    (grad_again,) = torch.autograd.grad(again.sum(), [rows])
    torch.testing.assert_close(grad_again, grad_rows)
    assert len(buffers._idle) == 2


def test_a_forward_under_inference_mode_keeps_nothing_and_training_after_it_agrees():
    model = demo_model()
    rows = random_pairs(2, model.config.vocab_size, seed=5)
    batch = collate_pairs(rows, pad_token_id=0)
    wrapper = LabelLogProbs(model, head_path="body")
    with torch.inference_mode():
        first = wrapper(batch["input_ids"], batch["attention_mask"], batch["labels"]).logps.clone()
    assert not wrapper.logit_buffers._idle
    again = wrapper(batch["input_ids"], batch["attention_mask"], batch["labels"]).logps
    again.sum().backward()
    torch.testing.assert_close(again.detach(), first)
    assert wrapper.logit_buffers._idle and not wrapper.logit_buffers._idle[0].is_inference()


def test_output_layer_row_ranges_and_what_they_keep(monkeypatch):
    """On the CPU (vocabulary blocks) calls of CALL_ROWS, the first keeping what keep_bytes holds; where
    [rows, vocab] logits exist (a GPU) chunks of a step, each kept whole while keep_bytes allows."""
    from dpo.pipeline import logprobs

    monkeypatch.setattr(logprobs, "CALL_ROWS", 10)
    model = demo_model()
    head, vocab = model.get_output_embeddings(), model.config.vocab_size
    wrapper = LabelLogProbs(model, head_path="body", chunk_bytes=4 * vocab * 4, keep_bytes=4 * vocab * 7)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert wrapper._head_chunks(23, vocab, 4, True, head, cpu) == [(0, 10, 7), (10, 20, 0), (20, 23, 0)]
    assert wrapper._head_chunks(5, vocab, 4, True, head, cpu) == [(0, 5, 5)]
    assert wrapper._head_chunks(23, vocab, 4, False, head, cpu) == [(0, 10, 0), (10, 20, 0), (20, 23, 0)]
    assert wrapper._head_chunks(10, vocab, 4, True, head, gpu) == [(0, 4, 4), (4, 8, 0), (8, 10, 2)]
    assert wrapper._head_chunks(10, vocab, 4, True, None, cpu) == [(0, 4, 0), (4, 8, 0), (8, 10, 0)]


def test_linear_head_refuses_a_second_backward():
    head = torch.nn.Linear(8, 11)
    rows, targets = torch.randn(3, 8, requires_grad=True), torch.randint(0, 11, (3,))
    logp = _LinearLabelLogProb.apply(rows, head.weight, head.bias, targets, 3, LogitBuffers(limit=1), 3)
    logp.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        logp.sum().backward()


def test_gradients_match_textbook_through_chunks():
    model = demo_model()
    rows = random_pairs(3, model.config.vocab_size, seed=3)
    batch = collate_pairs(rows, pad_token_id=0)
    wrapper = LabelLogProbs(model, head_path="body", chunk_bytes=4 * model.config.vocab_size * 5)
    res = wrapper(batch["input_ids"], batch["attention_mask"], batch["labels"], with_wpo_term=True)
    (res.logps.sum() + res.wpo_term.sum()).backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    total = 0.0
    for i in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][i].sum())
        logits = model(input_ids=batch["input_ids"][i: i + 1, :n]).logits[0].float()
        logp = F.log_softmax(logits[:-1], dim=-1)
        targets = batch["labels"][i, 1:n]
        keep = targets != -100
        picked = logp[keep].gather(-1, targets[keep, None]).squeeze(-1)
        total = total + picked.sum() + (picked - torch.logsumexp(2 * logp[keep], -1)).mean()
    total.backward()
    for name, p in model.named_parameters():
        # Batched vs unbatched float32 sums round differently; compare at the scale of the gradient.
        assert (ours[name] - p.grad).norm() <= 1e-5 * p.grad.norm(), name


def test_sequence_without_labels_scores_zero():
    model = demo_model()
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8]])
    labels = torch.tensor([[-100] * 4, [-100, -100, 7, 8]])
    res = LabelLogProbs(model)(ids, torch.ones_like(ids), labels, with_wpo_term=True)
    assert res.num_tokens.tolist() == [0, 2]
    assert res.logps[0].item() == 0.0 and res.wpo_term[0].item() == 0.0
    assert res.logps[1].item() < 0


def test_logit_softcapping_is_applied():
    config = Gemma2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=0.5)
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config).eval()
    rows = random_pairs(4, 300, seed=4)
    wrapper = LabelLogProbs(model)
    got = run_batches(wrapper, rows, 4)
    assert wrapper.head_path == "body"
    for row in rows:
        want = textbook(model, row["chosen_input_ids"], row["chosen_labels"])[0]
        assert abs(got[(row["index"], "chosen")][0] - want) <= 1e-5 * abs(want)


class ScaledHeadLlama(LlamaForCausalLM):
    """An architecture whose forward changes the logits in a way no config field announces."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 7.0
        return out


def test_unknown_head_transform_falls_back_to_full_forward():
    base = demo_model()
    model = ScaledHeadLlama(base.config).eval()
    model.load_state_dict(base.state_dict())
    rows = random_pairs(4, base.config.vocab_size, seed=5)
    wrapper = LabelLogProbs(model)
    got = run_batches(wrapper, rows, 2)
    assert wrapper.head_path == "full"
    for row in rows:
        want = textbook(model, row["rejected_input_ids"], row["rejected_labels"])[0]
        assert abs(got[(row["index"], "rejected")][0] - want) <= 1e-5 * abs(want)


def test_peft_lora_and_disabled_adapter():
    from peft import LoraConfig, get_peft_model

    base = demo_model()
    plain = {k: v.clone() for k, v in base.state_dict().items()}
    rows = random_pairs(4, base.config.vocab_size, seed=6)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    wrapper = LabelLogProbs(peft_model)
    with_adapter = run_batches(wrapper, rows, 4)
    assert wrapper.head_path == "body"
    with peft_model.disable_adapter():
        without = run_batches(wrapper, rows, 4)
    reference = demo_model()
    reference.load_state_dict(plain)
    for row in rows:
        ids, labels = row["chosen_input_ids"], row["chosen_labels"]
        want_lora = textbook(peft_model, ids, labels)[0]
        want_base = textbook(reference, ids, labels)[0]
        assert abs(with_adapter[(row["index"], "chosen")][0] - want_lora) <= 1e-5 * abs(want_lora)
        assert abs(without[(row["index"], "chosen")][0] - want_base) <= 1e-5 * abs(want_base)
        assert abs(want_lora - want_base) > 1e-3  # the adapter does change the values


@pytest.mark.parametrize("columns", [None, 3])
@pytest.mark.parametrize("keep", [6, 2, 0])
def test_linear_head_under_bfloat16_autocast_matches_textbook(keep, columns, monkeypatch):
    """Mixed precision: the matmuls run in bfloat16 (forward and recomputed), the softmax in float32."""
    use_vocab_blocks(monkeypatch, columns)
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11)
    rows, targets = torch.randn(6, 8, requires_grad=True), torch.randint(0, 11, (6,))
    upstream = torch.randn(6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = _LinearLabelLogProb.apply(rows, head.weight, head.bias, targets, keep, LogitBuffers(limit=1), 4)
        textbook = F.log_softmax(head(rows).float(), -1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(ours, textbook)
    grads = torch.autograd.grad((ours * upstream).sum(), [rows, head.weight, head.bias])
    expected = torch.autograd.grad((textbook * upstream).sum(), [rows, head.weight, head.bias])
    for a, b in zip(grads, expected):
        assert a.dtype == b.dtype == torch.float32
        assert (a - b).norm() <= 2e-2 * b.norm()


@pytest.mark.parametrize("columns", [None, 3])
def test_linear_head_in_bfloat16_keeps_the_gradient_of_confident_targets(columns, monkeypatch):
    """d logp / d z = g (onehot - p): for p near 1 it must not be rebuilt from -g p and g after rounding."""
    use_vocab_blocks(monkeypatch, columns)
    torch.manual_seed(0)
    targets = torch.arange(6) % 11
    weight = F.normalize(torch.randn(11, 16), dim=-1) * 3.0
    rows = weight[targets] * 3.0  # each row's own target has by far the largest logit: p above 0.99
    rows, weight = rows.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    logp = _LinearLabelLogProb.apply(rows, weight, None, targets, 6, None, 6)
    grad_rows, grad_weight = torch.autograd.grad(logp.sum(), [rows, weight])
    rows64, weight64 = rows.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    textbook = F.log_softmax(rows64 @ weight64.t(), -1).gather(-1, targets[:, None]).sum()
    want_rows, want_weight = torch.autograd.grad(textbook, [rows64, weight64])
    assert torch.exp(textbook / 6) > 0.99
    assert (grad_rows.double() - want_rows).norm() <= 0.05 * want_rows.norm()
    assert (grad_weight.double() - want_weight).norm() <= 0.05 * want_weight.norm()
