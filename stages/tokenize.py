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

import collections
import dataclasses
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import signal
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
from ..artifacts.shards import ShardWriter, arrow_copy_path, committed_shard, file_entry, shard_bounds, shard_path
from ..pipeline.arrays import as_arrow, as_arrow_strings, as_numpy
from ..pipeline.config import StageOptions, at_least, flatten, fraction, option, validate
from ..pipeline.formats import CHAT_FORMATS, FORMATS, Drop, FieldError, Pair, apply_columns, detect_format, normalise, parse_columns
from ..pipeline.logs import progress
from ..pipeline.sources import Record, Source, fraction_mask, resolve_source, sample_mask
from ..pipeline.tokenization import (
    IGNORE_INDEX, PROMPT_TRUNCATION_MODES, TRUNCATION_MODES, Encoded, EncodeSettings, PairEncoder, PrefixMismatch,
    data_loss_warnings,
    read_template_file, tokenizer_fingerprint, tokenizer_info,
)

STAGE = "tokenize"
TOKENIZE_VERSION = 1
KIND = "tokenized"
REJECTS = "rejects.jsonl"
REJECT_PARTS = ".rejects"  # per-shard reject lists, merged into rejects.jsonl at commit
OWNS = ("*/part-*.parquet", "*/part-*.arrow", REJECT_PARTS + "/", REJECTS)  # what a (partial) run writes besides the manifest
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
# The memory-mapped Arrow copies that train, cache-ref and evaluate read leave the labels out: they are
# the input ids with the prompt masked (pipeline/batching.py derives them), and without them the copies
# are half the size to hash, map and cache. The Parquet shards keep every column.
MAPPED_COLUMNS = [name for name in SCHEMA.names if not name.endswith("_labels")]


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
            _remove_reject_parts(out)  # left by a run killed between its commit and this cleanup
            return None
        started = time.perf_counter()
        plan, source_stats = _read_items(cfg, train_sources, eval_sources, encoder, source_hashes)
        processed = _write_shards(cfg, stage_run.dir, plan, encoder, settings, stage_run)
        elapsed = time.perf_counter() - started
        manifest = _close(cfg, stage_run.dir, fp, plan.sizes, encoder, tok_fp, source_stats, source_hashes,
                          train_sources, eval_sources, processed, elapsed)
        stage_run.commit(manifest)
    _remove_reject_parts(out)
    _log_summary(out, manifest)
    return manifest


# ------------------------------------------------------------------------------------------ run


@dataclasses.dataclass
class _Input:
    """One source as read for its split: which of its records are sampled, and in which format."""

    source: Source
    split: str
    sampled: np.ndarray | None  # mask over its records (None: all)
    count: int  # records sampled
    fmt: str = ""

    def records(self) -> Iterator[Record]:
        if self.sampled is None:
            yield from self.source.records()
            return
        for position, record in enumerate(self.source.records()):
            if self.sampled[position]:
                yield record


@dataclasses.dataclass
class _Plan:
    """The inputs and what goes where: every pass streams the sources again, none holds them."""

    inputs: list[_Input]
    held_out: np.ndarray | None  # mask over the sampled train records (--eval-fraction)
    sizes: dict[str, int]  # records per split, before filtering

    def items(self, split: str) -> Iterator[tuple[str, Record, str]]:
        """``(source name, record, format)`` of a split, in its order: the train records not held
        out; for eval, the held-out train records, then the --eval-data ones."""
        for wanted_split, held in ((("train", False),) if split == "train" else (("train", True), ("eval", None))):
            position = 0
            for given in self.inputs:
                if given.split != wanted_split:
                    continue
                for record in given.records():
                    is_held = self.held_out is not None and bool(self.held_out[position]) if given.split == "train" else None
                    position += given.split == "train"
                    if held is None or is_held == held:
                        yield given.source.name, record, given.fmt


