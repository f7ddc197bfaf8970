"""`dpo cache-ref`: the reference model's log-probs of every chosen and rejected response, once.

DPO-style losses need log pi_ref(y|x) for both responses of every pair. Computing them here,
before training, means `dpo train` never holds a second model nor spends a forward pass on it.

Build: read the tokenized artifact's manifest, identify the model (cheap, or exact with
--verify), fingerprint, take the output (rank 0 holds the lock). Run: the pairs of each split are
cut into output shards by row range; rank r computes shards r, r+W, ...; within a shard pairs are
batched by length and scored by LabelLogProbs; each shard is committed by an atomic rename, so a
killed run resumes at the first missing shard and a shard's values do not depend on which rank or
which run computed it. Close: after a barrier, rank 0 lists the shards and writes the manifest.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from ..artifacts.fingerprint import fingerprint, semantic_config
from ..artifacts.lock import ArtifactLock
from ..artifacts.manifest import InputRef, Manifest, read_manifest
from ..artifacts.output import OutputState, commit_output, prepare_output, say_complete
from ..artifacts.shards import ArtifactReader, committed_shard, shard_bounds, shard_path, write_shard
from ..pipeline import distributed as dist
from ..pipeline.batching import SIDES, collate_pairs, length_grouped_batches, pad_token_id
from ..pipeline.errors import ArtifactError, DataError, UsageError
from ..pipeline.logprobs import LabelLogProbs
from ..pipeline.logs import progress
from ..pipeline.modeling import DTYPES, load_causal_lm, model_identity
from ..pipeline.refcache import KIND

STAGE = "cache-ref"
VERSION = 1
FORWARDS = ("concatenated", "separate")
INPUT_COLUMNS = ["index"] + [f"{s}_{c}" for s in SIDES for c in ("input_ids", "labels")]
SCHEMA = pa.schema([
    ("index", pa.int64()),
    ("chosen_logps", pa.float32()), ("rejected_logps", pa.float32()),
    ("chosen_num_tokens", pa.int32()), ("rejected_num_tokens", pa.int32()),
])
log = logging.getLogger(__name__)

PLUMBING = {"semantic": False}  # where things live and how fast they are computed: not what is computed


@dataclasses.dataclass(frozen=True)
class CacheRefConfig:
    tokenized: str = field(metadata=PLUMBING)
    model: str = field(metadata=PLUMBING)  # the model enters the fingerprint by its identity, not its path
    out: str = field(metadata=PLUMBING)
    batch_size: int = field(default=8, metadata=PLUMBING)
    dtype: str = "float32"
    forward: str = field(default="concatenated", metadata=PLUMBING)  # both give the same values
    splits: tuple[str, ...] = ()  # empty: every split of the tokenized artifact
    verify: bool = field(default=False, metadata=PLUMBING)  # checks the full sha256; the sampled one is fingerprinted
    rows_per_shard: int = 2048
    overwrite: bool = field(default=False, metadata=PLUMBING)
    lock_timeout: float = field(default=600.0, metadata=PLUMBING)
    quiet: bool = field(default=False, metadata=PLUMBING)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.forward not in FORWARDS:
            raise UsageError(f"--forward must be one of {', '.join(FORWARDS)}, not {self.forward!r}")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, not {self.batch_size}")
        if self.rows_per_shard < 1:
            raise UsageError(f"--rows-per-shard must be >= 1, not {self.rows_per_shard}")


@dataclasses.dataclass(frozen=True)
class ShardTask:
    split: str
    path: str  # relative to --out
    start: int  # row range [start, stop) of the split, in the tokenized artifact's order
    stop: int


def run(config: CacheRefConfig) -> None:
    distributed = dist.init()
    try:
        _run(config, distributed)
    finally:
        dist.close()


def _run(config: CacheRefConfig, distributed: bool) -> None:
    started = time.perf_counter()
    out = Path(config.out)
    tokenized = ArtifactReader(config.tokenized, kind="tokenized")
    splits = _resolve_splits(config, tokenized)
    config = dataclasses.replace(config, splits=splits)
    info = tokenized.manifest.stats.get("tokenizer_info") or {}
    _check_vocab(config, info)
    identity = dist.on_main(lambda: model_identity(config.model, exact=config.verify))
    # The sampled identity is the key whether or not --verify hashed the weights in full, so adding
    # --verify to a finished cache checks it (below) instead of asking to recompute it.
    fp = fingerprint(STAGE, VERSION, {**semantic_config(config), "model_identity": identity["sampled_digest"]},
                     [tokenized.fingerprint])

    lock = ArtifactLock(out, config.lock_timeout)
    state = dist.on_main(lambda: _take_output(lock, out, fp, config.overwrite))
    try:
        if state is OutputState.COMPLETE:
            if dist.is_main():
                _check_verified(out, identity)
                say_complete(out, KIND, fp)
            return
        if state is OutputState.RESUME:
            log.info("resuming %s from its committed shards", out)
        plan = _plan(tokenized, splits, config.rows_per_shard)
        mine = plan[dist.rank()::dist.world_size()]
        local = _compute(config, tokenized, mine, out, info)
        dist.barrier()
        gathered = dist.all_gather_object(local)
        if dist.is_main():
            manifest = _manifest(config, tokenized, fp, identity, plan, out, gathered, started)
            commit_output(out, manifest)
            _report(out, manifest)
        dist.barrier()  # no rank reports success before the artifact exists
    finally:
        if dist.is_main():
            lock.release()


def _check_verified(out: Path, identity: dict) -> None:
    """With --verify, a complete cache must have been made from weights with the same full sha256."""
    if not identity.get("exact"):
        return
    recorded = read_manifest(out).stats.get("model_identity", {}).get("sha256_digest")
    if recorded is None:
        log.warning("%s was made without --verify: its model matches by sampled identity, but there is no full "
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


def _check_vocab(config: CacheRefConfig, info: dict) -> None:
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(config.model)
    except (OSError, ValueError) as exc:
        raise UsageError(f"model {config.model}: cannot read its config: {exc}") from None
    model_vocab = model_config.get_text_config().vocab_size
    tokenizer_vocab = info.get("vocab_size")
    if tokenizer_vocab is not None and tokenizer_vocab > model_vocab:
        raise UsageError(
            f"model {config.model} has a vocabulary of {model_vocab} tokens, but {config.tokenized} was tokenized "
            f"with a tokenizer of {tokenizer_vocab} (ids up to {tokenizer_vocab - 1}): this is not the model those "
            "tokens were made for. Tokenize with the model's own tokenizer"
        )


def _take_output(lock: ArtifactLock, out: Path, fp: str, overwrite: bool) -> OutputState:
    lock.acquire()
    try:
        return prepare_output(out, KIND, fp, overwrite)
    except BaseException:
        lock.release()
        raise


def _plan(tokenized: ArtifactReader, splits: tuple[str, ...], rows_per_shard: int) -> list[ShardTask]:
    plan = []
    for split in splits:
        bounds = shard_bounds(tokenized.manifest.rows(split), rows_per_shard)
        plan.extend(ShardTask(split, shard_path(split, k, len(bounds)), a, b) for k, (a, b) in enumerate(bounds))
    return plan


def _read_rows(tokenized: ArtifactReader, split: str, start: int, stop: int) -> pa.Table:
    """Rows [start, stop) of a split, reading only the files that hold them."""
    pieces, offset = [], 0
    for entry in tokenized.manifest.files_of(split):
        if not entry.path.endswith(".parquet"):
            continue
        rows = entry.rows or 0
        lo, hi = max(start, offset), min(stop, offset + rows)
        if lo < hi:
            table = pq.read_table(tokenized.root / entry.path, columns=INPUT_COLUMNS)
            if table.num_rows != rows:
                raise ArtifactError(f"{tokenized.root}: {entry.path} has {table.num_rows} rows, the manifest says {rows}")
            pieces.append(table.slice(lo - offset, hi - lo))
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


class _Scorer:
    """The reference model on this rank's device, loaded on first use (a resumed run may need none)."""

    def __init__(self, config: CacheRefConfig, pad_token_id: int):
        self.config = config
        self.pad_token_id = pad_token_id
        self.device = dist.device()
        self.module: LabelLogProbs | None = None
        self.vocab = 0
        self.load_seconds = 0.0

    def load(self) -> None:
        if self.module is None:
            t0 = time.perf_counter()
            model = load_causal_lm(self.config.model, self.config.dtype, device=self.device)
            self.module = LabelLogProbs(model)
            self.vocab = self.module.vocab_size()
            self.load_seconds = time.perf_counter() - t0

    @torch.no_grad()
    def score(self, rows: list[dict]) -> tuple[dict[str, torch.Tensor], int]:
        """Logps and label counts per side for a batch of pairs, and the padded token count."""
        batch = collate_pairs(rows, self.pad_token_id, self.config.forward)
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        n = len(rows)
        if self.config.forward == "concatenated":
            res = self.module(batch["input_ids"], batch["attention_mask"], batch["labels"])
            parts = {"chosen": (res.logps[:n], res.num_tokens[:n]), "rejected": (res.logps[n:], res.num_tokens[n:])}
            padded = batch["input_ids"].numel()
        else:
            parts, padded = {}, 0
            for side in SIDES:
                res = self.module(batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"], batch[f"{side}_labels"])
                parts[side] = (res.logps, res.num_tokens)
                padded += batch[f"{side}_input_ids"].numel()
        values = {}
        for side, (logps, counts) in parts.items():
            values[f"{side}_logps"] = logps.float().cpu()
            values[f"{side}_num_tokens"] = counts.cpu()
        return values, padded


def _compute(config: CacheRefConfig, tokenized: ArtifactReader, tasks: list[ShardTask], out: Path,
             info: dict) -> dict:
    """Score and commit this rank's shards that no earlier run committed; returns this rank's stats."""
    scorer = _Scorer(config, pad_token_id({"tokenizer_info": info}))
    todo = [t for t in tasks if committed_shard(out, t.path) is None]
    stats = {"shards_computed": len(todo), "shards_resumed": len(tasks) - len(todo), "pairs": 0, "tokens": 0,
             "padded_tokens": 0, "label_tokens": 0, "compute_seconds": 0.0, "load_seconds": 0.0}
    if not todo:
        return stats
    scorer.load()
    stats["load_seconds"] = scorer.load_seconds
    bar = progress(sum(t.stop - t.start for t in todo), desc="cache-ref", unit="pairs",
                   quiet=config.quiet)
    with bar:
        for task in todo:
            table = _read_rows(tokenized, task.split, task.start, task.stop)
            _check_ids(table, task, scorer.vocab, tokenized.root)
            t0 = time.perf_counter()
            result, shard_stats = _score_table(scorer, table, config.batch_size, bar)
            if scorer.device.type == "cuda":
                torch.cuda.synchronize(scorer.device)
            stats["compute_seconds"] += time.perf_counter() - t0
            for key, value in shard_stats.items():
                stats[key] += value
            write_shard(out, task.path, result)
            log.debug("committed %s (%d pairs)", task.path, result.num_rows)
    return stats


def _score_table(scorer: _Scorer, table: pa.Table, batch_size: int, bar) -> tuple[pa.Table, dict]:
    columns = {name: table.column(name).to_numpy(zero_copy_only=False) for name in INPUT_COLUMNS}
    n = table.num_rows
    lengths = {s: np.array([len(x) for x in columns[f"{s}_input_ids"]], dtype=np.int64) for s in SIDES}
    label_counts = np.zeros(n, dtype=np.int64)
    out = {name: np.zeros(n, dtype=SCHEMA.field(name).type.to_pandas_dtype()) for name in SCHEMA.names[1:]}
    padded = 0
    key = np.maximum(lengths["chosen"], lengths["rejected"])
    for positions in length_grouped_batches(key, batch_size):
        rows = [{name: columns[name][i] for name in INPUT_COLUMNS} for i in positions]
        values, batch_padded = scorer.score(rows)
        padded += batch_padded
        for name, tensor in values.items():
            out[name][positions] = tensor.numpy()
        bar.update(len(positions))
    for side in SIDES:
        label_counts += out[f"{side}_num_tokens"]
    result = pa.table({"index": columns["index"].astype(np.int64), **out}, schema=SCHEMA)
    stats = {"pairs": n, "tokens": int(lengths["chosen"].sum() + lengths["rejected"].sum()),
             "padded_tokens": int(padded), "label_tokens": int(label_counts.sum())}
    return result, stats


def _manifest(config: CacheRefConfig, tokenized: ArtifactReader, fp: str, identity: dict, plan: list[ShardTask],
              out: Path, ranks: list[dict], started: float) -> Manifest:
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
    total = {key: sum(r[key] for r in ranks) for key in ranks[0]}
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
                    "total": time.perf_counter() - started},
        "device": str(dist.device()),
    }
    return Manifest(
        kind=KIND,
        fingerprint=fp,
        config={**dataclasses.asdict(config), "splits": list(config.splits), "identity": "sha256" if config.verify else "sampled"},
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
