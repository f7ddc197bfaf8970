"""Training metrics: always a ``metrics.jsonl`` next to the checkpoints; optionally Weights & Biases
and TensorBoard (``--report-to``, as TRL's ``report_to``).

Only the main process writes. A resumed job first cuts ``metrics.jsonl`` back to the step of the
checkpoint it resumes from (rows logged after that checkpoint were computed by a run whose later
state is lost and will be computed again), so the file of a resumed run equals an uninterrupted
run's; TensorBoard is told the same (``purge_step``). The W&B run id is minted once and kept in the
checkpoint's trainer state: a resumed job passes it back here and continues the same W&B run
instead of starting a new one. ``WANDB_MODE=offline`` (or ``disabled``) is honoured because wandb
reads it itself.

Names: metrics.jsonl keeps dpo's own keys (``loss``, ``rewards/margins``, ``eval/loss``, ``step``;
evaluate and the reports read them). W&B and TensorBoard get the keys the HF Trainer and TRL log, so
dashboards line up: ``train/`` before every training metric (``train/loss``,
``train/rewards/margins``, ``train/learning_rate``, ``train/epoch``), ``eval/`` metrics as they
are, and the step as ``train/global_step`` (``tracker_key`` is the one mapping).
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
TENSORBOARD_DIR = "tensorboard"  # under the train artifact; `tensorboard --logdir <out>/tensorboard`
DESTINATIONS = ("wandb", "tensorboard")
DEFAULT_WANDB_PROJECT = "dpo"
log = logging.getLogger(__name__)


def _report_to(value: str | None) -> str | None:
    if value is None:
        return None
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in (*DESTINATIONS, "all", "none")]
    if unknown or not names:
        return f"must be a comma-separated list of {', '.join(DESTINATIONS)} (or all, none)"
    if "none" in names and len(names) > 1:
        return "none cannot be combined with other destinations"
    return None


@dataclasses.dataclass(frozen=True)
class TrackingConfig:
    PANEL: ClassVar[str] = "Logging"

    logging_steps: int = option(10, semantic=False, check=at_least(1), help=(
        "Log metrics every N steps (step 1 and the last step always)."))
    report_to: str | None = option(None, semantic=False, check=_report_to, help=(
        "Where metrics go besides metrics.jsonl, as TRL's report_to: wandb, tensorboard, both "
        "(wandb,tensorboard), all or none. Default: wandb when --wandb-project is given, else none. "
        "TensorBoard writes <out>/tensorboard/."))
    wandb_project: str | None = option(None, semantic=False, help=(
        "Weights & Biases project (implies --report-to wandb; default with --report-to wandb: $WANDB_PROJECT, "
        "else dpo). WANDB_MODE=offline works."))
    wandb_entity: str | None = option(None, semantic=False, help="W&B entity (team or user).")
    wandb_run_name: str | None = option(None, semantic=False, help="W&B run name.")
    wandb_tags: tuple[str, ...] = option((), semantic=False, help="W&B run tags (repeatable, or comma-separated).")
    wandb_group: str | None = option(None, semantic=False, help=(
        "W&B run group, e.g. one sweep's runs (as WANDB_RUN_GROUP)."))

    @property
    def destinations(self) -> tuple[str, ...]:
        """The trackers to write to, resolved: --report-to, else wandb when a project is named."""
        if self.report_to is None:
            return ("wandb",) if self.wandb_project else ()
        names = {n.strip() for n in self.report_to.split(",")}
        if "all" in names:
            return DESTINATIONS
        return tuple(d for d in DESTINATIONS if d in names)

    @property
    def tags(self) -> list[str]:
        return [t.strip() for value in self.wandb_tags for t in value.split(",") if t.strip()]

    def check(self) -> None:
        if "wandb" not in self.destinations:
            given = [flag for flag, value in (("--wandb-project", self.wandb_project), ("--wandb-entity", self.wandb_entity),
                                              ("--wandb-run-name", self.wandb_run_name), ("--wandb-tags", self.wandb_tags),
                                              ("--wandb-group", self.wandb_group)) if value]
            if given:
                raise UsageError(f"{', '.join(given)} given, but --report-to {self.report_to} does not include wandb")


def tracker_key(key: str) -> str:
    """The name W&B and TensorBoard get for a metrics.jsonl key, as the HF Trainer and TRL name it."""
    if key == "step":
        return "train/global_step"
    return key if key.startswith("eval/") else f"train/{key}"


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
    """Writes one JSON object per logged step to ``<out>/metrics.jsonl`` and mirrors it to W&B and
    TensorBoard under the names TRL uses (``tracker_key``)."""

    def __init__(self, out: Path, settings: TrackingConfig, *, is_main: bool, resume_step: int,
                 run_id: str | None, config: dict[str, Any]):
        self.is_main = is_main
        self.path = Path(out) / METRICS_FILE
        self.run_id = run_id or new_run_id()
        self._wandb_run = None
        self._tensorboard = None
        self._file = None
        if not is_main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step > 0:
            truncate_metrics(self.path, resume_step)
        else:
            self.path.unlink(missing_ok=True)
        self._file = open(self.path, "a", buffering=1)
        if "wandb" in settings.destinations:
            self._wandb_run = self._start_wandb(Path(out), settings, config, resuming=resume_step > 0)
        if "tensorboard" in settings.destinations:
            self._tensorboard = self._start_tensorboard(Path(out), config, resume_step)

    def _start_wandb(self, out: Path, settings: TrackingConfig, config: dict[str, Any], resuming: bool):
        try:
            import wandb
        except ImportError:
            raise UsageError("--report-to wandb needs the wandb package: pip install wandb") from None
        wandb_dir = Path(os.environ.get("WANDB_DIR") or out)
        wandb_dir.mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            project=settings.wandb_project or os.environ.get("WANDB_PROJECT") or DEFAULT_WANDB_PROJECT,
            entity=settings.wandb_entity, name=settings.wandb_run_name, group=settings.wandb_group,
            tags=settings.tags or None, id=self.run_id, dir=str(wandb_dir), config=config,
            # "allow": the same id continues the run a pre-empted job started, or starts it.
            resume="allow",
        )
        # As the HF Trainer does: charts against the optimizer step, also when runs are compared.
        run.define_metric("train/global_step")
        run.define_metric("*", step_metric="train/global_step", step_sync=True)
        log.info("W&B run %s (%s)%s", run.id, os.environ.get("WANDB_MODE", "online"),
                 ": continuing it after a resume" if resuming else "")
        return run

    def _start_tensorboard(self, out: Path, config: dict[str, Any], resume_step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UsageError("--report-to tensorboard needs the tensorboard package: pip install tensorboard") from None
        # purge_step: TensorBoard hides what an earlier session logged after the checkpoint resumed
        # from, as metrics.jsonl drops those rows.
        writer = SummaryWriter(log_dir=str(out / TENSORBOARD_DIR), purge_step=resume_step + 1 if resume_step else None)
        if not resume_step:
            writer.add_text("config", "```json\n" + json.dumps(config, indent=2, default=str) + "\n```")
        log.info("TensorBoard: tensorboard --logdir %s", out / TENSORBOARD_DIR)
        return writer

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
        step = int(row["step"])
        named = {tracker_key(k): v for k, v in row.items()}
        if self._wandb_run is not None:
            self._wandb_run.log(named, step=step)
        if self._tensorboard is not None:
            for key, value in named.items():
                if key != "train/global_step" and isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(key, value, global_step=step)
            self._tensorboard.flush()

    def summary(self, values: dict[str, Any]) -> None:
        if self._wandb_run is not None:
            self._wandb_run.summary.update({k: _clean(v) for k, v in values.items()})

    def close(self, exit_code: int = 0) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb_run is not None:
            self._wandb_run.finish(exit_code=exit_code)
            self._wandb_run = None
