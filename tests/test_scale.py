"""Memory that does not grow with the data (issue 11): streaming sources, content-keyed sampling
from counts, shards written row group by row group, and memory-mapped readers."""

from __future__ import annotations

import gzip
import json
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import DEMO, HH_DATA
from dpo.artifacts.errors import DataError
from dpo.artifacts.shards import ROW_GROUP_ROWS, ArtifactReader, ShardWriter, arrow_copy_path
from dpo.pipeline import sources
from dpo.pipeline.sources import fraction_mask, resolve_source, sample_mask
from dpo.stages.tokenize import MAPPED_COLUMNS, TokenizeConfig, run

REPO = DEMO.parent


def hh_records(n: int) -> list[dict]:
    with gzip.open(HH_DATA, "rt") as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


# ------------------------------------------------------------------------------ sampling


def sorted_choice(count: int, take: int, rank) -> list[int]:
    """The selection as it was made before streaming: every position sorted by its full rank."""
    return sorted(sorted(range(count), key=rank)[:take])


@pytest.mark.parametrize("count,amount", [(1000, 0.25), (997, 0.5), (50, 49), (5000, 7), (1, 1)])
def test_sample_mask_is_the_sort_by_full_digest(count, amount):
    mask = sample_mask(count, amount, 3, "key", "src")
    take = round(amount * count) if isinstance(amount, float) else amount
    assert np.flatnonzero(mask).tolist() == sorted_choice(count, take, lambda i: sources._rank(3, "key", i))
    assert sample_mask(count, None, 3, "key", "src") is None


def test_ties_of_the_8_byte_prefix_are_settled_by_the_full_digest(monkeypatch):
    # Ranks whose first 8 bytes take 3 values: a cut inside a tie must follow the rest of the digest.
    rank = lambda seed, key, i: bytes([i % 3]) * 8 + ((i * 7919) % 1009).to_bytes(4, "big")  # noqa: E731
    monkeypatch.setattr(sources, "_rank", rank)
    for take in (1, 100, 334, 335, 600, 999):
        assert np.flatnonzero(fraction_mask(1000, take / 1000, 0, "k")).tolist() == sorted_choice(
            1000, take, lambda i: rank(0, "k", i))


# ------------------------------------------------------------------------------ streaming sources


def test_json_list_streams_in_small_reads_with_the_values_json_loads_gives(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "JSON_READ_CHARS", 7)  # every value cut across reads
    records = [{"prompt": "ünï ☃ \"q\"", "chosen": "a\nb", "rejected": "c", "n": 12345678, "f": -1.5e-3,
                "nested": [1, [2, {"x": None}], True]} for _ in range(5)] + [17, "s", None, 3.25]
    path = tmp_path / "list.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(records, indent=1, ensure_ascii=False).encode() + b"\n")
    source = resolve_source(str(path))
    assert source.count() == len(records)
    assert [(r.row, r.data) for r in source.records()] == list(enumerate(records))


@pytest.mark.parametrize("text,expected", [
    ('{"a": 1}\n{"a": 2}\n', [{"a": 1}, {"a": 2}]),  # JSON lines under a .json name
    ('[{"a": 1}]\n[{"a": 2}]\n', None),  # text after the list: read as JSON lines, as before
])
def test_json_that_is_not_one_list_is_read_whole_as_before(tmp_path, monkeypatch, text, expected):
    monkeypatch.setattr(sources, "JSON_READ_CHARS", 4)
    path = tmp_path / "odd.json"
    path.write_text(text)
    source = resolve_source(str(path))
    assert source.count() == 2
    records = list(source.records())
    assert [r.line for r in records] == [1, 2]
    if expected is not None:
        assert [r.parsed() for r in records] == expected
    else:
        with pytest.raises(DataError, match="line 1: expected a JSON object"):
            records[0].parsed()


def test_broken_json_list_names_its_line_as_before(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "JSON_READ_CHARS", 5)
    path = tmp_path / "broken.json"
    path.write_text('[\n{"a": 1},\n{"a": 2,,}\n]')
    with pytest.raises(DataError, match=r"broken.json, line 3: not valid JSON \(Expecting property name"):
        resolve_source(str(path)).count()


