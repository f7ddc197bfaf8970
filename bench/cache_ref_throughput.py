"""cache-ref's compute path against a bare forward loop, on the same batches, in one process.

The baseline is what any script would do: ``model(input_ids, attention_mask)`` for every batch,
its logits left unused (so the baseline does strictly less than compute log-probs). cache-ref's
path runs the model body, the output layer on label positions only, and a float32 logsumexp in
chunks. Both see the same length-grouped, right-padded concatenated batches. Each batch is run
by both, in alternating order, ``--repeats`` times after a warm-up; a path's time is the sum over
batches of its fastest run (the one least disturbed by other load on a shared machine).
Goal: ratio = bare time / cache-ref time >= 0.9.

    python bench/cache_ref_throughput.py --preset demo
    python bench/cache_ref_throughput.py --preset gpt2-20m     # a ~20M Llama with the GPT-2 vocabulary
    python bench/cache_ref_throughput.py --model DIR --tokenized DIR --dtype bfloat16
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import torch

from dpo.artifacts.shards import ArtifactReader
from dpo.pipeline import distributed as dist
from dpo.pipeline.batching import length_grouped_batches, pair_lengths
from dpo.pipeline.scoring import collate_pairs
from dpo.pipeline.logprobs import LabelLogProbs
from dpo.pipeline.modeling import load_causal_lm

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "demo" / "model"
GPT2_TOKENIZER = REPO / "demo" / "gpt2-tokenizer"
HH_DATA = REPO / "demo" / "data" / "hh-rlhf-harmless-test.jsonl.gz"


def build_gpt2_vocab_llama(out: Path, hidden: int, layers: int, seed: int = 0) -> Path:
    """A randomly initialised Llama with the real GPT-2 tokenizer (50,257 tokens), built locally."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(GPT2_TOKENIZER)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def tokenize(model: Path, data: str, max_seq_length: int, out: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "dpo.cli", "tokenize", "--data", data, "--tokenizer", str(model), "--out", str(out),
         "--max-seq-length", str(max_seq_length), "--quiet"],
        check=True,
    )
    return out


def load_batches(tokenized: Path, batch_size: int, pad_token_id: int) -> list[dict[str, torch.Tensor]]:
    reader = ArtifactReader(tokenized, kind="tokenized")
    table = pa.concat_tables([reader.read_split(s) for s in reader.splits])
    rows = table.to_pylist()
    batches = length_grouped_batches(pair_lengths(rows), batch_size)
    return [collate_pairs([rows[i] for i in b], pad_token_id) for b in batches]


def best_times(paths: dict, batches: list, repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Per path, per batch: the fastest of ``repeats`` runs, the paths alternating batch by batch."""
    best = {name: [float("inf")] * len(batches) for name in paths}
    for r in range(repeats):
        order = list(paths) if r % 2 == 0 else list(reversed(paths))
        for i, batch in enumerate(batches):
            for name in order:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                paths[name](batch)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                best[name][i] = min(best[name][i], time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=["demo", "gpt2-20m"], default="demo")
    parser.add_argument("--model", type=Path, help="Model folder (overrides the preset's model).")
    parser.add_argument("--tokenized", type=Path, help="Tokenized artifact (default: tokenize --data with the model's tokenizer).")
    parser.add_argument("--data", default=f"{HH_DATA}:128", help="Data to tokenize when --tokenized is not given.")
    parser.add_argument("--max-seq-length", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=8, help="Pairs per batch (2x rows, concatenated).")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's); 1 is steadiest on a busy machine.")
    parser.add_argument("--hidden", type=int, default=256, help="gpt2-20m preset: hidden size.")
    parser.add_argument("--layers", type=int, default=8, help="gpt2-20m preset: layers.")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="dpo-bench-") as scratch:
        scratch = Path(scratch)
        model_dir = args.model or (DEMO_MODEL if args.preset == "demo" else
                                   build_gpt2_vocab_llama(scratch / "model", args.hidden, args.layers))
        tokenized = args.tokenized or tokenize(model_dir, args.data, args.max_seq_length, scratch / "tokenized")
        info = ArtifactReader(tokenized, kind="tokenized").manifest.stats.get("tokenizer_info") or {}
        pad = info.get("pad_token_id") if info.get("pad_token_id") is not None else (info.get("eos_token_id") or 0)
        device = dist.device()
        batches = [{k: v.to(device) for k, v in b.items()} for b in load_batches(tokenized, args.batch_size, pad)]
        model = load_causal_lm(model_dir, args.dtype, device=device)
        scorer = LabelLogProbs(model)

        def bare(batch):
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

        def cache_ref(batch):
            scorer(batch["input_ids"], batch["attention_mask"], batch["labels"])

        paths = {"bare": bare, "cache_ref": cache_ref}
        with torch.inference_mode():
            best_times(paths, batches[:2], 1, device)  # warm-up (and LabelLogProbs' one-time check)
            best = {k: sum(v) for k, v in best_times(paths, batches, args.repeats, device).items()}

    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    padded = sum(b["input_ids"].numel() for b in batches)
    labels = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    params = sum(p.numel() for p in model.parameters())
    print(f"model        {model_dir} ({params / 1e6:.1f}M parameters, vocab {model.config.vocab_size}, "
          f"{args.dtype}, {device}, {torch.get_num_threads()} threads, head path {scorer.head_path})")
    print(f"batches      {len(batches)} x {args.batch_size} pairs: {tokens} tokens, {labels} label tokens "
          f"({labels / tokens:.0%}), padding {1 - tokens / padded:.1%}")
    for name, seconds in best.items():
        print(f"{name:<12} {tokens / seconds:>10.0f} tokens/s  ({seconds:.3f}s: per batch the best of {args.repeats})")
    print(f"ratio        {best['bare'] / best['cache_ref']:.2f}  (cache-ref throughput / bare forward; goal >= 0.9)")


if __name__ == "__main__":
    main()
