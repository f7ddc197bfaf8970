"""Training metrics: always a ``metrics.jsonl`` next to the checkpoints, optionally Weights & Biases.

Only the main process writes. A resumed job first cuts ``metrics.jsonl`` back to the step of the
checkpoint it resumes from (rows logged after that checkpoint were computed by a run whose later
state is lost and will be computed again), so the file of a resumed run equals an uninterrupted
run's. The W&B run id is minted once and kept in the checkpoint's trainer state: a resumed job
passes it back here and continues the same W&B run instead of starting a new one.
``WANDB_MODE=offline`` (or ``disabled``) is honoured because wandb reads it itself.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import uuid
from pathlib import Path
from typing import Any, ClassVar

from ..artifacts.errors import UsageError
from ..artifacts.faults import fault_point
from .config import at_least, option

METRICS_FILE = "metrics.jsonl"
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrackingConfig:
    PANEL: ClassVar[str] = "Logging"

    logging_steps: int = option(10, semantic=False, check=at_least(1), help=(
        "Log metrics every N steps (step 1 and the last step always)."))
    wandb_project: str | None = option(None, semantic=False, help=(
        "Also log to this Weights & Biases project (WANDB_MODE=offline works)."))
    wandb_entity: str | None = option(None, semantic=False, help="W&B entity (team or user).")
    wandb_run_name: str | None = option(None, semantic=False, help="W&B run name.")


def new_run_id() -> str:
    """An id in W&B's alphabet (lowercase letters and digits)."""
    return uuid.uuid4().hex[:12]


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf; a diverged loss must still be recorded, as a string W&B and pandas read."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return value


def truncate_metrics(path: Path, keep_through_step: int) -> int:
    """Drop rows with ``step > keep_through_step`` and any torn last line; returns the rows kept."""
    if not path.is_file():
        return 0
    kept = []
    for raw in path.read_bytes().splitlines():
        try:
            line = raw.decode("utf-8")
            row = json.loads(line)
        except ValueError:
            continue  # the line a crash tore in half
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= keep_through_step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write("".join(line + "\n" for line in kept))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(kept)


class Tracker:
    """Writes one JSON object per logged step to ``<out>/metrics.jsonl`` and mirrors it to W&B."""

    def __init__(self, out: Path, settings: TrackingConfig, *, is_main: bool, resume_step: int,
                 run_id: str | None, config: dict[str, Any]):
        self.is_main = is_main
        self.path = Path(out) / METRICS_FILE
        self.run_id = run_id or new_run_id()
        self._wandb_run = None
        self._file = None
        if not is_main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step > 0:
            truncate_metrics(self.path, resume_step)
        else:
            self.path.unlink(missing_ok=True)
        self._file = open(self.path, "a", buffering=1)
        if settings.wandb_project:
            self._wandb_run = self._start_wandb(Path(out), settings, config, resuming=resume_step > 0)

    def _start_wandb(self, out: Path, settings: TrackingConfig, config: dict[str, Any], resuming: bool):
        try:
            import wandb
        except ImportError:
            raise UsageError("--wandb-project needs the wandb package: pip install wandb") from None
        wandb_dir = Path(os.environ.get("WANDB_DIR") or out)
        wandb_dir.mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            project=settings.wandb_project, entity=settings.wandb_entity, name=settings.wandb_run_name,
            id=self.run_id, dir=str(wandb_dir), config=config,
            # "allow": the same id continues the run a pre-empted job started, or starts it.
            resume="allow",
        )
        log.info("W&B run %s (%s)%s", run.id, os.environ.get("WANDB_MODE", "online"),
                 ": continuing it after a resume" if resuming else "")
        return run

    def log(self, row: dict[str, Any]) -> None:
        if not self.is_main:
            return
        row = {k: _clean(v) for k, v in row.items()}
        text = json.dumps(row, separators=(", ", ": ")) + "\n"
        # Two writes, so that a crash test can stop between them (a torn line, which a resume drops).
        self._file.write(text[: len(text) // 2])
        self._file.flush()
        fault_point("metrics-write")
        self._file.write(text[len(text) // 2:])
        if self._wandb_run is not None:
            self._wandb_run.log({k: v for k, v in row.items() if k != "step"}, step=int(row["step"]))

    def summary(self, values: dict[str, Any]) -> None:
        if self._wandb_run is not None:
            self._wandb_run.summary.update({k: _clean(v) for k, v in values.items()})

    def close(self, exit_code: int = 0) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb_run is not None:
            self._wandb_run.finish(exit_code=exit_code)
            self._wandb_run = None
