"""`dpo tokenize` on one huge record against the same run on a small one: time and peak memory.

A 50 MB response at --max-seq-length 64 keeps 64 tokens; tokenizing all 50 MB of it took about a
minute and 5 GB before texts were cut before tokenizing (pipeline/tokenization.py,
PairEncoder.bound). The baseline is the same command on a file whose huge text is replaced by a
short one, measured in the same run: the huge record should cost about what it takes to read it.

    python bench/huge_record.py                 # a 50 MB response
    python bench/huge_record.py --mb 50 --field prompt --tokenizer demo/gpt2-tokenizer
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = "the cat sat on a mat and then it ran far away from home under the bright blue sky".split()


def write_data(path: Path, field: str, chars: int) -> None:
    rng = random.Random(0)
    words, size = [], 0
    while size < chars:
        words.append(rng.choice(WORDS))
        size += len(words[-1]) + 1
    record = {"prompt": "Tell me a story.", "chosen": " Once upon a time.", "rejected": " A short one."}
    record[field] = " " + " ".join(words)
    small = {"prompt": "Once upon a time", "chosen": " a dog barked.", "rejected": " the sun set."}
    path.write_text(json.dumps(record) + "\n" + json.dumps(small) + "\n")


def tokenize(data: Path, out: Path, tokenizer: str, max_seq_length: int) -> tuple[float, int]:
    """Wall seconds and the child's peak RSS in bytes (RUSAGE_CHILDREN keeps the largest child's)."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dpo.cli", "tokenize", "--data", str(data), "--tokenizer", tokenizer,
                    "--out", str(out), "--max-seq-length", str(max_seq_length), "--quiet"], check=True)
    return time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=50.0, help="Size of the huge text in millions of characters.")
    parser.add_argument("--field", choices=("chosen", "prompt"), default="chosen")
    parser.add_argument("--tokenizer", default=str(REPO / "demo" / "model"))
    parser.add_argument("--max-seq-length", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_data(tmp / "small.jsonl", args.field, 100)
        write_data(tmp / "huge.jsonl", args.field, int(args.mb * 1e6))
        # The small run first: RUSAGE_CHILDREN reports the largest child so far.
        base_s, base_rss = tokenize(tmp / "small.jsonl", tmp / "a", args.tokenizer, args.max_seq_length)
        huge_s, huge_rss = tokenize(tmp / "huge.jsonl", tmp / "b", args.tokenizer, args.max_seq_length)
    print(f"{args.mb:g} MB {args.field} at --max-seq-length {args.max_seq_length}: {huge_s:.1f} s, peak RSS "
          f"{huge_rss / 2**20:.0f} MiB; the same with a short {args.field}: {base_s:.1f} s, {base_rss / 2**20:.0f} MiB "
          f"(ratio {huge_s / base_s:.2f} in time, {huge_rss / base_rss:.2f} in memory)")


if __name__ == "__main__":
    main()
