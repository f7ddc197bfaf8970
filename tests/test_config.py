"""Stage options declared once: nested groups flatten, checks run in one style, YAML is typed."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest

from dpo.artifacts.errors import UsageError
from dpo.artifacts.fingerprint import semantic_config
from dpo.pipeline.config import (
    StageOptions, at_least, coerce, flatten, from_mapping, group, leaves, option, replace, section_values, validate,
)
from dpo.stages import STAGES


@dataclasses.dataclass(frozen=True)
class Inner:
    PANEL: ClassVar[str] = "Inner"

    beta: float | None = option(None, check=at_least(0), help="b")
    names: tuple[str, ...] = option(("x",), help="n")

    def check(self) -> None:
        if self.beta == 7:
            raise UsageError("inner check: 7")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Outer(StageOptions):
    path: str = option(semantic=False, help="p")
    mode: str = option("a", choices=("a", "b"), help="m")
    inner: Inner = group(Inner)
    quiet_group: Inner = dataclasses.field(default_factory=Inner, metadata={"group": True, "semantic": False})

    def check(self) -> None:
        if self.mode == "b" and self.inner.beta is None:
            raise UsageError("mode b needs --beta")


def test_groups_flatten_for_flags_yaml_and_manifests():
    names = [leaf.name for leaf in leaves(Outer)]
    assert names == ["overwrite", "lock_timeout", "quiet", "verify_inputs", "path", "mode", "beta", "names", "beta",
                     "names"]
    assert {leaf.panel for leaf in leaves(Outer) if leaf.name == "beta"} == {"Inner"}
    config = from_mapping(Outer, {"path": "p", "beta": 0.5})
    assert config.inner == Inner(beta=0.5) and config.path == "p"
    assert flatten(config)["names"] == ["x"]  # JSON-ready
    assert replace(config, mode="b").mode == "b" and replace(config, mode="b").inner.beta == 0.5
    with pytest.raises(UsageError, match="--path is required"):
        from_mapping(Outer, {})


def test_semantic_fields_and_groups():
    config = from_mapping(Outer, {"path": "p"})
    assert semantic_config(config) == {"mode": "a", "beta": None, "names": ("x",)}


@dataclasses.dataclass(frozen=True)
class Grown:
    beta: float = option(0.1, help="b")
    tau: float = option(0.05, omit_if_default=True, help="an option added after runs existed")
    names: tuple[str, ...] = option((), omit_if_default=True, help="n")
    scale: float = option(1.0, omit_if_default=True, help="s")


def test_options_omitted_at_their_default_keep_old_fingerprints():
    """An omit_if_default option enters the fingerprint only once set: runs that leave it alone keep
    the fingerprint they had before it existed (1 and 1.0 count as the same value)."""
    before = {"beta": 0.1}
    assert semantic_config(Grown()) == before and semantic_config(Grown(tau=0.05, names=(), scale=1)) == before
    assert semantic_config(Grown(tau=0.5)) == {"beta": 0.1, "tau": 0.5}
    assert semantic_config(Grown(names=("a",))) == {"beta": 0.1, "names": ("a",)}
    assert flatten(Grown()) == {"beta": 0.1, "tau": 0.05, "names": [], "scale": 1.0}  # manifests record every value


def test_validate_field_checks_then_group_then_stage_checks():
    with pytest.raises(UsageError, match=r"--mode 'c' is not one of: a, b"):
        validate(from_mapping(Outer, {"path": "p", "mode": "c"}))
    with pytest.raises(UsageError, match=r"--beta must be at least 0, got -1"):
        validate(from_mapping(Outer, {"path": "p", "beta": -1.0}))
    with pytest.raises(UsageError, match="inner check: 7"):
        validate(from_mapping(Outer, {"path": "p", "beta": 7.0}))
    with pytest.raises(UsageError, match="mode b needs --beta"):
        validate(from_mapping(Outer, {"path": "p", "mode": "b"}))
    with pytest.raises(UsageError, match="--lock-timeout must be a positive number"):
        validate(from_mapping(Outer, {"path": "p", "lock_timeout": -1.0}))


@pytest.mark.parametrize("value, kind, expected", [
    ("5e-7", float, 5e-7),  # YAML reads 5e-7 as a string
    (50, str, "50"),
    (512.0, int, 512),
    ("eval", tuple[str, ...], ("eval",)),
    (["a", "b"], tuple[str, ...], ("a", "b")),
    (None, float | None, None),
    (True, bool, True),
])
def test_coerce_yaml_values(value, kind, expected):
    assert coerce(value, kind) == expected


@pytest.mark.parametrize("value, kind", [("lots", int), (2.5, int), ("yes", bool), (True, int), ([1], str)])
def test_coerce_refuses_wrong_types(value, kind):
    with pytest.raises(ValueError, match="expected"):
        coerce(value, kind)


def test_section_values_name_file_section_and_key(tmp_path):
    run_file = tmp_path / "run.yaml"
    run_file.write_text("stage:\n  beta: high\n")
    with pytest.raises(UsageError, match=r"run.yaml: section 'stage', key 'beta': expected a number, got 'high'"):
        section_values(run_file, "stage", Outer)
    (tmp_path / "folder").mkdir()
    with pytest.raises(UsageError, match="is a folder"):
        section_values(tmp_path / "folder", "stage", Outer)


def test_run_files_may_list_the_losses_of_a_combination(tmp_path):
    """--loss-type dpo,sft --loss-weights 1,0.5 on the command line; a YAML list or the same string in a run file."""
    config_cls, _ = STAGES["train"].load()
    run_file = tmp_path / "run.yaml"
    for text in ("train:\n  loss_type: [sigmoid, sft]\n  loss_weights: [1, 0.5]\n",
                 "train:\n  loss_type: sigmoid,sft\n  loss_weights: 1,0.5\n"):
        run_file.write_text(text)
        values = section_values(run_file, "train", config_cls)
        assert values == {"loss_type": "sigmoid,sft", "loss_weights": "1,0.5"}
        loss = from_mapping(config_cls, {"tokenized": "t", "model": "m", "out": "o", **values}).loss.resolved()
        assert (loss.loss_type, loss.loss_weights) == ("dpo,sft", "1.0,0.5")


def test_every_stage_option_has_help_and_a_unique_name():
    for stage in STAGES.values():
        config_cls, _ = stage.load()
        names = [leaf.option_name for leaf in leaves(config_cls)]
        assert len(names) == len(set(names)), stage.command
        assert all(leaf.field.metadata["help"] for leaf in leaves(config_cls)), stage.command


def test_train_fingerprints_the_same_options_as_before_the_redesign():
    """The train fingerprint's config keys (pinned: changing them invalidates every user's checkpoints)."""
    config_cls, _ = STAGES["train"].load()
    config = from_mapping(config_cls, {"tokenized": "t", "model": "m", "out": "o"})
    assert set(semantic_config(config)) == {
        "loss_type", "beta", "label_smoothing", "gamma_beta_ratio", "rpo_alpha", "learning_rate", "weight_decay",
        "lr_scheduler", "warmup_ratio", "epochs", "max_steps", "max_grad_norm", "seed", "dtype", "mixed_precision",
        "keep_dropout", "lora", "lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules",
    }


@pytest.mark.parametrize("options, before, same", [
    ({}, "35bdd6d161237f48", True),
    ({"loss_type": "simpo"}, "113c01e0494a68d2", True),
    ({"label_smoothing": 0.1, "beta": 0.2}, "b22f952248a78559", True),
    ({"loss_type": "ipo"}, "e6146a7a09ff0f7c", True),
    ({"loss_type": "sigmoid_norm"}, "fb09c0686092855b", True),  # TRL's name for dpo_norm: the same run
    ({"rpo_alpha": 0.5}, "1bdf8620b429cb03", False),  # now dpo,sft: a checkpoint of the old term is refused
])
def test_train_fingerprints_of_existing_runs(options, before, same):
    """Train fingerprints (fixed inputs, global batch 8) as the code before the loss combinations
    computed them: kept for every run that sets no new option, changed where --rpo-alpha's numbers
    changed."""
    from dpo.artifacts.fingerprint import fingerprint
    from dpo.stages import train

    config = from_mapping(train.TrainConfig, {"tokenized": "t", "model": "m", "out": "o", **options})
    config = dataclasses.replace(config, loss=config.loss.resolved())  # as train.run does
    fp = fingerprint(train.STAGE, train.VERSION, {**semantic_config(config), "global_batch": 8}, ["a" * 16, "b" * 16])
    assert (fp == before) == same, fp
