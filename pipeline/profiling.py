"""Where a stage's time goes, and how much model arithmetic it does per second.

``PhaseTimer`` adds up seconds per named phase (data, body forward, output layer, loss, backward,
optimizer, ...). On a GPU a phase has only ended once the device has finished its queued work,
which costs a synchronisation, so there only every ``every``-th step is timed; on the CPU timing is
free and every step is. The stages report the breakdown in their manifest's ``stats``.

``model_flops_per_token`` counts the model arithmetic one real token costs: 2 multiply-adds per
body parameter (x3 with the backward), the output layer only on the share of positions that carry
a label (the others are skipped: pipeline/logprobs.py), and causal attention over the mean
attended length. Multiplied by real tokens per second it is the model FLOP/s a benchmark compares
with the machine's matmul peak.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator

import numpy as np
import torch


class PhaseTimer:
    def __init__(self, device: torch.device | str = "cpu", every: int = 10):
        self.cuda = torch.device(device).type == "cuda"
        self.every = every if self.cuda else 1
        self.seconds: dict[str, float] = defaultdict(float)
        self.steps = 0  # steps timed
        self.calls = 0  # steps seen
        self.active = False

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Time this step (and its phases) when it is one of the sampled ones."""
        self.calls += 1
        self.active = self.calls % self.every == 0 or self.every == 1
        if not self.active:
            yield
            return
        with self._timed("step"):
            yield
        self.steps += 1
        self.active = False

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if not self.active:
            yield
            return
        with self._timed(name):
            yield

    @contextlib.contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        yield
        self._sync()
        self.seconds[name] += time.perf_counter() - start

    def breakdown(self) -> dict:
        """Seconds per timed step by phase ("other": what no phase covers) and each phase's share."""
        if not self.steps:
            return {}
        per_step = {name: seconds / self.steps for name, seconds in self.seconds.items() if name != "step"}
        total = self.seconds["step"] / self.steps
        per_step["other"] = max(total - sum(per_step.values()), 0.0)
        return {"steps_timed": self.steps, "seconds_per_step": round(total, 6),
                "seconds": {k: round(v, 6) for k, v in per_step.items()},
                "share": {k: round(v / total, 4) for k, v in per_step.items()} if total > 0 else {}}


NULL_TIMER = PhaseTimer()  # never active: a phase() on it costs one attribute check


def model_flops_per_token(model: torch.nn.Module, lengths: np.ndarray, label_tokens: np.ndarray,
                          backward: bool) -> dict[str, float]:
    """Model FLOPs per real token for sequences of ``lengths`` with ``label_tokens`` scored each.

    Body parameters exclude the input embeddings (a lookup, not a matmul) and the output layer,
    which is counted separately (tied embeddings are the output layer).
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = inner.config.get_text_config() if hasattr(inner.config, "get_text_config") else inner.config
    head = inner.get_output_embeddings().weight
    embedding = inner.get_input_embeddings().weight
    size = lambda p: int(getattr(p, "ds_numel", p.numel()))  # noqa: E731 - ZeRO-3 partitions report ds_numel
    total = sum(size(p) for p in inner.parameters())
    head_params = size(head)
    body_params = total - head_params - (0 if embedding is head else size(embedding))
    lengths = np.asarray(lengths, dtype=np.float64)
    tokens = float(lengths.sum())
    mean_context = float((lengths * (lengths + 1) / 2).sum() / tokens) if tokens else 0.0
    label_share = float(np.sum(label_tokens) / tokens) if tokens else 0.0
    passes = 6 if backward else 2  # a multiply-add forward, and twice that again for the backward
    per_token = passes * (body_params + head_params * label_share
                          + config.num_hidden_layers * config.hidden_size * mean_context)
    return {"model_flops_per_token": per_token, "body_parameters": body_params, "output_layer_parameters": head_params,
            "label_share": round(label_share, 4), "mean_attended_length": round(mean_context, 2)}
