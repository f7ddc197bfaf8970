"""The order training sees pairs in: a pure function of (seed, epoch), so a cursor is all a resumed
run needs to continue exactly where an uninterrupted one would be.

A global batch (per-device batch x accumulation x processes pairs) is one optimizer step. Each
epoch's global batches are seeded, shuffled and length-grouped (pipeline/batching.py); each rank
then takes its micro-batches of every global batch.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .batching import full_length_groups


@dataclasses.dataclass(frozen=True)
class Cursor:
    epoch: int = 0
    batches_done: int = 0  # global batches of this epoch already trained on


class BatchOrder:
    """Global batches of one epoch: seeded, shuffled, grouped by length within megabatches."""

    def __init__(self, lengths: np.ndarray, global_batch: int, seed: int):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.global_batch = global_batch
        self.seed = seed
        self.steps_per_epoch = len(self.lengths) // global_batch
        self._epoch = -1
        self._batches = np.zeros((0, global_batch), dtype=np.int64)

    def _epoch_batches(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            # Incomplete global batches are dropped: every rank then gets the same number of
            # equal micro-batches, so the accumulated mean equals the big batch's mean exactly.
            self._batches = full_length_groups(self.lengths, self.global_batch, seed=self.seed * 100_003 + epoch)
            self._epoch = epoch
        return self._batches

    def batch(self, cursor: Cursor) -> list[int]:
        return self._epoch_batches(cursor.epoch)[cursor.batches_done].tolist()

    def advance(self, cursor: Cursor) -> Cursor:
        if cursor.batches_done + 1 >= self.steps_per_epoch:
            return Cursor(cursor.epoch + 1, 0)
        return Cursor(cursor.epoch, cursor.batches_done + 1)

    def epoch_progress(self, cursor: Cursor) -> float:
        return round(cursor.epoch + cursor.batches_done / self.steps_per_epoch, 6)


def micro_batches(batch: list[int], lengths: np.ndarray, per_device: int, grad_accum: int, world: int,
                  rank: int) -> list[list[int]]:
    """This rank's ``grad_accum`` micro-batches of a global batch, each of similar-length pairs.

    Micro-batch ``m * world + rank`` of the length-sorted batch: at every accumulation step the
    ranks get neighbouring lengths, so no rank waits long for another at the gradient all-reduce.
    """
    ordered = sorted(batch, key=lambda i: (-int(lengths[i]), i))
    micros = [ordered[j * per_device:(j + 1) * per_device] for j in range(world * grad_accum)]
    return [micros[m * world + rank] for m in range(grad_accum)]
