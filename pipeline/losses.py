"""Preference losses as pure functions of per-example log-probabilities.

Every loss takes per-example tensors ``[B]`` and returns a :class:`PreferenceLoss` of per-example
``losses`` and detached implicit ``chosen_rewards`` / ``rejected_rewards`` (as torchtune's DPO
loss does); the trainer takes the mean over the global batch. Notation, used in every docstring:

- ``πc, πr``: the policy's log-probs of the chosen / rejected response, summed over label tokens;
- ``refc, refr``: the same from the (cached) reference model;
- ``nc, nr``: the number of label tokens; ``π̄ = π / max(n, 1)`` is the per-token average;
- ``z = (πc − πr) − (refc − refr)``: the margin of log-ratios; ``ε`` the label smoothing.

The implicit rewards are β times the log-ratios the loss itself compares: ``β·(πc − refc)`` for
the summed losses, ``β·(π̄c − ref̄c)`` for the per-token ones (``dpo_norm``, ``ipo``, as
open-instruct and TRL log them) and ``β·π̄c`` for the reference-free ``simpo``.
"""

from __future__ import annotations

import dataclasses
import math
from types import MappingProxyType

import torch
import torch.nn.functional as F

from .errors import UsageError

LOSS_TYPES = ("dpo", "dpo_norm", "simpo", "wpo", "ipo", "hinge", "robust")

# The β each loss is used with in the literature: DPO (Rafailov et al.) 0.1, Tulu 3's
# length-normalised DPO 5, SimPO 2 (its paper's sweeps land on 2-2.5).
DEFAULT_BETA = MappingProxyType(
    {"dpo": 0.1, "dpo_norm": 5.0, "simpo": 2.0, "wpo": 0.1, "ipo": 0.1, "hinge": 0.1, "robust": 0.1}
)

# Losses whose formula has a label-smoothing term; for ipo and hinge a nonzero ε would be ignored.
SMOOTHED = frozenset({"dpo", "dpo_norm", "simpo", "wpo", "robust"})

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


def needs_reference(loss_type: str) -> bool:
    return loss_type != "simpo"


def needs_wpo_term(loss_type: str) -> bool:
    return loss_type == "wpo"


def resolve_beta(loss_type: str, beta: float | None) -> float:
    return DEFAULT_BETA[loss_type] if beta is None else float(beta)


def check_loss_options(
    loss_type: str,
    beta: float | None = None,
    label_smoothing: float = 0.0,
    gamma_beta_ratio: float = 0.3,
    rpo_alpha: float = 0.0,
) -> float:
    """Validate the loss options a user gave; return the resolved β. Raises UsageError."""
    if loss_type not in LOSS_TYPES:
        raise UsageError(f"--loss-type {loss_type!r} is not one of: {', '.join(LOSS_TYPES)}")
    beta = resolve_beta(loss_type, beta)
    if not (beta > 0 and math.isfinite(beta)):
        raise UsageError(f"--beta must be a positive number, got {beta}")
    if loss_type == "robust":
        if not 0.0 <= label_smoothing < 0.5:
            raise UsageError(
                f"--label-smoothing must lie in [0, 0.5) for the robust loss (it divides by 1 - 2ε), "
                f"got {label_smoothing}"
            )
    elif not 0.0 <= label_smoothing <= 0.5:
        raise UsageError(f"--label-smoothing must lie in [0, 0.5], got {label_smoothing}")
    if label_smoothing > 0 and loss_type not in SMOOTHED:
        raise UsageError(
            f"--label-smoothing has no effect on the {loss_type} loss; it applies to "
            f"{', '.join(t for t in LOSS_TYPES if t in SMOOTHED)}"
        )
    if not (math.isfinite(gamma_beta_ratio) and gamma_beta_ratio >= 0):
        raise UsageError(f"--gamma-beta-ratio must be a non-negative number, got {gamma_beta_ratio}")
    if not (math.isfinite(rpo_alpha) and rpo_alpha >= 0):
        raise UsageError(f"--rpo-alpha must be a non-negative number, got {rpo_alpha}")
    return beta


