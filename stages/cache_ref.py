"""`dpo cache-ref`: the reference model's log-probs of every chosen and rejected response, once.

DPO-style losses need log pi_ref(y|x) for both responses of every pair. Computing them here,
before training, means `dpo train` never holds a second model nor spends a forward pass on it.

Build: read the tokenized artifact's manifest, identify the model (cheap, or exact with
--verify-model), fingerprint, take the output (rank 0 holds the lock). Run: the pairs of each split are
cut into output shards by row range; in round r rank k computes shard r*W+k; within a shard pairs
are batched by length and scored (pipeline/scoring.py); each shard is committed by an atomic
rename, so a killed or pre-empted run resumes at the first missing shard and a shard's values do
not depend on which rank or which run computed it. Close: rank 0 lists the shards and commits.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from ..artifacts.errors import ArtifactError, DataError, UsageError
from ..artifacts.fingerprint import fingerprint, semantic_config
from ..artifacts.manifest import InputRef, Manifest
from ..artifacts.runner import StageRun, on_main
from ..artifacts.shards import ArtifactReader, committed_shard, shard_bounds, shard_path, write_shard
from ..pipeline import distributed as dist
from ..pipeline.batching import SIDES, forward_batches, pad_token_id, sequence_lengths, take_rows
from ..pipeline.config import StageOptions, at_least, flatten, group, option, validate
from ..pipeline.logprobs import LabelLogProbs
from ..pipeline.logs import progress
from ..pipeline.modeling import DTYPES, check_vocab, load_causal_lm, model_identity
from ..pipeline.refcache import KIND
from ..pipeline.packing import PackingConfig, enable_packing
from ..pipeline.profiling import PhaseTimer, model_flops_per_token
from ..pipeline.scoring import FORWARDS, PairScorer, forward_mode

STAGE = "cache-ref"
# 2: the shared-prefix columns (LD-DPO) joined the layout; a version-1 cache serves every other loss.
VERSION = 2
INPUT_COLUMNS = ["index", "prompt_length"] + [f"{s}_{c}" for s in SIDES for c in ("input_ids", "length")]
SCHEMA = pa.schema([
    ("index", pa.int64()),
    ("chosen_logps", pa.float32()), ("rejected_logps", pa.float32()),
    ("chosen_num_tokens", pa.int32()), ("rejected_num_tokens", pa.int32()),
    # Sums over each pair's first min(chosen, rejected) label tokens: all LD-DPO needs, for any --ld-alpha.
    ("chosen_shared_logps", pa.float32()), ("rejected_shared_logps", pa.float32()),
])
OWNS = ("*/part-*.parquet",)  # what a (partial) run writes besides the manifest
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CacheRefConfig(StageOptions):
    # Where things live and how fast they are computed is not what is computed: not semantic.
    tokenized: str = option(semantic=False, panel="Data", help="Tokenized artifact (from `dpo tokenize`).")
    # The model enters the fingerprint by its identity, not its path.
    model: str = option(semantic=False, panel="Data", help="Reference model: a Hugging Face model folder (for LoRA runs, the base model).")
    out: str = option(semantic=False, panel="Data", help="Output folder for the ref-logps artifact.")
    batch_size: int = option(8, semantic=False, check=at_least(1), panel="Batching", help=(
        "Pairs per forward; batches are formed from pairs of similar length."))
    dtype: str = option("float32", choices=tuple(DTYPES), panel="Model", help=(
        "Weights dtype: float32, bfloat16 or float16 (log-softmax is always float32). Part of the fingerprint."))
    forward: str = option("concatenated", semantic=False, choices=tuple(FORWARDS), panel="Batching", help=(
        "concatenated: chosen and rejected in one forward; separate: two forwards, less peak memory; packed: see "
        "--packing. Same values."))
    batching: PackingConfig = group(PackingConfig)
    splits: tuple[str, ...] = option((), flag="--split", panel="Data", help=(
        "Split to compute (repeatable); default: every split of --tokenized."))
    # Checks the full sha256; the sampled identity is what is fingerprinted.
    verify_model: bool = option(False, semantic=False, panel="Model", help=(
        "Identify the model by the full sha256 of its weight files (reads them all) instead of a sampled identity; "
        "a finished cache is checked against it."))
    rows_per_shard: int = option(2048, check=at_least(1), panel="Data", help=(
        "Pairs per output shard: the unit of resumption and of work per process."))


@dataclasses.dataclass(frozen=True)
class ShardTask:
    split: str
    path: str  # relative to --out
    start: int  # row range [start, stop) of the split, in the tokenized artifact's order
    stop: int


# ---------------------------------------------------------------------------------------- build


def run(config: CacheRefConfig) -> None:
    validate(config)
    dist.init()
    try:
        _run(config)
    finally:
        dist.close()


def _run(config: CacheRefConfig) -> None:
    started = time.perf_counter()
    tokenized = ArtifactReader(config.tokenized, kind="tokenized", verify=config.verify_inputs, in_background=True)
    config = dataclasses.replace(config, splits=_resolve_splits(config, tokenized))
    info = tokenized.manifest.stats.get("tokenizer_info") or {}
    check_vocab(config.model, config.tokenized, tokenized.manifest)
    collective = dist.COLLECTIVE
    identity = on_main(collective, lambda: model_identity(config.model, exact=config.verify_model))
    # The sampled identity is the key whether or not --verify-model hashed the weights in full, so
    # adding --verify-model to a finished cache checks it (below) instead of asking to recompute it.
    fp = fingerprint(STAGE, VERSION, {**semantic_config(config), "model_identity": identity["sampled_digest"]},
                     [tokenized.fingerprint])

    with StageRun(STAGE, config.out, KIND, fp, overwrite=config.overwrite, lock_timeout=config.lock_timeout,
                  collective=collective, inputs=[("--tokenized", config.tokenized), ("--model", config.model)],
                  owns=OWNS) as run:
        if run.complete:
            if run.is_main:
                _check_verified(run.manifest, identity, config.out)
            return
        plan = _plan(tokenized, config.splits, config.rows_per_shard)
        local = _compute(config, tokenized, plan, run, info)
        ranks = dist.COLLECTIVE.gather(local)
        if run.stop_requested():
            done = sum(r["shards_committed"] for r in ranks)
            raise run.preempted(f"after committing {done} of {len(plan)} shards in {config.out}")
        manifest = _manifest(config, tokenized, fp, identity, plan, ranks, run.dir, started) if run.is_main else None
        run.commit(manifest)
        if manifest is not None:
            _report(Path(config.out), manifest)


def _check_verified(manifest: Manifest, identity: dict, out: str) -> None:
    """With --verify-model, a complete cache must have been made from weights with the same full sha256."""
    if not identity.get("exact"):
        return
    recorded = manifest.stats.get("model_identity", {}).get("sha256_digest")
    if recorded is None:
        log.warning("%s was made without --verify-model: its model matches by sampled identity, but there is no full "
                    "sha256 recorded to compare the weights with", out)
    elif recorded != identity["sha256_digest"]:
        raise ArtifactError(
            f"{out} was computed from weights whose sha256 ({recorded}) differs from the --model's "
            f"({identity['sha256_digest']}), though they agree on the sampled identity: rerun with --overwrite"
        )


def _resolve_splits(config: CacheRefConfig, tokenized: ArtifactReader) -> tuple[str, ...]:
    available = tokenized.splits
    if not config.splits:
        return tuple(available)
    unknown = [s for s in config.splits if s not in available]
    if unknown:
        raise UsageError(
            f"--split {', '.join(unknown)}: {config.tokenized} has no such split (it has {', '.join(available)})"
        )
    return tuple(dict.fromkeys(config.splits))


def _plan(tokenized: ArtifactReader, splits: tuple[str, ...], rows_per_shard: int) -> list[ShardTask]:
    plan = []
    for split in splits:
        bounds = shard_bounds(tokenized.manifest.rows(split), rows_per_shard)
        plan.extend(ShardTask(split, shard_path(split, k, len(bounds)), a, b) for k, (a, b) in enumerate(bounds))
    return plan


# ------------------------------------------------------------------------------------------ run


def _read_rows(tokenized: ArtifactReader, split: str, start: int, stop: int) -> pa.Table:
    """Rows [start, stop) of a split, reading only the files that hold them."""
    pieces, offset = [], 0
    for entry in tokenized.manifest.files_of(split):
        if not entry.path.endswith(".parquet"):
            continue
        rows = entry.rows or 0
        lo, hi = max(start, offset), min(stop, offset + rows)
        if lo < hi:
            pieces.append(tokenized.read_file(entry, INPUT_COLUMNS).slice(lo - offset, hi - lo))
        offset += rows
    if not pieces:
        return pa.table({name: pa.array([], type=pa.int64()) for name in INPUT_COLUMNS}).select(INPUT_COLUMNS)
    return pa.concat_tables(pieces)


def _check_ids(table: pa.Table, task: ShardTask, vocab: int, root: Path) -> None:
    if table.num_rows == 0:
        return
    for side in SIDES:
        column = table.column(f"{side}_input_ids")
        flat = pc.list_flatten(column)
        if len(flat) == 0:
            continue
        lo, hi = pc.min_max(flat).values()
        if lo.as_py() >= 0 and hi.as_py() < vocab:
            continue
        for index, ids in zip(table.column("index").to_pylist(), column.to_pylist()):
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise DataError(
                    f"{root}: split {task.split!r}, pair index {index}: {side}_input_ids holds token id {bad[0]}, "
                    f"outside the model's vocabulary of {vocab}"
                )


class _Reference:
    """The reference model on this rank's device, loaded on first use (a resumed run may need none)."""

    def __init__(self, config: CacheRefConfig, pad_token_id: int):
        self.config = config
        self.pad_token_id = pad_token_id
        self.scorer: PairScorer | None = None
        self.module: LabelLogProbs | None = None
        self.vocab = 0
        self.load_seconds = 0.0
        self.timer = PhaseTimer(dist.device())

    def load(self) -> PairScorer:
        if self.scorer is None:
            t0 = time.perf_counter()
            device = dist.device()
            model = load_causal_lm(self.config.model, self.config.dtype, device=device)
            if self.config.batching.packing:
                enable_packing(model)
            self.module = LabelLogProbs(model)
            self.vocab = self.module.vocab_size()
            mode = forward_mode(self.config.forward, self.config.batching.packing)
            self.scorer = PairScorer(self.module, mode, self.pad_token_id, device, with_shared=True)
            self.scorer.timer = self.module.timer = self.timer
            self.load_seconds = time.perf_counter() - t0
        return self.scorer


