"""Preference-data sources: local files and folders, `datasets` folders, hub names, and mixing.

A source is what one ``--data`` names: a ``.jsonl``/``.jsonl.gz``/``.json``/``.parquet`` file, a
folder of such files, a folder written by ``datasets.save_to_disk`` (a Dataset, or a DatasetDict
whose split is chosen), or a hub dataset name. The whole syntax is ``NAME[#[CONFIG/]SPLIT][:AMOUNT]``:

- ``#SPLIT`` picks a split (``HuggingFaceH4/ultrafeedback_binarized#test_prefs``, ``saved_dict#test``),
  ``#CONFIG/SPLIT`` a hub config too (``allenai/ai2_arc#ARC-Easy/test``; ``#CONFIG/`` leaves the split
  to the default below). It reads as the hub's own viewer path (``org/name/viewer/CONFIG/SPLIT``),
  and a URL fragment is what selects part of a resource; ``@`` is not used because the hub's URLs
  already mean a revision by it (``hf://datasets/org/name@main``). Without a split, ``--data`` reads
  ``train``, and ``--eval-data`` reads the one test-like split (test, validation, eval, dev, ...) if
  exactly one exists and otherwise asks for ``#SPLIT``: an eval split never silently falls back to
  the training data.
- ``:AMOUNT`` takes part of it, like open-instruct's mixer: ``NAME:0.5`` (a number with a decimal
  point) is that fraction of its rows, ``NAME:1000`` (an integer) that many rows. Rows are sampled
  by a seeded hash of their position, so a sample is the same on every machine and Python version,
  and it is drawn before any filtering.

Every record keeps where it came from (file and 1-based line, or 0-based row), so an error or a
reject can point at it.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..artifacts.fingerprint import hash_json, sha256_file
from ..artifacts.errors import DataError, UsageError

FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")
_AMOUNT = re.compile(r"^(?P<path>.+):(?P<amount>\d+|\d+\.\d*|\.\d+)$")
# What follows the last colon when someone meant an amount but wrote one dpo does not take:
# 1e3, -5, 50%, 1,000, 0.5.1, or nothing at all.
_AMOUNT_ATTEMPT = re.compile(r"^$|^[-+]?[\d.,_]*\d[\d.,_eE+%-]*$")
AMOUNT_SYNTAX = ("AMOUNT is a row count (a whole number, PATH:1000) or a fraction (with a decimal point, in (0, 1], "
                 "PATH:0.5)")
SOURCE_SYNTAX = "NAME[#[CONFIG/]SPLIT][:AMOUNT]"
# Split names as `datasets` allows them; a config name is anything without a slash.
_FRAGMENT = re.compile(r"^(?:(?P<config>[^/#:]+)/)?(?P<split>\w+(?:\.\w+)*)?$")
# Split names an eval split defaults to when --eval-data names none (exactly one must exist).
_TEST_LIKE = re.compile(r"(^|[_.-])(test|validation|valid|val|eval|evaluation|dev)([_.-]|$)")


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One ``--data`` (or ``--eval-data``) value: a path or hub name, the hub config and split asked
    for (None: not given), and how much of it to take (None: all).

    ``NAME#CONFIG/SPLIT:AMOUNT`` is split at the last colon, then at the last ``#``. A file whose name
    itself contains a colon or a ``#`` is read as named when no amount follows (``my:data.jsonl``,
    ``v#2.jsonl``); to take part of it, put the amount after the whole name (``my:data.jsonl:0.5``).
    If both readings name existing files (``a.jsonl`` and ``a.jsonl:100``), the amount reading wins;
    ``a.jsonl:100:1.0`` takes all of the file ``a.jsonl:100``.
    """

    spec: str
    path: str
    amount: int | float | None
    flag: str = dataclasses.field(default="--data", compare=False)
    config: str | None = None
    split: str | None = None

    @property
    def named(self) -> str:
        """How messages name this source: the flag and the value as the user gave it."""
        return f"{self.flag} {self.spec}"

    @classmethod
    def parse(cls, text: str, flag: str = "--data") -> SourceSpec:
        match = _AMOUNT.match(text)
        if match is None or (not _names_local(match["path"]) and _names_local(text)):
            head, colon, tail = text.rpartition(":")
            if colon and not _names_local(text) and (
                    _names_local(head) or head.endswith(FILE_SUFFIXES) or _AMOUNT_ATTEMPT.match(tail)):
                raise UsageError(
                    f"{flag} {text}: the amount {tail!r} after the last ':' is not one dpo takes; {AMOUNT_SYNTAX}. "
                    f"A file whose name contains a colon is read as named when it exists; add the amount after its "
                    f"whole name (NAME:0.5)"
                )
            return cls._with_split(text, text, None, flag)
        path, raw = match["path"], match["amount"]
        if "." in raw:
            fraction = float(raw)
            if not 0.0 < fraction <= 1.0:
                raise UsageError(f"{flag} {text}: a fraction must be in (0, 1], got {raw}; {AMOUNT_SYNTAX}")
            return cls._with_split(text, path, None if fraction == 1.0 else fraction, flag)
        count = int(raw)
        if count <= 0:
            raise UsageError(f"{flag} {text}: a row count must be positive, got {raw}; {AMOUNT_SYNTAX}")
        return cls._with_split(text, path, count, flag)

    @classmethod
    def _with_split(cls, text: str, path: str, amount: int | float | None, flag: str) -> SourceSpec:
        name, hash_, fragment = path.rpartition("#")
        if not hash_ or os.path.exists(path):
            return cls(text, path, amount, flag)
        match = _FRAGMENT.match(fragment)
        if not name or match is None or not (match["split"] or match["config"]):
            raise UsageError(
                f"{flag} {text}: {fragment!r} after '#' is not a split ('#test') or a config and split "
                f"('#CONFIG/test'); a source is {SOURCE_SYNTAX}. A file whose name contains '#' is read as named "
                "when it exists"
            )
        return cls(text, name, amount, flag, match["config"], match["split"])

    @property
    def selector(self) -> str:
        """The ``#[CONFIG/]SPLIT`` part as given ('' when none was)."""
        if self.config is None and self.split is None:
            return ""
        return "#" + (f"{self.config}/" if self.config is not None else "") + (self.split or "")


