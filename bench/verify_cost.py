"""What checking inputs against their manifests' sha256 (the default; `--no-verify` skips it) costs.

1. The demo: `dpo tokenize` of the demo data, then `dpo cache-ref` and `dpo train` (one epoch), each
   with and without --no-verify, and the verification pass alone (ArtifactReader with and without
   the hash) on each input those stages read.
2. A large tokenized artifact (--gigabytes, random token ids of the demo vocabulary, long pairs):
   the verification pass alone, a full read of every shard (the least a stage that reads all of its
   input does), and `dpo train --loss-type simpo --max-steps 1` with and without --no-verify.

    .venv/bin/python bench/verify_cost.py --work /tmp/verify-cost --gigabytes 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
DPO = [sys.executable, "-m", "dpo.cli"]
MODEL = ROOT / "demo" / "model"
DATA = ROOT / "demo" / "data" / "hh-rlhf-harmless-test.jsonl.gz"


def timed(argv: list) -> float:
    started = time.perf_counter()
    subprocess.run([*DPO, *map(str, argv), "-q"], check=True)
    return time.perf_counter() - started


def verify_pass(artifact: Path) -> tuple[float, float]:
    """Seconds to open ``artifact`` with the sha256 check and without it."""
    from dpo.artifacts.shards import ArtifactReader

    times = []
    for verify in (True, False):
        started = time.perf_counter()
        ArtifactReader(artifact, verify=verify)
        times.append(time.perf_counter() - started)
    return times[0], times[1]


def size(artifact: Path) -> int:
    return sum(p.stat().st_size for p in artifact.rglob("*.parquet"))


def demo(work: Path) -> dict:
    tok, found = work / "tokenized", {}
    found["tokenize_s"] = timed(["tokenize", "--data", DATA, "--tokenizer", MODEL, "--eval-fraction", "0.05",
                                 "--max-seq-length", "128", "--max-prompt-length", "64", "--out", tok])
    for flag, name in (([], "verify"), (["--no-verify"], "no_verify")):
        found[f"cache_ref_{name}_s"] = timed(["cache-ref", "--tokenized", tok, "--model", MODEL, "--batch-size", "32",
                                              "--out", work / f"ref-{name}", *flag])
    for flag, name in (([], "verify"), (["--no-verify"], "no_verify")):
        found[f"train_{name}_s"] = timed(["train", "--tokenized", tok, "--ref-cache", work / "ref-verify", "--model",
                                          MODEL, "--per-device-batch-size", "8", "--epochs", "1", "--learning-rate",
                                          "5e-5", "--out", work / f"train-{name}", *flag])
    found["tokenized_bytes"] = size(tok)
    found["ref_bytes"] = size(work / "ref-verify")
    for name, path in (("tokenized", tok), ("ref", work / "ref-verify")):
        with_hash, without = verify_pass(path)
        found[f"verify_pass_{name}_s"], found[f"open_without_hash_{name}_s"] = with_hash, without
    return found


def large(work: Path, demo_tok: Path, gigabytes: float, seq: int = 256) -> dict:
    """A tokenized artifact of random pairs (``seq`` tokens a side), ``gigabytes`` of Parquet, with a manifest
    made as tokenize makes one; then what opening, reading and a one-step train cost on it."""
    from dpo.artifacts.manifest import read_manifest, write_manifest
    from dpo.artifacts.shards import file_entry, shard_path

    out = work / "large-tokenized"
    shutil.rmtree(out, ignore_errors=True)
    template = read_manifest(demo_tok, "tokenized")
    vocab = json.loads((MODEL / "config.json").read_text())["vocab_size"]
    rng = np.random.default_rng(0)
    rows, prompt = 4096, seq // 4
    first = _shard(rng, 0, rows, seq, prompt, vocab)
    sink = pa.BufferOutputStream()
    pq.write_table(first, sink, compression="zstd")
    shards = max(2, round(gigabytes * 2**30 / sink.getvalue().size))
    entries = []
    for i in range(shards):
        relative = shard_path("train", i, shards)
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        table = first if i == 0 else _shard(rng, i * rows, rows, seq, prompt, vocab)
        pq.write_table(table, out / relative, compression="zstd")
        entries.append(dataclasses.replace(file_entry(out, relative), rows=rows))
    eval_file = next(f for f in template.files if f.path.startswith("eval/"))
    shutil.copytree(demo_tok / "eval", out / "eval")
    entries.append(eval_file)
    manifest = dataclasses.replace(template, files=entries, created="")
    write_manifest(out, manifest)
    found = {"large_bytes": size(out), "large_rows": rows * shards}
    found["large_verify_pass_s"], found["large_open_without_hash_s"] = verify_pass(out)
    started = time.perf_counter()
    for entry in entries:
        pq.read_table(out / entry.path)
    found["large_read_all_s"] = time.perf_counter() - started
    for flag, name in (([], "verify"), (["--no-verify"], "no_verify")):
        found[f"large_train_1_step_{name}_s"] = timed(
            ["train", "--tokenized", out, "--model", MODEL, "--loss-type", "simpo", "--max-steps", "1",
             "--per-device-batch-size", "8", "--out", work / f"large-train-{name}", *flag])
    return found


def _shard(rng, start: int, rows: int, seq: int, prompt: int, vocab: int) -> pa.Table:
    ids = {side: rng.integers(3, vocab, size=(rows, seq), dtype=np.int32) for side in ("chosen", "rejected")}
    ids["rejected"][:, :prompt] = ids["chosen"][:, :prompt]
    columns = {"index": pa.array(np.arange(start, start + rows)), "source": pa.array(["synthetic"] * rows)}
    for side, values in ids.items():
        labels = values.copy()
        labels[:, :prompt] = -100
        columns[f"{side}_input_ids"] = pa.array(list(values))
        columns[f"{side}_labels"] = pa.array(list(labels))
    for name, value in (("prompt_length", prompt), ("chosen_length", seq), ("rejected_length", seq)):
        columns[name] = pa.array(np.full(rows, value, dtype=np.int32))
    return pa.table(columns).cast(pa.schema([
        ("index", pa.int64()), ("source", pa.string()),
        ("chosen_input_ids", pa.list_(pa.int32())), ("chosen_labels", pa.list_(pa.int32())),
        ("rejected_input_ids", pa.list_(pa.int32())), ("rejected_labels", pa.list_(pa.int32())),
        ("prompt_length", pa.int32()), ("chosen_length", pa.int32()), ("rejected_length", pa.int32()),
    ]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "verify-cost")
    parser.add_argument("--gigabytes", type=float, default=1.0)
    parser.add_argument("--skip-demo", action="store_true", help="only the large artifact (needs WORK/tokenized)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    found = {} if args.skip_demo else demo(args.work)
    found.update(large(args.work, args.work / "tokenized", args.gigabytes))
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in found.items()}, indent=2))


if __name__ == "__main__":
    main()
