"""Preference losses: one small class each, one registry, and the options that pick and tune them.

Every loss maps per-example tensors ``[B]`` to a :class:`PreferenceLoss` of per-example
``losses`` and detached implicit ``chosen_rewards`` / ``rejected_rewards`` (as torchtune's DPO
loss does); the trainer takes the mean over the global batch. Notation, used in every docstring:

- ``πc, πr``: the policy's log-probs of the chosen / rejected response, summed over label tokens;
- ``refc, refr``: the same from the (cached) reference model;
- ``nc, nr``: the number of label tokens; ``π̄ = π / max(n, 1)`` is the per-token average;
- ``z = (πc − πr) − (refc − refr)``: the margin of log-ratios; ``ε`` the label smoothing.

The implicit rewards are β times the log-ratios the loss itself compares: ``β·(πc − refc)`` for
the summed losses, ``β·(π̄c − ref̄c)`` for the per-token ones (``dpo_norm``, ``ipo``, as
open-instruct logs them) and ``β·π̄c`` for the reference-free ``simpo``.

Adding a loss is one class here (decorated with ``@register``) and its test: ``LossConfig`` (the
options of train and evaluate), the CLI's choices and evaluate's objective all read the registry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..artifacts.errors import UsageError
from .config import non_negative, option, positive, validate
from .logprobs import SequenceLogProbs

METRIC_NAMES = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


@dataclasses.dataclass(frozen=True)
class PreferenceLoss:
    losses: torch.Tensor  # [B], differentiable through the policy's log-probs only
    chosen_rewards: torch.Tensor  # [B], detached
    rejected_rewards: torch.Tensor  # [B], detached


def _float(value: torch.Tensor | None) -> torch.Tensor | None:
    return None if value is None else value.float()


@dataclasses.dataclass(frozen=True)
class LossInputs:
    """Per-example values a loss may read; float32 (the loss is cheap, and bf16 sums lose digits)."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    chosen_num_tokens: torch.Tensor
    rejected_num_tokens: torch.Tensor
    reference_chosen: torch.Tensor | None = None
    reference_rejected: torch.Tensor | None = None
    chosen_wpo_term: torch.Tensor | None = None  # see pipeline/logprobs.py
    rejected_wpo_term: torch.Tensor | None = None

    @classmethod
    def of(cls, chosen: SequenceLogProbs, rejected: SequenceLogProbs,
           reference: Mapping[str, torch.Tensor] | None = None) -> LossInputs:
        """From the policy's scores of a batch and the reference cache's values for its pairs."""
        reference = reference or {}
        return cls(_float(chosen.logps), _float(rejected.logps), chosen.num_tokens, rejected.num_tokens,
                   _float(reference.get("chosen_logps")), _float(reference.get("rejected_logps")),
                   _float(chosen.wpo_term), _float(rejected.wpo_term))

    def ratios(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(πc − refc, πr − refr); the reference is a constant of the update."""
        return (self.policy_chosen - self.reference_chosen.detach(),
                self.policy_rejected - self.reference_rejected.detach())


def per_token(logps: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
    """π̄ = π / max(n, 1): a pair with no label tokens has π = 0, so its average is 0, not NaN."""
    return logps / num_tokens.clamp(min=1).to(logps.dtype)


def _smoothed_sigmoid(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    # −(1−ε)·logσ(x) − ε·logσ(−x): cDPO's loss when the preference label is flipped with prob. ε.
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def _rewards(beta: float, chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return beta * chosen.detach(), beta * rejected.detach()


class Loss:
    """A preference loss: its formula (``__call__``) and what it needs and accepts."""

    name: ClassVar[str]
    default_beta: ClassVar[float] = 0.1
    needs_reference: ClassVar[bool] = True
    needs_wpo_term: ClassVar[bool] = False
    smoothed: ClassVar[bool] = False  # its formula has a label-smoothing term

    def __call__(self, x: LossInputs, config: LossConfig) -> PreferenceLoss:
        raise NotImplementedError

    def check(self, config: LossConfig) -> None:
        """Option combinations this loss refuses, beyond the generic ones."""


LOSSES: dict[str, Loss] = {}


def register(cls: type[Loss]) -> type[Loss]:
    LOSSES[cls.name] = cls()
    return cls


@register
class Dpo(Loss):
    """DPO (Rafailov et al. 2023), with cDPO's label smoothing: −(1−ε)·logσ(βz) − ε·logσ(−βz)."""

    name = "dpo"
    smoothed = True

    def __call__(self, x: LossInputs, config: LossConfig) -> PreferenceLoss:
        chosen, rejected = x.ratios()
        losses = _smoothed_sigmoid(config.beta * (chosen - rejected), config.label_smoothing)
        return PreferenceLoss(losses, *_rewards(config.beta, chosen, rejected))


@register
class DpoNorm(Loss):
    """Tulu 3's length-normalised DPO: the DPO loss of per-token averaged log-probs."""

    name = "dpo_norm"
    default_beta = 5.0
    smoothed = True

    def __call__(self, x: LossInputs, config: LossConfig) -> PreferenceLoss:
        averaged = LossInputs(
            per_token(x.policy_chosen, x.chosen_num_tokens), per_token(x.policy_rejected, x.rejected_num_tokens),
            x.chosen_num_tokens, x.rejected_num_tokens,
            per_token(x.reference_chosen, x.chosen_num_tokens), per_token(x.reference_rejected, x.rejected_num_tokens),
        )
        return LOSSES["dpo"](averaged, config)


@register
class Simpo(Loss):
    """SimPO (Meng et al. 2024), reference-free: z = (π̄c − π̄r) − γ/β, loss as DPO's of βz."""

    name = "simpo"
    default_beta = 2.0  # its paper's sweeps land on 2-2.5
    needs_reference = False
    smoothed = True

    def __call__(self, x: LossInputs, config: LossConfig) -> PreferenceLoss:
        chosen = per_token(x.policy_chosen, x.chosen_num_tokens)
        rejected = per_token(x.policy_rejected, x.rejected_num_tokens)
        losses = _smoothed_sigmoid(config.beta * (chosen - rejected - config.gamma_beta_ratio), config.label_smoothing)
        return PreferenceLoss(losses, *_rewards(config.beta, chosen, rejected))


def wpo_weight(chosen_wpo_term: torch.Tensor, rejected_wpo_term: torch.Tensor) -> torch.Tensor:
    """WPO's pair weight (Zhou et al. 2024, Eq. 2 with the alignment term): min(1, exp(wc + wr)).

    ``wc``/``wr`` are each response's per-token mean of log p(y_t) − log Σ_v p(v)², computed by
    pipeline/logprobs.py. Each pair's weight depends on that pair alone (no normalisation across
    the batch), and no gradient flows through it. Clamping the exponent first keeps exp finite.
    """
    return torch.exp((chosen_wpo_term + rejected_wpo_term).detach().clamp(max=0.0))


@register
class Wpo(Loss):
    """Weighted preference optimisation: each pair's DPO loss times its (constant) WPO weight."""

    name = "wpo"
    needs_wpo_term = True
    smoothed = True

    def __call__(self, x: LossInputs, config: LossConfig) -> PreferenceLoss:
        if x.chosen_wpo_term is None or x.rejected_wpo_term is None:
            raise ValueError("the wpo loss needs the policy's wpo terms (LabelLogProbs(..., with_wpo_term=True))")
        dpo = LOSSES["dpo"](x, config)
        weight = wpo_weight(x.chosen_wpo_term, x.rejected_wpo_term).to(dpo.losses.dtype)
        return PreferenceLoss(dpo.losses * weight, dpo.chosen_rewards, dpo.rejected_rewards)


@register
class Ipo(Loss):
    """IPO (Azar et al. 2023): (z̄ − 1/(2β))², z̄ built from per-token averaged log-ratios."""

    name = "ipo"

    def __call__(self, x: LossInputs, config: LossConfig) -> PreferenceLoss:
        chosen, rejected = x.ratios()
        chosen, rejected = per_token(chosen, x.chosen_num_tokens), per_token(rejected, x.rejected_num_tokens)
        losses = (chosen - rejected - 1 / (2 * config.beta)) ** 2
        return PreferenceLoss(losses, *_rewards(config.beta, chosen, rejected))


@register
class Hinge(Loss):
    """SLiC-style hinge on the DPO margin: relu(1 − βz)."""

    name = "hinge"

    def __call__(self, x: LossInputs, config: LossConfig) -> PreferenceLoss:
        chosen, rejected = x.ratios()
        losses = torch.relu(1 - config.beta * (chosen - rejected))
        return PreferenceLoss(losses, *_rewards(config.beta, chosen, rejected))


@register
class Robust(Loss):
    """rDPO (Chowdhury et al. 2024), unbiased under label noise ε: [−(1−ε)logσ(βz) + ε logσ(−βz)]/(1−2ε)."""

    name = "robust"
    smoothed = True

    def check(self, config: LossConfig) -> None:
        if not 0.0 <= config.label_smoothing < 0.5:
            raise UsageError(
                f"--label-smoothing must lie in [0, 0.5) for the robust loss (it divides by 1 - 2ε), "
                f"got {config.label_smoothing}"
            )

    def __call__(self, x: LossInputs, config: LossConfig) -> PreferenceLoss:
        self.check(config)
        eps = config.label_smoothing
        chosen, rejected = x.ratios()
        logits = config.beta * (chosen - rejected)
        losses = (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)
        return PreferenceLoss(losses, *_rewards(config.beta, chosen, rejected))


def rpo_nll(policy_chosen: torch.Tensor, chosen_num_tokens: torch.Tensor) -> torch.Tensor:
    """RPO's added term (Pang et al. 2024): the chosen response's per-token mean NLL, −π̄c."""
    return -per_token(policy_chosen, chosen_num_tokens)


LOSS_TYPES = tuple(LOSSES)
DEFAULT_BETA = MappingProxyType({name: loss.default_beta for name, loss in LOSSES.items()})


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Which loss, with which hyperparameters: train's options, and evaluate's objective.

    ``beta`` None means the loss's own default; ``resolved()`` fills it in, and that resolved form
    is what train records (its manifest's ``loss`` section) and evaluate rebuilds.
    """

    PANEL: ClassVar[str] = "Loss"

    loss_type: str = option("dpo", choices=LOSS_TYPES, help=(
        f"The preference loss: {', '.join(LOSS_TYPES)} (reference-free: "
        f"{', '.join(n for n, loss in LOSSES.items() if not loss.needs_reference)})."))
    beta: float | None = option(None, check=positive, help=(
        "Strength of the KL penalty / reward scale. Default by loss type: "
        f"{'; '.join(f'{b:g} for {n}' for n, b in DEFAULT_BETA.items())}."))
    label_smoothing: float = option(0.0, help="Label smoothing ε (cDPO); for robust it must lie in [0, 0.5).")
    gamma_beta_ratio: float = option(0.3, check=non_negative, help="SimPO's target margin γ/β.")
    rpo_alpha: float = option(0.0, check=non_negative, help=(
        "Add this times the chosen response's per-token NLL (RPO); 0 = off."))

    @property
    def loss(self) -> Loss:
        return LOSSES[self.loss_type]

    def check(self) -> None:
        if self.loss_type not in LOSSES:
            return  # the choices check names it
        loss = self.loss
        if loss.name != "robust" and not 0.0 <= self.label_smoothing <= 0.5:
            raise UsageError(f"--label-smoothing must lie in [0, 0.5], got {self.label_smoothing}")
        if self.label_smoothing > 0 and not loss.smoothed:
            raise UsageError(
                f"--label-smoothing has no effect on the {self.loss_type} loss; it applies to "
                f"{', '.join(name for name, other in LOSSES.items() if other.smoothed)}"
            )
        loss.check(self)

    def resolved(self) -> LossConfig:
        """Checked, with β filled in from the loss's default."""
        validate(self)
        return self if self.beta is not None else dataclasses.replace(self, beta=self.loss.default_beta)

    def __call__(self, x: LossInputs) -> PreferenceLoss:
        """The per-example loss (plus ``rpo_alpha`` times the RPO term); call on a resolved config."""
        if self.loss.needs_reference and (x.reference_chosen is None or x.reference_rejected is None):
            raise ValueError(f"the {self.loss_type} loss needs the reference log-probs")
        out = self.loss(x, self)
        if self.rpo_alpha:
            out = dataclasses.replace(out, losses=out.losses + self.rpo_alpha * rpo_nll(x.policy_chosen, x.chosen_num_tokens))
        return out

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LossConfig:
        """A loss section as train's manifest records it (or the flat config of older train runs)."""
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{k: data[k] for k in names if k in data}).resolved()


def needs_reference(loss_type: str) -> bool:
    return LOSSES[loss_type].needs_reference


def needs_wpo_term(loss_type: str) -> bool:
    return LOSSES[loss_type].needs_wpo_term


def check_loss_options(loss_type: str, **options: Any) -> float:
    """Validate the loss options a user gave (LossConfig's fields); return the resolved β. Raises UsageError."""
    return LossConfig(loss_type=loss_type, **options).resolved().beta


def preference_loss(loss_type: str, *, policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                    chosen_num_tokens: torch.Tensor, rejected_num_tokens: torch.Tensor,
                    reference_chosen_logps: torch.Tensor | None = None,
                    reference_rejected_logps: torch.Tensor | None = None,
                    chosen_wpo_term: torch.Tensor | None = None, rejected_wpo_term: torch.Tensor | None = None,
                    **options: Any) -> PreferenceLoss:
    """The per-example loss of ``loss_type`` from keyword tensors and LossConfig options, in one call."""
    config = LossConfig(loss_type=loss_type, **options).resolved()
    return config(LossInputs(
        _float(policy_chosen_logps), _float(policy_rejected_logps), chosen_num_tokens, rejected_num_tokens,
        _float(reference_chosen_logps), _float(reference_rejected_logps), _float(chosen_wpo_term),
        _float(rejected_wpo_term),
    ))


def metric_sums(
    out: PreferenceLoss, policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor
) -> torch.Tensor:
    """Sums over the examples of each of METRIC_NAMES, then the example count, as one float64 vector.

    Sums (not means) so that micro-batches and ranks add up exactly: all-reduce the vector, add
    it over accumulation steps, then :func:`metrics_from_sums` gives the global-batch means.
    """
    with torch.no_grad():
        chosen, rejected = out.chosen_rewards.double(), out.rejected_rewards.double()
        columns = (
            out.losses.detach().double(),
            chosen,
            rejected,
            (chosen > rejected).double(),
            chosen - rejected,
            policy_chosen_logps.detach().double(),
            policy_rejected_logps.detach().double(),
        )
        sums = [c.sum() for c in columns]
        sums.append(torch.tensor(float(out.losses.numel()), dtype=torch.float64, device=out.losses.device))
        return torch.stack(sums)


def metrics_from_sums(sums: torch.Tensor) -> dict[str, float]:
    values = sums.detach().double().cpu().tolist()
    count = values[-1]
    if count <= 0:
        raise ValueError("no examples to average metrics over")
    return {name: value / count for name, value in zip(METRIC_NAMES, values[:-1], strict=True)}


def preference_metrics(
    out: PreferenceLoss, policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor
) -> dict[str, float]:
    """The TRL-named metrics of one batch: mean loss, rewards, reward accuracy and margin, policy logps."""
    return metrics_from_sums(metric_sums(out, policy_chosen_logps, policy_rejected_logps))