def _names_local(path: str) -> bool:
    """Whether ``path`` (possibly ending in ``#SPLIT``) names something on this machine."""
    return os.path.exists(path) or ("#" in path and os.path.exists(path.rpartition("#")[0]))


@dataclasses.dataclass(frozen=True)
class Record:
    """One raw record and its origin. ``data`` is a parsed object, or a JSON line not yet parsed."""

    file: str
    line: int | None  # 1-based, for JSON lines
    row: int | None  # 0-based element/row index, for JSON lists, Parquet and datasets
    data: Any

    @property
    def where(self) -> str:
        return f"{self.file}, line {self.line}" if self.line is not None else f"{self.file}, row [{self.row}]"

    @property
    def location(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line} if self.line is not None else {"file": self.file, "row": self.row}

    def parsed(self) -> dict[str, Any]:
        """The record as a mapping; a DataError (file and line, no field) if it is not one."""
        data = self.data
        if isinstance(data, bytes):  # a JSON line that is not UTF-8 (see read_lines)
            raise DataError(f"{self.where}: {not_utf8(data)}")
        if isinstance(data, str) and self.line is not None:
            try:
                data = json.loads(data)
            except json.JSONDecodeError as exc:
                raise DataError(f"{self.where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(data, dict):
            raise DataError(f"{self.where}: expected a JSON object with the pair's fields, got {type(data).__name__}")
        return data


@dataclasses.dataclass
class Source:
    spec: SourceSpec
    files: list[Path]  # the local files read; empty for a hub dataset
    kind: str  # "files", "saved-dataset", "dataset-split" (one split of a saved DatasetDict) or "hub"
    split: str | None = None  # the split read, for "dataset-split" and "hub" (given or defaulted)
    # .json files that are not one plain list (JSON lines under a .json name, trailing text): read whole,
    # as json.loads judges them, so their records and errors are what they always were.
    _whole: set[Path] = dataclasses.field(default_factory=set, repr=False, compare=False)

    @property
    def name(self) -> str:
        """The source as rows, rejects and stats name it: its path, and the split read where it has splits."""
        if self.split is None:
            return self.spec.path
        return f"{self.spec.path}#{self.spec.config + '/' if self.spec.config else ''}{self.split}"

    def content_hash(self) -> str:
        """sha256 over the files' contents (and names inside a folder source), or the hub fingerprint;
        with the config and split where the source has them, so two splits never share a hash."""
        if self.kind == "hub":
            dataset = _load_hub(self.spec.path, self.spec.config, self.split, self.spec.named)
            return hash_json({"hub": self.spec.path, "config": self.spec.config, "split": self.split,
                              "fingerprint": dataset._fingerprint})
        root = Path(self.spec.path)
        files = [[str(f.relative_to(root)) if f != root else "", sha256_file(f)] for f in self.files]
        return hash_json({"split": self.split, "files": files} if self.kind == "dataset-split" else files)

    def read(self) -> list[Record]:
        return list(self.records())

    def records(self) -> Iterator[Record]:
        """The records one at a time, read in bounded chunks: memory does not grow with the source."""
        if self.kind != "files":
            yield from _dataset_records(self._dataset(), self.name)
            return
        for file in self.files:
            yield from _read_file(file, self._whole)

    def count(self) -> int:
        """How many records ``records()`` yields, from metadata where the format has it (Parquet,
        ``datasets``), else by one streaming pass; a file that cannot be read is a DataError here."""
        if self.kind != "files":
            return len(self._dataset())
        total = 0
        for file in self.files:
            if file.name.endswith(".parquet"):
                total += _parquet_file(file).metadata.num_rows
            elif file.name.endswith(".json"):
                try:
                    total += sum(1 for _ in _stream_json_list(file))
                except _NotPlainList:
                    self._whole.add(file)
                    total += len(_read_json_whole(file))
            else:
                total += sum(1 for _ in _read_jsonl(file))
        return total

    def _dataset(self):
        if self.kind == "hub":
            return _load_hub(self.spec.path, self.spec.config, self.split, self.spec.named)
        import datasets

        return datasets.load_from_disk(str(Path(self.spec.path) / (self.split or "")))


def resolve_source(text: str, flag: str = "--data") -> Source:
    """Parse a ``--data`` (or ``--eval-data``, as ``flag`` says) value, find its files and choose its
    split; a UsageError if there is nothing to read."""
    spec = SourceSpec.parse(text, flag)
    text = spec.named
    path = Path(spec.path)
    if spec.selector and not (path.is_dir() and (path / "dataset_dict.json").is_file()) and path.exists():
        raise UsageError(f"{text}: {spec.selector!r} picks a split of a hub dataset or a saved DatasetDict folder, "
                         f"and {spec.path} is neither; drop it")
    if path.is_file():
        if not path.name.endswith(FILE_SUFFIXES):
            raise UsageError(f"{text}: unsupported file type (supported: {', '.join(FILE_SUFFIXES)})")
        return Source(spec, [path], "files")
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            return _dataset_dict_split(spec, path)
        if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
            return Source(spec, sorted(p for p in path.rglob("*") if p.is_file()), "saved-dataset")
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(FILE_SUFFIXES))
        if not files:
            raise UsageError(f"{text}: folder has no {', '.join(FILE_SUFFIXES)} files")
        return Source(spec, files, "files")
    if path.name.endswith(FILE_SUFFIXES) or path.is_absolute() or spec.path.startswith("."):
        raise UsageError(f"{text}: no such file or folder")
    split = spec.split or _default_split(spec, lambda: _hub_splits(spec))
    return Source(spec, [], "hub", split)


