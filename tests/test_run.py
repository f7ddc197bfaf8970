"""`dpo run` (the pipeline in one job) and `dpo status`: chaining, skipping, errors, what runs next."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import HH_DATA, REPO, build_tiny_llama, run_dpo

from dpo.artifacts.errors import UsageError
from dpo.stages import run as run_stage
from dpo.stages import status as status_stage


def tiny_run_file(path: Path, run_dir: Path, model: Path, **overrides) -> Path:
    """A run file small enough for a test: 80 HH pairs, a ~40K-parameter Llama, 3 steps."""
    spec = {
        "run_dir": str(run_dir),
        "model": str(model),
        "tokenize": {"data": [f"{HH_DATA}:80"], "tokenizer": str(model), "eval_fraction": 0.25,
                     "max_seq_length": 96, "max_prompt_length": 48},
        "cache-ref": {"batch_size": 16},
        "train": {"max_steps": 3, "per_device_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1,
                  "save_every": "2", "warmup_ratio": 0.0},
        "export": {},
        "evaluate-base": {"generate": 2, "max_new_tokens": 8},
        "evaluate": {"generate": 2, "max_new_tokens": 8},
    }
    for key, value in overrides.items():
        key = key.replace("_", "-") if key in ("cache_ref", "evaluate_base") else key
        if value is None:
            spec.pop(key, None)
        elif isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("model") / "tiny-llama")


# ------------------------------------------------------------------------------ resolve (pure)


def test_resolve_chains_outputs_into_inputs(tmp_path):
    run_file = tiny_run_file(tmp_path / "run.yaml", tmp_path / "r", Path("base"),
                             train={"loss_type": "ipo", "beta": 0.3}, export={"out": str(tmp_path / "elsewhere")})
    resolved = run_stage.resolve(run_file)
    r = str(tmp_path / "r")
    assert resolved["tokenize"]["out"] == f"{r}/tokenized"
    assert resolved["cache-ref"]["tokenized"] == f"{r}/tokenized" and resolved["cache-ref"]["model"] == "base"
    assert resolved["train"]["ref_cache"] == f"{r}/ref-logps" and resolved["train"]["model"] == "base"
    # A section's own key wins over the chained default, and the chain follows it.
    assert resolved["export"]["out"] == str(tmp_path / "elsewhere")
    assert resolved["evaluate"]["model"] == str(tmp_path / "elsewhere")
    assert resolved["evaluate"]["train"] == f"{r}/train"
    assert resolved["evaluate"]["baseline"] == f"{r}/eval-base"
    # The base model is judged with the trained loss's β so before/after measure the same reward.
    base = resolved["evaluate-base"]
    assert (base["model"], base["loss_type"], base["beta"]) == ("base", "ipo", 0.3)
    assert "train" not in base and "baseline" not in base


def test_resolve_without_reference_for_simpo(tmp_path):
    run_file = tiny_run_file(tmp_path / "run.yaml", tmp_path / "r", Path("base"), cache_ref=None,
                             evaluate_base=None, train={"loss_type": "simpo"})
    resolved = run_stage.resolve(run_file)
    assert "ref_cache" not in resolved["train"]
    assert "ref_cache" not in resolved["evaluate"] and "baseline" not in resolved["evaluate"]
    assert run_stage.steps_of(run_file) == ["tokenize", "train", "export", "evaluate"]


def test_relative_paths_are_taken_from_the_run_files_folder(tmp_path, monkeypatch):
    folder = tmp_path / "sweeps"
    (folder / "models" / "base").mkdir(parents=True)
    (folder / "data.jsonl").write_text("{}\n")
    run_file = folder / "run.yaml"
    run_file.write_text(yaml.safe_dump({
        "run_dir": "../runs/a", "model": "models/base",
        "tokenize": {"data": ["data.jsonl:0.5", "org/hub-dataset", str(HH_DATA)], "tokenizer": "models/base",
                     "chat-template": "template.jinja"},
        "train": {"model": "meta-llama/Llama-3.1-8B", "deepspeed_config": "zero3.json"},
    }))
    monkeypatch.chdir(tmp_path)  # the working directory plays no part
    resolved = run_stage.resolve(Path("sweeps/run.yaml"))
    runs = tmp_path / "runs" / "a"
    assert resolved["run_dir"] == str(runs) and resolved["model"] == str(folder / "models" / "base")
    tok = resolved["tokenize"]
    # A data spec keeps its :AMOUNT; a Hub name that is no folder here stays a Hub name.
    assert tok["data"] == [f"{folder}/data.jsonl:0.5", "org/hub-dataset", str(HH_DATA)]
    assert tok["tokenizer"] == str(folder / "models" / "base") and tok["out"] == str(runs / "tokenized")
    assert tok["chat-template"] == str(folder / "template.jinja")  # a file option: resolved even before it exists
    train = resolved["train"]
    assert train["model"] == "meta-llama/Llama-3.1-8B" and train["deepspeed_config"] == str(folder / "zero3.json")
    assert train["tokenized"] == str(runs / "tokenized")
    # `dpo train --config sweeps/run.yaml` reads its section the same way.
    from dpo.pipeline.config import section_values
    from dpo.stages.train import TrainConfig

    values = section_values(Path("sweeps/run.yaml"), "train", TrainConfig)
    assert values["deepspeed_config"] == str(folder / "zero3.json") and values["model"] == "meta-llama/Llama-3.1-8B"


def test_set_overrides_values_of_the_run_file(tmp_path, monkeypatch):
    run_file = tiny_run_file(tmp_path / "run.yaml", tmp_path / "r", Path("base"),
                             train={"max-steps": 3, "beta": 0.1})
    monkeypatch.chdir(tmp_path)
    resolved = run_stage.resolve(run_file, ("train.beta=0.05", "train.max_steps=7", "run_dir=runs/b05",
                                            "cache-ref.batch_size=2", "tokenize.data=[a.jsonl:10, b.jsonl]"))
    train = resolved["train"]
    assert train["beta"] == 0.05 and train["max_steps"] == 7 and "max-steps" not in train
    assert resolved["run_dir"] == str(tmp_path / "runs" / "b05")  # from the current folder, as a flag
    assert train["out"] == str(tmp_path / "runs" / "b05" / "train")
    assert resolved["cache-ref"]["batch_size"] == 2
    assert resolved["tokenize"]["data"] == ["a.jsonl:10", "b.jsonl"]
    # The evaluate-base step is judged with the overridden loss too.
    assert resolved["evaluate-base"]["beta"] == 0.05
    for item, message in (("train.beta", "expected SECTION.OPTION=VALUE"), ("trian.beta=1", "no step 'trian'"),
                          ("beta=1", "'beta' is not a top-level key"), ("train.beta=[1", "not valid YAML")):
        with pytest.raises(UsageError, match=message):
            run_stage.resolve(run_file, (item,))
    no_eval = tiny_run_file(tmp_path / "no-eval.yaml", tmp_path / "r", Path("base"), evaluate=None)
    with pytest.raises(UsageError, match="has no 'evaluate' section"):
        run_stage.resolve(no_eval, ("evaluate.generate=4",))


@pytest.mark.parametrize("text, message", [
    ("run_dir: r\nmodel: m\ntrian: {}\n", "unknown top-level key(s) 'trian'"),
    ("model: m\ntokenize: {}\n", "needs a top-level run_dir"),
    ("run_dir: r\n", "no step sections"),
    ("run_dir: r\ntrain: [1, 2]\n", "section 'train' must be a mapping"),
    ("run_dir: r\nmodel: [m]\ntrain: {}\n", "top-level key 'model': expected a single value"),
    ("run_dir: {a: 1}\ntrain: {}\n", "top-level key 'run_dir': expected a single value"),
])
def test_resolve_rejects_bad_run_files(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_stage.resolve(path)


def test_unknown_option_in_a_section_names_file_and_section(tmp_path, model):
    run_file = tiny_run_file(tmp_path / "run.yaml", tmp_path / "r", model, tokenize={"max_seq_lenght": 64})
    proc = run_dpo("run", "--config", run_file, "--step", "tokenize")
    assert proc.returncode == 2, proc.stderr
    assert str(run_file) in proc.stderr and "'tokenize'" in proc.stderr and "max_seq_lenght" in proc.stderr
    proc = run_dpo("run", "--config", run_file, "--step", "tarin")
    assert proc.returncode == 2 and "--step 'tarin' is not one of" in proc.stderr


# ------------------------------------------------------------------------------- end to end


def test_run_whole_pipeline_then_skip_everything(tmp_path, model):
    run_dir = tmp_path / "run"
    run_file = tiny_run_file(tmp_path / "run.yaml", run_dir, model)

    # A first job that only gets through tokenize: status says what comes next.
    run_dpo("run", "--config", run_file, "--step", "tokenize", check=True)
    result = status_stage.status(run_dir)
    assert [e["state"] for e in result["artifacts"]] == ["complete"] + ["missing"] * 5
    assert result["next"].startswith("cache-ref")

    proc = run_dpo("run", "--config", run_file, check=True)
    assert f"report: {run_dir / 'eval' / 'report.md'}" in proc.stdout
    assert (proc.stdout + proc.stderr).count("report: ") == 1  # the path once, as the run's result
    assert "step tokenize: skipped" in proc.stderr
    for step in ("cache-ref", "train", "export", "evaluate-base", "evaluate"):
        assert f"step {step}: done" in proc.stderr, proc.stderr
    resolved = yaml.safe_load((run_dir / "run.yaml").read_text())
    assert resolved["evaluate"]["baseline"] == str(run_dir / "eval-base")

    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    before = metrics["baseline"]["metrics"]
    # The untrained model is its own reference: every implicit reward is 0, no pair is "won".
    assert before["rewards/accuracies"] == 0.0 and abs(before["rewards/margins"]) < 1e-5
    assert before["logp_accuracies/summed"] == before["ref/logp_accuracies/summed"]
    assert "## Before and after" in (run_dir / "eval" / "report.md").read_text()

    # Re-submitting the finished job: every step is a no-op and says so.
    proc = run_dpo("run", "--config", run_file, check=True)
    for step in ("tokenize", "cache-ref", "train", "export", "evaluate-base", "evaluate"):
        assert f"step {step}: skipped" in proc.stderr, proc.stderr

    proc = run_dpo("status", run_dir, check=True)
    assert "next: nothing: every step is complete" in proc.stdout
    for kind in ("tokenized", "ref-logps", "train", "model", "eval"):
        assert f"[{kind} " in proc.stdout
    listing = json.loads(run_dpo("status", run_dir, "--json", check=True).stdout)
    assert all(e["state"] == "complete" for e in listing["artifacts"])
    train_entry = next(e for e in listing["artifacts"] if e["step"] == "train")
    assert {i["kind"] for i in train_entry["inputs"]} == {"tokenized", "ref-logps"}
    assert all(i["state"] == "ok" for i in train_entry["inputs"])
    trained = train_entry["stats"]["trained"]
    assert trained["pairs"] == trained["steps"] * trained["global_batch"] == 3 * 4
    assert f"trained: 3 steps x 4 pairs = 12 pairs ({trained['epochs']:.2f} epochs)" in proc.stdout
    # The base model evaluate-base read is a model folder dpo did not make: external, not "incomplete".
    base_entry = next(e for e in listing["artifacts"] if e["step"] == "evaluate-base")
    assert {i["kind"]: i["state"] for i in base_entry["inputs"]}["model"] == "external"
    assert "incomplete" not in proc.stdout

    # One artifact on its own: its next stage.
    proc = run_dpo("status", run_dir / "train", check=True)
    assert "next: nothing for train (complete); the next stage is export" in proc.stdout

    # A changed config (here from --set) refuses instead of silently mixing runs.
    proc = run_dpo("run", "--config", run_file, "--set", "train.learning_rate=5e-4")
    assert proc.returncode == 3, proc.stderr
    assert "step train failed with exit code 3" in proc.stderr and "--overwrite" in proc.stderr


def test_status_of_partial_train_names_the_checkpoint(tmp_path):
    train = tmp_path / "train"
    (train / "checkpoints" / "step-00000004").mkdir(parents=True)
    (train / "checkpoints" / "step-00000004" / "manifest.json").write_text("{}")
    (train / "checkpoints" / "step-00000006").mkdir()  # a save that crashed: no manifest
    (train / ".dpo-partial.json").write_text(json.dumps({"kind": "train", "fingerprint": "abc"}))
    result = status_stage.status(train)
    assert result["artifacts"][0]["checkpoints"] == ["step-00000004"]
    assert result["next"] == "train (resumes from checkpoint step-00000004)"


def test_status_errors(tmp_path):
    assert run_dpo("status", tmp_path / "nope").returncode == 2
    (tmp_path / "file.txt").write_text("x")
    proc = run_dpo("status", tmp_path / "file.txt")
    assert proc.returncode == 2 and "is a file" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = run_dpo("status", tmp_path / "empty")
    assert proc.returncode == 2 and "neither an artifact" in proc.stderr


def test_demo_run_file_is_valid():
    """examples/demo.yaml (what `make demo` runs) resolves, and every key is an option of its command."""
    from typer.main import get_command

    from dpo.cli import app

    demo = REPO / "examples" / "demo.yaml"
    resolved = run_stage.resolve(demo)
    assert run_stage.steps_of(demo) == ["tokenize", "cache-ref", "train", "export", "evaluate-base", "evaluate"]
    commands = get_command(app).commands
    for step, command, _ in run_stage.STEPS:
        options = {p.name for p in commands[command].params}
        unknown = {k.replace("-", "_") for k in resolved[step]} - options
        assert not unknown, f"{step}: {unknown}"
