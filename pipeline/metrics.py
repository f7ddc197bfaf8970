"""Training metrics as named sums: added over micro-batches, reduced across ranks in one collective.

Sums, not means, so micro-batches and ranks add up exactly; the logged row divides by the pair
count only once everything is summed. The names are TRL's (``loss``, ``rewards/margins``, ...),
plus ``loss/NAME`` for each component of a combined loss. A loss's own per-example values
(``PreferenceLoss.extras``, e.g. bco_pair's rewards for its running mean) are summed alongside
under their names but not logged.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from .losses import METRIC_NAMES, PreferenceLoss, metric_sums
from .scoring import PairScores

COUNTS = ("pairs", "tokens", "slots")  # pairs scored; real tokens; token positions incl. padding
Reduce = Callable[[torch.Tensor], torch.Tensor]  # a sum over ranks (identity in one process)


def batch_sums(out: PreferenceLoss, scores: PairScores) -> dict[str, torch.Tensor]:
    """The metric sums and counts of one scored micro-batch, by name."""
    values = dict(zip((*METRIC_NAMES, "pairs"), metric_sums(out, scores.chosen.logps, scores.rejected.logps)))
    for name, losses in out.components.items():
        values[component_metric(name)] = losses.detach().double().sum()
    for name, extra in out.extras.items():
        values[name] = extra.detach().double().sum()
    device = values["pairs"].device
    values["tokens"] = torch.tensor(float(scores.tokens), dtype=torch.float64, device=device)
    values["slots"] = torch.tensor(float(scores.slots), dtype=torch.float64, device=device)
    return values


def add(total: dict[str, torch.Tensor] | None, sums: dict[str, torch.Tensor], weight: float = 1.0) -> dict[str, torch.Tensor]:
    if total is None:
        return {k: v * weight for k, v in sums.items()}
    return {k: total[k] + v * weight for k, v in sums.items()}


def component_metric(name: str) -> str:
    return f"loss/{name}"


def reduced(sums: dict[str, torch.Tensor], reduce: Reduce, device: torch.device) -> dict[str, float]:
    """Every sum, summed over ranks in one collective, as floats (in the order ``sums`` has them)."""
    names = sorted(sums)
    total = dict(zip(names, reduce(torch.stack([sums[n].to(device) for n in names])).tolist()))
    return {name: total[name] for name in sums}


def means(totals: dict[str, float]) -> dict[str, float]:
    """The TRL-named metrics, each component's ``loss/NAME`` after ``loss``: each sum over the pair count."""
    if totals["pairs"] <= 0:
        raise ValueError("no examples to average metrics over")
    names = [METRIC_NAMES[0], *(k for k in totals if k.startswith(component_metric(""))), *METRIC_NAMES[1:]]
    return {name: totals[name] / totals["pairs"] for name in names}


def means_of(row: dict[str, float]) -> dict[str, float]:
    """The metrics of a logged row (``means``' keys, in its order), without the throughput and norm."""
    return {k: v for k, v in row.items() if k in METRIC_NAMES or k.startswith(component_metric(""))}


class Window:
    """Metric sums of the steps since the last logged row."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] | None = None
        self.grad_norm: float | None = None
        self.started = time.perf_counter()

    def add(self, sums: dict[str, torch.Tensor]) -> None:
        self.sums = add(self.sums, sums)

    def flush(self, reduce: Reduce, device: torch.device) -> tuple[dict[str, float], dict[str, float]]:
        """(the row to log, the window's counts); collective: every rank calls it at the same step."""
        totals = reduced(self.sums, reduce, device)
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        row = {**means(totals), "grad_norm": self.grad_norm if self.grad_norm is not None else float("nan"),
               "tokens_per_second": totals["tokens"] / elapsed,
               "padding_fraction": 1.0 - totals["tokens"] / max(totals["slots"], 1.0)}
        self.sums, self.started = None, time.perf_counter()
        return row, {k: totals[k] for k in COUNTS}