def _dataset_dict_split(spec: SourceSpec, root: Path) -> Source:
    """One split of a folder that ``DatasetDict.save_to_disk`` wrote."""
    if spec.config is not None:
        raise UsageError(f"{spec.named}: a saved DatasetDict folder has no configs, only splits; write "
                         f"{spec.path}#SPLIT")
    try:
        splits = list(json.loads((root / "dataset_dict.json").read_text())["splits"])
    except (OSError, ValueError, KeyError, TypeError):
        splits = sorted(p.name for p in root.iterdir() if p.is_dir())
    split = spec.split or _default_split(spec, lambda: splits)
    if split not in splits or not (root / split).is_dir():
        raise UsageError(f"{spec.named}: the saved DatasetDict has no split {split!r}; its splits: "
                         f"{', '.join(splits) or 'none'} (write {spec.path}#SPLIT)")
    return Source(spec, sorted(p for p in (root / split).rglob("*") if p.is_file()), "dataset-split", split)


def _default_split(spec: SourceSpec, splits) -> str:
    """The split read when none is given: train for --data; for --eval-data the one test-like split,
    as a held-out set must never default to the training data. ``splits`` lists them (on demand: for a
    hub dataset that needs the network)."""
    if spec.flag != "--eval-data":
        return "train"
    names = list(splits())
    test_like = [name for name in names if _TEST_LIKE.search(name.lower())]
    if len(test_like) == 1:
        return test_like[0]
    which = (f"it has {len(test_like)} test-like splits ({', '.join(test_like)})" if test_like
             else f"it has no test-like split (its splits: {', '.join(names) or 'none'})")
    example = f"{spec.path}#{spec.config + '/' if spec.config else ''}{(test_like or names or ['test'])[0]}"
    raise UsageError(f"{spec.named}: name the eval split, e.g. --eval-data {example}: {which}, and --eval-data "
                     "never falls back to the train split")


