"""`dpo compare`: two tiny runs (β 0.1 and 0.5 on one reference cache) side by side."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import HH_DATA, build_tiny_llama, run_dpo

from dpo.pipeline.report import fmt


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """`dpo run` trains at β 0.1; a second train at β 0.5 reuses its tokens and reference cache."""
    root = tmp_path_factory.mktemp("compare")
    model = build_tiny_llama(root / "tiny-llama")
    train = {"max_steps": 3, "per_device_batch_size": 4, "learning_rate": 5e-3, "warmup_ratio": 0.0,
             "logging_steps": 1, "eval_steps": 3}
    spec = {"run_dir": str(root / "beta-0.1"), "model": str(model),
            "tokenize": {"data": [f"{HH_DATA}:40"], "tokenizer": str(model), "max_seq_length": 64,
                         "eval_fraction": 0.2},
            "cache-ref": {}, "train": {**train, "beta": 0.1}}
    (root / "run.yaml").write_text(yaml.safe_dump(spec))
    run_dpo("run", "--config", root / "run.yaml", check=True)
    first = root / "beta-0.1"
    args = [f"--{k.replace('_', '-')}={v}" for k, v in train.items()]
    run_dpo("train", "--tokenized", first / "tokenized", "--ref-cache", first / "ref-logps", "--model", model,
            "--out", root / "beta-0.5" / "train", "--beta", "0.5", *args, check=True)
    return {"root": root, "0.1": first / "train", "0.5": root / "beta-0.5" / "train"}


def metrics(train: Path) -> list[dict]:
    return [json.loads(line) for line in (train / "metrics.jsonl").read_text().splitlines()]


def test_table_curves_and_manifest(runs, tmp_path):
    out = tmp_path / "cmp"
    # A `dpo run` folder (holding train/) is as good as the train artifact itself.
    proc = run_dpo("compare", runs["0.1"].parent, runs["0.5"], "--out", out)
    assert proc.returncode == 0, proc.stderr
    table = (out / "compare.md").read_text()
    assert "Settings that differ between the runs: `beta`." in table
    header = next(line for line in table.splitlines() if line.startswith("| run |"))
    assert header == ("| run | beta | steps | loss | rewards/accuracies | rewards/margins | eval/loss "
                      "| eval/rewards/accuracies | eval/rewards/margins |")
    for beta, train in (("0.1", runs["0.1"]), ("0.5", runs["0.5"])):
        rows = metrics(train)
        last, last_eval = [r for r in rows if "loss" in r][-1], [r for r in rows if "eval/loss" in r][-1]
        values = [last[k] for k in ("loss", "rewards/accuracies", "rewards/margins")]
        values += [last_eval[k] for k in ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins")]
        assert f"| `beta-{beta}/train` | `{beta}` | 3 | " + " | ".join(fmt(v) for v in values) + " |" in table
        summary = next(r for r in json.loads((out / "compare.json").read_text())["runs"] if r["settings"]["beta"] == float(beta))
        assert summary["train"]["rewards/margins"] == last["rewards/margins"]  # unrounded
        assert summary["eval"]["eval/loss"] == last_eval["eval/loss"] and summary["train_step"] == 3

    assert (out / "curves.png").stat().st_size > 10_000
    manifest = json.loads((out / "manifest.json").read_text())
    trains = [json.loads((runs[b] / "manifest.json").read_text())["fingerprint"] for b in ("0.1", "0.5")]
    assert manifest["kind"] == "comparison" and [i["fingerprint"] for i in manifest["inputs"]] == trains
    assert {f["path"] for f in manifest["files"]} == {"compare.md", "compare.json", "curves.png"}

    from dpo.stages.compare import CompareConfig, run

    again = run(CompareConfig(runs=(str(runs["0.1"].parent), str(runs["0.5"])), out=str(out)))
    assert again.fingerprint == manifest["fingerprint"]  # a no-op: the same runs, the same artifact


def test_unfinished_or_unknown_runs_are_refused(runs, tmp_path):
    from dpo.artifacts.errors import ArtifactError, UsageError
    from dpo.stages.compare import load_runs

    running = tmp_path / "running"
    running.mkdir()
    shutil.copy(runs["0.1"] / "metrics.jsonl", running / "metrics.jsonl")
    with pytest.raises(ArtifactError, match=f"{running}: training has not finished"):
        load_runs((str(runs["0.1"]), str(running)), verify=True)
    with pytest.raises(UsageError, match="is neither a train artifact"):
        load_runs((str(runs["0.1"]), str(tmp_path)), verify=True)
    with pytest.raises(UsageError, match="the same train run is named twice"):
        load_runs((str(runs["0.1"]), str(runs["0.1"].parent)), verify=True)
    edited = tmp_path / "edited"
    shutil.copytree(runs["0.5"], edited, ignore=shutil.ignore_patterns("checkpoints", "final"))
    with open(edited / "metrics.jsonl", "a") as f:
        f.write("{}\n")
    with pytest.raises(ArtifactError, match="is not the file its manifest lists"):
        load_runs((str(edited),), verify=True)
