"""dpo against TRL 1.16's DPOTrainer, side by side, on one CPU machine (issue #10, section 3).

    make bench                                   # installs the bench extra (TRL), then the full run below
    python bench/vs_trl.py                       # full run: 30 steps, median of 3 interleaved runs -> bench/RESULTS.md
    python bench/vs_trl.py --quick               # smoke run: 2 steps, 1 run, 64 pairs -> runs/bench-vs-trl/RESULTS.md
    python bench/vs_trl.py --steps 2 --runs 1 --pairs 64
    python bench/vs_trl.py --tokenize-only       # the tokenize goal alone, 5 interleaved runs -> its section of RESULTS.md

build    one model both sides load (a ~16M-parameter Llama, hidden 256, 4 layers, intermediate 688, 4 heads,
         tied embeddings, the real GPT-2 vocabulary, fixed seed) and the HH-RLHF harmless pairs as plain
         prompt/chosen/rejected strings (split at the last "\\n\\nAssistant:"; pairs with an empty response,
         which dpo drops and TRL would train on as a bare EOS, are left out so both sides get the same records).
check    on identical weights and an identical batch of 8 pairs, `dpo train --max-steps 1`'s step-1 loss and
         pre-clip gradient norm must equal TRL's (relative difference < 1e-5), else the bench stops. TRL is fed
         the token ids of dpo's tokenized artifact (so the batch is identical by construction; the bench checks
         the ids TRL's forward received), and TRL's own tokenization of every record is compared with dpo's.
measure  run r = 1..R, each in its own subprocess, interleaved so machine noise hits both sides alike:
         matmul, (a) TRL with the reference model in memory, (c) dpo tokenize + cache-ref + train (unpacked, then
         packed where this dpo has --packing), (b) TRL with precompute_ref_log_probs=True, bare inference loop.
report   medians, ratios dpo / TRL against the issue's goals, printed and written to RESULTS.md.

What is timed, per side:
- training: dpo: the manifest's ``stats.train_seconds`` (the step loop: data, forward, backward, optimizer,
  logging; not model load, not the final save). TRL: from ``on_train_begin`` to ``on_train_end`` of a Trainer
  callback (the same loop; not model load, dataset preparation or the reference precompute). Real tokens are the
  attention-mask sums of the training batches (dpo: ``stats.tokens``; TRL: counted by a forward pre-hook on the
  policy, only forwards with gradients on); padding share = 1 - real / computed positions.
- reference pass: dpo: ``cache-ref``'s ``stats.pairs_per_second`` (its compute loop over every pair). TRL (b): the
  whole ``DPOTrainer._precompute_ref_logps`` call (data loader, forwards, writing the columns). Bare: a
  ``model(input_ids, attention_mask)`` loop (full logits, inference mode) over the same pairs, batched like
  cache-ref (longest first, 8 pairs per batch, chosen and rejected concatenated, right-padded; it sorts the whole
  set where cache-ref sorts within shards of 2,048 pairs).
- tokenize: dpo: ``stats.throughput`` of ``dpo tokenize`` (reading the file, encoding, writing Parquet). TRL: the
  whole ``DPOTrainer._prepare_dataset`` call inside (a) (EOS map, tokenize map, length filter) on an in-memory
  ``Dataset`` of the same records.
- peak memory: ``ru_maxrss`` of each stage's own process, from ``os.wait4`` in this script (not in-process).
- FLOP/s share: model FLOPs per real token (6 x body parameters + 6 x output-layer parameters x label share +
  causal attention 6 x layers x hidden x mean attended length, all from the data's lengths; 2/2/2 instead of 6
  for the forward-only reference pass) x real tokens/s, over the best fp32 ``torch.mm`` GFLOP/s measured in the
  same run with the same threads.

dpo is driven only through its CLI and read only through its artifacts (manifest.json, metrics.jsonl, the
tokenized Parquet columns), so refactors of its internals do not break this script. TRL is a bench-only extra
(``pip install -e '.[bench]'``), never a dependency of dpo.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gzip
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from report import write_section

REPO = Path(__file__).resolve().parents[1]
HH_DATA = REPO / "demo" / "data" / "hh-rlhf-harmless-test.jsonl.gz"
GPT2_TOKENIZER = REPO / "demo" / "gpt2-tokenizer"
RESULTS = REPO / "bench" / "RESULTS.md"
HH_ASSISTANT = "\n\nAssistant:"
TOLERANCE = 1e-5  # relative difference allowed between dpo's and TRL's step-1 loss and gradient norm
CHECK_PAIRS = 8
HISTORY_TAG = "vs_trl-history"


@dataclasses.dataclass(frozen=True)
class Settings:
    steps: int = 30
    runs: int = 3
    pairs: int | None = None  # None: every usable HH harmless pair
    max_length: int = 512
    batch_size: int = 8
    learning_rate: float = 5e-6
    beta: float = 0.1
    max_grad_norm: float = 1.0
    threads: int = 2
    seed: int = 42
    model_seed: int = 0
    hidden: int = 256
    layers: int = 4
    intermediate: int = 688
    heads: int = 4
    trl_gradient_checkpointing: bool = False  # TRL 1.16 defaults to True; off = the same computation as dpo
    max_tokens_per_batch: int | None = None  # packed runs; None: batch_size x 2 x mean tokens per side

    @property
    def full(self) -> bool:
        """The configuration the issue's goals are stated for."""
        return self.steps == 30 and self.runs >= 3 and self.pairs is None


class BenchError(RuntimeError):
    pass


# =============================================================================================
# Subprocesses: every measured thing runs in its own process; peak RSS comes from os.wait4.


@dataclasses.dataclass
class Proc:
    returncode: int
    seconds: float
    peak_rss_bytes: int
    log: Path

    def tail(self, lines: int = 25) -> str:
        text = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return "\n".join(text[-lines:])


def bench_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), RAYON_NUM_THREADS=str(threads),
        TQDM_DISABLE="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
        WANDB_MODE="disabled", NO_COLOR="1", TERM="dumb", COLUMNS="200", PYTHONUNBUFFERED="1",
        CUDA_VISIBLE_DEVICES="",  # the comparison is on CPU for both sides, even where a GPU exists
    )
    return env


def run_proc(cmd: list[str], log: Path, threads: int, check: bool = True) -> Proc:
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=bench_env(threads), cwd=REPO)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4; tell Popen so it does not wait again
    result = Proc(proc.returncode, time.perf_counter() - t0, usage.ru_maxrss * 1024, log)
    if check and result.returncode != 0:
        raise BenchError(f"{' '.join(map(str, cmd[:4]))} ... exited {result.returncode}; log {log}:\n{result.tail()}")
    return result


def dpo_cmd(*args: Any) -> list[str]:
    return [sys.executable, "-m", "dpo.cli", *map(str, args)]