def _hub_splits(spec: SourceSpec) -> list[str]:
    import datasets

    try:
        return datasets.get_dataset_split_names(spec.path, spec.config)
    except Exception as exc:  # noqa: BLE001 - offline, unknown name, gated: all mean "cannot read it"
        raise _hub_error(spec, exc) from None


@functools.lru_cache(maxsize=None)
def _load_hub(name: str, config: str | None, split: str, named: str):
    import datasets

    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # noqa: BLE001 - offline, unknown name, gated: all mean "cannot read it"
        raise _hub_error(SourceSpec(named, name, None, named.split(" ")[0], config, split), exc) from None


def _hub_error(spec: SourceSpec, exc: Exception) -> UsageError:
    return UsageError(
        f"{spec.named}: not a local file or folder, and loading it as a Hugging Face hub dataset failed "
        f"(name {spec.path!r}, config {spec.config!r}, split {spec.split!r}: {type(exc).__name__}: {exc}). "
        "Without network access, download it elsewhere (datasets' save_to_disk, or its parquet/jsonl files) and "
        "pass the local path"
    )


ROWS_PER_CHUNK = 1024  # Parquet rows and datasets rows turned into Python objects at a time
JSON_READ_CHARS = 1 << 20  # text of a JSON list decoded at a time


def _dataset_records(dataset, file: str) -> Iterator[Record]:
    for start in range(0, len(dataset), ROWS_PER_CHUNK):
        chunk = dataset[start : start + ROWS_PER_CHUNK]
        names = list(chunk)
        for offset, values in enumerate(zip(*(chunk[name] for name in names))):
            yield Record(file, None, start + offset, dict(zip(names, values)))