def _read_items(cfg: TokenizeConfig, train_sources: list[Source], eval_sources: list[Source],
                encoder: PairEncoder, source_hashes: dict[int, str]) -> tuple[_Plan, list[dict[str, Any]]]:
    """The plan of a run, from streaming passes over the sources, none of which keeps their records:
    a first pass counts each source's records (so that ``PATH:AMOUNT`` and --eval-fraction, which
    depend only on counts, can be drawn); a second one normalises every sampled record, so a
    malformed one stops the run before any shard is committed (shards are committed one by one as
    the unit of resume, so the check cannot wait for the end), and finds the first chat pair to
    render, and compares the train pairs with the --eval-data pairs' digests."""
    columns = parse_columns(cfg.columns)
    inputs: list[_Input] = []
    for split, sources in (("train", train_sources), ("eval", eval_sources)):
        for source in sources:
            # Keyed by content, not path: the same data and seed give the same sample wherever it lives.
            total = source.count()
            mask = sample_mask(total, source.spec.amount, cfg.seed, source_hashes[id(source)], source.spec.named)
            inputs.append(_Input(source, split, mask, total if mask is None else int(mask.sum())))
    train_count = sum(given.count for given in inputs if given.split == "train")
    held_out = None
    if cfg.eval_fraction > 0:
        held_out = fraction_mask(train_count, cfg.eval_fraction, cfg.seed, "eval-fraction")
        held = int(held_out.sum())
        if not held or held == train_count:
            raise UsageError(
                f"--eval-fraction {cfg.eval_fraction:g} holds out {held} of the {train_count} --data records, "
                + ("so there would be no eval split: raise it, or give eval pairs with --eval-data" if not held
                   else "leaving none to train on: lower it")
            )
    eval_count = (int(held_out.sum()) if held_out is not None else 0) + sum(
        given.count for given in inputs if given.split == "eval")
    sizes = {"train": train_count - (eval_count - sum(g.count for g in inputs if g.split == "eval"))}
    if eval_count:
        sizes["eval"] = eval_count
    plan = _Plan(inputs, held_out, sizes)

    first_chat: dict[str, tuple[Pair, str]] = {}  # the first chat pair of train, held out, --eval-data
    # The --eval-data pairs are read first, so the train pairs are compared with them in the same pass.
    eval_keys: list[tuple[bytes, str]] = []
    wanted: set[bytes] = set()  # their digests
    twins: dict[bytes, str] = {}  # eval pair digest -> the first train record with the same pair
    starts = itertools.accumulate((g.count if g.split == "train" else 0 for g in inputs), initial=0)
    train_start = {id(given): start for given, start in zip(inputs, starts)}  # its first position in held_out
    for given in sorted(inputs, key=lambda g: g.split != "eval"):
        given.fmt = _source_format(cfg, given, columns, encoder)
        position = train_start[id(given)]
        for record in given.records():
            pair = _normalise(cfg, record, given.fmt, columns)
            part = given.split
            if part == "train":
                part = "held" if held_out is not None and held_out[position] else "train"
                position += 1
            if isinstance(pair, Pair):
                if part not in first_chat and encoder.uses_template(pair):
                    first_chat[part] = (pair, record.where)
                if part == "eval":
                    eval_keys.append((key := _pair_digest(pair), record.where))
                    wanted.add(key)
                elif part == "train" and wanted and (key := _pair_digest(pair)) in wanted:
                    twins.setdefault(key, record.where)
    chat = next((first_chat[part] for part in ("train", "held", "eval") if part in first_chat), None)
    if chat is not None:
        encoder.check_renders(*chat)
    _check_overlap(cfg, inputs, eval_keys, twins)
    stats = [{"data": given.source.spec.spec, "split": given.split, "format": given.fmt, "records": given.count}
             for given in inputs]
    return plan, stats


def _pair_digest(pair: Pair) -> bytes:
    prompt = pair.prompt if isinstance(pair.prompt, str) else [[m["role"], m["content"]] for m in pair.prompt]
    return hashlib.blake2b(json.dumps([prompt, pair.chosen, pair.rejected]).encode(), digest_size=16).digest()


def _check_overlap(cfg: TokenizeConfig, inputs: list[_Input], eval_keys: list[tuple[bytes, str]],
                   twins: dict[bytes, str]) -> None:
    """--eval-data pairs that are also train pairs (the same normalised prompt, chosen and rejected)
    would be scored as held out while the model trained on them: refused unless --allow-overlap.
    Pairs are compared by 16-byte digests, so only the eval side is held, never the train pairs."""
    shared = [(where, twins[key]) for key, where in eval_keys if key in twins]
    if not shared:
        return
    where, twin = shared[0]
    total = sum(g.count for g in inputs if g.split == "eval")
    what = (f"{len(shared)} of the {total} --eval-data records are also train pairs (the same prompt, chosen and "
            f"rejected), e.g. {where} is {twin}")
    if not cfg.allow_overlap:
        raise UsageError(f"{what}: the eval split would score pairs the model trains on. Remove them from one side, "
                         "or pass --allow-overlap to keep them")
    log.warning("%s; kept, as --allow-overlap asks", what)


