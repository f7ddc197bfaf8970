"""The pipeline's stages, one module each; this table is how the CLI and `dpo run` find them.

Each stage module has a frozen config dataclass (its options, declared once: pipeline/config.py)
and ``run(config)``. Adding a stage is its module and one line here.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class Stage:
    command: str  # the `dpo` subcommand
    module: str  # the module under dpo.stages
    config: str  # its config dataclass
    summary: str  # the command's help

    def load(self) -> tuple[type, Callable[[Any], Any]]:
        """The config class and the run function."""
        module = importlib.import_module(f"{__name__}.{self.module}")
        return getattr(module, self.config), module.run


STAGES = {stage.command: stage for stage in (
    Stage("tokenize", "tokenize", "TokenizeConfig",
          "Turn preference data into a tokenized artifact; rerunning the same command resumes or is a no-op."),
    Stage("cache-ref", "cache_ref", "CacheRefConfig",
          "Compute the reference model's log-probs of every chosen and rejected response (resumable, multi-process)."),
    Stage("train", "train", "TrainConfig",
          "Train a policy with DPO or a variant; rerunning the same command resumes or is a no-op."),
    Stage("export", "export", "ExportConfig",
          "Write a trained policy as a Hugging Face model folder (LoRA merged by default) with a model card."),
    Stage("evaluate", "evaluate", "EvaluateConfig",
          "Preference accuracy, margins and log-prob movement on held-out pairs, generations, report.md."),
    Stage("compare", "compare", "CompareConfig",
          "Training runs side by side: overlaid curves (PNG) and a table of their differing settings and final metrics."),
)}
