"""`dpo tokenize`: preference data -> a tokenized artifact (kind "tokenized").

build: resolve the sources, load the tokenizer, fingerprint the run (data content + tokenizer
content + semantic config), take the output's lock.
run:   read every source, sample it (``PATH:AMOUNT``), assign the eval split, normalise each record
       to a Pair (malformed records stop the run here, before any shard is written, unless
       ``--on-bad-record skip``), then tokenize shard by shard, each shard in chunks spread over
       ``--num-proc`` processes and reassembled in order, so the bytes never depend on N.
close: derive the stats from the committed shards and per-shard reject lists, write
       ``rejects.jsonl`` and the manifest last.

Shards cover fixed ranges of input records (``--rows-per-shard`` before filtering), so their
names and contents are known before any filtering happens; a shard's ``index`` values start where
the previous shard's rows end. A shard and its reject list are committed together (reject list
first, then the shard's atomic rename), so a run killed at any point resumes at the first
uncommitted shard and produces the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..artifacts.errors import DataError, DpoError, UsageError
from ..artifacts.fingerprint import fingerprint, sha256_file
from ..artifacts.fingerprint import semantic_config as _semantic_options
from ..artifacts.manifest import FileEntry, InputRef, Manifest, write_json_atomic, write_text_atomic
from ..artifacts.runner import StageRun
from ..artifacts.shards import committed_shard, file_entry, shard_bounds, shard_path, write_shard
from ..pipeline.config import StageOptions, at_least, flatten, fraction, option, validate
from ..pipeline.formats import CHAT_FORMATS, FORMATS, Drop, FieldError, Pair, apply_columns, detect_format, normalise, parse_columns
from ..pipeline.logs import progress
from ..pipeline.sources import Record, Source, pick_fraction, resolve_source, sample_rows
from ..pipeline.tokenization import (
    IGNORE_INDEX, PROMPT_TRUNCATION_MODES, TRUNCATION_MODES, EncodeSettings, PairEncoder, PrefixMismatch,
    data_loss_warnings,
    read_template_file, tokenizer_fingerprint, tokenizer_info,
)

STAGE = "tokenize"
TOKENIZE_VERSION = 1
KIND = "tokenized"
REJECTS = "rejects.jsonl"
REJECT_PARTS = ".rejects"  # per-shard reject lists, merged into rejects.jsonl at commit
OWNS = ("*/part-*.parquet", REJECT_PARTS + "/", REJECTS)  # what a (partial) run writes besides the manifest
CHUNK_PAIRS = 256  # pairs per task handed to a worker process
BAD_RECORD_MODES = ("error", "skip")
log = logging.getLogger("dpo.tokenize")

SCHEMA = pa.schema([
    ("index", pa.int64()),
    ("source", pa.string()),
    ("chosen_input_ids", pa.list_(pa.int32())),
    ("chosen_labels", pa.list_(pa.int32())),
    ("rejected_input_ids", pa.list_(pa.int32())),
    ("rejected_labels", pa.list_(pa.int32())),
    ("prompt_length", pa.int32()),
    ("chosen_length", pa.int32()),
    ("rejected_length", pa.int32()),
])


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenizeConfig(StageOptions):
    # Sources enter the fingerprint as (split, amount, content hash): the same data found at another
    # path or from another working directory (a requeued job) is the same artifact. A hub dataset's or
    # a DatasetDict's content hash covers its config and split.
    data: tuple[str, ...] = option(semantic=False, panel="Data", help=(
        "Preference data (repeatable), NAME[#[CONFIG/]SPLIT][:AMOUNT]: a .jsonl/.jsonl.gz/.json/.parquet file or "
        "folder, a datasets.save_to_disk folder, or a hub name. #SPLIT picks a split of a hub dataset or a saved "
        "DatasetDict (default train), #CONFIG/SPLIT a hub config too (org/name#test_prefs, allenai/ai2_arc#ARC-Easy/"
        "test). :0.5 takes a fraction, :1000 a row count (sampled with --seed)."))
    tokenizer: str = option(semantic=False, panel="Data", help=(  # its content fingerprint is an input
        "Tokenizer folder (a model folder works)."))
    out: str = option(semantic=False, panel="Data", help="Output folder of the tokenized artifact.")
    eval_data: tuple[str, ...] = option((), semantic=False, panel="Data", help=(
        "Sources for the eval split (repeatable, same syntax as --data). A hub dataset or DatasetDict without "
        "#SPLIT gives its one test-like split (test, validation, ...); never train."))
    eval_fraction: float = option(0.0, check=fraction(), panel="Data", help=(
        "Hold out this fraction of the --data records (seeded, before filtering) as the eval split."))
    # Not semantic: it changes nothing when no --eval-data pair is also a train pair, and when some
    # are, the run without it refuses (it makes no artifact), so no two artifacts ever differ by it.
    # It is a permission, like --overwrite, not part of what is computed.
    allow_overlap: bool = option(False, semantic=False, panel="Data", help=(
        "Allow --eval-data pairs that are also train pairs (same prompt, chosen and rejected); refused by default."))
    max_seq_length: int = option(1024, check=at_least(2), panel="Tokenization", help=(
        "Most tokens in prompt+response, per side."))
    # Default half, as TRL's DPOConfig (512 of 1024): a long prompt must not fill --max-seq-length and
    # leave the responses no tokens (the pair would be dropped).
    max_prompt_length: int | None = option(None, check=at_least(0), panel="Tokenization", help=(
        "Most prompt tokens; a longer prompt is cut from the left as --prompt-truncation says, keeping its "
        "latest turns (default: half of --max-seq-length; 0: no limit)."))
    prompt_truncation: str = option("turns", choices=PROMPT_TRUNCATION_MODES, panel="Tokenization", help=(
        "How a prompt over --max-prompt-length is cut: turns (leave out its earliest whole turns, chat messages "
        "or HH '\\n\\nHuman:' turns, keeping any system message; a prompt without turns, or whose last turn alone "
        "is too long, keeps its latest tokens) or tokens (keep its latest tokens)."))
    truncation: str = option("keep-start", choices=TRUNCATION_MODES, panel="Tokenization", help=(
        "Pairs over --max-seq-length: keep-start (keep the prompt and the start of the responses) or drop."))
    format: str = option("auto", choices=FORMATS, panel="Data", help=(
        "Record format: auto (detect per source), text, chat, chat-prompt, hh, sharegpt."))
    columns: str | None = option(None, panel="Data", help=(
        "Map other column names, e.g. prompt=question,chosen=good,rejected=bad."))
    chat_template: str | None = option(None, semantic=False, panel="Tokenization", help=(  # content hashed as an input
        "Jinja chat template file used instead of the tokenizer's."))
    apply_chat_template: bool = option(False, panel="Tokenization", help=(
        "Wrap plain-text pairs as one user turn and one assistant turn of the chat template."))
    seed: int = option(42, panel="Data", help="Seed of the PATH:AMOUNT sampling and the eval split.")
    rows_per_shard: int = option(50_000, check=at_least(1), help=(
        "Input records per Parquet shard (before filtering); the unit of resume."))
    on_bad_record: str = option("error", choices=BAD_RECORD_MODES, panel="Data", help=(
        "A malformed record: error (stop, exit 2) or skip (list it in rejects.jsonl)."))
    num_proc: int = option(1, semantic=False, check=at_least(1), help=(
        "Tokenizer processes; the output is byte-identical for any value."))

    def check(self) -> None:
        if not self.data:
            raise UsageError("--data: give at least one source")
        if self.max_prompt_length and not self.max_prompt_length < self.max_seq_length:
            raise UsageError(
                f"--max-prompt-length must be in [1, --max-seq-length) = [1, {self.max_seq_length}) or 0 for no limit, "
                f"got {self.max_prompt_length}"
            )
        parse_columns(self.columns)

    @property
    def prompt_limit(self) -> int | None:
        """--max-prompt-length resolved: its default is half of --max-seq-length, 0 means none (None)."""
        if self.max_prompt_length is None:
            return self.max_seq_length // 2
        return self.max_prompt_length or None


def semantic_config(cfg: TokenizeConfig) -> dict[str, Any]:
    """What the fingerprint covers: the semantic options with --max-prompt-length resolved, so a run
    without a limit (0) keeps the fingerprint runs had when no limit was the default, and
    --prompt-truncation only where it can change a prompt (tokens is how prompts were cut before it existed)."""
    semantic = {**_semantic_options(cfg), "max_prompt_length": cfg.prompt_limit}
    if cfg.prompt_limit is None or cfg.prompt_truncation == "tokens":
        del semantic["prompt_truncation"]
    return semantic


@dataclasses.dataclass
class Item:
    """One sampled input record on its way to a row or a reject."""

    source: str
    record: Record
    pair: Pair | Drop


# ---------------------------------------------------------------------------------------- build


def run(cfg: TokenizeConfig) -> Manifest | None:
    validate(cfg)
    train_sources = [resolve_source(s, "--data") for s in cfg.data]
    eval_sources = [resolve_source(s, "--eval-data") for s in cfg.eval_data]
    template_override = read_template_file(cfg.chat_template)
    settings = EncodeSettings(
        tokenizer=cfg.tokenizer, chat_template=template_override, apply_chat_template=cfg.apply_chat_template,
        max_seq_length=cfg.max_seq_length, max_prompt_length=cfg.prompt_limit, truncation=cfg.truncation,
        chat_template_file=cfg.chat_template, prompt_truncation=cfg.prompt_truncation,
    )
    encoder = PairEncoder(settings)
    if template_override is not None or cfg.apply_chat_template or cfg.format in CHAT_FORMATS:
        encoder.check_template()  # a template that will be used: before any data is read
    if encoder.context < cfg.max_seq_length:
        log.warning("--max-seq-length %d is longer than the tokenizer's model_max_length %d: check the model's context",
                    cfg.max_seq_length, encoder.context)
    tok_fp = tokenizer_fingerprint(cfg.tokenizer)
    source_hashes = {id(s): s.content_hash() for s in train_sources + eval_sources}
    inputs = [f"{split}:{s.spec.amount}:{source_hashes[id(s)]}"
              for split, sources in (("train", train_sources), ("eval", eval_sources)) for s in sources] + [tok_fp]
    if template_override is not None:
        inputs.append(sha256_file(cfg.chat_template))
    fp = fingerprint(STAGE, TOKENIZE_VERSION, semantic_config(cfg), inputs)

    out = Path(cfg.out)
    inputs = [("--data", s.spec.path) for s in train_sources] + [("--eval-data", s.spec.path) for s in eval_sources]
    inputs += [("--tokenizer", cfg.tokenizer), ("--chat-template", cfg.chat_template)]
    with StageRun(STAGE, out, KIND, fp, overwrite=cfg.overwrite, lock_timeout=cfg.lock_timeout, inputs=inputs,
                  owns=OWNS) as stage_run:
        if stage_run.complete:
            return None
        started = time.perf_counter()
        splits, source_stats = _read_items(cfg, train_sources, eval_sources, encoder, source_hashes)
        processed = _write_shards(cfg, stage_run.dir, splits, encoder, settings, stage_run)
        elapsed = time.perf_counter() - started
        manifest = _close(cfg, stage_run.dir, fp, splits, encoder, tok_fp, source_stats, source_hashes,
                          train_sources, eval_sources, processed, elapsed)
        stage_run.commit(manifest)
    _remove_reject_parts(out)
    _log_summary(out, manifest)
    return manifest


# ------------------------------------------------------------------------------------------ run


def _read_items(cfg: TokenizeConfig, train_sources: list[Source], eval_sources: list[Source],
                encoder: PairEncoder, source_hashes: dict[int, str]) -> tuple[dict[str, list[Item]], list[dict[str, Any]]]:
    """Every sampled record of every source, normalised, assigned to its split."""
    columns = parse_columns(cfg.columns)
    train: list[Item] = []
    evals: list[Item] = []
    stats = []
    for split, sources in (("train", train_sources), ("eval", eval_sources)):
        for source in sources:
            records = source.read()
            # Keyed by content, not path: the same data and seed give the same sample wherever it lives.
            keep = sample_rows(len(records), source.spec.amount, cfg.seed, source_hashes[id(source)], source.spec.named)
            records = [records[i] for i in keep]
            fmt = _source_format(cfg, source, records, columns, encoder)
            items = [Item(source.name, r, _normalise(cfg, r, fmt, columns)) for r in records]
            (train if split == "train" else evals).extend(items)
            stats.append({"data": source.spec.spec, "split": split, "format": fmt, "records": len(records)})
    first_chat = next((item for item in train + evals if isinstance(item.pair, Pair) and encoder.uses_template(item.pair)),
                      None)
    if first_chat is not None:
        encoder.check_renders(first_chat.pair, first_chat.record.where)
    from_eval_data = evals
    if cfg.eval_fraction > 0:
        held_out = pick_fraction(len(train), cfg.eval_fraction, cfg.seed, "eval-fraction")
        if not held_out or len(held_out) == len(train):
            raise UsageError(
                f"--eval-fraction {cfg.eval_fraction:g} holds out {len(held_out)} of the {len(train)} --data records, "
                + ("so there would be no eval split: raise it, or give eval pairs with --eval-data" if not held_out
                   else "leaving none to train on: lower it")
            )
        evals = [item for i, item in enumerate(train) if i in held_out] + evals
        train = [item for i, item in enumerate(train) if i not in held_out]
    if eval_sources:
        _check_overlap(cfg, train, from_eval_data)
    splits = {"train": train}
    if evals:
        splits["eval"] = evals
    return splits, stats


def _pair_key(pair: Pair) -> tuple:
    prompt = pair.prompt if isinstance(pair.prompt, str) else tuple((m["role"], m["content"]) for m in pair.prompt)
    return prompt, pair.chosen, pair.rejected


def _check_overlap(cfg: TokenizeConfig, train: list[Item], evals: list[Item]) -> None:
    """--eval-data pairs that are also train pairs (the same normalised prompt, chosen and rejected)
    would be scored as held out while the model trained on them: refused unless --allow-overlap."""
    seen = {}
    for item in train:
        if isinstance(item.pair, Pair):
            seen.setdefault(_pair_key(item.pair), item)
    shared = [(item, seen[key]) for item in evals if isinstance(item.pair, Pair) and (key := _pair_key(item.pair)) in seen]
    if not shared:
        return
    item, twin = shared[0]
    what = (f"{len(shared)} of the {len(evals)} --eval-data records are also train pairs (the same prompt, chosen and "
            f"rejected), e.g. {item.record.where} is {twin.record.where}")
    if not cfg.allow_overlap:
        raise UsageError(f"{what}: the eval split would score pairs the model trains on. Remove them from one side, "
                         "or pass --allow-overlap to keep them")
    log.warning("%s; kept, as --allow-overlap asks", what)


def _source_format(cfg: TokenizeConfig, source: Source, records: list[Record], columns: dict[str, str],
                   encoder: PairEncoder) -> str:
    fmt = cfg.format
    if not records:
        raise DataError(f"{source.spec.named}: has no records" + (" (an eval split was asked for with it)"
                                                                   if source.spec.flag == "--eval-data" else ""))
    if fmt == "auto":
        fmt = _detect(cfg, source, records, columns)
        log.info("%s: %d records, format %s", source.spec.spec, len(records), fmt)
    if (fmt in CHAT_FORMATS or cfg.apply_chat_template) and encoder.template is None:
        raise UsageError(
            f"{source.spec.named} is chat data (format {fmt}), but tokenizer {cfg.tokenizer} has no chat "
            "template; pass one with --chat-template FILE"
            if fmt in CHAT_FORMATS
            else f"--apply-chat-template: tokenizer {cfg.tokenizer} has no chat template; pass one with --chat-template FILE"
        )
    return fmt


def _detect(cfg: TokenizeConfig, source: Source, records: list[Record], columns: dict[str, str]) -> str:
    """The source's format, judged from its first record; under --on-bad-record skip, from its first
    record that can be judged (a malformed first line is set aside like any other)."""
    first: DpoError | None = None
    for record in records if cfg.on_bad_record == "skip" else records[:1]:
        try:
            return detect_format(apply_columns(record.parsed(), columns))
        except FieldError as exc:
            error: DpoError = DataError(f"{record.where}: {exc}")
        except DataError as exc:
            error = exc
        except UsageError as exc:
            error = UsageError(f"{source.spec.named} ({record.where}): {exc}")
        first = first or error
    raise first


def _normalise(cfg: TokenizeConfig, record: Record, fmt: str, columns: dict[str, str]) -> Pair | Drop:
    try:
        return normalise(apply_columns(record.parsed(), columns), fmt)
    except (FieldError, DataError) as exc:
        message = f"{record.where}: {exc}" if isinstance(exc, FieldError) else str(exc)
        if cfg.on_bad_record == "error":
            raise DataError(f"{message} (format {fmt}; --on-bad-record skip sets such records aside)") from None
        return Drop("malformed", message)


def _write_shards(cfg: TokenizeConfig, out: Path, splits: dict[str, list[Item]], encoder: PairEncoder,
                  settings: EncodeSettings, stage_run: StageRun) -> dict[str, int]:
    """Tokenize and commit every shard not yet committed; returns this run's pair and token counts."""
    plan = []  # (split, shard number, shard count, items) in commit order
    for split, items in splits.items():
        bounds = shard_bounds(len(items), cfg.rows_per_shard)
        plan.extend((split, k, len(bounds), items[a:b]) for k, (a, b) in enumerate(bounds))
    pending = [p for p in plan if not _is_committed(out, *p[:3])]
    if len(pending) < len(plan):
        log.info("%d of %d shards already committed by an earlier run", len(plan) - len(pending), len(plan))

    processed = {"pairs": 0, "tokens": 0, "shards": 0}
    pending_keys = {(split, number) for split, number, *_ in pending}
    bar = progress(sum(len(p[3]) for p in pending), "tokenize", unit="pairs", quiet=cfg.quiet, logger=log)
    with _Workers(cfg.num_proc, settings, encoder) as workers:
        results = workers.map(_chunks(pending))
        first_index = 0  # indices run on across shards and from train into eval
        for split, number, count, items in plan:
            if (split, number) not in pending_keys:
                first_index += committed_shard(out, shard_path(split, number, count)).rows
                continue
            if stage_run.stop_requested():
                committed = len(plan) - len(pending) + processed["shards"]
                raise stage_run.preempted(f"after committing {committed} of {len(plan)} shards in {out}")
            encoded = [r for _ in range(_chunk_count(items)) for r in next(results)]
            rows, part = _assemble(cfg, split, items, encoded, first_index)
            _commit_shard(out, split, number, count, rows, part)
            first_index += rows.num_rows
            processed["shards"] += 1
            processed["pairs"] += rows.num_rows
            processed["tokens"] += int(pc.sum(rows["chosen_length"]).as_py() or 0) + int(
                pc.sum(rows["rejected_length"]).as_py() or 0)
            bar.update(len(items))
    bar.close()
    return processed