def _source_format(cfg: TokenizeConfig, given: _Input, columns: dict[str, str], encoder: PairEncoder) -> str:
    fmt, source = cfg.format, given.source
    if not given.count:
        raise DataError(f"{source.spec.named}: has no records" + (" (an eval split was asked for with it)"
                                                                   if source.spec.flag == "--eval-data" else ""))
    if fmt == "auto":
        fmt = _detect(cfg, source, given.records(), columns)
        log.info("%s: %d records, format %s", source.spec.spec, given.count, fmt)
    if (fmt in CHAT_FORMATS or cfg.apply_chat_template) and encoder.template is None:
        raise UsageError(
            f"{source.spec.named} is chat data (format {fmt}), but tokenizer {cfg.tokenizer} has no chat "
            "template; pass one with --chat-template FILE"
            if fmt in CHAT_FORMATS
            else f"--apply-chat-template: tokenizer {cfg.tokenizer} has no chat template; pass one with --chat-template FILE"
        )
    return fmt


def _detect(cfg: TokenizeConfig, source: Source, records: Iterator[Record], columns: dict[str, str]) -> str:
    """The source's format, judged from its first record; under --on-bad-record skip, from its first
    record that can be judged (a malformed first line is set aside like any other)."""
    first: DpoError | None = None
    for record in records if cfg.on_bad_record == "skip" else itertools.islice(records, 1):
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


def _write_shards(cfg: TokenizeConfig, out: Path, plan: _Plan, encoder: PairEncoder,
                  settings: EncodeSettings, stage_run: StageRun) -> dict[str, int]:
    """Tokenize and commit every shard not yet committed; returns this run's pair and token counts.

    Records stream from the sources into CHUNK_PAIRS-record chunks, at most a few per process in
    flight, and their rows into the shard's writer row group by row group: memory holds a few chunks
    and one row group, whatever the size of the data."""
    shards = [(split, k, len(bounds), b - a) for split, size in plan.sizes.items()
              for bounds in [shard_bounds(size, cfg.rows_per_shard)] for k, (a, b) in enumerate(bounds)]
    pending = [shard for shard in shards if not _is_committed(out, *shard[:3])]
    if len(pending) < len(shards):
        log.info("%d of %d shards already committed by an earlier run", len(shards) - len(pending), len(shards))

    columns = parse_columns(cfg.columns)
    processed = {"pairs": 0, "tokens": 0, "shards": 0}
    bar = progress(sum(shard[3] for shard in pending), "tokenize", unit="pairs", quiet=cfg.quiet, logger=log)
    with _Workers(cfg.num_proc, settings, encoder) as workers:
        first_index = 0  # indices run on across shards and from train into eval
        for split in plan.sizes:
            records = plan.items(split)
            for shard in (shard for shard in shards if shard[0] == split):
                _, number, count, size = shard
                taken = itertools.islice(records, size)
                if shard not in pending:
                    collections.deque(taken, maxlen=0)
                    first_index += committed_shard(out, shard_path(split, number, count)).rows
                    continue
                committed = len(shards) - len(pending) + processed["shards"]
                saved = f"after committing {committed} of {len(shards)} shards in {out}"
                if stage_run.stop_requested():
                    raise stage_run.preempted(saved)
                items = (Item(name, record, _normalise(cfg, record, fmt, columns)) for name, record, fmt in taken)
                writer = ShardWriter(out, shard_path(split, number, count), SCHEMA, arrow_copy=True,
                                     copy_columns=MAPPED_COLUMNS)
                part = {"rejects": [], "truncated": 0, "prompt_truncated": 0}
                rows = 0
                try:
                    for done in workers.map(_chunked(items), stage_run):
                        if done is None:  # a stop signal: this shard is abandoned (a rerun encodes it again)
                            raise stage_run.preempted(saved)
                        chunk, encoded = done
                        table = _assemble(cfg, split, chunk, encoded, first_index + rows, part)
                        writer.write(table)
                        rows += table.num_rows
                        processed["tokens"] += int(pc.sum(table["chosen_length"]).as_py() or 0) + int(
                            pc.sum(table["rejected_length"]).as_py() or 0)
                        bar.update(len(chunk))
                    _commit_shard(out, split, number, count, writer, part)
                except BaseException:
                    writer.discard()
                    raise
                first_index += rows
                processed["shards"] += 1
                processed["pairs"] += rows
    bar.close()
    return processed


