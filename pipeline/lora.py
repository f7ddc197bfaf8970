"""LoRA through PEFT: adapters on the policy; the frozen base weights are the reference.

The reference log-probs for a LoRA run come from the cache made from the base model, and LoRA's B
matrices start at zero, so before the first update the adapted policy equals the reference
exactly (the first DPO loss is ln 2). Only adapter weights train; what is saved is the adapter.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from .errors import UsageError

log = logging.getLogger(__name__)

ALL_LINEAR = "all-linear"


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    # "all-linear" is PEFT's shorthand for every linear layer but the output head: the
    # model-agnostic choice that QLoRA found to matter most for quality.
    target_modules: tuple[str, ...] = (ALL_LINEAR,)

    def check(self) -> None:
        if self.rank < 1:
            raise UsageError(f"--lora-rank must be at least 1, got {self.rank}")
        if self.alpha <= 0:
            raise UsageError(f"--lora-alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"--lora-dropout must lie in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise UsageError("--lora-target-modules needs at least one module name (or 'all-linear')")


def _targets(modules: tuple[str, ...]) -> str | list[str]:
    return ALL_LINEAR if tuple(m.lower() for m in modules) == (ALL_LINEAR,) else list(modules)


def apply_lora(model: torch.nn.Module, settings: LoraSettings) -> torch.nn.Module:
    """Wrap ``model`` in a PEFT LoRA model whose only trainable parameters are the adapters."""
    from peft import LoraConfig, TaskType, get_peft_model

    settings.check()
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=_targets(settings.target_modules),
        bias="none",
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:
        names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise UsageError(
            f"--lora-target-modules {', '.join(settings.target_modules)}: {exc}. "
            f"This model's linear layers are named: {', '.join(names)}"
        ) from None
    trainable, total = count_parameters(peft_model)
    log.info("LoRA r=%d alpha=%g dropout=%g on %s: %s of %s parameters train (%.2f%%)",
             settings.rank, settings.alpha, settings.dropout, ", ".join(settings.target_modules),
             f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))
    return peft_model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; ZeRO-3 partitions report their full size as ds_numel."""
    def numel(p: torch.nn.Parameter) -> int:
        return int(getattr(p, "ds_numel", p.numel()))

    params = list(model.parameters())
    return sum(numel(p) for p in params if p.requires_grad), sum(numel(p) for p in params)


def is_peft_model(model: torch.nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)
