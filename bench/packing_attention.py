"""Which attention keeps packed sequences apart fastest on this machine, against the padded forward.

The same HH pairs, batched as `dpo train` batches them (length-grouped, 8 pairs = 16 sequences), go
through the model body forward and backward in four layouts, interleaved batch by batch, the best
of ``--repeats`` runs each (the run least disturbed by other load):

- padded:  right-padded [16, longest] with an attention mask (what --packing off does);
- mask:    one packed row, transformers' own block-diagonal mask derived from position_ids (sdpa);
- varlen:  one packed row, dpo's ``dpo_varlen`` (one causal SDPA call per sequence, on views of the row);
- flex:    one packed row, transformers' flex_attention with its block mask (when it runs on CPU).

Each packed layout's per-sequence hidden states are first checked against the padded ones (max
absolute difference printed); an inexact layout is reported and not timed.

    python bench/packing_attention.py                     # the issue's benchmark model (16M Llama, GPT-2 vocab)
    python bench/packing_attention.py --hidden 64 --layers 2 --pairs 64
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
HH_DATA = REPO / "demo" / "data" / "hh-rlhf-harmless-test.jsonl.gz"
GPT2_TOKENIZER = REPO / "demo" / "gpt2-tokenizer"


def sequences(pairs: int, max_length: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(GPT2_TOKENIZER)
    out = []
    with gzip.open(HH_DATA, "rt") as f:
        for line in f:
            record = json.loads(line)
            out += [tokenizer(record[k])["input_ids"][:max_length] for k in ("chosen", "rejected")]
            if len(out) >= 2 * pairs:
                break
    return out


def batches_of(seqs: list[list[int]], pairs_per_batch: int) -> list[list[list[int]]]:
    """Length-grouped batches of whole pairs (chosen and rejected stay together), as training forms them."""
    pairs = sorted(((seqs[i], seqs[i + 1]) for i in range(0, len(seqs) - 1, 2)), key=lambda p: -max(map(len, p)))
    return [[s for pair in pairs[i:i + pairs_per_batch] for s in pair] for i in range(0, len(pairs), pairs_per_batch)]


def run(model, batch: list[list[int]], layout: str) -> list[torch.Tensor]:
    from dpo.pipeline.packing import layout as packed_layout

    if layout == "padded":
        width = max(map(len, batch))
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(batch):
            ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
        model.set_attn_implementation("sdpa")
        hidden = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        return [hidden[i, :len(s)] for i, s in enumerate(batch)]
    packed = packed_layout([len(s) for s in batch])
    ids = torch.tensor([t for s in batch for t in s]).unsqueeze(0)
    model.set_attn_implementation({"mask": "sdpa", "varlen": "dpo_varlen", "flex": "flex_attention"}[layout])
    extra = packed.attention_kwargs() if layout == "varlen" else {"position_ids": packed.position_ids}
    hidden = model.model(input_ids=ids, attention_mask=None, use_cache=False, **extra).last_hidden_state[0]
    bounds = packed.cu_seqlens.tolist()
    return [hidden[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--pairs-per-batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpo.pipeline.packing import enable_packing

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50257, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875),
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=1024, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    enable_packing(model)  # registers dpo_varlen
    batches = batches_of(sequences(args.pairs, args.max_length), args.pairs_per_batch)
    real = sum(len(s) for b in batches for s in b)
    padded = sum(len(b) * max(map(len, b)) for b in batches)
    print(f"{len(batches)} batches of {args.pairs_per_batch} pairs, {real} tokens, padding when padded "
          f"{1 - real / padded:.1%}; hidden {args.hidden}, {args.layers} layers, {args.threads} threads")

    layouts = ["padded"]
    reference = [[h.detach() for h in run(model, b, "padded")] for b in batches]
    for name in ("mask", "varlen", "flex"):
        try:  # with gradients: training needs the backward too
            got = [run(model, b, name) for b in batches]
            sum(h.sum() for g in got for h in g).backward()
            model.zero_grad(set_to_none=True)
        except Exception as exc:  # noqa: BLE001 - an implementation this build cannot run is reported, not timed
            print(f"{name:<8} cannot run forward+backward here: {type(exc).__name__}: {str(exc)[:100]}")
            continue
        error = max((x.detach() - y).abs().max().item() for g, r in zip(got, reference) for x, y in zip(g, r))
        print(f"{name:<8} max |hidden - padded hidden| = {error:.2e}{'' if error < 1e-3 else '  NOT EXACT: not timed'}")
        if error < 1e-3:
            layouts.append(name)
    best = {name: [float("inf")] * len(batches) for name in layouts}
    for repeat in range(args.repeats):
        for i, batch in enumerate(batches):
            for name in (layouts if repeat % 2 == 0 else layouts[::-1]):
                start = time.perf_counter()
                outputs = run(model, batch, name)
                sum(o.sum() for o in outputs).backward()
                model.zero_grad(set_to_none=True)
                best[name][i] = min(best[name][i], time.perf_counter() - start)
    base = sum(best["padded"])
    for name in layouts:
        seconds = sum(best[name])
        print(f"{name:<8} forward+backward {seconds:7.3f}s  {real / seconds:8.0f} real tokens/s  x{base / seconds:.2f}")


if __name__ == "__main__":
    main()
