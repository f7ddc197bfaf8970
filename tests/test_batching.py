from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from dpo.pipeline.batching import arrow_indices, as_numpy, full_length_groups, length_grouped_batches, pair_lengths, take_rows
from dpo.pipeline.scoring import collate_pairs
from dpo.artifacts.errors import DataError


def pair(index, chosen, rejected, prompt=2):
    return {
        "index": index,
        "chosen_input_ids": chosen, "chosen_labels": [-100] * prompt + chosen[prompt:],
        "rejected_input_ids": rejected, "rejected_labels": [-100] * prompt + rejected[prompt:],
    }


ROWS = [pair(7, [1, 2, 3, 4], [1, 2, 5]), pair(3, [1, 2, 6], [1, 2, 7, 8, 9])]


def test_concatenated_puts_chosen_first_and_pads_right_to_one_length():
    batch = collate_pairs(ROWS, pad_token_id=0)
    assert batch["input_ids"].tolist() == [
        [1, 2, 3, 4, 0], [1, 2, 6, 0, 0],  # chosen of pair 0, 1
        [1, 2, 5, 0, 0], [1, 2, 7, 8, 9],  # rejected of pair 0, 1
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [
        [-100, -100, 3, 4, -100], [-100, -100, 6, -100, -100],
        [-100, -100, 5, -100, -100], [-100, -100, 7, 8, 9],
    ]
    assert batch["index"].tolist() == [7, 3]


def test_separate_pads_each_side_to_its_own_length():
    batch = collate_pairs(ROWS, pad_token_id=99, mode="separate", pad_to_multiple_of=4)
    assert batch["chosen_input_ids"].tolist() == [[1, 2, 3, 4], [1, 2, 6, 99]]
    assert batch["rejected_input_ids"].shape == (2, 8)  # 5 rounded up to a multiple of 4
    assert batch["rejected_labels"][0].tolist() == [-100, -100, 5] + [-100] * 5
    assert batch["chosen_attention_mask"].sum().item() == 7
    assert "input_ids" not in batch


def test_misaligned_labels_name_the_pair():
    bad = pair(41, [1, 2, 3], [1, 2, 3])
    bad["rejected_labels"] = [-100, 2]
    with pytest.raises(DataError, match="pair index 41: rejected_labels has 2 entries but rejected_input_ids has 3"):
        collate_pairs([bad], pad_token_id=0)


def test_sorted_batches_cover_every_row_once_longest_first():
    lengths = [5, 1, 9, 9, 3, 7, 2]
    batches = length_grouped_batches(lengths, 3)
    assert batches == [[2, 3, 5], [0, 4, 6], [1]]
    assert length_grouped_batches(lengths, 3, drop_last=True) == [[2, 3, 5], [0, 4, 6]]


def padding_fraction(lengths, batches):
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - real / padded


def test_shuffled_megabatches_are_seeded_permutations_with_little_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 500, size=1000).tolist()
    a = length_grouped_batches(lengths, 8, shuffle=True, seed=1)
    b = length_grouped_batches(lengths, 8, shuffle=True, seed=1)
    c = length_grouped_batches(lengths, 8, shuffle=True, seed=2)
    assert a == b and a != c
    assert sorted(i for batch in a for i in batch) == list(range(1000))
    assert max(lengths[i] for i in a[0]) == max(lengths)
    in_order = [list(range(s, min(s + 8, 1000))) for s in range(0, 1000, 8)]
    assert padding_fraction(lengths, a) < padding_fraction(lengths, in_order) / 4
    assert padding_fraction(lengths, length_grouped_batches(lengths, 8)) <= padding_fraction(lengths, a)


def test_the_order_as_one_array_is_the_shuffled_batches_without_the_short_one():
    lengths = np.random.default_rng(5).integers(1, 40, size=1003)  # 1003 = 125 x 8 + 3: one short batch
    batches = length_grouped_batches(lengths, 8, shuffle=True, seed=9, megabatch_factor=4, drop_last=True)
    array = full_length_groups(lengths, 8, seed=9, megabatch_factor=4)
    assert array.shape == (125, 8) and array.tolist() == batches
    assert len(set(array.ravel().tolist())) == 1000


def test_pair_length_is_the_longer_side():
    assert pair_lengths(ROWS).tolist() == [4, 5]


def test_columns_reach_numpy_through_their_buffers_as_arrow_would_convert_them():
    chunked = pa.chunked_array([pa.array([5, 6, 7, 8], pa.int32()).slice(1), pa.array([9], pa.int32())])
    assert as_numpy(chunked).tolist() == [6, 7, 8, 9] and as_numpy(chunked).dtype == np.int64
    floats = pa.array([0.5, -1.25, 3.0], pa.float32()).slice(1, 2)
    assert as_numpy(floats, np.float32).tolist() == [-1.25, 3.0]
    assert as_numpy(pa.chunked_array([], pa.int64())).tolist() == []
    bufferless = pa.Array.from_buffers(pa.int32(), 0, [None, None])
    assert as_numpy(pa.chunked_array([bufferless, pa.array([4], pa.int32())])).tolist() == [4]
    with pytest.raises(ValueError, match="without nulls"):
        as_numpy(pa.array([1, None]))
    table = pa.Table.from_batches([pa.record_batch({"x": pa.array(range(k, k + 3))}) for k in (0, 3, 6)])
    assert take_rows(table, [7, 0, 4, 4]).column("x").to_pylist() == [7, 0, 4, 4]
    assert table.take(arrow_indices(np.array([8, 1]))).column("x").to_pylist() == [8, 1]


def test_reading_lengths_and_batches_does_not_import_pandas(tmp_path):
    """pyarrow's own conversions import pandas (a third of a second of every stage's start-up)."""
    ids = pa.array([[1, 2, 3], [4, 5]], pa.list_(pa.int32()))
    lengths = pa.array([3, 2], pa.int32())
    batch = pa.RecordBatch.from_arrays([ids, ids, lengths, lengths, pa.array([1, 1], pa.int32())], [
        "chosen_input_ids", "rejected_input_ids", "chosen_length", "rejected_length", "prompt_length"])
    with pa.ipc.new_file(tmp_path / "pairs.arrow", batch.schema) as writer:  # as tokenize writes its copies
        writer.write_batch(batch)
        writer.write_batch(batch)
    code = f"""
import sys, pyarrow as pa
from dpo.pipeline.batching import pair_lengths, sequence_lengths, take_rows, ragged
table = pa.ipc.open_file(pa.memory_map({str(tmp_path / "pairs.arrow")!r})).read_all()
assert "pandas" not in sys.modules
assert pair_lengths(table).tolist() == [3, 2, 3, 2]
assert sequence_lengths(table)[1].tolist() == [2, 1, 2, 1, 2, 1, 2, 1]
assert take_rows(table, [3, 0]).column("chosen_length").to_pylist() == [2, 3]
assert ragged(table, "chosen_input_ids")[0].tolist() == [1, 2, 3, 4, 5, 1, 2, 3, 4, 5]
assert "pandas" not in sys.modules, "pandas was imported"
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