def _is_committed(out: Path, split: str, number: int, count: int) -> bool:
    shard = shard_path(split, number, count)
    return ((out / _reject_part(split, number, count)).is_file()
            and committed_shard(out, shard, MAPPED_COLUMNS) is not None)


def _chunked(items: Iterator[Item]) -> Iterator[list[Item]]:
    """CHUNK_PAIRS items at a time; a shard with no records still makes one (empty) chunk."""
    chunk = list(itertools.islice(items, CHUNK_PAIRS))
    yield chunk
    while chunk := list(itertools.islice(items, CHUNK_PAIRS)):
        yield chunk


def _assemble(cfg: TokenizeConfig, split: str, items: list[Item], encoded: list, first_index: int,
              part: dict) -> pa.Table:
    """The rows of a chunk (in input order, densely indexed from ``first_index``); its rejects and
    truncations are added to the shard's ``part``."""
    rejects: list[dict] = part["rejects"]
    kept: list[Encoded] = []
    sources: list[str] = []
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
        kept.append(result)
        sources.append(item.source)
    part["truncated"] += sum(r.truncated for r in kept)
    part["prompt_truncated"] += sum(r.prompt_truncated for r in kept)
    prompt_length = np.fromiter((len(r.prompt) for r in kept), np.int32, len(kept))
    columns = {"index": as_arrow(np.arange(first_index, first_index + len(kept), dtype=np.int64)),
               "source": as_arrow_strings(sources), "prompt_length": as_arrow(prompt_length)}
    for side in ("chosen", "rejected"):
        length = prompt_length + np.fromiter((len(getattr(r, side)) for r in kept), np.int32, len(kept))
        offsets = np.zeros(len(kept) + 1, np.int32)
        np.cumsum(length, out=offsets[1:])
        ids = np.fromiter(itertools.chain.from_iterable(itertools.chain.from_iterable(
            (r.prompt, getattr(r, side)) for r in kept)), np.int32, int(offsets[-1]))
        # Labels are the ids with each row's first prompt_length positions masked.
        position = np.arange(len(ids), dtype=np.int32) - np.repeat(offsets[:-1], length)
        labels = np.where(position < np.repeat(prompt_length, length), np.int32(IGNORE_INDEX), ids)
        columns[f"{side}_input_ids"] = pa.ListArray.from_arrays(as_arrow(offsets), as_arrow(ids))
        columns[f"{side}_labels"] = pa.ListArray.from_arrays(as_arrow(offsets), as_arrow(labels))
        columns[f"{side}_length"] = as_arrow(length)
    return pa.table([columns[name] for name in SCHEMA.names], schema=SCHEMA)


def _reject_part(split: str, number: int, count: int) -> str:
    return f"{REJECT_PARTS}/{split}-{number:05d}-of-{count:05d}.json"


def _commit_shard(out: Path, split: str, number: int, count: int, writer: ShardWriter, part: dict) -> None:
    path = out / _reject_part(split, number, count)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, part)
    writer.commit()


