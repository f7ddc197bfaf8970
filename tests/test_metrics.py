"""Training metrics as named sums: micro-batches and ranks add up to the global batch's means."""

from __future__ import annotations

import pytest
import torch

from dpo.pipeline import metrics
from dpo.pipeline.logprobs import SequenceLogProbs
from dpo.pipeline.losses import METRIC_NAMES, preference_loss, preference_metrics
from dpo.pipeline.scoring import PairScores

PC, PR = [-10.0, -20.0, -5.0, -7.0], [-14.0, -18.0, -6.0, -9.0]
RC, RR = [-11.0, -19.0, -6.0, -7.5], [-13.0, -19.0, -4.0, -8.0]


def scored(rows: slice, tokens: int, slots: int) -> tuple:
    t = lambda values: torch.tensor(values, dtype=torch.float32)[rows]  # noqa: E731
    n = torch.tensor([4, 8, 2, 3])[rows]
    out = preference_loss("dpo", policy_chosen_logps=t(PC), policy_rejected_logps=t(PR), chosen_num_tokens=n,
                          rejected_num_tokens=n, reference_chosen_logps=t(RC), reference_rejected_logps=t(RR), beta=0.1)
    scores = PairScores(SequenceLogProbs(t(PC), n), SequenceLogProbs(t(PR), n), tokens, slots)
    return out, scores


def test_micro_batch_sums_give_the_whole_batch_means():
    whole_out, whole_scores = scored(slice(0, 4), tokens=30, slots=40)
    parts = [scored(slice(0, 1), 10, 12), scored(slice(1, 4), 20, 28)]
    total = None
    for out, scores in parts:
        total = metrics.add(total, metrics.batch_sums(out, scores))
    totals = metrics.reduced(total, lambda x: x, torch.device("cpu"))
    assert totals["pairs"] == 4 and totals["tokens"] == 30 and totals["slots"] == 40
    assert metrics.means(totals) == pytest.approx(preference_metrics(whole_out, whole_scores.chosen.logps,
                                                                     whole_scores.rejected.logps))


def test_window_reduces_once_and_reports_throughput_and_padding():
    calls = []

    def reduce(values: torch.Tensor) -> torch.Tensor:
        calls.append(values.shape)
        return values * 2  # as if a second rank had the same sums

    window = metrics.Window()
    for part in (slice(0, 2), slice(2, 4)):
        out, scores = scored(part, tokens=15, slots=20)
        window.add(metrics.batch_sums(out, scores))
    window.grad_norm = 1.5
    row, counts = window.flush(reduce, torch.device("cpu"))
    assert len(calls) == 1  # one collective for every metric
    assert counts == {"pairs": 8.0, "tokens": 60.0, "slots": 80.0}
    assert row["padding_fraction"] == pytest.approx(0.25) and row["tokens_per_second"] > 0
    assert row["grad_norm"] == 1.5 and set(METRIC_NAMES) <= set(row)
    assert window.sums is None  # the next window starts empty