def worker_cmd(name: str, spec: dict, path: Path) -> list[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec))
    return [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--spec", str(path)]


def run_worker(name: str, spec: dict, folder: Path, threads: int, check: bool = True) -> tuple[dict | None, Proc]:
    folder.mkdir(parents=True, exist_ok=True)
    result_path = folder / f"{name}-result.json"
    result_path.unlink(missing_ok=True)
    proc = run_proc(worker_cmd(name, {**spec, "result": str(result_path)}, folder / f"{name}-spec.json"),
                    folder / f"{name}.log", threads, check=check)
    result = json.loads(result_path.read_text()) if result_path.exists() else None
    return result, proc


def read_manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def cli_help(stage: str) -> str:
    out = subprocess.run(dpo_cmd(stage, "--help"), capture_output=True, text=True, env=bench_env(1), cwd=REPO)
    return out.stdout + out.stderr


# =============================================================================================
# Build: data and model.


def hh_pairs() -> list[dict[str, str]]:
    """HH-RLHF harmless as prompt/chosen/rejected strings; the prompt keeps the last "\\n\\nAssistant:"."""
    pairs = []
    with gzip.open(HH_DATA, "rt", encoding="utf-8") as fh:
        for line in fh:
            record = json.loads(line)
            chosen, rejected = record["chosen"], record["rejected"]
            cut_c, cut_r = chosen.rfind(HH_ASSISTANT), rejected.rfind(HH_ASSISTANT)
            if cut_c < 0 or cut_r < 0:
                continue
            cut_c, cut_r = cut_c + len(HH_ASSISTANT), cut_r + len(HH_ASSISTANT)
            if chosen[:cut_c] != rejected[:cut_r]:
                continue  # a turn marker inside a response moved the split: no shared prompt
            pair = {"prompt": chosen[:cut_c], "chosen": chosen[cut_c:], "rejected": rejected[cut_r:]}
            if not pair["chosen"].strip() or not pair["rejected"].strip():
                continue  # dpo drops these, TRL would train on a bare EOS: leave them out for both
            pairs.append(pair)
    return pairs


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def build_model(out: Path, s: Settings) -> dict:
    """The one model both sides load: a Llama with the GPT-2 vocabulary, seeded, saved once."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(GPT2_TOKENIZER)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=s.hidden, intermediate_size=s.intermediate,
        num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.heads,
        max_position_embeddings=max(1024, s.max_length), tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        attention_dropout=0.0, dtype="float32",
    )
    torch.manual_seed(s.model_seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    total = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings().weight.numel()
    return {"parameters": total, "output_layer_parameters": head, "body_parameters": total - head,
            "vocab_size": config.vocab_size, "hidden": s.hidden, "layers": s.layers,
            "intermediate": s.intermediate, "heads": s.heads}


def tokenized_rows(folder: Path, columns: list[str]) -> list[dict]:
    """The train split's rows of a tokenized artifact, through the files its manifest lists."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = read_manifest(folder)
    tables = [pq.read_table(folder / f["path"], columns=columns) for f in manifest["files"]
              if f["path"].startswith("train/") and f["path"].endswith(".parquet")]
    return pa.concat_tables(tables).to_pylist()


def data_profile(tokenized: Path, model: dict) -> dict:
    """Lengths, label share and model FLOPs per real token of the data set, from the tokenized artifact."""
    rows = tokenized_rows(tokenized, ["prompt_length", "chosen_length", "rejected_length"])
    lengths = [r[k] for r in rows for k in ("chosen_length", "rejected_length")]
    labels = sum(r["chosen_length"] + r["rejected_length"] - 2 * r["prompt_length"] for r in rows)
    tokens = sum(lengths)
    # Causal attention, forward, per layer and sequence of n tokens: QK^T and AV each d * n(n+1) FLOPs.
    attention_fwd = sum(2 * model["layers"] * model["hidden"] * n * (n + 1) for n in lengths) / tokens
    share = labels / tokens
    return {
        "pairs": len(rows), "tokens": tokens, "label_tokens": labels, "label_share": share,
        "mean_tokens_per_side": tokens / max(1, len(lengths)), "max_tokens_per_side": max(lengths),
        "train_flops_per_token": 6 * model["body_parameters"] + 6 * model["output_layer_parameters"] * share
                                 + 3 * attention_fwd,
        "forward_flops_per_token": 2 * model["body_parameters"] + 2 * model["output_layer_parameters"] * share
                                   + attention_fwd,
    }


# =============================================================================================
# Check: dpo's step-1 loss and gradient norm against TRL's, on identical weights and batch.


def dpo_train_args(s: Settings, tokenized: Path, ref: Path, model: Path, out: Path, steps: int) -> list:
    return ["train", "--tokenized", tokenized, "--ref-cache", ref, "--model", model, "--out", out,
            "--loss-type", "dpo", "--beta", s.beta, "--learning-rate", s.learning_rate, "--max-steps", steps,
            "--per-device-batch-size", s.batch_size, "--max-grad-norm", s.max_grad_norm, "--warmup-ratio", 0,
            "--lr-scheduler", "linear", "--seed", s.seed, "--dtype", "float32", "--quiet"]


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def record_of_rows(tokenized: Path, n_records: int) -> list[int]:
    """For each row of a tokenized artifact (in order), the 0-based input record it came from."""
    rejected_lines = set()
    rejects = tokenized / "rejects.jsonl"
    if rejects.exists():
        rejected_lines = {r["line"] - 1 for r in read_jsonl(rejects) if r.get("line")}
    return [i for i in range(n_records) if i not in rejected_lines]


def compare_tokenization(dpo_rows: list[dict], row_records: list[int], trl_rows: dict[int, dict],
                         max_length: int) -> dict:
    """dpo's ids against TRL's own preparation of the same records (TRL truncates later, in its collator)."""
    same, differ, first = 0, 0, None
    for row, rec in zip(dpo_rows, row_records):
        trl = trl_rows.get(rec)
        if trl is None:
            differ += 1
            first = first or f"record {rec}: kept by dpo, dropped by TRL"
            continue
        p = trl["prompt_ids"]
        ok = (row["chosen_input_ids"] == (p + trl["chosen_ids"])[:max_length]
              and row["rejected_input_ids"] == (p + trl["rejected_ids"])[:max_length]
              and row["prompt_length"] == len(p))
        same += ok
        differ += not ok
        if not ok and first is None:
            first = f"record {rec}: prompt {row['prompt_length']} vs {len(p)} tokens"
    only_trl = len(set(trl_rows) - set(row_records))
    return {"identical": same, "different": differ, "kept_by_trl_only": only_trl, "first_difference": first}


def check(s: Settings, out: Path, model: Path, records_path: Path, n_records: int) -> dict:
    say("check: dpo and TRL on identical weights and an identical batch")
    folder = out / "check"
    shutil.rmtree(folder, ignore_errors=True)
    full_tok = folder / "tokenized-all"
    run_proc(dpo_cmd("tokenize", "--data", records_path, "--tokenizer", model, "--out", full_tok,
                     "--max-seq-length", s.max_length, "--format", "text", "--quiet"), folder / "tokenize-all.log", s.threads)
    rows = tokenized_rows(full_tok, ["chosen_input_ids", "rejected_input_ids", "prompt_length"])
    row_records = record_of_rows(full_tok, n_records)
    if len(row_records) != len(rows):
        raise BenchError(f"{full_tok}: {len(rows)} rows but {len(row_records)} records not listed in rejects.jsonl")

    # TRL's own preparation of every record, to compare ids with dpo's.
    prepared, _ = run_worker("trl-prepare", {"records": str(records_path), "model": str(model),
                                             "max_length": s.max_length, "threads": s.threads}, folder, s.threads)
    trl_rows = {r["record"]: r for r in read_jsonl(Path(prepared["rows"]))}
    tokenization = compare_tokenization(rows, row_records, trl_rows, s.max_length)
    tokenization["dpo_pairs"] = len(rows)
    tokenization["trl_pairs"] = len(trl_rows)

    # One batch of 8 pairs, tokenized by dpo; TRL gets exactly those ids.
    records = read_jsonl(records_path)
    batch_records = [records[i] for i in row_records[:CHECK_PAIRS]]
    batch_path = write_jsonl(folder / "batch.jsonl", batch_records)
    tok = folder / "tokenized"
    run_proc(dpo_cmd("tokenize", "--data", batch_path, "--tokenizer", model, "--out", tok,
                     "--max-seq-length", s.max_length, "--format", "text", "--quiet"), folder / "tokenize.log", s.threads)
    batch_rows = tokenized_rows(tok, ["chosen_input_ids", "rejected_input_ids", "prompt_length"])
    if len(batch_rows) != CHECK_PAIRS:
        raise BenchError(f"{tok}: expected {CHECK_PAIRS} pairs, dpo kept {len(batch_rows)}")
    run_proc(dpo_cmd("cache-ref", "--tokenized", tok, "--model", model, "--out", folder / "ref",
                     "--batch-size", s.batch_size, "--quiet"), folder / "cache-ref.log", s.threads)
    run_proc(dpo_cmd(*dpo_train_args(s, tok, folder / "ref", model, folder / "train", 1), "--logging-steps", 1),
             folder / "train.log", s.threads)
    dpo_step = read_jsonl(folder / "train" / "metrics.jsonl")[0]

    pretokenized = [{"prompt_ids": r["chosen_input_ids"][: r["prompt_length"]],
                     "chosen_ids": r["chosen_input_ids"][r["prompt_length"]:],
                     "rejected_ids": r["rejected_input_ids"][r["prompt_length"]:]} for r in batch_rows]
    trl, _ = run_worker("trl", {**trl_spec(s, "check", model, folder / "trl", steps=1, logging_steps=1),
                                "pretokenized": pretokenized, "record_sequences": True}, folder, s.threads)
    trl_step = trl["first_log"]

    # The ids TRL's training forward received must be dpo's 16 sequences.
    expected = sorted([r["chosen_input_ids"] for r in batch_rows] + [r["rejected_input_ids"] for r in batch_rows])
    same_batch = sorted(trl["sequences"]) == expected
    result = {
        "pairs": CHECK_PAIRS, "same_token_ids": same_batch, "tokenization": tokenization,
        "dpo": {k: dpo_step.get(k) for k in ("loss", "grad_norm", "logps/chosen", "logps/rejected")},
        "trl": {k: trl_step.get(k) for k in ("loss", "grad_norm", "logps/chosen", "logps/rejected")},
    }
    result["relative_difference"] = {k: rel_diff(result["dpo"][k], result["trl"][k]) for k in result["dpo"]
                                     if result["dpo"][k] is not None and result["trl"][k] is not None}
    for k in ("loss", "grad_norm", "logps/chosen", "logps/rejected"):
        say(f"  {k:<15} dpo {result['dpo'][k]!r:<24} TRL {result['trl'][k]!r:<24} "
            f"rel. diff {result['relative_difference'].get(k, float('nan')):.2e}")
    say(f"  TRL's own tokenization: {tokenization['identical']} of {len(rows)} pairs identical to dpo's ids"
        + (f" (first difference: {tokenization['first_difference']})" if tokenization["first_difference"] else ""))
    failures = [k for k in ("loss", "grad_norm") if result["relative_difference"].get(k, math.inf) >= TOLERANCE]
    if not same_batch:
        raise BenchError("check: the sequences TRL trained on are not dpo's; the comparison would be meaningless")
    if failures:
        raise BenchError(f"check failed: dpo and TRL differ in {', '.join(failures)} by more than {TOLERANCE:g} "
                         f"relative ({json.dumps(result['relative_difference'])}); logs in {folder}")
    say(f"  passed: loss and gradient norm agree within {TOLERANCE:g} relative")
    return result


# =============================================================================================
# Measure.


def trl_spec(s: Settings, mode: str, model: Path, out: Path, steps: int, logging_steps: int = 10,
             records: Path | None = None) -> dict:
    return {"mode": mode, "model": str(model), "out": str(out), "records": str(records) if records else None,
            "steps": steps, "logging_steps": logging_steps, "batch_size": s.batch_size,
            "learning_rate": s.learning_rate, "beta": s.beta, "max_length": s.max_length,
            "max_grad_norm": s.max_grad_norm, "seed": s.seed, "threads": s.threads,
            "gradient_checkpointing": s.trl_gradient_checkpointing}


def measure_trl(s: Settings, mode: str, model: Path, records: Path, folder: Path) -> dict:
    shutil.rmtree(folder, ignore_errors=True)
    res, proc = run_worker("trl", trl_spec(s, mode, model, folder / "out", s.steps, records=records), folder,
                           s.threads)
    shutil.rmtree(folder / "out", ignore_errors=True)
    trained_pairs = res["steps"] * s.batch_size
    ref_share = min(1.0, trained_pairs / res["prepared_pairs"])
    m = {
        "peak_rss_bytes": proc.peak_rss_bytes, "wall_seconds": proc.seconds,
        "train_seconds": res["train_seconds"], "train_tokens": res["train_tokens"],
        "train_tokens_per_second": res["train_tokens"] / res["train_seconds"],
        "train_padding": 1 - res["train_tokens"] / res["train_slots"],
        "trl_num_tokens_metric": res.get("num_tokens_metric"), "steps": res["steps"],
        "prepare_seconds": res["prepare_seconds"], "prepare_pairs_per_second": res["input_pairs"] / res["prepare_seconds"],
        "prepared_pairs": res["prepared_pairs"], "optimizer": res["optimizer"],
    }
    if mode == "b":
        m.update(ref_seconds=res["precompute_seconds"], ref_pairs=res["precompute_pairs"],
                 ref_pairs_per_second=res["precompute_pairs"] / res["precompute_seconds"],
                 ref_padding=1 - res["ref_tokens"] / res["ref_slots"],
                 ref_tokens_per_second=res["ref_tokens"] / res["precompute_seconds"])
        m["train_tokens_per_second_with_ref"] = res["train_tokens"] / (
            res["train_seconds"] + res["precompute_seconds"] * ref_share)
    else:
        m["train_tokens_per_second_with_ref"] = m["train_tokens_per_second"]  # the reference runs inside the steps
    return m


def measure_dpo_tokenize(s: Settings, tokenizer: Path, records: Path, out: Path, log: Path) -> dict:
    """``dpo tokenize`` of the records: its own throughput (reading the file, encoding, writing Parquet)."""
    p = run_proc(dpo_cmd("tokenize", "--data", records, "--tokenizer", tokenizer, "--out", out,
                         "--max-seq-length", s.max_length, "--format", "text", "--quiet"), log, s.threads)
    t = read_manifest(out)["stats"]
    return {"pairs": sum(t["pairs"].values()), "pairs_per_second": t["throughput"]["pairs_per_second"],
            "seconds": t["throughput"]["seconds"], "wall_seconds": p.seconds, "peak_rss_bytes": p.peak_rss_bytes}


def tokenize_only(s: Settings, out: Path, results: Path) -> None:
    """The tokenize goal alone (minutes, not hours): ``dpo tokenize`` against TRL's own preparation
    (``DPOTrainer._prepare_dataset``, as timed inside TRL (a) in the full run) of the same records with
    the same tokenizer, interleaved, ``s.runs`` times; writes the ``tokenize`` section of ``results``."""
    records = write_jsonl(out / "pairs.jsonl", hh_pairs()[: s.pairs] if s.pairs else hh_pairs())
    count = len(read_jsonl(records))
    rows = []
    for r in range(1, s.runs + 1):
        folder = out / "tokenize-only" / f"run-{r}"
        shutil.rmtree(folder, ignore_errors=True)
        trl, _ = run_worker("trl-prepare", {"model": str(GPT2_TOKENIZER), "records": str(records),
                                            "max_length": s.max_length}, folder / "trl", s.threads)
        dpo = measure_dpo_tokenize(s, GPT2_TOKENIZER, records, folder / "tokenized", folder / "tokenize.log")
        rows.append((count / trl["seconds"], dpo["pairs_per_second"]))
        say(f"run {r}/{s.runs}: TRL's preparation {rows[-1][0]:.0f} pairs/s, dpo tokenize {rows[-1][1]:.0f} pairs/s")
    trl_median, dpo_median = (statistics.median(x) for x in zip(*rows))
    v, load = versions(), os.getloadavg()[0]
    lines = ["## Tokenize alone (`bench/vs_trl.py --tokenize-only`)", "",
             f"{datetime.datetime.now():%Y-%m-%d %H:%M}, dpo {v['dpo_commit']}, tokenizers {v['tokenizers']}, trl "
             f"{v['trl']}, {machine()['cpu']}, {s.threads} threads, load average {load:.2f} at the end. The "
             f"{count:,} HH pairs and the GPT-2 tokenizer of the full run, --max-seq-length {s.max_length}; "
             f"median of {s.runs} interleaved runs (TRL's preparation, then dpo tokenize, in each).", "",
             "| run | TRL's preparation pairs/s | dpo tokenize pairs/s | dpo / TRL |", "|---|---:|---:|---:|",
             *[f"| {r} | {t:,.0f} | {d:,.0f} | {d / t:.2f}x |" for r, (t, d) in enumerate(rows, 1)],
             f"| median | {trl_median:,.0f} | {dpo_median:,.0f} | **{dpo_median / trl_median:.2f}x** (goal >= 3x) |"]
    write_section(results, "tokenize", lines)
    say(f"tokenize: dpo {dpo_median:.0f} pairs/s, TRL's preparation {trl_median:.0f}: {dpo_median / trl_median:.2f}x; "
        f"wrote {results}")


def measure_dpo(s: Settings, model: Path, records: Path, folder: Path, packing: dict) -> dict:
    """dpo tokenize -> cache-ref -> train, unpacked, then packed where this dpo has --packing."""
    shutil.rmtree(folder, ignore_errors=True)
    tok = folder / "tokenized"
    m: dict[str, Any] = {"tokenize": measure_dpo_tokenize(s, model, records, tok, folder / "tokenize.log")}
    variants = {"unpacked": False}
    if packing["available"]:
        variants["packed"] = True
    for name, packed in variants.items():
        ref, train = folder / f"ref-{name}", folder / f"train-{name}"
        ref_extra = (packing["cache_ref"] or []) if packed else []
        try:
            p = run_proc(dpo_cmd("cache-ref", "--tokenized", tok, "--model", model, "--out", ref,
                                 "--batch-size", s.batch_size, "--quiet", *ref_extra), folder / f"cache-ref-{name}.log",
                         s.threads)
            c = read_manifest(ref)["stats"]
            cache_ref = {"pairs": c["pairs_computed"], "pairs_per_second": c["pairs_per_second"],
                         "tokens_per_second": c["tokens_per_second"], "padding": c["padding_fraction"],
                         "seconds": c["seconds"]["compute"], "wall_seconds": p.seconds,
                         "peak_rss_bytes": p.peak_rss_bytes, "packed": bool(ref_extra),
                         "reported_stats": reported_stats(c)}
            train_extra = (packing["train"] or []) if packed else []
            p = run_proc(dpo_cmd(*dpo_train_args(s, tok, ref, model, train, s.steps), *train_extra),
                         folder / f"train-{name}.log", s.threads)
            st = read_manifest(train)["stats"]
            rows = read_jsonl(train / "metrics.jsonl")
            slots = None
            # padding share of the whole run, from the logged windows (real tokens/s x window time is not kept,
            # so weight each window's padding by its share of steps: windows are equal-length except the first)
            if rows and all("padding_fraction" in r for r in rows):
                slots = padding_of_windows(rows)
            ref_share = min(1.0, st["pairs"] / cache_ref["pairs"])
            m[name] = {
                "cache_ref": cache_ref,
                "train": {
                    "steps": st["steps"], "pairs": st["pairs"], "tokens": st["tokens"],
                    "train_seconds": st["train_seconds"], "tokens_per_second": st["tokens_per_second"],
                    "tokens_per_second_with_ref": st["tokens"] / (st["train_seconds"] + cache_ref["seconds"] * ref_share),
                    "padding": st.get("padding_fraction", slots),
                    "peak_rss_bytes": p.peak_rss_bytes, "peak_rss_bytes_self_reported": st.get("peak_cpu_rss_bytes"),
                    "wall_seconds": p.seconds, "time_breakdown": phase_seconds(st.get("time_breakdown")),
                    "packed": bool(train_extra), "reported_stats": reported_stats(st),
                },
            }
        except BenchError as exc:
            if name == "unpacked":
                raise
            m[name] = {"error": str(exc).splitlines()[0] + " ... " + str(exc).splitlines()[-1]}
        shutil.rmtree(train / "final", ignore_errors=True)
        shutil.rmtree(train / "checkpoints", ignore_errors=True)
    return m


def padding_of_windows(rows: list[dict]) -> float:
    """Padding share over the logged windows, each window weighted by its steps."""
    total, weight, prev = 0.0, 0, 0
    for r in rows:
        steps = r["step"] - prev
        prev = r["step"]
        total += r["padding_fraction"] * steps
        weight += steps
    return total / max(1, weight)


def reported_stats(stats: dict) -> dict:
    """What a stage reports itself about FLOP rates and memory use (stats keys naming flop, mfu or a memory split)."""
    return {k: v for k, v in stats.items() if re.search(r"flop|mfu|memory_breakdown", k, re.IGNORECASE)}


def phase_seconds(breakdown: dict | None) -> dict | None:
    """Seconds per phase from train's ``stats.time_breakdown`` ({"seconds": {...}, "share": {...}, ...})."""
    return breakdown.get("seconds", breakdown) if breakdown else None


def packing_support(s: Settings, profile: dict) -> dict:
    n = s.max_tokens_per_batch or int(math.ceil(s.batch_size * 2 * profile["mean_tokens_per_side"] / 64) * 64)
    n = max(n, s.max_length * 2)  # a packed batch must hold the longest pair

    def flags(help_text: str) -> list[str] | None:
        # train packs each micro-batch of pairs (the batch stays fixed in pairs); the forward-only passes
        # may batch by a token budget instead, where the stage offers one
        if "--packing" not in help_text:
            return None
        return ["--packing"] + (["--max-tokens-per-batch", str(n)] if "--max-tokens-per-batch" in help_text else [])

    train, cache_ref = flags(cli_help("train")), flags(cli_help("cache-ref"))
    return {"available": bool(train or cache_ref), "train": train, "cache_ref": cache_ref, "max_tokens_per_batch": n}


# =============================================================================================
# Workers (run as `vs_trl.py --worker NAME --spec FILE` in their own process).


def worker_matmul(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    shapes = {"2048x2048x2048": (2048, 2048, 2048), "4096x4096x4096": (4096, 4096, 4096),
              "8192x256x688": (8192, 256, 688), "2048x256x50257 (output layer)": (2048, 256, 50257)}
    result = {}
    for name, (m, k, n) in shapes.items():
        a, b = torch.randn(m, k), torch.randn(k, n)
        out = torch.empty(m, n)
        torch.mm(a, b, out=out)  # warm-up
        flops = 2 * m * k * n
        reps = max(1, int(2e9 // flops))
        best = math.inf
        for _ in range(spec.get("repeats", 5)):
            t0 = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b, out=out)
            best = min(best, (time.perf_counter() - t0) / reps)
        result[name] = flops / best / 1e9
    # The reference: the best plain fp32 matmul (the output-layer shape is reported, not used).
    result["peak_gflops"] = max(v for k, v in result.items() if "output layer" not in k)
    result["threads"] = torch.get_num_threads()
    return result


def worker_bare(spec: dict) -> dict:
    """``model(input_ids, attention_mask)`` over every pair, batched as cache-ref does; logits unused."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(spec["threads"])
    rows = tokenized_rows(Path(spec["tokenized"]), ["chosen_input_ids", "rejected_input_ids"])
    order = sorted(range(len(rows)), key=lambda i: (-max(len(rows[i]["chosen_input_ids"]),
                                                         len(rows[i]["rejected_input_ids"])), i))
    batches = []
    for start in range(0, len(order), spec["batch_size"]):
        group = [rows[i] for i in order[start: start + spec["batch_size"]]]
        seqs = [r["chosen_input_ids"] for r in group] + [r["rejected_input_ids"] for r in group]
        width = max(len(x) for x in seqs)
        ids = torch.full((len(seqs), width), spec["pad_token_id"], dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, x in enumerate(seqs):
            ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        batches.append((ids, mask))
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).eval()
    with torch.inference_mode():
        model(input_ids=batches[-1][0], attention_mask=batches[-1][1])  # warm-up on the shortest batch
        t0 = time.perf_counter()
        for ids, mask in batches:
            model(input_ids=ids, attention_mask=mask)
        seconds = time.perf_counter() - t0
    tokens = sum(int(m.sum()) for _, m in batches)
    slots = sum(m.numel() for _, m in batches)
    return {"pairs": len(rows), "seconds": seconds, "pairs_per_second": len(rows) / seconds,
            "tokens_per_second": tokens / seconds, "padding": 1 - tokens / slots}


def worker_imports(spec: dict) -> dict:
    """Import what a side's training process imports, and nothing else: the libraries' share of its peak RSS."""
    import importlib

    if spec["side"] == "trl":
        import datasets  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
        from trl import DPOConfig, DPOTrainer  # noqa: F401
    else:
        import accelerate  # noqa: F401
        import pyarrow  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401

        importlib.import_module("dpo.cli")
        try:
            importlib.import_module("dpo.stages.train")  # the stage module, if it still lives there
        except ImportError:
            pass
    return {}


def worker_trl_prepare(spec: dict) -> dict:
    """TRL's own dataset preparation (DPOTrainer._prepare_dataset) of the records; the ids it makes."""
    import types

    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    records = read_jsonl(Path(spec["records"]))
    dataset = Dataset.from_list([{**r, "record": i} for i, r in enumerate(records)])
    args = DPOConfig(output_dir=str(Path(spec["result"]).parent / "trl-prepare"), max_length=spec["max_length"],
                     bf16=False, report_to="none", dataset_num_proc=None)
    t0 = time.perf_counter()
    # _prepare_dataset reads only self._tokenizer: call TRL's own code without building a trainer (no model).
    prepared = DPOTrainer._prepare_dataset(types.SimpleNamespace(_tokenizer=tokenizer), dataset, tokenizer, args,
                                           "train")
    seconds = time.perf_counter() - t0
    rows_path = Path(spec["result"]).parent / "trl-prepared.jsonl"
    write_jsonl(rows_path, prepared.select_columns(["record", "prompt_ids", "chosen_ids", "rejected_ids"]).to_list())
    return {"rows": str(rows_path), "seconds": seconds, "pairs": len(prepared)}


def worker_trl(spec: dict) -> dict:
    """One TRL DPOTrainer run: (a) reference model in memory, (b) precompute_ref_log_probs, or the check."""
    import torch

    torch.set_num_threads(spec["threads"])
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    timings: dict[str, Any] = {"prepare_seconds": 0.0, "precompute_seconds": None, "precompute_pairs": None}
    counts = {"train_tokens": 0, "train_slots": 0, "ref_tokens": 0, "ref_slots": 0}
    sequences: list[list[int]] = []

    class BenchDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            if "prompt_ids" in dataset.column_names:
                return dataset  # pre-tokenized by the bench (the check): exactly dpo's ids
            t0 = time.perf_counter()
            try:
                return super()._prepare_dataset(dataset, *args, **kwargs)
            finally:
                timings["prepare_seconds"] += time.perf_counter() - t0

        def _precompute_ref_logps(self, dataset, name, batch_size):
            t0 = time.perf_counter()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            timings["precompute_seconds"] = time.perf_counter() - t0
            timings["precompute_pairs"] = len(dataset)
            return out

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            timings["train_start"] = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            timings["train_end"] = time.perf_counter()

    def count(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        real = int(mask.sum()) if mask is not None else ids.numel()
        side = "train" if torch.is_grad_enabled() else "ref"  # (b)'s precompute runs the policy without grad
        counts[f"{side}_tokens"] += real
        counts[f"{side}_slots"] += ids.numel()
        if spec.get("record_sequences") and side == "train":
            sequences.extend(ids[i][mask[i].bool()].tolist() for i in range(ids.shape[0]))

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    model.register_forward_pre_hook(count, with_kwargs=True)
    if spec.get("pretokenized"):
        dataset = Dataset.from_list(spec["pretokenized"])
    else:
        dataset = Dataset.from_list(read_jsonl(Path(spec["records"])))
    input_pairs = len(dataset)
    config = DPOConfig(
        output_dir=spec["out"], per_device_train_batch_size=spec["batch_size"], max_steps=spec["steps"],
        learning_rate=spec["learning_rate"], beta=spec["beta"], loss_type=["sigmoid"], max_length=spec["max_length"],
        truncation_mode="keep_start", max_grad_norm=spec["max_grad_norm"], warmup_steps=0, lr_scheduler_type="linear",
        bf16=False, fp16=False, gradient_checkpointing=spec["gradient_checkpointing"], disable_dropout=True,
        precompute_ref_log_probs=spec["mode"] == "b", logging_steps=spec["logging_steps"], save_strategy="no",
        report_to="none", disable_tqdm=True, seed=spec["seed"], dataloader_num_workers=0, use_cpu=True,
    )
    trainer = BenchDPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                              callbacks=[Clock()])
    if spec["mode"] == "b" and trainer.ref_model is not None:
        raise RuntimeError("TRL kept a reference model despite precompute_ref_log_probs=True")
    if spec["mode"] != "b" and trainer.ref_model is None:
        raise RuntimeError("TRL has no reference model in memory in mode (a)")
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {
        **timings, **counts, "sequences": sequences, "input_pairs": input_pairs,
        "prepared_pairs": len(trainer.train_dataset), "steps": trainer.state.global_step,
        "train_seconds": timings["train_end"] - timings["train_start"], "first_log": logs[0] if logs else {},
        "num_tokens_metric": next((h["num_tokens"] for h in reversed(trainer.state.log_history) if "num_tokens" in h),
                                  None),
        "optimizer": type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer).__name__
                     + f" ({config.optim})",
    }


WORKERS = {"matmul": worker_matmul, "bare": worker_bare, "imports": worker_imports, "trl": worker_trl,
           "trl-prepare": worker_trl_prepare}


def run_as_worker(name: str, spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    result = WORKERS[name](spec)
    Path(spec["result"]).write_text(json.dumps(result))


# =============================================================================================
# Report.


def median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def get(d: Any, path: str) -> Any:
    for key in path.split("."):
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def summarize(runs: list[dict], profile: dict) -> dict:
    """Medians over the runs of every reported measure."""
    def med(path: str) -> float | None:
        return median([get(r, path) for r in runs])

    peak = med("matmul.peak_gflops") * 1e9
    out: dict[str, Any] = {"matmul_gflops": med("matmul.peak_gflops"),
                           "matmul_output_layer_gflops": med("matmul.2048x256x50257 (output layer)")}
    for side in ("a", "b"):
        out[side] = {k: med(f"{side}.{k}") for k in (
            "train_tokens_per_second", "train_tokens_per_second_with_ref", "train_padding", "peak_rss_bytes",
            "train_seconds", "prepare_pairs_per_second", "ref_pairs_per_second", "ref_tokens_per_second",
            "ref_padding", "ref_seconds",
            "wall_seconds")}
        out[side]["train_flops_share"] = out[side]["train_tokens_per_second"] * profile["train_flops_per_token"] / peak
        if out[side]["ref_tokens_per_second"] is not None:
            out[side]["ref_flops_share"] = out[side]["ref_tokens_per_second"] * profile["forward_flops_per_token"] / peak
    out["tokenize"] = {k: med(f"c.tokenize.{k}") for k in ("pairs_per_second", "seconds", "wall_seconds")}
    out["bare"] = {k: med(f"bare.{k}") for k in ("pairs_per_second", "tokens_per_second", "padding", "seconds")}
    for variant in ("unpacked", "packed"):
        errors = [get(r, f"c.{variant}.error") for r in runs if get(r, f"c.{variant}.error")]
        if not any(get(r, f"c.{variant}") for r in runs):
            out[variant] = None
            continue
        if errors:
            out[variant] = {"error": errors[0]}
            continue
        v = {"cache_ref": {k: med(f"c.{variant}.cache_ref.{k}") for k in (
                 "pairs_per_second", "tokens_per_second", "padding", "seconds", "peak_rss_bytes")},
             "train": {k: med(f"c.{variant}.train.{k}") for k in (
                 "tokens_per_second", "tokens_per_second_with_ref", "padding", "peak_rss_bytes", "train_seconds",
                 "peak_rss_bytes_self_reported")}}
        v["cache_ref"]["flops_share"] = (v["cache_ref"]["tokens_per_second"] * profile["forward_flops_per_token"] / peak)
        v["train"]["flops_share"] = v["train"]["tokens_per_second"] * profile["train_flops_per_token"] / peak
        breakdowns = [get(r, f"c.{variant}.train.time_breakdown") for r in runs]
        breakdowns = [b for b in breakdowns if isinstance(b, dict)]
        v["train"]["time_breakdown"] = ({k: median([b.get(k) for b in breakdowns]) for k in breakdowns[0]}
                                        if breakdowns else None)
        v["train"]["reported_stats"] = get(runs[-1], f"c.{variant}.train.reported_stats") or {}
        v["cache_ref"]["reported_stats"] = get(runs[-1], f"c.{variant}.cache_ref.reported_stats") or {}
        v["packed_flags"] = {"cache_ref": get(runs[-1], f"c.{variant}.cache_ref.packed"),
                             "train": get(runs[-1], f"c.{variant}.train.packed")}
        out[variant] = v
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def goals(sm: dict) -> list[tuple[str, str, str, bool | None]]:
    """(measure, value, goal, met) rows; dpo's best available variant where the goal says 'packed'."""
    rows = []
    a, b, un, pk = sm["a"], sm["b"], sm["unpacked"], sm.get("packed")
    packed = pk if pk and "error" not in pk else None
    missing = "not available in this dpo" if pk is None else "packed run failed (see RESULTS.md)"

    def row(name, value, goal, target, fmt="{:.2f}x", higher=True):
        met = None if value is None else (value >= target if higher else value <= target)
        rows.append((name, "n/a" if value is None else fmt.format(value), goal, met))

    for label, v in (("unpacked", un), ("packed", packed)):
        if v is None:
            rows.append((f"train / cache-ref model FLOP/s share ({label})", missing, ">= 60%", None))
            continue
        row(f"train model FLOP/s share of fp32 matmul ({label})", v["train"]["flops_share"], ">= 60%", 0.60, "{:.0%}")
        row(f"cache-ref model FLOP/s share of fp32 matmul ({label})", v["cache_ref"]["flops_share"], ">= 60%", 0.60,
            "{:.0%}")
    if packed:
        row("train padding share (packed)", packed["train"]["padding"], "<= 2%", 0.02, "{:.1%}", higher=False)
        row("cache-ref padding share (packed)", packed["cache_ref"]["padding"], "<= 2%", 0.02, "{:.1%}", higher=False)
    else:
        rows.append(("padding share (packed)", missing, "<= 2%", None))
    for label, v in (("unpacked", un), ("packed", packed)):
        if v is None:
            continue
        row(f"train peak RSS / TRL (a) ({label})", ratio(v["train"]["peak_rss_bytes"], a["peak_rss_bytes"]),
            "<= 0.4x", 0.4, higher=False)
        row(f"train real tokens/s incl. reference / TRL (a) ({label})",
            ratio(v["train"]["tokens_per_second_with_ref"], a["train_tokens_per_second_with_ref"]), ">= 10x", 10)
        row(f"train real tokens/s incl. reference / TRL (b) ({label})",
            ratio(v["train"]["tokens_per_second_with_ref"], b["train_tokens_per_second_with_ref"]), ">= 5x", 5)
        row(f"reference pass pairs/s / TRL (b) precompute ({label})",
            ratio(v["cache_ref"]["pairs_per_second"], b["ref_pairs_per_second"]), ">= 5x", 5)
        row(f"reference pass pairs/s / bare inference loop ({label})",
            ratio(v["cache_ref"]["pairs_per_second"], sm["bare"]["pairs_per_second"]), ">= 1.0x", 1.0)
    row("tokenize pairs/s / TRL's preparation", ratio(sm["tokenize"]["pairs_per_second"], a["prepare_pairs_per_second"]),
        ">= 3x", 3)
    return rows


def gib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def num(x: float | None, fmt: str = "{:,.0f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def memory_rows(sm: dict, model: dict, libs: dict) -> list[tuple[str, str, str]]:
    """Where the peak goes: measured libraries, exact weight/gradient/optimizer bytes, the measured rest."""
    p = model["parameters"] * 4
    sides = [("TRL (a)", sm["a"]["peak_rss_bytes"], libs["trl"], 1), ("TRL (b)", sm["b"]["peak_rss_bytes"], libs["trl"], 0)]
    for variant in ("unpacked", "packed"):
        v = sm.get(variant)
        if v and "error" not in v:
            sides.append((f"dpo train ({variant})", v["train"]["peak_rss_bytes"], libs["dpo"], 0))
    rows = []
    for name, peak, lib, ref_copies in sides:
        accounted = lib + p + p + 2 * p + ref_copies * p
        rows.append((name, gib(peak), f"{gib(lib)} libraries + {gib(p)} weights + {gib(p)} gradients + "
                     f"{gib(2 * p)} AdamW state" + (f" + {gib(p)} reference model" if ref_copies else "")
                     + f" + {gib(peak - accounted)} activations, output layer, data and allocator (the rest)"))
    return rows


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "trl", "datasets", "accelerate", "tokenizers", "dpo"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                               cwd=REPO).stdout.strip()
        out["dpo_commit"] = commit + ("+dirty" if dirty else "")
    except OSError:
        out["dpo_commit"] = "unknown"
    return out


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem, "platform": platform.platform(),
            "load_average": os.getloadavg()}


def read_history(path: Path) -> list[dict]:
    if not path.exists():
        return []
    pattern = re.compile(rf"<!-- {HISTORY_TAG} (.*) -->")
    return [json.loads(m.group(1)) for m in pattern.finditer(path.read_text())]


def history_entry(sm: dict, meta: dict) -> dict:
    un, pk = sm["unpacked"], sm.get("packed")
    pk = pk if pk and "error" not in pk else None
    return {
        "date": meta["date"], "dpo_commit": meta["versions"]["dpo_commit"], "cpu": meta["machine"]["cpu"],
        "reduced": not meta["settings"]["full"],
        "train_tokens_per_second": un["train"]["tokens_per_second"],
        "train_tokens_per_second_packed": pk["train"]["tokens_per_second"] if pk else None,
        "train_flops_share": un["train"]["flops_share"], "cache_ref_pairs_per_second": un["cache_ref"]["pairs_per_second"],
        "train_peak_rss_bytes": un["train"]["peak_rss_bytes"],
        "time_breakdown": un["train"]["time_breakdown"] or (pk["train"]["time_breakdown"] if pk else None),
        "trl_a_tokens_per_second": sm["a"]["train_tokens_per_second"], "matmul_gflops": sm["matmul_gflops"],
    }


def render(sm: dict, meta: dict, history: list[dict]) -> str:
    s, model, prof, chk = meta["settings"], meta["model"], meta["profile"], meta["check"]
    a, b, un, pk = sm["a"], sm["b"], sm["unpacked"], sm.get("packed")
    L = []
    add = L.append
    add("# dpo vs TRL: side-by-side benchmark\n")
    add(f"Written by `make bench` (`bench/vs_trl.py`) on {meta['date']}; rerun it to refresh this file, do not edit "
        "it by hand. Goals and method: issue #10, section 3; what is timed on each side: the docstring of "
        "`bench/vs_trl.py`.\n")
    if not s["full"] and s["steps"] == 30 and s["pairs"] is None:
        add(f"> **{s['runs']} run(s), not the median of 3.** 30 steps on every pair as the goals ask, but the "
            "numbers below are those of fewer interleaved runs, so machine noise is not averaged out (three take "
            "2.5 to 4 hours on 2 idle cores).\n")
    elif not s["full"]:
        add(f"> **REDUCED RUN ({s['steps']} steps, {s['runs']} run(s), "
            f"{s['pairs'] or 'all'} pairs): a smoke test of the script, not the measurement.** The goals are "
            "stated for 30 steps, the median of 3 interleaved runs, every pair.\n")
    add("## Machine and versions\n")
    mc = meta["machine"]
    add(f"- CPU: {mc['cpu']}, {mc['cores']} cores, {gib(mc['memory_bytes'])} memory; {mc['platform']}")
    add(f"- load average at start {meta['load_start'][0]:.2f}, at end {mc['load_average'][0]:.2f} "
        "(1 min; above the thread count means other work shared the cores)")
    add(f"- fp32 matmul, {s['threads']} threads: {num(sm['matmul_gflops'], '{:.0f}')} GFLOP/s (median over the runs of "
        f"each run's best of 2048^3, 4096^3, 8192x256x688; the FLOP/s shares below divide by it); output-layer shape "
        f"2048x256x50257: "
        f"{num(sm['matmul_output_layer_gflops'], '{:.0f}')} GFLOP/s")
    add("- " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + "\n")
    add("## Settings\n")
    add(f"- model: Llama, hidden {model['hidden']}, {model['layers']} layers, intermediate {model['intermediate']}, "
        f"{model['heads']} heads, tied embeddings, vocabulary {model['vocab_size']:,} (GPT-2 tokenizer), "
        f"{model['parameters'] / 1e6:.2f}M parameters ({model['body_parameters'] / 1e6:.2f}M body, "
        f"{model['output_layer_parameters'] / 1e6:.2f}M output layer), seed {s['model_seed']}, float32")
    add(f"- data: HH-RLHF harmless test, {prof['pairs']:,} pairs as plain prompt/chosen/rejected strings, "
        f"{prof['tokens']:,} tokens, mean {prof['mean_tokens_per_side']:.0f} tokens per side, label share "
        f"{prof['label_share']:.1%}")
    add(f"- max length {s['max_length']}, batch {s['batch_size']} pairs, learning rate {s['learning_rate']:g}, "
        f"beta {s['beta']}, {s['steps']} steps, max grad norm {s['max_grad_norm']}, no warmup, linear schedule, "
        f"float32, {s['threads']} threads, seed {s['seed']}, dropout off on both sides")
    add(f"- TRL {meta['versions']['trl']}: sigmoid loss, bf16=False, gradient_checkpointing="
        f"{s['trl_gradient_checkpointing']}, optimizer {meta.get('trl_optimizer')}; dpo: torch AdamW")
    add(f"- model FLOPs per real token: train {prof['train_flops_per_token'] / 1e6:.1f} MFLOP, reference forward "
        f"{prof['forward_flops_per_token'] / 1e6:.1f} MFLOP (6/2 x body + 6/2 x output layer x label share + "
        "causal attention)")
    add(f"- runs: {s['runs']}, interleaved (matmul, TRL (a), dpo, TRL (b), bare loop) per run; medians below\n")
    add("## Correctness check (before any timing)\n")
    add(f"One batch of {chk['pairs']} pairs, identical weights; TRL fed dpo's token ids (the ids its training "
        f"forward received were checked: {'identical' if chk['same_token_ids'] else 'DIFFERENT'}).\n")
    add("| step 1 | dpo | TRL | relative difference |")
    add("|---|---|---|---|")
    for k in ("loss", "grad_norm", "logps/chosen", "logps/rejected"):
        add(f"| {k} | {chk['dpo'][k]!r} | {chk['trl'][k]!r} | {chk['relative_difference'].get(k, float('nan')):.2e} |")
    t = chk["tokenization"]
    add(f"\nTRL's own preparation of the same records: {t['identical']:,} of {t['dpo_pairs']:,} pairs give ids "
        f"identical to dpo's (TRL kept {t['trl_pairs']:,}; different: {t['different']}, kept by TRL only: "
        f"{t['kept_by_trl_only']}" + (f"; first difference: {t['first_difference']}" if t["first_difference"] else "")
        + ").\n")
    add("## Goals\n")
    add("| measure | dpo / TRL (medians) | goal | met |")
    add("|---|---|---|---|")
    for name, value, goal, met in goals(sm):
        add(f"| {name} | {value} | {goal} | {'yes' if met else 'no' if met is False else '-'} |")
    add("\n## Measurements (median of the runs)\n")
    add("| | TRL (a) ref in memory | TRL (b) precomputed ref | dpo unpacked | dpo packed |")
    add("|---|---|---|---|---|")

    def dv(path: str, fmt: str = "{:,.0f}", conv=lambda x: x) -> list[str]:
        cells = []
        for v in (un, pk):
            if v is None:
                cells.append("not available in this dpo")
            elif "error" in v:
                cells.append("failed: " + v["error"][:80].replace("|", "/"))
            else:
                x = get(v, path)
                cells.append("n/a" if x is None else fmt.format(conv(x)))
        return cells

    def line(label, trl_a, trl_b, dpo_cells):
        add(f"| {label} | {trl_a} | {trl_b} | " + " | ".join(dpo_cells) + " |")

    line("train real tokens/s", num(a["train_tokens_per_second"]), num(b["train_tokens_per_second"]),
         dv("train.tokens_per_second"))
    line("train real tokens/s, reference included pro rata", num(a["train_tokens_per_second_with_ref"]),
         num(b["train_tokens_per_second_with_ref"]), dv("train.tokens_per_second_with_ref"))
    line("train model FLOP/s share", num(a["train_flops_share"], "{:.0%}"), num(b["train_flops_share"], "{:.0%}"),
         dv("train.flops_share", "{:.0%}"))
    line("train padding share", num(a["train_padding"], "{:.1%}"), num(b["train_padding"], "{:.1%}"),
         dv("train.padding", "{:.1%}"))
    line("train peak RSS", gib(a["peak_rss_bytes"]), gib(b["peak_rss_bytes"]), dv("train.peak_rss_bytes", "{}", gib))
    line("train seconds (timed loop)", num(a["train_seconds"], "{:.1f}"), num(b["train_seconds"], "{:.1f}"),
         dv("train.train_seconds", "{:.1f}"))
    line("reference pass pairs/s (whole data set)", "inside each step", num(b["ref_pairs_per_second"], "{:.2f}"),
         dv("cache_ref.pairs_per_second", "{:.2f}"))
    line("reference pass model FLOP/s share", "-", num(b.get("ref_flops_share"), "{:.0%}"),
         dv("cache_ref.flops_share", "{:.0%}"))
    line("reference pass padding share", "-", num(b["ref_padding"], "{:.1%}"), dv("cache_ref.padding", "{:.1%}"))
    line("reference pass peak RSS", "-", "(within the run above)", dv("cache_ref.peak_rss_bytes", "{}", gib))
    line("tokenize pairs/s", f"{num(a['prepare_pairs_per_second'])} (TRL's preparation)", "-",
         [f"{num(sm['tokenize']['pairs_per_second'])} (dpo tokenize)", "same"])
    add(f"\nBare `model(input_ids, attention_mask)` inference loop over the same pairs: "
        f"{num(sm['bare']['pairs_per_second'], '{:.2f}')} pairs/s ({num(sm['bare']['tokens_per_second'])} tokens/s, "
        f"padding {num(sm['bare']['padding'], '{:.1%}')}).")
    for v, name in ((un, "unpacked"), (pk, "packed")):
        if v and "error" not in v:
            for stage in ("train", "cache_ref"):
                if v[stage]["reported_stats"]:
                    add(f"\ndpo {stage.replace('_', '-')} ({name}) reports itself: {json.dumps(v[stage]['reported_stats'])}")
    add("\n## Memory: where train's peak goes\n")
    add("Libraries: peak RSS of a process that only imports what the side's training process imports (measured); "
        "weights, gradients and AdamW state: 4, 4 and 8 bytes per parameter; the rest is measured peak minus those.\n")
    add("| run | peak RSS | accounted |")
    add("|---|---|---|")
    for name, peak, text in memory_rows(sm, model, meta["libraries"]):
        add(f"| {name} | {peak} | {text} |")
    add("\n## Where the time goes in `dpo train`\n")
    shown = False
    for v, name in ((un, "unpacked"), (pk, "packed")):
        if v and "error" not in v and v["train"]["time_breakdown"]:
            tb = v["train"]["time_breakdown"]
            total = sum(x for x in tb.values() if isinstance(x, (int, float)))
            add(f"{name} (`stats.time_breakdown`, median seconds over the runs):\n")
            add("| phase | seconds | share |")
            add("|---|---|---|")
            for k, x in tb.items():
                add(f"| {k} | {num(x, '{:.2f}')} | {num(x / total if total and x is not None else None, '{:.0%}')} |")
            add("")
            shown = True
    if not shown:
        add("Absent: this dpo's train manifest has no `stats.time_breakdown` (seconds per phase: data, body forward, "
            "output layer, loss, backward, optimizer). The table appears here once `dpo train` reports it.\n")
    add("### History (one row per run of this bench written to this file; before and after each optimisation)\n")
    add("| date | dpo commit | train tok/s (unpacked / packed) | train FLOP/s share | cache-ref pairs/s | "
        "train peak | TRL (a) tok/s | time breakdown (s) |")
    add("|---|---|---|---|---|---|---|---|")
    for h in history:
        tb = h.get("time_breakdown")
        tb_text = ", ".join(f"{k} {v:.1f}" for k, v in tb.items() if isinstance(v, (int, float))) if tb else "absent"
        add(f"| {h['date']}{' (reduced)' if h.get('reduced') else ''} | {h['dpo_commit']} | "
            f"{num(h['train_tokens_per_second'])} / {num(h.get('train_tokens_per_second_packed'))} | "
            f"{num(h['train_flops_share'], '{:.0%}')} | {num(h['cache_ref_pairs_per_second'], '{:.1f}')} | "
            f"{gib(h['train_peak_rss_bytes'])} | {num(h['trl_a_tokens_per_second'])} | {tb_text} |")
    add("\n## Notes on TRL 1.16\n")
    add("- `DPOConfig` defaults to `bf16=True` and `gradient_checkpointing=True`; the bench sets `bf16=False` (float32 "
        "as the issue asks) and gradient checkpointing off unless `--trl-gradient-checkpointing` (dpo does not "
        "recompute the body either).")
    add("- Non-conversational pairs are tokenized as `tok(prompt)` and `tok(prompt + response + eos_token)`; the "
        "completion starts at their common prefix. Truncation (`keep_start`, `max_length`) happens in the collator.")
    add("- Its fused LM head scores only label positions on CUDA/XPU (Triton); on CPU it projects every position, "
        "prompt and padding included (in [4096 x 32768] tiles, never the full logits).")
    add("- `padding_free` is forced off for DPO; batches are random (no length grouping), so padding is high; the "
        "precompute pass runs the data in dataset order.")
    for h in history:
        add(f"<!-- {HISTORY_TAG} {json.dumps(h)} -->")
    return "\n".join(L) + "\n"


def print_summary(sm: dict) -> None:
    say("\nratios dpo / TRL (medians):")
    for name, value, goal, met in goals(sm):
        mark = "ok " if met else "-- " if met is None else "NO "
        say(f"  {mark}{name:<62} {value:>28}   goal {goal}")


# =============================================================================================
# Main: build -> check -> measure -> report.


def say(msg: str) -> None:
    print(msg, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="training steps per run (goal setting: 30)")
    parser.add_argument("--runs", type=int, default=3, help="interleaved runs; medians are reported (goal setting: 3)")
    parser.add_argument("--pairs", type=int, help="use the first N pairs (default: every usable HH harmless pair)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-vs-trl", help="scratch folder")
    parser.add_argument("--results", type=Path,
                        help="report file (default: bench/RESULTS.md for the full run, <out>/RESULTS.md otherwise)")
    parser.add_argument("--quick", action="store_true", help="smoke run: --steps 2 --runs 1 --pairs 64")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens-per-batch", type=int,
                        help="packed runs (default: batch x 2 x mean tokens per side, at least 2 x max length)")
    parser.add_argument("--trl-gradient-checkpointing", action="store_true",
                        help="TRL's own default; off by default so both sides do the same computation")
    parser.add_argument("--render", type=Path, metavar="SUMMARY_JSON",
                        help="only write the report again from a run's summary.json (to --results, else bench/RESULTS.md)")
    parser.add_argument("--tokenize-only", action="store_true",
                        help="measure only dpo tokenize against TRL's preparation (--runs, default 5) and write its "
                             "section of the report")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_as_worker(args.worker, args.spec)
        return
    if args.render:
        rerender(args.render, args.results or RESULTS)
        return
    if args.quick:
        args.steps, args.runs, args.pairs = 2, 1, args.pairs or 64
    if args.tokenize_only and "--runs" not in sys.argv:
        args.runs = 5
    s = Settings(steps=args.steps, runs=args.runs, pairs=args.pairs, threads=args.threads,
                 max_tokens_per_batch=args.max_tokens_per_batch,
                 trl_gradient_checkpointing=args.trl_gradient_checkpointing)
    try:
        import trl  # noqa: F401
    except ImportError:
        sys.exit("TRL is not installed: run `make bench`, or `pip install -e '.[bench]'` (a benchmark-only extra)")
    started = time.perf_counter()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.tokenize_only:
        try:
            tokenize_only(s, out, args.results or RESULTS)
        except BenchError as exc:
            sys.exit(f"bench: {exc}")
        return
    meta: dict[str, Any] = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "load_start": os.getloadavg(),
                            "settings": {**dataclasses.asdict(s), "full": s.full}, "versions": versions()}
    try:
        # ---- build
        say(f"build: model and data in {out}")
        model_dir = out / "model"
        meta["model"] = build_model(model_dir, s)
        pairs = hh_pairs()
        if s.pairs:
            pairs = pairs[: s.pairs]
        records = write_jsonl(out / "pairs.jsonl", pairs)

        # ---- check
        meta["check"] = check(s, out, model_dir, records, len(pairs))
        profile = data_profile(out / "check" / "tokenized-all", meta["model"])
        meta["profile"] = profile
        packing = packing_support(s, profile)
        meta["packing"] = packing
        say(f"  {profile['pairs']} pairs, mean {profile['mean_tokens_per_side']:.0f} tokens per side; packing: "
            + (f"train {' '.join(packing['train'] or ['off'])}, cache-ref {' '.join(packing['cache_ref'] or ['off'])}"
               if packing["available"] else "not available in this dpo"))
        libs = {}
        for side in ("dpo", "trl"):
            _, proc = run_worker("imports", {"side": side}, out / "libraries" / side, s.threads)
            libs[side] = proc.peak_rss_bytes
        meta["libraries"] = libs

        # ---- measure, interleaved
        runs = []
        for r in range(1, s.runs + 1):
            folder = out / f"run-{r}"
            run: dict[str, Any] = {}
            say(f"run {r}/{s.runs}: matmul")
            run["matmul"], _ = run_worker("matmul", {"threads": s.threads}, folder / "matmul", s.threads)
            say(f"run {r}/{s.runs}: TRL (a), reference model in memory")
            run["a"] = measure_trl(s, "a", model_dir, records, folder / "trl-a")
            say(f"run {r}/{s.runs}: dpo tokenize, cache-ref, train")
            run["c"] = measure_dpo(s, model_dir, records, folder / "dpo", packing)
            say(f"run {r}/{s.runs}: TRL (b), precompute_ref_log_probs=True")
            run["b"] = measure_trl(s, "b", model_dir, records, folder / "trl-b")
            say(f"run {r}/{s.runs}: bare inference loop")
            run["bare"], _ = run_worker("bare", {"tokenized": str(folder / "dpo" / "tokenized"), "model": str(model_dir),
                                                 "batch_size": s.batch_size, "threads": s.threads,
                                                 "pad_token_id": 50256}, folder / "bare", s.threads)
            (folder / "measurements.json").write_text(json.dumps(run, indent=1))
            runs.append(run)
            elapsed = time.perf_counter() - started
            say(f"  train real tokens/s: TRL (a) {run['a']['train_tokens_per_second']:.0f}, TRL (b) "
                f"{run['b']['train_tokens_per_second']:.0f}, dpo {run['c']['unpacked']['train']['tokens_per_second']:.0f}"
                f"; reference pairs/s: TRL (b) {run['b']['ref_pairs_per_second']:.2f}, dpo "
                f"{run['c']['unpacked']['cache_ref']['pairs_per_second']:.2f}, bare {run['bare']['pairs_per_second']:.2f}")
            say(f"  {elapsed:.0f}s so far" + (f", about {elapsed / r * (s.runs - r) / 60:.0f} min to go"
                                              if r < s.runs else ""))
        meta["trl_optimizer"] = runs[-1]["a"]["optimizer"]

        # ---- report
        sm = summarize(runs, profile)
        meta["machine"] = machine()
        results = args.results or (RESULTS if s.full else out / "RESULTS.md")
        history = read_history(results) + [history_entry(sm, meta)]
        (out / "summary.json").write_text(json.dumps({"summary": sm, "meta": meta, "runs": runs}, indent=1, default=str))
        results.write_text(with_other_sections(results, render(sm, meta, history)))
        print_summary(sm)
        say(f"\nwrote {results} ({time.perf_counter() - started:.0f}s in all)")
    except BenchError as exc:
        sys.exit(f"bench: {exc}")


def rerender(summary_json: Path, results: Path) -> None:
    """The report of a finished run again, from its summary.json (after a fix to the report's text), with
    its history row added to those ``results`` already has, unless it is there."""
    saved = json.loads(summary_json.read_text())
    sm, meta = saved["summary"], saved["meta"]
    entry = json.loads(json.dumps(history_entry(sm, meta)))
    history = [h for h in read_history(results) if (h["date"], h["dpo_commit"]) != (entry["date"], entry["dpo_commit"])]
    results.write_text(with_other_sections(results, render(sm, meta, history + [entry])))
    print_summary(sm)
    say(f"\nwrote {results} from {summary_json}")


def with_other_sections(results: Path, text: str) -> str:
    """``text`` followed by the sections other benches keep in the same file (bench/scale.py's, marked
    ``<!-- NAME:begin -->`` ... ``<!-- NAME:end -->``), which this report must not erase."""
    old = results.read_text() if results.is_file() else ""
    kept = [m.group(0) for m in re.finditer(r"<!-- (\w+):begin -->.*?<!-- \1:end -->\n?", old, re.S)]
    return "\n".join([text.rstrip("\n") + "\n", *kept])


if __name__ == "__main__":
    main()
