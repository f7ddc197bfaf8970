"""Scale benchmark (issue 11): memory and throughput of tokenize, train and evaluate from 10k to 1M pairs.

For each size it writes synthetic preference pairs (HH-RLHF records from demo/data, each made
distinct by a numbered opening to its first turn, so lengths follow the HH data), then runs, each as
its own `dpo` process with one tokenizer process and one torch thread:

- ``dpo tokenize`` of all of them, with a fixed 256-pair --eval-data split;
- ``dpo train`` of a tiny Llama (tests/conftest.py's build_tiny_llama) for a few steps of SimPO
  (reference-free, so no reference pass over all pairs is needed);
- ``dpo evaluate`` of the trained model on the eval split.

Every stage reads its inputs with sha256 verification, as a user's run does. It records per stage
the peak RSS (the kernel's ru_maxrss for the process, file-backed pages of memory-mapped shards
included) and the peak private (anonymous) RSS sampled from /proc, the wall time, tokenize's pairs
per second and train's time from process start to its first step (its first metrics.jsonl row). The
results replace the "Scale" section of bench/RESULTS.md (other sections are kept).

    .venv/bin/python bench/scale.py                      # 10k, 100k, 1M
    .venv/bin/python bench/scale.py --sizes 10000 100000 --tokenize-only 1000000
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from report import write_section  # noqa: E402 - bench/ is on the path as this script's folder
HH = REPO / "demo" / "data" / "hh-rlhf-harmless-test.jsonl.gz"
DPO = str(Path(sys.executable).parent / "dpo")
RESULTS = REPO / "bench" / "RESULTS.md"
EVAL_PAIRS = 256
TRAIN_STEPS = 3


def synthesise(path: Path, count: int, offset: int = 0) -> int:
    """``count`` distinct HH-style pairs as JSON lines; returns the bytes written."""
    with gzip.open(HH, "rt") as f:
        records = [json.loads(line) for line in f]
    with open(path, "w") as out:
        for i in range(offset, offset + count):
            record = records[i % len(records)]
            opening = f"\n\nHuman: (case {i}) "
            out.write(json.dumps({side: record[side].replace("\n\nHuman: ", opening, 1) for side in ("chosen", "rejected")})
                      + "\n")
    return path.stat().st_size


def measure(command: list[str], watch: str | None = None, limit_s: float | None = None) -> dict:
    """Runs ``command``; its peak private RSS, wall time, and when ``watch`` first appeared. Past
    ``limit_s`` it is stopped (SIGTERM: a stage commits what it has and exits 75) and marked so."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    watch = Path(watch) if watch else None
    peak_anon, first_seen, stopped = 0, None, False
    stderr_lines: list[str] = []
    reader = threading.Thread(target=lambda: stderr_lines.extend(process.stderr), daemon=True)
    reader.start()
    while process.poll() is None:
        try:
            status = Path(f"/proc/{process.pid}/status").read_text()
            peak_anon = max(peak_anon, int(re.search(r"RssAnon:\s+(\d+)", status)[1]) * 1024)
        except (OSError, TypeError):
            pass
        if watch is not None and first_seen is None and watch.is_file() and watch.stat().st_size:
            first_seen = time.perf_counter() - started
        if limit_s is not None and time.perf_counter() - started > limit_s and not stopped:
            process.terminate()
            stopped = True
        time.sleep(0.05)
    reader.join()
    wall = time.perf_counter() - started
    if process.returncode and not stopped:
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}):\n{''.join(stderr_lines[-20:])}")
    return {"wall_s": round(wall, 2), "peak_anon_mib": round(peak_anon / 2**20, 1),
            "first_step_s": round(first_seen, 2) if first_seen is not None else None, "stopped": stopped}