def _is_committed(out: Path, split: str, number: int, count: int) -> bool:
    return (out / _reject_part(split, number, count)).is_file() and committed_shard(out, shard_path(split, number, count)) is not None


def _chunks(pending: list) -> Iterator[list[Pair]]:
    for *_, items in pending:
        pairs = [item.pair for item in items if isinstance(item.pair, Pair)]
        for start in range(0, max(len(pairs), 1), CHUNK_PAIRS):
            yield pairs[start : start + CHUNK_PAIRS]


def _chunk_count(items: list[Item]) -> int:
    pairs = sum(isinstance(item.pair, Pair) for item in items)
    return max(1, -(-pairs // CHUNK_PAIRS))


def _assemble(cfg: TokenizeConfig, split: str, items: list[Item], encoded: list, first_index: int) -> tuple[pa.Table, dict]:
    """A shard's rows (in input order, densely indexed) and its part of the rejects and stats."""
    columns: dict[str, list] = {name: [] for name in SCHEMA.names}
    rejects: list[dict] = []
    truncated = prompt_truncated = 0
    results = iter(encoded)
    for item in items:
        result = next(results) if isinstance(item.pair, Pair) else item.pair
        if isinstance(result, PrefixMismatch):
            message = f"{item.record.where}: {result.detail}"
            if cfg.on_bad_record == "error":
                raise DataError(
                    f"{message}. The labels would be misaligned; fix the chat template (--chat-template FILE) "
                    "or the data, or set such records aside with --on-bad-record skip"
                )
            result = Drop("prompt_not_token_prefix", result.detail)
        if isinstance(result, Drop):
            rejects.append({"split": split, "source": item.source, **item.record.location,
                            "reason": result.reason, "detail": result.detail})
            continue
        prompt_ignore = [IGNORE_INDEX] * len(result.prompt)
        columns["index"].append(first_index + len(columns["index"]))
        columns["source"].append(item.source)
        for side, response in (("chosen", result.chosen), ("rejected", result.rejected)):
            columns[f"{side}_input_ids"].append(result.prompt + response)
            columns[f"{side}_labels"].append(prompt_ignore + response)
            columns[f"{side}_length"].append(len(result.prompt) + len(response))
        columns["prompt_length"].append(len(result.prompt))
        truncated += result.truncated
        prompt_truncated += result.prompt_truncated
    return pa.table(columns, schema=SCHEMA), {"rejects": rejects, "truncated": truncated,
                                              "prompt_truncated": prompt_truncated}


def _reject_part(split: str, number: int, count: int) -> str:
    return f"{REJECT_PARTS}/{split}-{number:05d}-of-{count:05d}.json"


def _commit_shard(out: Path, split: str, number: int, count: int, rows: pa.Table, part: dict) -> None:
    path = out / _reject_part(split, number, count)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, part)
    write_shard(out, shard_path(split, number, count), rows)


class _Workers:
    """In-process encoding for --num-proc 1; otherwise a pool whose ordered map keeps the output order."""

    def __init__(self, num_proc: int, settings: EncodeSettings, encoder: PairEncoder):
        self.num_proc, self.settings, self.encoder = num_proc, settings, encoder
        self.pool = None

    def __enter__(self) -> _Workers:
        global _worker_encoder
        if self.num_proc > 1:
            # fork (as datasets.map does) hands the loaded tokenizer to the workers for free; where fork is
            # unavailable, spawned workers load their own.
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            _worker_encoder = self.encoder
            self.pool = context.Pool(self.num_proc, initializer=_init_worker, initargs=(self.settings,))
        return self

    def map(self, chunks: Iterator[list[Pair]]) -> Iterator[list]:
        if self.pool is None:
            return (self.encoder.encode(chunk) for chunk in chunks)
        return self.pool.imap(_encode_chunk, chunks, chunksize=1)

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


_worker_encoder: PairEncoder | None = None


def _init_worker(settings: EncodeSettings) -> None:
    global _worker_encoder
    # The processes are the parallelism: no tokenizer thread pool inside each (and none after a fork).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if _worker_encoder is None:
        _worker_encoder = PairEncoder(settings)


def _encode_chunk(pairs: list[Pair]) -> list:
    return _worker_encoder.encode(pairs)


# ---------------------------------------------------------------------------------------- close


def _close(cfg: TokenizeConfig, out: Path, fp: str, splits: dict[str, list[Item]], encoder: PairEncoder,
           tok_fp: str, source_stats: list[dict], source_hashes: dict[int, str], train_sources: list[Source],
           eval_sources: list[Source], processed: dict[str, int], elapsed: float) -> Manifest:
    """The manifest, with stats read back from the committed shards (so a resumed run reports the same)."""
    files: list[FileEntry] = []
    pairs: dict[str, dict[str, int]] = {}
    lengths: dict[str, list[np.ndarray]] = {"prompt_length": [], "chosen_length": [], "rejected_length": []}
    reject_rows: list[dict] = []
    truncated = prompt_truncated = 0
    for split, items in splits.items():
        count = len(shard_bounds(len(items), cfg.rows_per_shard))
        for number in range(count):
            entry = committed_shard(out, shard_path(split, number, count))
            files.append(entry)
            table = pq.read_table(out / entry.path, columns=["source", *lengths])
            for source, n in Counter(table["source"].to_pylist()).items():
                pairs.setdefault(split, {}).setdefault(source, 0)
                pairs[split][source] += n
            for name in lengths:
                lengths[name].append(table[name].to_numpy())
            part = json.loads((out / _reject_part(split, number, count)).read_text())
            reject_rows.extend(part["rejects"])
            truncated += part["truncated"]
            prompt_truncated += part["prompt_truncated"]
    write_text_atomic(out / REJECTS, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in reject_rows))
    files.append(dataclasses.replace(file_entry(out, REJECTS), rows=len(reject_rows)))

    dropped = Counter(r["reason"] for r in reject_rows)
    all_lengths = {name: np.concatenate(parts) for name, parts in lengths.items()}
    total_pairs = sum(n for per_source in pairs.values() for n in per_source.values())
    if total_pairs == 0 or not pairs.get("train"):
        raise DataError(f"no training pairs are left after filtering (dropped: {dict(dropped)}); see {out / REJECTS}")
    if "eval" in splits and not pairs.get("eval"):
        asked = " and ".join(flag for flag, given in (("--eval-fraction", cfg.eval_fraction > 0),
                                                      ("--eval-data", bool(cfg.eval_data))) if given)
        eval_dropped = dict(Counter(r["reason"] for r in reject_rows if r["split"] == "eval"))
        raise DataError(f"the eval split asked for with {asked} has no pairs left after filtering: all "
                        f"{len(splits['eval'])} of its records were dropped ({eval_dropped}); see {out / REJECTS}")
    for source in train_sources + eval_sources:
        # A source that makes no pair at all is lost to a configuration mistake (its format, --columns,
        # the chat template, the lengths), not to bad records; beside other sources it would go unnoticed.
        if not any(per_source.get(source.name) for per_source in pairs.values()):
            lost = Counter(r["reason"] for r in reject_rows if r["source"] == source.name)
            raise DataError(
                f"{source.spec.named}: none of its {sum(lost.values())} records made a pair (dropped: {dict(lost)}): "
                f"a whole source lost points at its format, --columns, the chat template or the lengths; see "
                f"{out / REJECTS}"
            )
    total_tokens = int(all_lengths["chosen_length"].sum() + all_lengths["rejected_length"].sum())
    stats = {
        "pairs": {split: sum(per_source.values()) for split, per_source in pairs.items()},
        "pairs_per_source": pairs,
        "records_read": sum(len(items) for items in splits.values()),
        "dropped": dict(sorted(dropped.items())),
        "dropped_total": sum(dropped.values()),
        "truncated": truncated,
        "prompt_truncated": prompt_truncated,
        "total_tokens": total_tokens,
        "lengths": {name: _describe(values) for name, values in all_lengths.items()},
        "sources": source_stats,
        "throughput": {
            "seconds": round(elapsed, 3),
            "num_proc": cfg.num_proc,
            "pairs": processed["pairs"],
            "pairs_per_second": round(processed["pairs"] / elapsed, 1) if elapsed > 0 else None,
            "tokens_per_second": round(processed["tokens"] / elapsed, 1) if elapsed > 0 else None,
        },
        "tokenizer_info": tokenizer_info(encoder.tokenizer, tok_fp),
        "chat_template": encoder.template if _uses_template(cfg, source_stats) else None,
    }
    stats["warnings"] = data_loss_warnings(stats["records_read"], total_pairs, dropped, truncated, prompt_truncated)
    inputs = [InputRef("data", s.spec.spec, source_hashes[id(s)]) for s in train_sources + eval_sources]
    inputs.append(InputRef("tokenizer", cfg.tokenizer, tok_fp))
    config = {**flatten(cfg), "max_prompt_length": cfg.prompt_limit or 0}
    return Manifest(kind=KIND, fingerprint=fp, config=config, inputs=inputs, files=files, stats=stats)


def _uses_template(cfg: TokenizeConfig, source_stats: list[dict]) -> bool:
    return cfg.apply_chat_template or any(s["format"] in CHAT_FORMATS for s in source_stats)


def _describe(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {}
    p50, p90, p99 = np.percentile(values, [50, 90, 99]).tolist()
    return {"min": int(values.min()), "p50": p50, "p90": p90, "p99": p99, "max": int(values.max()),
            "mean": round(float(values.mean()), 2)}


def _remove_reject_parts(out: Path) -> None:
    parts = out / REJECT_PARTS
    if parts.is_dir():
        for part in parts.iterdir():
            part.unlink()
        parts.rmdir()


def _log_summary(out: Path, manifest: Manifest) -> None:
    s = manifest.stats
    t = s["throughput"]
    log.info(
        "wrote %s: %s pairs, %d tokens; dropped %d %s; %.1f pairs/s, %.0f tokens/s over %.1fs (fingerprint %s)",
        out, s["pairs"], s["total_tokens"], s["dropped_total"], s["dropped"] or "",
        t["pairs_per_second"] or 0, t["tokens_per_second"] or 0, t["seconds"], manifest.fingerprint,
    )
    for warning in s["warnings"]:
        log.warning("%s", warning)
