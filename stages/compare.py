"""`dpo compare RUN...`: training runs side by side (a β or loss-type sweep on one reference cache).

build:  each RUN (a train artifact, or a `dpo run` folder holding one): its manifest, and its
        metrics.jsonl checked against the sha256 the manifest lists
run:    curves.png (loss, reward accuracy and margin of every run on shared axes, eval dashed over
        train) and compare.md (one row per run: the settings that differ between the runs, then the
        final train and eval metrics), with compare.json holding the same numbers unrounded
close:  the manifest (kind comparison), the runs as its inputs

The output is an artifact like every stage's: it names the runs and fingerprints it was made from,
a rerun on the same finished runs is a no-op, and a folder holding anything else is refused. Only
finished runs are compared, so a table never mixes a final row with one still moving.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from ..artifacts.errors import ArtifactError, UsageError
from ..artifacts.fingerprint import fingerprint, sha256_file
from ..artifacts.manifest import MANIFEST, InputRef, Manifest, read_manifest
from ..artifacts.runner import StageRun
from ..artifacts.shards import file_entry
from ..pipeline import report
from ..pipeline.config import StageOptions, flatten, option, validate
from ..pipeline.tracking import METRICS_FILE

STAGE = "compare"
VERSION = 1
KIND = "comparison"
OWNS = ("compare.md", "compare.json", "curves.png")
# Options that never change what a run learns, or that differ between any two runs by construction.
NOT_SETTINGS = {"out", "overwrite", "lock_timeout", "quiet", "verify_inputs", "logging_steps", "report_to",
                "wandb_project", "wandb_entity", "wandb_run_name", "wandb_tags", "wandb_group", "save_every",
                "keep_last", "eval_steps", "gradient_checkpointing", "loss"}
TRAIN_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")
EVAL_METRICS = tuple(f"eval/{k}" for k in TRAIN_METRICS)
TABLE_METRICS = ("loss", "rewards/accuracies", "rewards/margins")  # compare.json has the rest
log = logging.getLogger(__name__)


def _some_runs(value: tuple[str, ...]) -> str | None:
    return None if len(value) >= 1 else "name at least one train run"


@dataclasses.dataclass(frozen=True, kw_only=True)
class CompareConfig(StageOptions):
    runs: tuple[str, ...] = option(semantic=False, argument=True, check=_some_runs, help=(
        "Finished train artifacts (from `dpo train`) or `dpo run` folders holding one, in the table's order."))
    out: str = option(semantic=False, help="Output folder: curves.png, compare.md, compare.json and manifest.json.")


@dataclasses.dataclass(frozen=True)
class Run:
    label: str
    path: Path
    manifest: Manifest
    rows: list[dict[str, Any]]

    @property
    def settings(self) -> dict[str, Any]:
        """What the run was trained with: its options, the resolved loss section over the flat loss options."""
        config = self.manifest.config
        values = {k: v for k, v in config.items() if k not in NOT_SETTINGS}
        values.update(config.get("loss") or {})
        if values.get("beta") is None and self.manifest.stats.get("beta") is not None:
            values["beta"] = self.manifest.stats["beta"]
        return values


# ---------------------------------------------------------------------------------------- build


def _train_dir(spec: str) -> Path:
    path = Path(spec)
    for candidate in (path, path / "train"):
        if (candidate / MANIFEST).is_file() and read_manifest(candidate).kind == "train":
            return candidate
    if (path / METRICS_FILE).is_file() or (path / "train" / METRICS_FILE).is_file():
        raise ArtifactError(f"{spec}: training has not finished (no train {MANIFEST}); compare it once `dpo train` "
                            "has completed (rerun its command to resume it)")
    raise UsageError(f"{spec}: is neither a train artifact nor a `dpo run` folder with a train/ artifact in it")


def _labels(paths: list[Path]) -> list[str]:
    """The shortest path endings that tell the runs apart (``beta0.1/train`` and ``beta0.5/train``)."""
    parts = [p.resolve().parts for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]


def load_runs(specs: tuple[str, ...], verify: bool) -> list[Run]:
    dirs = [_train_dir(spec) for spec in specs]
    if len({d.resolve() for d in dirs}) < len(dirs):
        raise UsageError(f"the same train run is named twice: {', '.join(specs)}")
    runs = []
    for label, path in zip(_labels(dirs), dirs):
        manifest = read_manifest(path, "train")
        entry = next((f for f in manifest.files if f.path == METRICS_FILE), None)
        metrics = path / METRICS_FILE
        if entry is None or not metrics.is_file():
            raise ArtifactError(f"{path}: has no {METRICS_FILE} listed in its manifest; it cannot be compared")
        if metrics.stat().st_size != entry.bytes or (verify and sha256_file(metrics) != entry.sha256):
            raise ArtifactError(f"{metrics}: is not the file its manifest lists (changed after training); "
                                "rerun that train stage with --overwrite, or compare with --no-verify")
        runs.append(Run(label, path, manifest, report.read_metrics_jsonl(metrics)))
    return runs


# ------------------------------------------------------------------------------------------ run


def differing_settings(runs: list[Run]) -> list[str]:
    """Settings whose values are not the same in every run, in the order of the first run's config."""
    keys = list(dict.fromkeys(k for run in runs for k in run.settings))
    return [k for k in keys if len({json.dumps(run.settings.get(k), sort_keys=True) for run in runs}) > 1]