def _compute(config: CacheRefConfig, tokenized: ArtifactReader, plan: list[ShardTask], run: StageRun,
             info: dict) -> dict:
    """Score and commit this rank's uncommitted shards; returns this rank's stats.

    Ranks work in rounds of one shard each and ask after every round whether any rank was told to
    stop (a collective, so every rank asks as often); a stop signal also abandons the shard being
    scored after its current batch, so the stop comes within one batch.
    """
    out, world, rank = run.dir, dist.world_size(), dist.rank()
    reference = _Reference(config, pad_token_id({"tokenizer_info": info}))
    stats = {"shards_computed": 0, "shards_resumed": 0, "shards_committed": 0, "pairs": 0, "tokens": 0,
             "padded_tokens": 0, "label_tokens": 0, "compute_seconds": 0.0, "load_seconds": 0.0,
             "read_seconds": 0.0, "write_seconds": 0.0, "model_flops": 0.0}
    mine = plan[rank::world]
    todo = [t for t in mine if committed_shard(out, t.path) is None]
    stats["shards_resumed"] = stats["shards_committed"] = len(mine) - len(todo)
    desc = "cache-ref" if world == 1 else f"cache-ref (rank 0's shards of {world})"
    bar = progress(sum(t.stop - t.start for t in todo), desc=desc, unit="pairs", quiet=config.quiet, logger=log)
    with bar:
        for round_ in range(math.ceil(len(plan) / world)):
            task = plan[round_ * world + rank] if round_ * world + rank < len(plan) else None
            if task in todo and not run.signalled:
                _compute_shard(config, tokenized, task, reference, stats, run, bar)
            if run.stop_requested():
                break
    stats["load_seconds"] = reference.load_seconds
    return {**stats, "time_breakdown": reference.timer.breakdown()}