def _parquet_file(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None


def _read_file(path: Path, whole: set[Path] = frozenset()) -> Iterator[Record]:
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz")):
        yield from _read_jsonl(path)
    elif name.endswith(".json"):
        if path in whole:
            yield from _read_json_whole(path)
            return
        try:
            yield from _stream_json_list(path)
        except _NotPlainList:
            raise DataError(f"{path}: changed while it was being read; rerun") from None
    else:
        parquet = _parquet_file(path)
        row = 0
        try:
            for batch in parquet.iter_batches(batch_size=ROWS_PER_CHUNK):
                for data in batch.to_pylist():
                    yield Record(str(path), None, row, data)
                    row += 1
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a damaged file
            raise DataError(f"{path}: not a readable Parquet file ({exc})") from None


def _read_json_whole(path: Path) -> list[Record]:
    # One JSON document: bytes that are not UTF-8 stay in its strings as lone surrogates, which
    # normalise() reports as a bad record naming the row and field.
    text = decode_text(path, path.read_bytes())
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # a .json file that is really JSON lines
            return list(_read_jsonl(path))
        raise DataError(f"{path}, line {exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return [Record(str(path), None, i, row) for i, row in enumerate(data)]


class _NotPlainList(Exception):
    """A .json file that is anything but one well-formed list of values: read whole instead."""


def _stream_json_list(path: Path) -> Iterator[Record]:
    """The elements of a file holding one JSON list, decoded JSON_READ_CHARS of text at a time, the
    same values json.loads gives; anything else (bad JSON, not a list, text after it) raises
    _NotPlainList so that the whole-file reading judges it."""
    decoder = json.JSONDecoder()
    with open(path, "rb") as raw:
        _check_bom(path, raw.read(4))
    with open(path, "rt", encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        buffer, position, done = "", 0, False

        def more() -> bool:
            nonlocal buffer, position, done
            chunk = f.read(JSON_READ_CHARS)
            buffer, position, done = buffer[position:] + chunk, 0, not chunk
            return not done

        def skip_space() -> str:
            nonlocal position
            while True:
                while position < len(buffer) and buffer[position] in " \t\n\r":
                    position += 1
                if position < len(buffer) or not more():
                    return buffer[position] if position < len(buffer) else ""

        if skip_space() != "[":
            raise _NotPlainList
        position += 1
        row = 0
        if skip_space() == "]":
            position += 1
        else:
            while True:
                skip_space()
                while True:
                    try:
                        value, end = decoder.raw_decode(buffer, position)
                        # A number or literal cut by the end of the buffer decodes short: read on.
                        if end == len(buffer) and not done and more():
                            continue
                        break
                    except json.JSONDecodeError:
                        if done or not more():
                            raise _NotPlainList from None
                position = end
                yield Record(str(path), None, row, value)
                row += 1
                mark = skip_space()
                position += 1
                if mark == "]":
                    break
                if mark != ",":
                    raise _NotPlainList
        if skip_space() != "":
            raise _NotPlainList


def _read_jsonl(path: Path) -> Iterator[Record]:
    return (Record(str(path), number, None, line) for number, line in read_lines(path) if line.strip())


# ------------------------------------------------------------------------------ text encoding
#
# Data files are UTF-8. A UTF-8 byte-order mark at the very start of a file is an encoding marker
# that many tools write (Excel, Notepad, PowerShell), not content: it is skipped. Anywhere else
# U+FEFF is a character like any other (inside a JSON string it stays in the text; before a JSON
# line that is not the first it makes that line invalid JSON, a bad record). A file that starts
# with a UTF-16 or UTF-32 byte-order mark is in another encoding: refused as a whole. Bytes that are
# not UTF-8 make only their own line a bad record (file and line), so --on-bad-record skip can
# set it aside; they are carried as lone surrogates ("surrogateescape") until then.

_OTHER_BOMS = {b"\xff\xfe\x00\x00": "UTF-32", b"\x00\x00\xfe\xff": "UTF-32", b"\xff\xfe": "UTF-16",
               b"\xfe\xff": "UTF-16"}
_ESCAPED = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of a byte that is not UTF-8


def _check_bom(path: Path, head: bytes) -> None:
    for bom, encoding in _OTHER_BOMS.items():
        if head.startswith(bom):
            raise DataError(f"{path}: starts with a {encoding} byte-order mark, so it is {encoding} text; dpo reads "
                            "UTF-8: convert it (e.g. iconv -f UTF-16 -t UTF-8)")


def decode_text(path: Path, data: bytes) -> str:
    """A whole file's bytes as text: a leading UTF-8 BOM skipped, bytes that are not UTF-8 kept as lone surrogates."""
    _check_bom(path, data[:4])
    return data.decode("utf-8-sig", errors="surrogateescape")


def not_utf8(line: bytes) -> str:
    """What is wrong with a line that is not UTF-8, and where (a position in the line, not in the file)."""
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return (f"not UTF-8 text (byte 0x{line[exc.start]:02x} at byte {exc.start + 1} of the line); "
                "save the file as UTF-8")
    return "not UTF-8 text"


def read_lines(path: Path):
    """``(line number, line)`` of a text file (gzip-compressed if it ends in .gz), 1-based, with
    universal newlines; a line that is not UTF-8 comes as its raw bytes. A file that cannot be read
    at all is a DataError naming it."""
    compressed = path.name.endswith(".gz")
    opener = gzip.open if compressed else open
    try:
        with opener(path, "rb") as raw:
            _check_bom(path, raw.read(4))
        with opener(path, "rt", encoding="utf-8-sig", errors="surrogateescape") as f:
            for number, line in enumerate(f, 1):
                if _ESCAPED.search(line):
                    yield number, line.encode("utf-8", errors="surrogateescape")
                else:
                    yield number, line
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read it as {'gzip-compressed ' if compressed else ''}JSON lines ({exc})") from None


def _rank(seed: int, key: str, position: int) -> bytes:
    return hashlib.sha256(f"{seed}:{key}:{position}".encode()).digest()


def _lowest_ranks(count: int, take: int, seed: int, key: str) -> np.ndarray:
    """A mask of the ``take`` positions of lowest rank, holding 8 bytes per position (not a digest
    object each): ranks are compared by their first 8 bytes, and only a tie across the cut is settled
    by the full digests, so the choice is exactly that of sorting by ``_rank``."""
    prefix = np.fromiter((int.from_bytes(_rank(seed, key, i)[:8], "big") for i in range(count)),
                         dtype=np.uint64, count=count)
    mask = np.zeros(count, dtype=bool)
    if take == 0:
        return mask
    order = np.argsort(prefix, kind="stable")
    if take < count and prefix[order[take - 1]] == prefix[order[take]]:
        tied_value = prefix[order[take - 1]]
        below = int(np.count_nonzero(prefix < tied_value))
        tied = sorted(np.flatnonzero(prefix == tied_value).tolist(), key=lambda i: _rank(seed, key, i))
        mask[prefix < tied_value] = True
        mask[tied[: take - below]] = True
        return mask
    mask[order[:take]] = True
    return mask


def sample_mask(count: int, amount: int | float | None, seed: int, key: str, what: str) -> np.ndarray | None:
    """Which of ``count`` rows a ``:AMOUNT`` takes (None: all of them); ``what`` names the source in
    messages (``--data PATH:AMOUNT``). Depends only on the count, seed and key, never on the rows."""
    if amount is None:
        return None
    take = round(amount * count) if isinstance(amount, float) else amount
    if take > count:
        raise UsageError(f"{what}: asks for {take} rows but the source has only {count}")
    if take == 0:
        raise UsageError(f"{what}: takes no rows ({amount:g} of {count} rounds to 0); give a larger fraction or a row count")
    return _lowest_ranks(count, take, seed, key)


def sample_rows(count: int, amount: int | float | None, seed: int, key: str, what: str) -> list[int]:
    """Positions of the rows a ``:AMOUNT`` takes, in their original order."""
    mask = sample_mask(count, amount, seed, key, what)
    return list(range(count)) if mask is None else np.flatnonzero(mask).tolist()


def fraction_mask(count: int, fraction: float, seed: int, key: str) -> np.ndarray:
    """A seeded, reproducible subset of ``round(fraction * count)`` positions (for --eval-fraction)."""
    return _lowest_ranks(count, round(fraction * count), seed, key)


def pick_fraction(count: int, fraction: float, seed: int, key: str) -> set[int]:
    return set(np.flatnonzero(fraction_mask(count, fraction, seed, key)).tolist())
