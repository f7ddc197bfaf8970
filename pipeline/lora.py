"""LoRA through PEFT: adapters on the policy; the frozen base weights are the reference.

The reference log-probs for a LoRA run come from the cache made from the base model, and LoRA's B
matrices start at zero, so before the first update the adapted policy equals the reference
exactly (the first DPO loss is ln 2). Only adapter weights train; what is saved is the adapter.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar

import torch

from ..artifacts.errors import UsageError
from .config import at_least, fraction, option, positive

log = logging.getLogger(__name__)

ALL_LINEAR = "all-linear"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    PANEL: ClassVar[str] = "LoRA"

    lora: bool = option(False, help="Train LoRA adapters (PEFT) instead of all weights; the adapter is what is saved.")
    lora_rank: int = option(16, check=at_least(1), help="LoRA rank r.")
    lora_alpha: float = option(32.0, check=positive, help="LoRA scaling alpha.")
    lora_dropout: float = option(0.0, check=fraction(), help=(
        "Dropout on the LoRA input; 0 by default, like every other dropout (see --keep-dropout)."))
    # "all-linear" is PEFT's shorthand for every linear layer but the output head: the
    # model-agnostic choice that QLoRA found to matter most for quality.
    lora_target_modules: tuple[str, ...] = option((ALL_LINEAR,), help=(
        "Module names to adapt (repeatable), or all-linear."))

    def check(self) -> None:
        if not self.lora_target_modules:
            raise UsageError("--lora-target-modules needs at least one module name (or 'all-linear')")


def _targets(modules: tuple[str, ...]) -> str | list[str]:
    return ALL_LINEAR if tuple(m.lower() for m in modules) == (ALL_LINEAR,) else list(modules)


def apply_lora(model: torch.nn.Module, settings: LoraConfig) -> torch.nn.Module:
    """Wrap ``model`` in a PEFT LoRA model whose only trainable parameters are the adapters."""
    import peft

    config = peft.LoraConfig(
        task_type=peft.TaskType.CAUSAL_LM,
        r=settings.lora_rank,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=_targets(settings.lora_target_modules),
        bias="none",
    )
    try:
        peft_model = peft.get_peft_model(model, config)
    except ValueError as exc:
        names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise UsageError(
            f"--lora-target-modules {', '.join(settings.lora_target_modules)}: {exc}. "
            f"This model's linear layers are named: {', '.join(names)}"
        ) from None
    trainable, total = count_parameters(peft_model)
    log.info("LoRA r=%d alpha=%g dropout=%g on %s: %s of %s parameters train (%.2f%%)",
             settings.lora_rank, settings.lora_alpha, settings.lora_dropout, ", ".join(settings.lora_target_modules),
             f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))
    return peft_model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; ZeRO-3 partitions report their full size as ds_numel."""
    def numel(p: torch.nn.Parameter) -> int:
        return int(getattr(p, "ds_numel", p.numel()))

    params = list(model.parameters())
    return sum(numel(p) for p in params if p.requires_grad), sum(numel(p) for p in params)