def _compute_shard(config: CacheRefConfig, tokenized: ArtifactReader, task: ShardTask, reference: _Reference,
                   stats: dict, run: StageRun, bar) -> None:
    scorer = reference.load()  # first: the inputs' sha256 check runs on meanwhile (the read below waits for it)
    t0 = time.perf_counter()
    table = _read_rows(tokenized, task.split, task.start, task.stop)
    stats["read_seconds"] += time.perf_counter() - t0
    _check_ids(table, task, reference.vocab, tokenized.root)
    t0 = time.perf_counter()
    scored = _score_table(scorer, table, config, bar, run)
    if scored is None:
        return  # stopped mid-shard: nothing of it is committed, the rerun scores it again
    result, shard_stats = scored
    if scorer.device.type == "cuda":
        torch.cuda.synchronize(scorer.device)
    stats["compute_seconds"] += time.perf_counter() - t0
    for key, value in shard_stats.items():
        stats[key] += value
    flops = model_flops_per_token(reference.module.hf_model, *sequence_lengths(table), backward=False)
    stats["model_flops"] += flops["model_flops_per_token"] * shard_stats["tokens"]
    t0 = time.perf_counter()
    write_shard(run.dir, task.path, result)
    stats["write_seconds"] += time.perf_counter() - t0
    stats["shards_computed"] += 1
    stats["shards_committed"] += 1
    log.debug("committed %s (%d pairs)", task.path, result.num_rows)