def peak_rss(command: list[str], watch: Path | None = None, limit_s: float | None = None) -> dict:
    """``measure`` in a child interpreter, so that its RUSAGE_CHILDREN ru_maxrss (the largest of the
    stage's process and the worker processes it waited for) is this stage's alone."""
    code = (f"import json, resource, sys; sys.path.insert(0, {str(REPO / 'bench')!r}); import scale; "
            f"r = scale.measure({command!r}, {str(watch) if watch else None!r}, {limit_s!r}); "
            "r['peak_rss_mib'] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1); print(json.dumps(r))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-4000:] + out.stdout[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def committed_pairs(tokenized: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(p).metadata.num_rows for p in tokenized.glob("*/part-*.parquet"))


def run_size(work: Path, size: int, model: Path, tokenize_only: bool, limit_s: float | None) -> dict:
    folder = work / f"n{size}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    data, evals = folder / "pairs.jsonl", folder / "eval.jsonl"
    data_bytes = synthesise(data, size)
    synthesise(evals, EVAL_PAIRS, offset=10**9)
    tokenized = folder / "tokenized"
    result = {"size": size, "data_mib": round(data_bytes / 2**20, 1)}
    result["tokenize"] = peak_rss([DPO, "tokenize", "--data", str(data), "--eval-data", str(evals), "--tokenizer",
                                   str(model), "--out", str(tokenized), "--max-seq-length", "512", "--quiet"],
                                  limit_s=limit_s)
    if result["tokenize"]["stopped"]:
        # Throughput of the part done: committed pairs over the wall time (reading passes included).
        result["tokenize"]["pairs_per_s"] = round(committed_pairs(tokenized) / result["tokenize"]["wall_s"], 1)
        result["tokenize"]["committed"] = committed_pairs(tokenized)
        return result
    manifest = json.loads((tokenized / "manifest.json").read_text())
    result["tokenize"]["pairs_per_s"] = manifest["stats"]["throughput"]["pairs_per_second"]
    result["artifact"] = {
        suffix: round(sum(f["bytes"] for f in manifest["files"] if f["path"].endswith(suffix)) / 2**20, 1)
        for suffix in (".parquet", ".arrow")}
    result["tokens"] = manifest["stats"]["total_tokens"]
    result["tokenize"]["committed"] = size + EVAL_PAIRS
    if tokenize_only:
        return result
    train = folder / "train"
    result["train"] = peak_rss([DPO, "train", "--tokenized", str(tokenized), "--model", str(model), "--out", str(train),
                                "--loss-type", "simpo", "--max-steps", str(TRAIN_STEPS), "--per-device-batch-size", "4",
                                "--quiet"], watch=train / "metrics.jsonl")
    result["evaluate"] = peak_rss([DPO, "evaluate", "--tokenized", str(tokenized), "--model", str(train / "final"),
                                   "--train", str(train), "--out", str(folder / "eval"), "--quiet"])
    shutil.rmtree(folder)
    return result


def write_results(results: list[dict], command: str, load_start: float) -> None:
    lines = ["## Scale: memory and throughput from 10k to 1M pairs (bench/scale.py, issue 11)", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
             f"Python {platform.python_version()}; load average {load_start:.2f} at the start, "
             f"{os.getloadavg()[0]:.2f} at the end. Command: `{command}`. Synthetic HH-style pairs (distinct text, "
             f"HH lengths), --max-seq-length 512, --eval-data of {EVAL_PAIRS} pairs, tiny Llama (hidden 32, 2 "
             f"layers), train {TRAIN_STEPS} steps of SimPO at 4 pairs per step; sha256 verification on. Peak RSS: "
             "ru_maxrss (memory-mapped shard pages a process touched count here); private: peak RssAnon.", "",
             "| pairs | stage | wall s | peak RSS MiB | peak private MiB | pairs/s | first step s |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in results:
        for stage in ("tokenize", "train", "evaluate"):
            if stage in r:
                m = r[stage]
                stage = stage + (f" (stopped at the limit, {m['committed']:,} pairs committed)" if m.get("stopped") else "")
                lines.append(f"| {r['size']:,} | {stage} | {m['wall_s']} | {m['peak_rss_mib']} | {m['peak_anon_mib']} | "
                             f"{m.get('pairs_per_s') or ''} | {m.get('first_step_s') or ''} |")
    lines += ["", "| pairs | input JSONL MiB | Parquet shards MiB | Arrow copies MiB | tokens |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['size']:,} | {r['data_mib']} | {r['artifact']['.parquet']} | {r['artifact']['.arrow']} | "
              f"{r['tokens']:,} |" for r in results if "artifact" in r]
    write_section(RESULTS, "scale", lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--tokenize-only", type=int, nargs="*", default=[], help="sizes run through tokenize only")
    parser.add_argument("--limit-s", type=float, help="stop a tokenize that runs longer (the result says so)")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench-scale")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--train-probe", type=int, nargs="*", help="only dpo train, on directly written artifacts")
    parser.add_argument("--read-probe", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--probe", type=int, nargs="*", help="only train's data path at these sizes (data_path_probe)")
    args = parser.parse_args()
    if args.read_probe:
        print(json.dumps(read_probe(args.read_probe)))
        return
    if args.probe:
        for size in args.probe:
            print(json.dumps(data_path_probe(size, args.work)), flush=True)
        return
    if args.train_probe:
        from conftest import build_tiny_llama

        model = build_tiny_llama(args.work / "tiny-llama")
        for size in args.train_probe:
            print(json.dumps(train_probe(size, args.work, model)), flush=True)
        return
    from conftest import build_tiny_llama

    args.work.mkdir(parents=True, exist_ok=True)
    model = build_tiny_llama(args.work / "tiny-llama")
    results, load_start = [], os.getloadavg()[0]
    for size in sorted(set(args.sizes) | set(args.tokenize_only)):
        results.append(run_size(args.work, size, model, size not in args.sizes, args.limit_s))
        print(json.dumps(results[-1]), flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
        write_results(results, "python bench/scale.py " + " ".join(sys.argv[1:]), load_start)



def read_probe(root: Path) -> dict:
    """In a fresh process (so that the writing's freed memory does not blur it): the seconds and the
    private memory (RssAnon) that verifying, mapping, ordering and reading the first batch add."""
    import pyarrow as pa

    from dpo.artifacts.shards import ArtifactReader
    from dpo.pipeline.batching import pair_lengths, take_rows
    from dpo.pipeline.data_order import BatchOrder, Cursor

    def anon() -> int:
        return int(re.search(r"RssAnon:\s+(\d+)", Path("/proc/self/status").read_text())[1]) * 1024

    pa.table({"warm": [[1, 2], [3]]}).take([1])  # Arrow's one-time set-up, before the baseline
    base, started = anon(), time.perf_counter()
    reader = ArtifactReader(root, kind="tokenized", verify=True)
    verified = time.perf_counter()
    rows = reader.read_split("train")
    order = BatchOrder(pair_lengths(rows), 32, seed=42)
    first = take_rows(rows, order.batch(Cursor()))  # as train gathers a batch (Table.take copies the split)
    assert first.num_rows == 32
    done = time.perf_counter()
    return {"verify_s": round(verified - started, 2), "map_order_first_batch_s": round(done - verified, 2),
            "added_private_mib": round((anon() - base) / 2**20, 1)}


def train_probe(size: int, work: Path, model: Path) -> dict:
    """``dpo train`` (the same options as run_size) on a directly written artifact of ``size`` pairs."""
    root = write_probe_artifact(size, work)
    train = work / f"probe-train{size}"
    shutil.rmtree(train, ignore_errors=True)
    result = peak_rss([DPO, "train", "--tokenized", str(root), "--model", str(model), "--out", str(train),
                       "--loss-type", "simpo", "--max-steps", str(TRAIN_STEPS), "--per-device-batch-size", "4",
                       "--quiet"], watch=train / "metrics.jsonl")
    result["arrow_mib"] = round(sum(p.stat().st_size for p in root.glob("train/*.arrow")) / 2**20, 1)
    shutil.rmtree(root)
    shutil.rmtree(train)
    return {"size": size, "train": result}


def data_path_probe(size: int, work: Path) -> dict:
    """Train's data path alone (read_probe) on a directly written artifact of ``size`` pairs."""
    root = write_probe_artifact(size, work)
    out = subprocess.run([sys.executable, str(Path(__file__)), "--read-probe", str(root)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-4000:])
    result = {"size": size, **json.loads(out.stdout.strip().splitlines()[-1]),
              "arrow_mib": round(sum(p.stat().st_size for p in root.glob("train/*.arrow")) / 2**20, 1)}
    shutil.rmtree(root)
    return result


def write_probe_artifact(size: int, work: Path) -> Path:
    """A tokenized artifact of ``size`` train pairs written directly (random token ids, HH-like
    lengths from a lognormal fit, ~240 tokens per side, as the tokenized HH pairs have), since
    tokenizing 1M pairs takes hours on 2 shared cores: it measures the readers, not tokenize."""
    import numpy as np
    import pyarrow as pa

    from dpo.artifacts.manifest import Manifest, write_manifest
    from dpo.artifacts.shards import ShardWriter, arrow_copy_path, file_entry, shard_bounds, shard_path
    from dpo.stages.tokenize import MAPPED_COLUMNS, SCHEMA

    root = work / f"probe{size}"
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(0)
    bounds = shard_bounds(size, 50_000)
    files = []
    for k, (a, b) in enumerate(bounds):
        n = b - a
        prompt = np.clip(rng.lognormal(5.0, 0.8, n), 4, 400).astype(np.int32)
        sides = {s: prompt + np.clip(rng.lognormal(4.2, 0.9, n), 1, 511 - 400).astype(np.int32) for s in ("chosen", "rejected")}
        writer = ShardWriter(root, shard_path("train", k, len(bounds)), SCHEMA, arrow_copy=True,
                             copy_columns=MAPPED_COLUMNS)
        for start in range(0, n, 4096):
            stop = min(n, start + 4096)
            columns = {"index": pa.array(np.arange(a + start, a + stop)), "source": pa.array(["synthetic"] * (stop - start))}
            for side, lengths in sides.items():
                part = lengths[start:stop]
                offsets = np.concatenate([[0], np.cumsum(part)]).astype(np.int32)
                ids = pa.array(rng.integers(0, 500, int(offsets[-1]), dtype=np.int32))  # inside the tiny model's vocabulary (512)
                labels = ids.to_numpy().copy()
                starts = offsets[:-1]
                for i, p in enumerate(prompt[start:stop]):
                    labels[starts[i]: starts[i] + p] = -100
                columns[f"{side}_input_ids"] = pa.ListArray.from_arrays(pa.array(offsets), ids)
                columns[f"{side}_labels"] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(labels))
                columns[f"{side}_length"] = pa.array(part)
            columns["prompt_length"] = pa.array(prompt[start:stop])
            writer.write(pa.table(columns, schema=SCHEMA))
        entry = writer.commit()
        files += [entry, file_entry(root, arrow_copy_path(entry.path))]
    write_manifest(root, Manifest(kind="tokenized", fingerprint="probe", config={}, files=files, stats={}))
    return root


if __name__ == "__main__":
    main()
