"""The output layer's backward with the logit gradients kept from forward, against recomputing them.

`pipeline/logprobs.py` keeps the exponentiated logits (d logp / d logits but for per-row scales and the one-hot
part) for up to KEEP_BYTES of label rows per forward, so backward is two matmuls per vocabulary block instead of
recomputing the logits and the softmax (activation checkpointing). This runs the same training steps (concatenated forward of the
pairs' summed label log-probs, backward, AdamW) both ways, each in its own process, interleaved
(kept, recomputed, kept, ...), and prints seconds per step, peak RSS and their ratios, after checking
that both ways give the same gradients.

    .venv/bin/python bench/vs_trl.py --quick          # once: builds runs/bench-vs-trl/model and its data
    .venv/bin/python bench/output_layer.py --model runs/bench-vs-trl/model \\
        --tokenized runs/bench-vs-trl/check/tokenized-all
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def worker(args: argparse.Namespace) -> dict:
    import torch

    from dpo.artifacts.shards import ArtifactReader
    from dpo.pipeline.batching import pad_token_id, pair_lengths, take_rows
    from dpo.pipeline.data_order import BatchOrder, Cursor
    from dpo.pipeline.logprobs import LabelLogProbs
    from dpo.pipeline.modeling import load_causal_lm
    from dpo.pipeline.scoring import PairScorer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    reader = ArtifactReader(args.tokenized, kind="tokenized")
    table = reader.read_split("train")
    order = BatchOrder(pair_lengths(table), args.batch_size, seed=42)
    model = load_causal_lm(args.model)
    module = LabelLogProbs(model, head_path="body", keep_bytes=args.keep_mib << 20)
    scorer = PairScorer(module, "concatenated", pad_token_id(reader.manifest.stats), "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-6)
    seconds, grad_norms, cursor = [], [], Cursor()
    for _ in range(args.steps):
        pairs = take_rows(table, order.batch(cursor))
        cursor = order.advance(cursor)
        started = time.perf_counter()
        scores = scorer(pairs)
        (scores.chosen.logps.sum() - scores.rejected.logps.sum()).backward()
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - started)
    return {"seconds_per_step": statistics.median(seconds[1:] or seconds), "grad_norms": grad_norms,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def run(args: argparse.Namespace, keep_mib: int) -> dict:
    command = [sys.executable, __file__, "--worker", "--model", str(args.model), "--tokenized", str(args.tokenized),
               "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--threads", str(args.threads),
               "--keep-mib", str(keep_mib)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--tokenized", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--keep-mib", type=int, default=None, help="the budget to compare (default: KEEP_BYTES)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    from dpo.pipeline.logprobs import KEEP_BYTES

    kept_mib = args.keep_mib if args.keep_mib is not None else KEEP_BYTES >> 20
    results: dict[str, list[dict]] = {"kept": [], "recomputed": []}
    for _ in range(args.runs):
        results["kept"].append(run(args, kept_mib))
        results["recomputed"].append(run(args, 0))
    first_kept, first_recomputed = results["kept"][0]["grad_norms"], results["recomputed"][0]["grad_norms"]
    worst = max(abs(a - b) / abs(b) for a, b in zip(first_kept, first_recomputed))
    if worst > 1e-4:
        raise SystemExit(f"gradient norms differ by {worst:.2e} relative: the kept path is wrong")
    median = {name: {key: statistics.median(r[key] for r in runs) for key in ("seconds_per_step", "peak_rss_bytes")}
              for name, runs in results.items()}
    print(f"{args.steps} steps of {args.batch_size} pairs, {args.runs} interleaved runs each, {args.threads} threads; "
          f"gradient norms agree to {worst:.1e} relative")
    for name, m in median.items():
        print(f"  {name:<11} ({kept_mib if name == 'kept' else 0} MiB kept): {m['seconds_per_step']:.3f} s/step, "
              f"peak RSS {m['peak_rss_bytes'] / 2**30:.2f} GiB")
    print(f"  step time kept / recomputed: {median['kept']['seconds_per_step'] / median['recomputed']['seconds_per_step']:.3f}x;"
          f" peak RSS: {median['kept']['peak_rss_bytes'] / median['recomputed']['peak_rss_bytes']:.3f}x")


if __name__ == "__main__":
    main()