def summary(runs: list[Run]) -> dict[str, Any]:
    """Per run: the differing settings, steps, and the last logged train row's and last eval row's metrics."""
    differing = differing_settings(runs)
    out = []
    for run in runs:
        train = report.last_row_with(run.rows, "loss") or {}
        evals = report.last_row_with(run.rows, "eval/loss") or {}
        out.append({
            "run": run.label, "path": str(run.path), "fingerprint": run.manifest.fingerprint,
            "settings": {k: run.settings.get(k) for k in differing},
            "steps": run.manifest.stats.get("steps"), "train_step": train.get("step"), "eval_step": evals.get("step"),
            "train": {k: train[k] for k in TRAIN_METRICS if k in train},
            "eval": {k: evals[k] for k in EVAL_METRICS if k in evals},
        })
    return {"differing_settings": differing, "runs": out}


def markdown(data: dict[str, Any]) -> str:
    runs, differing = data["runs"], data["differing_settings"]
    train_keys = [k for k in TABLE_METRICS if any(k in r["train"] for r in runs)]
    eval_keys = [f"eval/{k}" for k in TABLE_METRICS if any(f"eval/{k}" in r["eval"] for r in runs)]
    header = ["run", *differing, "steps", *train_keys, *eval_keys]
    rows = [[f"`{r['run']}`", *(f"`{report.fmt(r['settings'].get(k))}`" for k in differing), report.fmt(r["steps"]),
             *(report.fmt(r["train"].get(k)) for k in train_keys), *(report.fmt(r["eval"].get(k)) for k in eval_keys)]
            for r in runs]
    lines = ["# Training runs compared", "",
             ("Settings that differ between the runs: " + ", ".join(f"`{k}`" for k in differing) + "."
              if differing else "The runs share every setting (they differ only in where they were written)."),
             "Train metrics are the last logged training step's (one batch); eval metrics the last evaluation's, "
             "on the tokenized eval split.", "", report.table(header, rows), "",
             "![training curves](curves.png)", ""]
    lines += ["| run | path | fingerprint |", "|---|---|---|"]
    lines += [f"| `{r['run']}` | `{r['path']}` | `{r['fingerprint']}` |" for r in runs]
    return "\n".join(lines) + "\n"


def run(cfg: CompareConfig) -> Manifest:
    validate(cfg)
    runs = load_runs(cfg.runs, cfg.verify_inputs)
    inputs = [InputRef("train", str(r.path), r.manifest.fingerprint) for r in runs]
    fp = fingerprint(STAGE, VERSION, {"labels": [r.label for r in runs]}, [i.fingerprint for i in inputs])
    with StageRun(STAGE, cfg.out, KIND, fp, overwrite=cfg.overwrite, lock_timeout=cfg.lock_timeout,
                  inputs=[("RUN", str(r.path)) for r in runs], owns=OWNS) as stage_run:
        if stage_run.complete:
            return stage_run.manifest
        work = stage_run.dir
        data = summary(runs)
        (work / "compare.json").write_text(json.dumps(data, indent=2) + "\n")
        (work / "compare.md").write_text(markdown(data))
        written = ["compare.json", "compare.md"]
        if report.plot_run_curves([(r.label, r.rows) for r in runs], work / "curves.png",
                                  "runs differing in " + ", ".join(data["differing_settings"])
                                  if data["differing_settings"] else "runs with the same settings"):
            written.append("curves.png")
        stage_run.commit(Manifest(kind=KIND, fingerprint=fp, config=flatten(cfg), inputs=inputs,
                                  files=[file_entry(work, name) for name in written],
                                  stats={"runs": len(runs), "differing_settings": data["differing_settings"]}))
    log.info("compared %d runs (differing: %s): %s", len(runs), ", ".join(data["differing_settings"]) or "nothing",
             Path(cfg.out) / "compare.md")
    return read_manifest(cfg.out, KIND)