@torch.no_grad()
def _score_table(scorer: PairScorer, table: pa.Table, config: CacheRefConfig, bar,
                 run: StageRun) -> tuple[pa.Table, dict] | None:
    n = table.num_rows
    out = {name: np.zeros(n, dtype=SCHEMA.field(name).type.to_pandas_dtype()) for name in SCHEMA.names[1:]}
    padded = 0
    for positions in forward_batches(table, config.batch_size, config.batching.max_tokens_per_batch):
        if run.signalled:
            return None
        with scorer.timer.step():
            scores = scorer(take_rows(table, positions))
            with scorer.timer.phase("results"):
                for side, values in (("chosen", scores.chosen), ("rejected", scores.rejected)):
                    out[f"{side}_logps"][positions] = values.logps.float().cpu().numpy()
                    out[f"{side}_num_tokens"][positions] = values.num_tokens.cpu().numpy()
                    out[f"{side}_shared_logps"][positions] = values.shared_logps.float().cpu().numpy()
        padded += scores.slots
        bar.update(len(positions))
    result = pa.table({"index": table.column("index").combine_chunks().cast(pa.int64()), **out}, schema=SCHEMA)
    tokens = int(sum(pc.sum(table.column(f"{side}_length")).as_py() or 0 for side in SIDES))
    label_tokens = int(out["chosen_num_tokens"].sum() + out["rejected_num_tokens"].sum())
    return result, {"pairs": n, "tokens": tokens, "padded_tokens": int(padded), "label_tokens": label_tokens}


# ---------------------------------------------------------------------------------------- close


def _manifest(config: CacheRefConfig, tokenized: ArtifactReader, fp: str, identity: dict, plan: list[ShardTask],
              ranks: list[dict], out: Path, started: float) -> Manifest:
    entries = []
    for task in plan:
        entry = committed_shard(out, task.path)
        if entry is None:
            raise ArtifactError(f"{out}: shard {task.path} is missing after all ranks finished; rerun to compute it")
        entries.append(entry)
    per_split = {}
    for split in config.splits:
        table = pa.concat_tables([pq.read_table(out / e.path) for e in entries if e.split == split])
        per_split[split] = {
            "pairs": table.num_rows,
            **{f"mean_{name}": _mean(table.column(name)) for name in SCHEMA.names[1:]},
        }
    total = {key: sum(r[key] for r in ranks) for key in ranks[0] if key != "time_breakdown"}
    compute = max(r["compute_seconds"] for r in ranks)
    stats = {
        "model_identity": identity,
        "splits": per_split,
        "world_size": len(ranks),
        "shards": {"total": len(plan), "computed": total["shards_computed"], "resumed": total["shards_resumed"]},
        "pairs_computed": total["pairs"],
        "tokens": total["tokens"],
        "label_tokens": total["label_tokens"],
        "padded_tokens": total["padded_tokens"],
        "padding_fraction": 1 - total["tokens"] / total["padded_tokens"] if total["padded_tokens"] else None,
        "tokens_per_second": total["tokens"] / compute if compute else None,
        "pairs_per_second": total["pairs"] / compute if compute else None,
        "seconds": {"load_model": max(r["load_seconds"] for r in ranks), "compute": compute,
                    "read": max(r["read_seconds"] for r in ranks), "write": max(r["write_seconds"] for r in ranks),
                    "total": time.perf_counter() - started},
        # Rank 0's batches: collate, body forward, output layer, results back to the host.
        "time_breakdown": ranks[0]["time_breakdown"],
        "model_flops_per_token": total["model_flops"] / total["tokens"] if total["tokens"] else None,
        "model_flops_per_second": total["model_flops"] / compute if compute else None,
        "device": str(dist.device()),
    }
    return Manifest(
        kind=KIND,
        fingerprint=fp,
        config={**flatten(config), "identity": "sha256" if config.verify_model else "sampled"},
        inputs=[InputRef(kind="tokenized", path=str(config.tokenized), fingerprint=tokenized.fingerprint)],
        files=entries,
        stats=stats,
    )


def _mean(column: pa.ChunkedArray) -> float | None:
    value = pc.mean(column).as_py()
    return float(value) if value is not None else None


def _report(out: Path, manifest: Manifest) -> None:
    s = manifest.stats
    if s["tokens_per_second"] is None:
        log.info("%s: complete (every shard was already committed), fingerprint %s", out, manifest.fingerprint)
        return
    log.info(
        "%s: %d pairs scored in %.1fs on %d process(es): %.0f tokens/s, padding %.1f%%, fingerprint %s",
        out, s["pairs_computed"], s["seconds"]["compute"], s["world_size"], s["tokens_per_second"],
        100 * (s["padding_fraction"] or 0), manifest.fingerprint,
    )
