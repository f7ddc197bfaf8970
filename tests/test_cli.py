"""The `dpo` command line: version and help, YAML config sections merged under flags, and errors
mapped to their exit codes without a traceback."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from dpo import __version__
from dpo.cli import app, register_stage
from dpo.pipeline.config import StageOptions, option, section_values
from dpo.artifacts.errors import EXIT_CODES, DataError, LockHeldError, UsageError

from conftest import dpo_env, run_dpo

DPO_SCRIPT = Path(sys.executable).parent / "dpo"
WIDE = {"COLUMNS": "1000"}  # Typer's error box wraps at the terminal width


def test_version():
    proc = run_dpo("--version", check=True)
    assert proc.stdout.strip() == f"dpo {__version__}"


def test_console_script_help_lists_exit_codes():
    import subprocess

    proc = subprocess.run([str(DPO_SCRIPT), "--help"], capture_output=True, text=True, env=dpo_env(COLUMNS="200"))
    assert proc.returncode == 0, proc.stderr
    assert "--version" in proc.stdout and "Direct Preference Optimization" in proc.stdout
    for code in EXIT_CODES:
        assert f"{code} " in proc.stdout


def test_every_stage_command_documents_every_option():
    """`dpo <stage> --help` works for each registered stage and no option lacks a help string."""
    group = typer.main.get_command(app)
    runner = CliRunner()
    for name, command in group.commands.items():
        result = runner.invoke(app, [name, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, (name, result.output)
        for param in command.params:
            if param.param_type_name == "option" and param.name != "help":
                assert param.help, f"dpo {name} {param.opts[0]} has no help text"
                assert param.opts[0] in result.output, (name, param.opts[0])


def test_train_help_groups_options_in_panels_and_flags_take_no_value():
    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    panels = [line.split("─ ", 1)[1].split(" ─", 1)[0] for line in result.output.splitlines() if line.startswith("╭─ ")]
    assert panels == ["Options", "Data", "Loss", "Optimisation", "Model", "LoRA", "Distributed", "Checkpoints and eval",
                      "Logging", "Output and run control"]
    lines = {line.split()[1]: line for line in result.output.splitlines() if line.startswith("│ --")}
    for flag in ("--lora", "--packing", "--overwrite", "--gradient-checkpointing", "--help", "--verbose"):
        assert "<bool>" not in lines[flag], lines[flag]
    assert "<float>" in lines["--learning-rate"] and "<int>" in lines["--logging-steps"]
    for name in ("cache-ref", "export"):
        output = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "200"}).output
        assert "╭─ Data " in output and "<bool>" not in output


@dataclasses.dataclass(frozen=True, kw_only=True)
class ToyConfig(StageOptions):
    data: tuple[str, ...] = option((), help="Sources.")
    max_seq_length: int = option(1024, help="Tokens.")
    truncation: str = option("keep-start", help="Mode.")
    seed: int = option(42, help="Seed.")
    fail: str = option("", help="Raise this error.")


# A stage command built exactly like the real ones (generated from a config dataclass by the same
# function), so the config machinery is tested whichever stages exist.
def make_app(calls: list[dict]) -> typer.Typer:
    test_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @test_app.callback()
    def root() -> None:
        """Test root: makes `tokenize` a subcommand, as in the real app."""

    def run(config: ToyConfig) -> None:
        calls.append(dict(data=list(config.data) or None, max_seq_length=config.max_seq_length,
                          truncation=config.truncation, seed=config.seed, overwrite=config.overwrite,
                          lock_timeout=config.lock_timeout, quiet=config.quiet))
        errors = {"usage": UsageError, "data": DataError, "lock": LockHeldError}
        if config.fail in errors:
            raise errors[config.fail](f"{config.fail} went wrong")
        if config.fail == "bug":
            raise RuntimeError("a bug")

    register_stage(test_app, "tokenize", ToyConfig, run, "Record the resolved options.")
    return test_app


def invoke(tmp_path: Path, yaml_text: str | None, *args: str):
    calls: list[dict] = []
    argv = ["tokenize", *args]
    if yaml_text is not None:
        run_file = tmp_path / "run.yaml"
        run_file.write_text(yaml_text)
        argv += ["--config", str(run_file)]
    result = CliRunner().invoke(make_app(calls), argv, env=WIDE)
    return result, calls


RUN_YAML = """
tokenize:
  max-seq-length: 512          # dashes, as on the command line
  truncation: drop
  data: a.jsonl                # one value for a repeatable option
  lock_timeout: 30             # underscores work too
train:
  beta: 0.5                    # other stages' sections are not this command's business
