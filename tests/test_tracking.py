"""Trackers: metrics.jsonl keeps dpo's keys; W&B and TensorBoard get TRL's (`train/...`, `eval/...`,
`train/global_step`), chosen with --report-to; TensorBoard is read back from its event files."""

from __future__ import annotations

import json
import sys
import types

import pytest

from dpo.artifacts.errors import UsageError
from dpo.pipeline.config import from_mapping, validate
from dpo.pipeline.tracking import TENSORBOARD_DIR, Tracker, TrackingConfig, tracker_key

ROW = {"step": 3, "epoch": 0.5, "loss": 0.69, "rewards/margins": 0.01, "learning_rate": 1e-6, "grad_norm": 0.3}
EVAL_ROW = {"step": 3, "epoch": 0.5, "eval/loss": 0.68, "eval/rewards/accuracies": 0.6}


def settings(**values) -> TrackingConfig:
    config = from_mapping(TrackingConfig, values)
    validate(config)
    return config


def test_keys_are_the_ones_trl_logs():
    assert tracker_key("loss") == "train/loss"
    assert tracker_key("rewards/margins") == "train/rewards/margins"
    assert tracker_key("learning_rate") == "train/learning_rate"
    assert tracker_key("eval/rewards/accuracies") == "eval/rewards/accuracies"
    assert tracker_key("step") == "train/global_step"


def test_report_to_resolves_destinations():
    assert settings().destinations == ()
    assert settings(wandb_project="p").destinations == ("wandb",)  # as before --report-to existed
    assert settings(report_to="tensorboard").destinations == ("tensorboard",)
    assert settings(report_to="wandb, tensorboard").destinations == ("wandb", "tensorboard")
    assert settings(report_to="all").destinations == ("wandb", "tensorboard")
    assert settings(report_to="none", wandb_project=None).destinations == ()
    assert settings(report_to="wandb", wandb_tags=("a,b", "c")).tags == ["a", "b", "c"]
    for bad, message in (("mlflow", "comma-separated list"), ("none,wandb", "cannot be combined")):
        with pytest.raises(UsageError, match=message):
            settings(report_to=bad)
    with pytest.raises(UsageError, match="--wandb-group given, but --report-to tensorboard"):
        settings(report_to="tensorboard", wandb_group="sweep")


class FakeRun:
    def __init__(self, **kwargs):
        self.init, self.logged, self.metrics, self.finished = kwargs, [], [], None
        self.id = kwargs["id"]
        self.summary = {}

    def define_metric(self, name, **kwargs):
        self.metrics.append((name, kwargs))

    def log(self, values, step):
        self.logged.append((step, values))

    def finish(self, exit_code):
        self.finished = exit_code


@pytest.fixture
def fake_wandb(monkeypatch):
    runs = []
    module = types.SimpleNamespace(init=lambda **kw: runs.append(FakeRun(**kw)) or runs[-1])
    monkeypatch.setitem(sys.modules, "wandb", module)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    return runs


def test_wandb_gets_trl_names_tags_group_and_the_config(tmp_path, fake_wandb):
    config = {"beta": 0.1, "tokenize": {"fingerprint": "abc", "max_seq_length": 512}}
    tracker = Tracker(tmp_path, settings(report_to="wandb", wandb_tags=("beta-sweep,dpo",), wandb_group="g"),
                      is_main=True, resume_step=0, run_id=None, config=config)
    tracker.log(ROW)
    tracker.log(EVAL_ROW)
    tracker.close(0)
    (run,) = fake_wandb
    assert run.init["project"] == "dpo" and run.init["tags"] == ["beta-sweep", "dpo"] and run.init["group"] == "g"
    assert run.init["config"] == config and run.init["resume"] == "allow"
    assert ("*", {"step_metric": "train/global_step", "step_sync": True}) in run.metrics
    (step, train), (_, evals) = run.logged
    assert step == 3 and train == {"train/global_step": 3, "train/epoch": 0.5, "train/loss": 0.69,
                                   "train/rewards/margins": 0.01, "train/learning_rate": 1e-6, "train/grad_norm": 0.3}
    assert evals == {"train/global_step": 3, "train/epoch": 0.5, "eval/loss": 0.68, "eval/rewards/accuracies": 0.6}
    assert run.finished == 0
    # metrics.jsonl keeps dpo's own keys.
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [ROW, EVAL_ROW]


def read_tensorboard(folder) -> tuple[dict[str, list[tuple[int, float]]], str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    texts = events.Tensors("config/text_summary") if "config/text_summary" in events.Tags()["tensors"] else []
    return scalars, texts[0].tensor_proto.string_val[0].decode() if texts else ""


def test_tensorboard_event_files_read_back_and_a_resume_purges_the_lost_steps(tmp_path):
    config = {"beta": 0.1, "data": [{"source": "a.jsonl", "sha256": "00ff"}]}
    tracker = Tracker(tmp_path, settings(report_to="tensorboard"), is_main=True, resume_step=0, run_id=None,
                      config=config)
    for step in (1, 2, 3, 4):
        tracker.log({**ROW, "step": step, "loss": 1.0 / step})
    tracker.log({**EVAL_ROW, "step": 4})
    tracker.close()
    scalars, text = read_tensorboard(tmp_path / TENSORBOARD_DIR)
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    assert scalars["train/loss"][1][1] == pytest.approx(0.5) and scalars["eval/loss"] == [(4, pytest.approx(0.68))]
    assert {"train/rewards/margins", "train/learning_rate", "train/grad_norm", "train/epoch"} <= set(scalars)
    assert "train/global_step" not in scalars  # it is the x axis
    assert json.loads(text.split("```json\n", 1)[1].rsplit("\n```", 1)[0]) == config

    # Resumed from the checkpoint at step 2: steps 3-4 of the first session are replaced, not doubled.
    tracker = Tracker(tmp_path, settings(report_to="tensorboard"), is_main=True, resume_step=2, run_id=None,
                      config=config)
    for step in (3, 4):
        tracker.log({**ROW, "step": step, "loss": 10.0 + step})
    tracker.close()
    scalars, _ = read_tensorboard(tmp_path / TENSORBOARD_DIR)
    assert [(s, round(v, 4)) for s, v in scalars["train/loss"]] == [(1, 1.0), (2, 0.5), (3, 13.0), (4, 14.0)]


def test_other_ranks_write_nothing(tmp_path, fake_wandb):
    tracker = Tracker(tmp_path, settings(report_to="all"), is_main=False, resume_step=0, run_id=None, config={})
    tracker.log(ROW)
    tracker.close()
    assert fake_wandb == [] and not any(tmp_path.iterdir())