def test_parquet_is_read_row_group_by_row_group(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "ROWS_PER_CHUNK", 3)
    rows = hh_records(10)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet", row_group_size=4)
    source = resolve_source(str(tmp_path / "d.parquet"))
    assert source.count() == 10
    assert [(r.row, r.data) for r in source.records()] == list(enumerate(rows))


def test_saved_dataset_is_read_in_chunks(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(sources, "ROWS_PER_CHUNK", 4)
    rows = [{"prompt": f"p{i}", "chosen": [{"role": "assistant", "content": f"c{i}"}], "rejected": "r"} for i in range(9)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    source = resolve_source(str(tmp_path / "saved"))
    assert source.count() == 9
    assert [r.data for r in source.records()] == list(datasets.load_from_disk(str(tmp_path / "saved")))


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_reading_a_source_holds_a_bounded_amount_of_it(tmp_path, monkeypatch, suffix):
    monkeypatch.setattr(sources, "JSON_READ_CHARS", 1 << 16)
    record = {"prompt": "x" * 1000, "chosen": "y" * 500, "rejected": "z" * 500}
    path = tmp_path / ("big" + suffix)
    with open(path, "w") as f:
        if suffix == ".json":
            f.write("[" + ",\n".join(json.dumps(record) for _ in range(4000)) + "]")
        else:
            f.writelines(json.dumps(record) + "\n" for _ in range(4000))
    assert path.stat().st_size > 7 * 2**20
    source = resolve_source(str(path))
    tracemalloc.start()
    try:
        assert source.count() == 4000
        assert sum(len(r.data) if isinstance(r.data, str) else 1 for r in source.records()) > 0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, f"peak {peak / 2**20:.1f} MiB while streaming a {path.stat().st_size / 2**20:.0f} MiB file"


# ------------------------------------------------------------------------------ writing and reading shards


@pytest.mark.parametrize("rows", [0, 5, ROW_GROUP_ROWS, 2 * ROW_GROUP_ROWS + 77])
def test_shard_written_in_pieces_is_the_file_of_one_table(tmp_path, rows):
    table = pa.table({"index": pa.array(range(rows), pa.int64()),
                      "ids": pa.array([[i, i + 1][: i % 3] for i in range(rows)], pa.list_(pa.int32()))})
    pq.write_table(table, tmp_path / "whole.parquet", compression="zstd", row_group_size=max(1, min(rows, ROW_GROUP_ROWS)))
    writer = ShardWriter(tmp_path, "split/part.parquet", table.schema, arrow_copy=True)
    start = 0
    for size in [1, 300, 5000, 9000] * 10:
        writer.write(table.slice(start, size))
        start += size
    writer.write(table.slice(start))
    entry = writer.commit()
    assert entry.rows == rows
    assert (tmp_path / "split/part.parquet").read_bytes() == (tmp_path / "whole.parquet").read_bytes()
    copy = pa.ipc.open_file(pa.memory_map(str(tmp_path / arrow_copy_path("split/part.parquet")))).read_all()
    assert copy.equals(table)
    assert not list(tmp_path.rglob("*.tmp"))


PINNED = {  # made by the code before streaming (whole sources in memory): the bytes must not change
    "train/part-00000-of-00008.parquet": "cfa889b230a42a94210f5368fb2f6bee9506ce483c0f6f9e47ec80d5769762bc",
    "train/part-00001-of-00008.parquet": "28e5289b1ccf83e5cea3b515c389e5f0ba57bf5524c9641cc612af1ffe8f7485",
    "train/part-00002-of-00008.parquet": "2aa85c155d2ce3ed1b29ededf5971cfc790649decfb76d63b8b0d07f548823e2",
    "train/part-00003-of-00008.parquet": "3334d54165ef583d0653ed2dcdf3441581c34e19b6a79bdcaecbdae40356cf69",
    "train/part-00004-of-00008.parquet": "80b4dbed1d6a3a23e30c69f26c17ee4660da77da5e5f062d8ae2b91cb9ed4cbe",
    "train/part-00005-of-00008.parquet": "f72cf345346162bf4eb4b70a9b13bddee7e2016f7496276a28c289570cfd0000",
    "train/part-00006-of-00008.parquet": "0ee50c64a7227d9a99aba63dc01909a8b30ccb1e908796dd3118d952df1cab61",
    "train/part-00007-of-00008.parquet": "89ef3ffe9801640eda9267d89d025b207c600663fc920001633f394edbfdf3d5",
    "eval/part-00000-of-00001.parquet": "eccf68d3b265f7cb273d7f573303aee8fa1ffb569f82019cbb772b87d6d24a5a",
    "rejects.jsonl": "75d5d6b123d2e38d62941b953749a7965e1211390ccd55cc0f381959641f5239",
}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """Two sources sampled with PATH:AMOUNT, an --eval-fraction, 8 train shards: paths relative to the
    repository, as the pinned bytes were made (the source column holds the path as given)."""
    out = tmp_path_factory.mktemp("mixed") / "tok"
    cwd = Path.cwd()
    os.chdir(REPO)
    try:
        run(TokenizeConfig(data=("demo/data/hh-rlhf-harmless-test.jsonl.gz:0.3", "demo/data/llamafactory-dpo-en-demo.json:100"),
                           tokenizer="demo/model", out=str(out), quiet=True, rows_per_shard=97, eval_fraction=0.1, seed=7,
                           max_prompt_length=0))  # no prompt limit: the default when the bytes were pinned
    finally:
        os.chdir(cwd)
    return out


def test_streamed_tokenize_writes_the_bytes_of_the_in_memory_one(mixed):
    files = {f["path"]: f["sha256"] for f in json.loads((mixed / "manifest.json").read_text())["files"]}
    assert {path: sha for path, sha in files.items() if not path.endswith(".arrow")} == PINNED
    assert sorted(p for p in files if p.endswith(".arrow")) == sorted(arrow_copy_path(p) for p in PINNED if p.endswith(".parquet"))


def test_reader_memory_maps_the_arrow_copies(mixed):
    reader = ArtifactReader(mixed, kind="tokenized", verify=True)
    assert reader.manifest.rows("train") == sum(pq.ParquetFile(mixed / p).metadata.num_rows for p in PINNED if p.startswith("train/"))
    before = pa.total_allocated_bytes()
    train = reader.read_split("train")
    assert pa.total_allocated_bytes() - before < 4096  # the rows stay in the mapped files, not in memory
    parquet = pa.concat_tables(pq.read_table(mixed / p) for p in sorted(PINNED) if p.startswith("train/"))
    assert train.column_names == MAPPED_COLUMNS and train.equals(parquet.select(MAPPED_COLUMNS))
    picked = train.take([0, 400, 17])
    assert picked.column("index").to_pylist() == [0, 400, 17]
    assert picked.equals(parquet.select(MAPPED_COLUMNS).take([0, 400, 17]))


def test_labels_derived_from_the_arrow_copies_are_the_parquet_shards_labels(mixed):
    """The copies leave the labels out; what the stages derive from ids and prompt length is what
    tokenize wrote, for every pair of both splits and both sides (real HH and Alpaca-style records)."""
    from dpo.pipeline.batching import scored_label_tokens, side_tokens

    reader = ArtifactReader(mixed, kind="tokenized", verify=True)
    for split in ("train", "eval"):
        mapped = reader.read_split(split)
        parquet = pa.concat_tables(pq.read_table(mixed / p) for p in sorted(PINNED) if p.startswith(f"{split}/"))
        assert "chosen_labels" not in mapped.column_names and mapped.num_rows == parquet.num_rows > 0
        for side in ("chosen", "rejected"):
            derived, written = side_tokens(mapped, side), side_tokens(parquet, side)
            for a, b in zip(derived, written):
                np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(scored_label_tokens(mapped, side), scored_label_tokens(parquet, side))
            positions = [3, 0, mapped.num_rows - 1]
            np.testing.assert_array_equal(scored_label_tokens(mapped, side, positions),
                                          scored_label_tokens(parquet, side, positions))


def test_take_rows_reads_only_the_batches_it_needs_and_keeps_the_order(mixed):
    from dpo.pipeline.batching import take_rows

    train = ArtifactReader(mixed, kind="tokenized", verify=False).read_split("train")
    assert len(train.to_batches()) > 1
    whole = train.combine_chunks()
    for positions in ([5, 0, 400, 96, 97, 5, len(whole) - 1], [], [42]):
        picked = take_rows(train, positions)
        assert picked.column("index").to_pylist() == positions
        assert picked.equals(whole.take(pa.array(positions, pa.int64())))