class _Workers:
    """In-process encoding for --num-proc 1; otherwise N worker processes, each fed one chunk at a time
    through its own pipe, chunk k to worker k mod N, results taken back in that order (so the output
    never depends on N).

    Not a multiprocessing.Pool: Ctrl-C and a pre-emption signal the whole process group, and a pool
    worker that dies of the signal can hold the pool's shared queue lock, which then hangs the pool's
    shutdown for ever. Here workers share no lock: they ignore the stop signals (the main process
    decides when to stop, at its safe points) and are killed outright when it is done with them.
    """

    def __init__(self, num_proc: int, settings: EncodeSettings, encoder: PairEncoder):
        self.num_proc, self.settings, self.encoder = num_proc, settings, encoder
        self.processes: list = []
        self.pipes: list = []
        self.sent = self.received = 0

    def __enter__(self) -> _Workers:
        global _worker_encoder
        if self.num_proc > 1:
            # fork (as datasets.map does) hands the loaded tokenizer to the workers for free; where fork is
            # unavailable, spawned workers load their own.
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            _worker_encoder = self.encoder
            for _ in range(self.num_proc):
                mine, theirs = context.Pipe()
                process = context.Process(target=_worker, args=(theirs, self.settings), daemon=True)
                process.start()
                theirs.close()
                self.processes.append(process)
                self.pipes.append(mine)
        return self

    def map(self, chunks: Iterator[list[Item]], stage_run: StageRun) -> Iterator[tuple[list[Item], list] | None]:
        """``(chunk, its pairs encoded)`` in input order, or None once a stop signal has arrived: waiting
        on the workers is a safe point, so that a stop comes within a chunk, not a shard. One chunk is in
        flight per worker (a second one sent while the worker sends its result back could fill both pipe
        buffers and hang both ends), so memory holds a few chunks whatever the size of the input."""
        pairs = lambda chunk: [item.pair for item in chunk if isinstance(item.pair, Pair)]  # noqa: E731
        if not self.processes:
            for chunk in chunks:
                if stage_run.signalled:
                    yield None
                    return
                yield chunk, self.encoder.encode(pairs(chunk))
            return
        chunks = iter(chunks)
        in_flight: collections.deque = collections.deque()

        def send() -> None:
            chunk = next(chunks, None)
            if chunk is not None:
                self.pipes[self.sent % self.num_proc].send(pairs(chunk))
                self.sent += 1
                in_flight.append(chunk)

        for _ in range(self.num_proc):
            send()
        while in_flight:
            worker = self.received % self.num_proc
            while not self.pipes[worker].poll(0.2):
                if stage_run.signalled:
                    yield None
                    return
                if not self.processes[worker].is_alive():
                    raise DpoError(f"tokenizer worker process {self.processes[worker].pid} died (exit code "
                                   f"{self.processes[worker].exitcode}); rerun to resume from the last committed shard")
            encoded = self.pipes[worker].recv()
            self.received += 1
            yield in_flight.popleft(), encoded
            send()

    def __exit__(self, *exc) -> None:
        for process in self.processes:
            process.kill()
        for process, pipe in zip(self.processes, self.pipes):
            process.join()
            pipe.close()


_worker_encoder: PairEncoder | None = None


def _worker(pipe, settings: EncodeSettings) -> None:
    global _worker_encoder
    # The main process decides when to stop (it kills the workers once it has): a Ctrl-C or pre-emption
    # sent to the whole process group must not end a worker on its own.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    # The processes are the parallelism: no tokenizer thread pool inside each (and none after a fork).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if _worker_encoder is None:
        _worker_encoder = PairEncoder(settings)
    while True:
        try:
            chunk = pipe.recv()
        except EOFError:  # the main process is gone
            return
        pipe.send(_worker_encoder.encode(chunk))


# ---------------------------------------------------------------------------------------- close


def _close(cfg: TokenizeConfig, out: Path, fp: str, sizes: dict[str, int], encoder: PairEncoder,
           tok_fp: str, source_stats: list[dict], source_hashes: dict[int, str], train_sources: list[Source],
           eval_sources: list[Source], processed: dict[str, int], elapsed: float) -> Manifest:
    """The manifest, with stats read back from the committed shards (so a resumed run reports the same)."""
    files: list[FileEntry] = []
    pairs: dict[str, dict[str, int]] = {}
    lengths: dict[str, list[np.ndarray]] = {"prompt_length": [], "chosen_length": [], "rejected_length": []}
    reject_rows: list[dict] = []
    truncated = prompt_truncated = 0
    for split, size in sizes.items():
        count = len(shard_bounds(size, cfg.rows_per_shard))
        for number in range(count):
            entry = committed_shard(out, shard_path(split, number, count))
            files += [entry, file_entry(out, arrow_copy_path(entry.path))]  # rows: the shard's, counted once
            # Not pq.read_table: it goes through pyarrow.dataset, which imports pandas (a third of a second).
            with pq.ParquetFile(out / entry.path) as shard:
                table = shard.read(columns=["source", *lengths])
            for counted in pc.value_counts(table["source"]).to_pylist():
                pairs.setdefault(split, {}).setdefault(counted["values"], 0)
                pairs[split][counted["values"]] += counted["counts"]
            for name in lengths:
                lengths[name].append(as_numpy(table[name], np.int32))
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
    if "eval" in sizes and not pairs.get("eval"):
        asked = " and ".join(flag for flag, given in (("--eval-fraction", cfg.eval_fraction > 0),
                                                      ("--eval-data", bool(cfg.eval_data))) if given)
        eval_dropped = dict(Counter(r["reason"] for r in reject_rows if r["split"] == "eval"))
        raise DataError(f"the eval split asked for with {asked} has no pairs left after filtering: all "
                        f"{sizes['eval']} of its records were dropped ({eval_dropped}); see {out / REJECTS}")
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
        "records_read": sum(sizes.values()),
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
