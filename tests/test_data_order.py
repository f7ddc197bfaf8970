"""The training data order: seeded per epoch, resumable from a cursor, split over ranks and accumulation."""

from __future__ import annotations

import numpy as np
import pytest

from dpo.pipeline.data_order import BatchOrder, Cursor, micro_batches

LENGTHS = np.random.default_rng(0).integers(5, 300, size=103)


def test_each_epoch_is_a_seeded_permutation_without_the_remainder():
    order = BatchOrder(LENGTHS, global_batch=8, seed=3)
    assert order.steps_per_epoch == 12  # 103 // 8: the last 7 pairs of the shuffle wait for the next epoch
    epoch0 = [order.batch(Cursor(0, k)) for k in range(12)]
    seen = [i for batch in epoch0 for i in batch]
    assert all(len(b) == 8 for b in epoch0) and len(set(seen)) == 96
    assert epoch0 == [BatchOrder(LENGTHS, 8, 3).batch(Cursor(0, k)) for k in range(12)]  # a pure function
    assert epoch0 != [order.batch(Cursor(1, k)) for k in range(12)]
    assert epoch0 != [BatchOrder(LENGTHS, 8, 4).batch(Cursor(0, k)) for k in range(12)]


def test_a_cursor_resumes_where_an_uninterrupted_run_is():
    """Advancing k steps and asking a fresh order for the batch at the cursor gives what an
    uninterrupted run sees at step k: all a checkpoint needs is the cursor."""
    order = BatchOrder(LENGTHS, 8, seed=1)
    cursor, uninterrupted = Cursor(), []
    for _ in range(30):  # past the end of epoch 0 (12 steps) and epoch 1
        uninterrupted.append(order.batch(cursor))
        cursor = order.advance(cursor)
    assert cursor == Cursor(2, 6)
    resumed = BatchOrder(LENGTHS, 8, seed=1)
    assert resumed.batch(Cursor(1, 5)) == uninterrupted[17]
    assert order.epoch_progress(Cursor(1, 6)) == pytest.approx(1.5)


def test_the_order_is_the_one_earlier_versions_saved_checkpoints_with():
    """A checkpoint stores only the cursor: the order behind it must stay the same across versions (this
    pins the one the list-of-lists implementation produced before the order became one numpy array)."""
    order = BatchOrder(LENGTHS, 8, seed=3)
    assert order.batch(Cursor(0, 0)) == [53, 55, 14, 58, 77, 19, 11, 91]
    assert order.batch(Cursor(0, 5)) == [3, 92, 48, 82, 93, 31, 8, 65]
    assert order.batch(Cursor(1, 11)) == [57, 80, 22, 45, 59, 10, 47, 1]


@pytest.mark.parametrize("world, grad_accum", [(1, 1), (1, 4), (2, 2), (4, 1)])
def test_micro_batches_cover_the_global_batch_once_with_neighbouring_lengths(world, grad_accum):
    per_device = 2
    batch = BatchOrder(LENGTHS, per_device * grad_accum * world, seed=0).batch(Cursor())
    parts = {rank: micro_batches(batch, LENGTHS, per_device, grad_accum, world, rank) for rank in range(world)}
    flat = sorted(i for micros in parts.values() for micro in micros for i in micro)
    assert flat == sorted(batch)
    assert all(len(micro) == per_device for micros in parts.values() for micro in micros)
    # At accumulation step m the ranks hold consecutive slices of the length-sorted batch.
    ordered = sorted(batch, key=lambda i: (-int(LENGTHS[i]), i))
    for m in range(grad_accum):
        step = [i for rank in range(world) for i in parts[rank][m]]
        assert step == ordered[m * world * per_device:(m + 1) * world * per_device]