"""


def test_config_section_sets_defaults(tmp_path):
    result, calls = invoke(tmp_path, RUN_YAML)
    assert result.exit_code == 0, result.output
    assert calls == [dict(data=["a.jsonl"], max_seq_length=512, truncation="drop", seed=42, overwrite=False,
                          lock_timeout=30.0, quiet=False)]


def test_flags_override_the_config_file(tmp_path):
    # --config given last still loses to the flags: it only supplies defaults
    result, calls = invoke(tmp_path, RUN_YAML, "--max-seq-length", "2048", "--data", "b.jsonl", "--data", "c.jsonl")
    assert result.exit_code == 0, result.output
    assert calls[0]["max_seq_length"] == 2048 and calls[0]["data"] == ["b.jsonl", "c.jsonl"]
    assert calls[0]["truncation"] == "drop"


def test_no_config_uses_the_code_defaults(tmp_path):
    result, calls = invoke(tmp_path, None)
    assert result.exit_code == 0, result.output
    assert calls[0]["max_seq_length"] == 1024 and calls[0]["data"] is None


@pytest.mark.parametrize(
    "yaml_text, expected",
    [
        ("tokenize:\n  max-seq-lenght: 5\n", ["unknown option 'max-seq-lenght'", "max-seq-length"]),
        ("tokenize:\n  config: other.yaml\n", ["unknown option 'config'"]),
        ("tokenize: [1, 2]\n", ["section 'tokenize' must be a mapping"]),
        ("- just\n- a list\n", ["expected a mapping with one section per stage"]),
        ("tokenize: {max-seq-length: 5\n", ["not valid YAML"]),
    ],
)
def test_bad_config_file_is_a_usage_error_naming_file_and_key(tmp_path, yaml_text, expected):
    result, calls = invoke(tmp_path, yaml_text)
    assert result.exit_code == 2, result.output
    assert calls == []
    assert str(tmp_path / "run.yaml") in result.output
    for text in expected:
        assert text in result.output


def test_missing_config_file(tmp_path):
    result = CliRunner().invoke(make_app([]), ["tokenize", "--config", str(tmp_path / "nope.yaml")], env=WIDE)
    assert result.exit_code == 2 and "does not exist" in result.output


def test_wrongly_typed_config_value_names_file_section_and_key(tmp_path):
    result, calls = invoke(tmp_path, "tokenize:\n  max-seq-length: lots\n")
    assert result.exit_code == 2 and calls == []
    assert f"{tmp_path / 'run.yaml'}: section 'tokenize', key 'max-seq-length': expected a whole number" in result.output


def test_empty_config_file_and_missing_section_change_nothing(tmp_path):
    for text in ("", "train:\n  beta: 0.1\n", "tokenize:\n"):
        result, calls = invoke(tmp_path, text)
        assert result.exit_code == 0, result.output
        assert calls[0]["max_seq_length"] == 1024


def test_section_values_checks_keys_against_the_config(tmp_path):
    @dataclasses.dataclass(frozen=True)
    class CacheRef:
        batch_size: int = option(8, help="Pairs.")
        splits: tuple[str, ...] = option((), flag="--split", help="Splits.")

    run_file = tmp_path / "run.yaml"
    run_file.write_text("cache-ref:\n  batch-size: 4\n  split: eval\n")
    assert section_values(run_file, "cache-ref", CacheRef) == {"batch_size": 4, "splits": ("eval",)}
    assert section_values(run_file, "tokenize", CacheRef) == {}
    run_file.write_text("cache-ref:\n  batch_sise: 4\n")
    with pytest.raises(UsageError, match=r"run.yaml: section 'cache-ref' has unknown option 'batch_sise'; known: batch-size, split"):
        section_values(run_file, "cache-ref", CacheRef)


@pytest.mark.parametrize("kind, code", [("usage", 2), ("data", 2), ("lock", 4)])
def test_errors_map_to_exit_codes_without_traceback(tmp_path, kind, code):
    result, _ = invoke(tmp_path, None, "--fail", kind)
    assert result.exit_code == code
    assert f"dpo tokenize: error: {kind} went wrong" in result.output
    assert "Traceback" not in result.output


def test_a_bug_keeps_its_traceback(tmp_path):
    result, _ = invoke(tmp_path, None, "--fail", "bug")
    assert result.exit_code == 1 and isinstance(result.exception, RuntimeError)


def test_real_stage_reads_its_config_section(tmp_path):
    """`dpo tokenize --config`: required options come from the file, flags win over it, and the
    resolved values are what the artifact records."""
    import json

    from conftest import DEMO_MODEL

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(
        json.dumps({"prompt": f"Tell a story about {n}.", "chosen": f" {n} was happy.", "rejected": f" {n} sat."}) + "\n"
        for n in ("Lily", "Tom", "Sue")
    ))
    run_file = tmp_path / "run.yaml"
    run_file.write_text(
        f"tokenize:\n  data: {data}\n  tokenizer: {DEMO_MODEL}\n  out: {tmp_path / 'tok'}\n"
        "  max-seq-length: 128\n  truncation: drop\n  seed: 7\n"
        "train:\n  not-a-tokenize-option: 1\n"
    )
    proc = run_dpo("tokenize", "--config", run_file, "--max-seq-length", "64", "--quiet")
    assert proc.returncode == 0, proc.stderr
    config = json.loads((tmp_path / "tok" / "manifest.json").read_text())["config"]
    assert (config["max_seq_length"], config["truncation"], config["seed"]) == (64, "drop", 7)

    run_file.write_text(run_file.read_text().replace("truncation:", "truncaton:"))
    proc = run_dpo("tokenize", "--config", run_file, env=dpo_env(COLUMNS="1000"))
    assert proc.returncode == 2
    assert str(run_file) in proc.stderr and "unknown option 'truncaton'" in proc.stderr
    assert "Traceback" not in proc.stderr