def per_token(logps: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
    """π̄ = π / max(n, 1): a pair with no label tokens has π = 0, so its average is 0, not NaN."""
    return logps / num_tokens.clamp(min=1).to(logps.dtype)


def _smoothed_sigmoid(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    # −(1−ε)·logσ(x) − ε·logσ(−x): cDPO's loss when the preference label is flipped with prob. ε.
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def _rewards(beta: float, chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return beta * chosen.detach(), beta * rejected.detach()


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """DPO (Rafailov et al. 2023), with cDPO's label smoothing: −(1−ε)·logσ(βz) − ε·logσ(−βz)."""
    chosen_ratio = policy_chosen - reference_chosen.detach()
    rejected_ratio = policy_rejected - reference_rejected.detach()
    losses = _smoothed_sigmoid(beta * (chosen_ratio - rejected_ratio), label_smoothing)
    return PreferenceLoss(losses, *_rewards(beta, chosen_ratio, rejected_ratio))


def dpo_norm_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    chosen_num_tokens: torch.Tensor,
    rejected_num_tokens: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """Tulu 3's length-normalised DPO: the DPO loss of per-token averaged log-probs."""
    return dpo_loss(
        per_token(policy_chosen, chosen_num_tokens),
        per_token(policy_rejected, rejected_num_tokens),
        per_token(reference_chosen, chosen_num_tokens),
        per_token(reference_rejected, rejected_num_tokens),
        beta,
        label_smoothing,
    )


def simpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    chosen_num_tokens: torch.Tensor,
    rejected_num_tokens: torch.Tensor,
    beta: float,
    gamma_beta_ratio: float = 0.3,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """SimPO (Meng et al. 2024), reference-free: z = (π̄c − π̄r) − γ/β, loss as DPO's of βz."""
    chosen = per_token(policy_chosen, chosen_num_tokens)
    rejected = per_token(policy_rejected, rejected_num_tokens)
    losses = _smoothed_sigmoid(beta * (chosen - rejected - gamma_beta_ratio), label_smoothing)
    return PreferenceLoss(losses, *_rewards(beta, chosen, rejected))


def wpo_weight(chosen_wpo_term: torch.Tensor, rejected_wpo_term: torch.Tensor) -> torch.Tensor:
    """WPO's pair weight (Zhou et al. 2024, Eq. 2 with the alignment term): min(1, exp(wc + wr)).

    ``wc``/``wr`` are each response's per-token mean of log p(y_t) − log Σ_v p(v)², computed by
    pipeline/logprobs.py. Each pair's weight depends on that pair alone (no normalisation across
    the batch), and no gradient flows through it. Clamping the exponent first keeps exp finite.
    """
    return torch.exp((chosen_wpo_term + rejected_wpo_term).detach().clamp(max=0.0))


def wpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    chosen_wpo_term: torch.Tensor,
    rejected_wpo_term: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """Weighted preference optimisation: each pair's DPO loss times its (constant) WPO weight."""
    dpo = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta, label_smoothing)
    weight = wpo_weight(chosen_wpo_term, rejected_wpo_term).to(dpo.losses.dtype)
    return PreferenceLoss(dpo.losses * weight, dpo.chosen_rewards, dpo.rejected_rewards)


def ipo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    chosen_num_tokens: torch.Tensor,
    rejected_num_tokens: torch.Tensor,
    beta: float,
) -> PreferenceLoss:
    """IPO (Azar et al. 2023): (z̄ − 1/(2β))², z̄ built from per-token averaged log-ratios."""
    chosen_ratio = per_token(policy_chosen - reference_chosen.detach(), chosen_num_tokens)
    rejected_ratio = per_token(policy_rejected - reference_rejected.detach(), rejected_num_tokens)
    losses = (chosen_ratio - rejected_ratio - 1 / (2 * beta)) ** 2
    return PreferenceLoss(losses, *_rewards(beta, chosen_ratio, rejected_ratio))


def hinge_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> PreferenceLoss:
    """SLiC-style hinge on the DPO margin: relu(1 − βz)."""
    chosen_ratio = policy_chosen - reference_chosen.detach()
    rejected_ratio = policy_rejected - reference_rejected.detach()
    losses = torch.relu(1 - beta * (chosen_ratio - rejected_ratio))
    return PreferenceLoss(losses, *_rewards(beta, chosen_ratio, rejected_ratio))


def robust_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """rDPO (Chowdhury et al. 2024), unbiased under label noise ε: [−(1−ε)logσ(βz) + ε logσ(−βz)]/(1−2ε)."""
    if not 0.0 <= label_smoothing < 0.5:
        raise UsageError(f"the robust loss needs label smoothing in [0, 0.5), got {label_smoothing}")
    chosen_ratio = policy_chosen - reference_chosen.detach()
    rejected_ratio = policy_rejected - reference_rejected.detach()
    logits = beta * (chosen_ratio - rejected_ratio)
    losses = (
        -(1 - label_smoothing) * F.logsigmoid(logits) + label_smoothing * F.logsigmoid(-logits)
    ) / (1 - 2 * label_smoothing)
    return PreferenceLoss(losses, *_rewards(beta, chosen_ratio, rejected_ratio))


def rpo_nll(policy_chosen: torch.Tensor, chosen_num_tokens: torch.Tensor) -> torch.Tensor:
    """RPO's added term (Pang et al. 2024): the chosen response's per-token mean NLL, −π̄c."""
    return -per_token(policy_chosen, chosen_num_tokens)


def preference_loss(
    loss_type: str,
    *,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_num_tokens: torch.Tensor,
    rejected_num_tokens: torch.Tensor,
    reference_chosen_logps: torch.Tensor | None = None,
    reference_rejected_logps: torch.Tensor | None = None,
    beta: float | None = None,
    label_smoothing: float = 0.0,
    gamma_beta_ratio: float = 0.3,
    rpo_alpha: float = 0.0,
    chosen_wpo_term: torch.Tensor | None = None,
    rejected_wpo_term: torch.Tensor | None = None,
) -> PreferenceLoss:
    """The per-example loss of ``loss_type`` (plus ``rpo_alpha`` times the RPO term)."""
    beta = check_loss_options(loss_type, beta, label_smoothing, gamma_beta_ratio, rpo_alpha)
    # Summed log-probs of long responses lose digits in bf16; the loss is cheap, so do it in float32.
    pc, pr = policy_chosen_logps.float(), policy_rejected_logps.float()
    nc, nr = chosen_num_tokens, rejected_num_tokens
    if needs_reference(loss_type):
        if reference_chosen_logps is None or reference_rejected_logps is None:
            raise ValueError(f"the {loss_type} loss needs the reference log-probs")
        rc, rr = reference_chosen_logps.float(), reference_rejected_logps.float()
    if loss_type == "dpo":
        out = dpo_loss(pc, pr, rc, rr, beta, label_smoothing)
    elif loss_type == "dpo_norm":
        out = dpo_norm_loss(pc, pr, rc, rr, nc, nr, beta, label_smoothing)
    elif loss_type == "simpo":
        out = simpo_loss(pc, pr, nc, nr, beta, gamma_beta_ratio, label_smoothing)
    elif loss_type == "wpo":
        if chosen_wpo_term is None or rejected_wpo_term is None:
            raise ValueError("the wpo loss needs the policy's wpo terms (LabelLogProbs(..., with_wpo_term=True))")
        out = wpo_loss(pc, pr, rc, rr, chosen_wpo_term.float(), rejected_wpo_term.float(), beta, label_smoothing)
    elif loss_type == "ipo":
        out = ipo_loss(pc, pr, rc, rr, nc, nr, beta)
    elif loss_type == "hinge":
        out = hinge_loss(pc, pr, rc, rr, beta)
    else:
        out = robust_loss(pc, pr, rc, rr, beta, label_smoothing)
    if rpo_alpha:
        out = dataclasses.replace(out, losses=out.losses + rpo_alpha * rpo_nll(pc, nc))
    return out


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
