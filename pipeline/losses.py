"""Preference losses: one small class each, one registry, and the options that pick, combine and tune them.

Every loss maps per-example tensors ``[B]`` to a :class:`PreferenceLoss` of per-example
``losses`` and detached implicit ``chosen_rewards`` / ``rejected_rewards`` (as torchtune's DPO
loss does); the trainer takes the mean over the global batch. Notation, used in every docstring:

- ``πc, πr``: the policy's log-probs of the chosen / rejected response, summed over label tokens;
- ``refc, refr``: the same from the (cached) reference model;
- ``nc, nr``: the number of label tokens; ``π̄ = π / max(n, 1)`` is the per-token average;
- ``lc = πc − refc``, ``lr = πr − refr``: the log-ratios; ``z = lc − lr``; ``ε`` the label smoothing;
- ``sc = φ(lc)``, ``sr = φ(lr)``, ``d = sc − sr``: the log-ratios through ``--f-divergence``'s φ
  (f-DPO, Wang et al. 2023, arXiv:2309.16240); φ is the identity for the default ``reverse_kl``,
  so ``d = z``. Losses that take φ say so; the others refuse another divergence;
- ``B``, ``N_c``: the pairs, and the chosen label tokens, of the batch the loss is averaged over
  (the global batch in training, see :class:`BatchContext`).

With ``--ld-alpha α`` (LD-DPO, Liu et al. 2024, arXiv:2409.06411) every summed log-prob above
(policy and reference) is ``S_k + α·(S_n − S_k)``: ``S_k`` sums the first ``k = min(nc, nr)``
label tokens, the length both responses share, so a longer response's tail counts α times.

The implicit rewards are β times the log-ratios the loss itself compares: ``β·lc, β·lr`` for the
summed losses, ``β·lc/nc, β·lr/nr`` for the per-token ones (``dpo_norm``, ``ipo``, as
open-instruct logs them; TRL 1.16 logs ``β·lc, β·lr`` for every loss) and ``β·π̄c, β·π̄r`` for
the reference-free ``simpo`` and ``sft``.

A loss is a weighted sum of components: ``--loss-type dpo,bco_pair,sft --loss-weights 0.8,0.2,1``
is ``0.8·ℓ_dpo + 0.2·ℓ_bco_pair + 1·ℓ_sft`` per example (TRL's ``loss_type`` list). Its rewards are
the first component's that compares the two responses (every loss but ``sft``). TRL's names are
aliases (``sigmoid`` is ``dpo``), resolved by ``LossConfig.resolved()`` before anything is
fingerprinted.

Adding a loss is one class here (decorated with ``@register``) and its test: ``LossConfig`` (the
options of train and evaluate), the CLI's help and evaluate's objective all read the registry.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..artifacts.errors import UsageError
from ..artifacts.fingerprint import leaf_values
from .config import fraction, non_negative, option, positive, validate
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
# bco_pair's per-pair mean reward (β·lc + β·lr)/2, summed by the trainer to move its running mean.
BCO_REWARD = "bco_pair/reward"


@dataclasses.dataclass(frozen=True)
class PreferenceLoss:
    losses: torch.Tensor  # [B], differentiable through the policy's log-probs only
    chosen_rewards: torch.Tensor  # [B], detached
    rejected_rewards: torch.Tensor  # [B], detached
    # A combination's components, each unweighted ([B]); empty for a single loss.
    components: Mapping[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    # Per-example values the trainer sums for a loss's own state (BCO_REWARD), never logged.
    extras: Mapping[str, torch.Tensor] = dataclasses.field(default_factory=dict)


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
    # Sums over the first min(nc, nr) label tokens (S_k of LD-DPO), policy and reference.
    policy_chosen_shared: torch.Tensor | None = None
    policy_rejected_shared: torch.Tensor | None = None
    reference_chosen_shared: torch.Tensor | None = None
    reference_rejected_shared: torch.Tensor | None = None

    @classmethod
    def of(cls, chosen: SequenceLogProbs, rejected: SequenceLogProbs,
           reference: Mapping[str, torch.Tensor] | None = None) -> LossInputs:
        """From the policy's scores of a batch and the reference cache's values for its pairs."""
        reference = reference or {}
        return cls(_float(chosen.logps), _float(rejected.logps), chosen.num_tokens, rejected.num_tokens,
                   _float(reference.get("chosen_logps")), _float(reference.get("rejected_logps")),
                   _float(chosen.wpo_term), _float(rejected.wpo_term),
                   _float(chosen.shared_logps), _float(rejected.shared_logps),
                   _float(reference.get("chosen_shared_logps")), _float(reference.get("rejected_shared_logps")))

    def ratios(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lc, lr) = (πc − refc, πr − refr); the reference is a constant of the update."""
        return (self.policy_chosen - self.reference_chosen.detach(),
                self.policy_rejected - self.reference_rejected.detach())

    def scores(self, config: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """(sc, sr) = (φ(lc), φ(lr)) for ``config.f_divergence``."""
        chosen, rejected = self.ratios()
        return f_divergence_score(chosen, config), f_divergence_score(rejected, config)

    def length_desensitised(self, alpha: float) -> LossInputs:
        """LD-DPO's inputs: every sum S_n becomes S_k + α·(S_n − S_k)."""
        pairs = [("policy_chosen", "policy_chosen_shared"), ("policy_rejected", "policy_rejected_shared")]
        if self.reference_chosen is not None:
            pairs += [("reference_chosen", "reference_chosen_shared"), ("reference_rejected", "reference_rejected_shared")]
        changes = {}
        for full, shared in pairs:
            if getattr(self, shared) is None:
                raise ValueError(f"--ld-alpha needs {shared} (LabelLogProbs(..., shared_tokens=...), the cache's "
                                 "shared-prefix columns)")
            part = getattr(self, shared)
            changes[full] = part + alpha * (getattr(self, full) - part)
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class BatchContext:
    """What a loss may need of the whole batch its mean is taken over, known before the forward.

    In training that batch is the global batch, whatever its split into micro-batches and ranks:
    the trainer counts its pairs and chosen label tokens from the tokenized artifact, so a loss
    defined per batch (``sft``'s token-weighted mean) is the same for any split. ``None`` in place
    of a context means "the batch these inputs are": one batch, one micro-batch, as in TRL.
    """

    pairs: float
    chosen_tokens: float  # label tokens of the batch's chosen responses (N_c)
    reward_shift: float = 0.0  # bco_pair's δ for this step (see RewardShift)


class RewardShift:
    """BCO's reward shift δ: the running mean of (β·lc + β·lr)/2 over every pair trained on so far.

    Jung et al. 2024 (arXiv:2404.04656) shift both rewards by δ so the binary classifier is
    balanced; TRL < 1.0 kept it as a running mean (TRL 1.x dropped it). Here it moves once per
    optimizer step, after the step, by the global batch's sum over all ranks: step t uses the
    mean of steps 1..t−1 (δ = 0 at step 1, where the policy is the reference). Its state is two
    float64 numbers that a checkpoint carries, so a resumed run continues it exactly.
    """

    def __init__(self) -> None:
        self.reward_sum = 0.0
        self.pairs = 0.0

    @property
    def value(self) -> float:
        return self.reward_sum / self.pairs if self.pairs else 0.0

    def update(self, reward_sum: float, pairs: float) -> None:
        self.reward_sum += float(reward_sum)
        self.pairs += float(pairs)

    def state_dict(self) -> dict[str, float]:
        return {"reward_sum": self.reward_sum, "pairs": self.pairs}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.reward_sum, self.pairs = float(state["reward_sum"]), float(state["pairs"])


F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def f_divergence_score(ratio: torch.Tensor, config: LossConfig) -> torch.Tensor:
    """φ(x) = f′(u) at log u = x, for the f of ``--f-divergence`` (exactly as TRL 1.16 computes it).

    reverse_kl: x;  forward_kl: 1 − e^(−x);  js_divergence: log 2 + logσ(x);
    alpha_divergence with coefficient a: (e^((a−1)x) − 1)/(a − 1), the exponent clamped at 80,
    and x at a = 1. TRL's a is the f-DPO paper's 1 − α (they agree at the default 0.5).
    """
    kind = config.f_divergence
    if kind == "reverse_kl":
        return ratio
    if kind == "forward_kl":
        return 1 - torch.exp(-ratio)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(ratio)
    a = config.f_alpha_divergence_coef
    if abs(a - 1.0) < 1e-6:
        return ratio
    exponent = ((a - 1.0) * ratio).float().clamp(max=80.0)
    return (torch.exp(exponent) - 1.0).to(ratio.dtype) * (1.0 / (a - 1.0))


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
    aliases: ClassVar[tuple[str, ...]] = ()  # other names for it (TRL's), resolved before fingerprinting
    default_beta: ClassVar[float] = 0.1
    needs_reference: ClassVar[bool] = True
    needs_wpo_term: ClassVar[bool] = False
    smoothed: ClassVar[bool] = False  # its formula has a label-smoothing term
    f_divergence: ClassVar[bool] = False  # it accepts an --f-divergence other than reverse_kl
    pairwise: ClassVar[bool] = True  # it compares the two responses (its rewards are a combination's)
    # Its value depends on which pairs share a micro-batch, not just on the global batch.
    sorts_micro_batch: ClassVar[bool] = False
    length_desensitised: ClassVar[bool] = True  # it reads LD-DPO's weighted sums when --ld-alpha is set
    needs_token_count: ClassVar[bool] = False  # it reads BatchContext.chosen_tokens

    def __call__(self, x: LossInputs, config: LossConfig, context: BatchContext | None) -> PreferenceLoss:
        raise NotImplementedError

    def check(self, config: LossConfig) -> None:
        """Option combinations this loss refuses, beyond the generic ones."""


LOSSES: dict[str, Loss] = {}


def register(cls: type[Loss]) -> type[Loss]:
    LOSSES[cls.name] = cls()
    return cls


@register
class Dpo(Loss):
    """DPO (Rafailov et al. 2023, arXiv:2305.18290) with cDPO's label smoothing:
    −(1−ε)·logσ(βd) − ε·logσ(−βd). TRL: ``sigmoid`` (whose 1.16 version ignores ε)."""

    name = "dpo"
    aliases = ("sigmoid",)
    smoothed = True
    f_divergence = True

    def __call__(self, x, config, context):
        chosen, rejected = x.ratios()
        scored_chosen, scored_rejected = x.scores(config)
        losses = _smoothed_sigmoid(config.beta * (scored_chosen - scored_rejected), config.label_smoothing)
        return PreferenceLoss(losses, *_rewards(config.beta, chosen, rejected))


@register
class DpoNorm(Loss):
    """Tülu 3's length-normalised DPO (Lambert et al. 2024, arXiv:2411.15124): the DPO loss of
    βd̄, d̄ = sc/nc − sr/nr. TRL: ``sigmoid_norm`` (β 0.1 there)."""

    name = "dpo_norm"
    aliases = ("sigmoid_norm",)
    default_beta = 5.0
    smoothed = True
    f_divergence = True

    def __call__(self, x, config, context):
        chosen, rejected = x.ratios()
        chosen, rejected = per_token(chosen, x.chosen_num_tokens), per_token(rejected, x.rejected_num_tokens)
        scored_chosen, scored_rejected = x.scores(config)
        margin = per_token(scored_chosen, x.chosen_num_tokens) - per_token(scored_rejected, x.rejected_num_tokens)
        return PreferenceLoss(_smoothed_sigmoid(config.beta * margin, config.label_smoothing),
                              *_rewards(config.beta, chosen, rejected))


@register
class Simpo(Loss):
    """SimPO (Meng et al. 2024, arXiv:2405.14734), reference-free: the DPO loss of
    β·(π̄c − π̄r − γ/β). Not in TRL's DPOTrainer (its CPOTrainer has it as ``simpo``)."""

    name = "simpo"
    default_beta = 2.0  # its paper's sweeps land on 2-2.5
    needs_reference = False
    smoothed = True

    def __call__(self, x, config, context):
        chosen = per_token(x.policy_chosen, x.chosen_num_tokens)
        rejected = per_token(x.policy_rejected, x.rejected_num_tokens)
        losses = _smoothed_sigmoid(config.beta * (chosen - rejected - config.gamma_beta_ratio), config.label_smoothing)
        return PreferenceLoss(losses, *_rewards(config.beta, chosen, rejected))


def wpo_weight(chosen_wpo_term: torch.Tensor, rejected_wpo_term: torch.Tensor) -> torch.Tensor:
    """WPO's pair weight (Zhou et al. 2024, Eq. 2 with the alignment term): min(1, exp(wc + wr)).

    ``wc``/``wr`` are each response's per-token mean of log p(y_t) − log Σ_v p(v)², computed by
    pipeline/logprobs.py. Each pair's weight depends on that pair alone (no normalisation across
    the batch), and no gradient flows through it. Clamping the exponent first keeps exp finite
    (TRL's ``use_weighting`` does not clamp: the two agree wherever wc + wr <= 0).
    """
    return torch.exp((chosen_wpo_term + rejected_wpo_term).detach().clamp(max=0.0))


@register
class Wpo(Loss):
    """Weighted preference optimisation (Zhou et al. 2024, arXiv:2406.11827): each pair's dpo loss
    times its constant weight min(1, e^(wc+wr)). TRL: ``sigmoid`` with ``use_weighting``."""

    name = "wpo"
    needs_wpo_term = True
    smoothed = True
    f_divergence = True

    def __call__(self, x, config, context):
        if x.chosen_wpo_term is None or x.rejected_wpo_term is None:
            raise ValueError("the wpo loss needs the policy's wpo terms (LabelLogProbs(..., with_wpo_term=True))")
        dpo = LOSSES["dpo"](x, config, context)
        weight = wpo_weight(x.chosen_wpo_term, x.rejected_wpo_term).to(dpo.losses.dtype)
        return PreferenceLoss(dpo.losses * weight, dpo.chosen_rewards, dpo.rejected_rewards)


@register
class Ipo(Loss):
    """IPO (Azar et al. 2023, arXiv:2310.12036, Eq. 17 with τ = β): (sc/nc − sr/nr − 1/(2β))²,
    each response averaged per token with its own count (as TRL, confirmed by the authors)."""

    name = "ipo"
    f_divergence = True

    def __call__(self, x, config, context):
        chosen, rejected = x.ratios()
        chosen, rejected = per_token(chosen, x.chosen_num_tokens), per_token(rejected, x.rejected_num_tokens)
        scored_chosen, scored_rejected = x.scores(config)
        margin = per_token(scored_chosen, x.chosen_num_tokens) - per_token(scored_rejected, x.rejected_num_tokens)
        losses = (margin - 1 / (2 * config.beta)) ** 2
        return PreferenceLoss(losses, *_rewards(config.beta, chosen, rejected))


@register
class Hinge(Loss):
    """SLiC's hinge on the DPO margin (Zhao et al. 2023, arXiv:2305.10425; RSO, Liu et al. 2023,
    arXiv:2309.06657): relu(1 − βd)."""

    name = "hinge"
    f_divergence = True

    def __call__(self, x, config, context):
        chosen, rejected = x.ratios()
        scored_chosen, scored_rejected = x.scores(config)
        losses = torch.relu(1 - config.beta * (scored_chosen - scored_rejected))
        return PreferenceLoss(losses, *_rewards(config.beta, chosen, rejected))


@register
class Robust(Loss):
    """rDPO (Chowdhury et al. 2024, arXiv:2403.00409), unbiased under label noise ε:
    [−(1−ε)·logσ(βd) + ε·logσ(−βd)] / (1−2ε)."""

    name = "robust"
    smoothed = True
    f_divergence = True

    def check(self, config):
        if not 0.0 <= config.label_smoothing < 0.5:
            raise UsageError(
                f"--label-smoothing must lie in [0, 0.5) for the robust loss (it divides by 1 - 2ε), "
                f"got {config.label_smoothing}"
            )

    def __call__(self, x, config, context):
        self.check(config)
        eps = config.label_smoothing
        chosen, rejected = x.ratios()
        scored_chosen, scored_rejected = x.scores(config)
        logits = config.beta * (scored_chosen - scored_rejected)
        losses = (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)
        return PreferenceLoss(losses, *_rewards(config.beta, chosen, rejected))


@register
class ExoPair(Loss):
    """EXO-pref (Ji et al. 2024, arXiv:2402.00856, Eq. 16 with K = 2): KL(q ‖ p) of
    q = (σ(βd), σ(−βd)) from p = (1−ε, ε):
    σ(βd)·[logσ(βd) − log(1−ε)] + σ(−βd)·[logσ(−βd) − log ε]. ε > 0 (the paper: 1e-3); the
    minimum is at βd = log((1−ε)/ε), and as β → 0 the loss tends to −log 2 − ½·log(ε(1−ε))."""

    name = "exo_pair"
    smoothed = True
    f_divergence = True

    def check(self, config):
        if not 0.0 < config.label_smoothing <= 0.5:
            raise UsageError(
                "the exo_pair loss needs --label-smoothing ε in (0, 0.5]: it is the target probability of the "
                f"rejected response (its paper uses 1e-3), got {config.label_smoothing}"
            )

    def __call__(self, x, config, context):
        chosen, rejected = x.ratios()
        scored_chosen, scored_rejected = x.scores(config)
        logits = config.beta * (scored_chosen - scored_rejected)
        eps = torch.tensor(config.label_smoothing, dtype=logits.dtype, device=logits.device)
        losses = (torch.sigmoid(logits) * (F.logsigmoid(logits) - torch.log1p(-eps))
                  + torch.sigmoid(-logits) * (F.logsigmoid(-logits) - torch.log(eps)))
        return PreferenceLoss(losses, *_rewards(config.beta, chosen, rejected))


@register
class NcaPair(Loss):
    """NCA (Chen et al. 2024, arXiv:2402.05369), on absolute log-ratios:
    −logσ(β·lc) − ½·logσ(−β·lc) − ½·logσ(−β·lr); 2·log 2 at lc = lr = 0."""

    name = "nca_pair"

    def __call__(self, x, config, context):
        chosen, rejected = x.ratios()
        c, r = config.beta * chosen, config.beta * rejected
        losses = -F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r)
        return PreferenceLoss(losses, *_rewards(config.beta, chosen, rejected))


@register
class BcoPair(Loss):
    """BCO on pairs (Jung et al. 2024, arXiv:2404.04656): −logσ(β·lc − δ) − logσ(−(β·lr − δ)), a
    binary classifier of chosen against rejected rewards. δ = 0 (TRL 1.x) unless
    ``--bco-reward-shift``, where δ is the running mean of the rewards (:class:`RewardShift`)."""

    name = "bco_pair"

    def __call__(self, x, config, context):
        chosen, rejected = x.ratios()
        c, r = config.beta * chosen, config.beta * rejected
        shift = context.reward_shift if config.bco_reward_shift and context is not None else 0.0
        losses = -F.logsigmoid(c - shift) - F.logsigmoid(-(r - shift))
        extras = {BCO_REWARD: (c.detach() + r.detach()) / 2} if config.bco_reward_shift else {}
        return PreferenceLoss(losses, *_rewards(config.beta, chosen, rejected), extras=extras)


@register
class SppoHard(Loss):
    """SPPO with hard labels (Wu et al. 2024, arXiv:2405.00675, Eq. 4.7 with P = 1 for the chosen
    and 0 for the rejected response): (lc − 1/(2β))² + (lr + 1/(2β))²; it grows as 1/β² when β → 0."""

    name = "sppo_hard"

    def __call__(self, x, config, context):
        chosen, rejected = x.ratios()
        losses = (chosen - 0.5 / config.beta) ** 2 + (rejected + 0.5 / config.beta) ** 2
        return PreferenceLoss(losses, *_rewards(config.beta, chosen, rejected))


def _sorted_margin_loss(delta: torch.Tensor, config: LossConfig) -> torch.Tensor:
    return _smoothed_sigmoid(config.beta * delta, config.label_smoothing)


@register
class Aot(Loss):
    """AOT (Melnyk et al. 2024, arXiv:2406.05882), paired: δ_(i) = sort↑(πc − πr)_(i) −
    sort↑(refc − refr)_(i), the i-th smallest margins matched by rank, and the cDPO loss of βδ_(i).
    Example i of the output is rank i, not pair i. It sorts within each micro-batch, as TRL sorts
    per device: its value depends on --per-device-batch-size, which its runs fingerprint."""

    name = "aot"
    smoothed = True
    sorts_micro_batch = True

    def __call__(self, x, config, context):
        chosen, rejected = x.ratios()
        policy, _ = torch.sort(x.policy_chosen - x.policy_rejected, dim=0)
        reference, _ = torch.sort((x.reference_chosen - x.reference_rejected).detach(), dim=0)
        return PreferenceLoss(_sorted_margin_loss(policy - reference, config), *_rewards(config.beta, chosen, rejected))


@register
class AotUnpaired(Loss):
    """AOT, unpaired (Melnyk et al. 2024): δ_(i) = sort↑(lc)_(i) − sort↑(lr)_(i), the chosen and
    rejected log-ratio distributions matched by rank; the cDPO loss of βδ_(i). Sorts per
    micro-batch, like ``aot``."""

    name = "aot_unpaired"
    smoothed = True
    sorts_micro_batch = True

    def __call__(self, x, config, context):
        chosen, rejected = x.ratios()
        delta = torch.sort(chosen, dim=0)[0] - torch.sort(rejected, dim=0)[0]
        return PreferenceLoss(_sorted_margin_loss(delta, config), *_rewards(config.beta, chosen, rejected))


@register
class ApoZero(Loss):
    """APO-zero (D'Oosterlinck et al. 2024, arXiv:2408.06266, Eq. 7), for chosen responses better
    than the model's own: (1 − σ(β·lc)) + σ(β·lr): raises the chosen, lowers the rejected."""

    name = "apo_zero"

    def __call__(self, x, config, context):
        chosen, rejected = x.ratios()
        losses = (1 - torch.sigmoid(config.beta * chosen)) + torch.sigmoid(config.beta * rejected)
        return PreferenceLoss(losses, *_rewards(config.beta, chosen, rejected))


@register
class ApoDown(Loss):
    """APO-down (D'Oosterlinck et al. 2024, Eq. 8), for chosen responses worse than the model's own:
    σ(β·lc) + (1 − σ(β·z)): lowers both, the rejected more."""

    name = "apo_down"

    def __call__(self, x, config, context):
        chosen, rejected = x.ratios()
        losses = torch.sigmoid(config.beta * chosen) + (1 - torch.sigmoid(config.beta * (chosen - rejected)))
        return PreferenceLoss(losses, *_rewards(config.beta, chosen, rejected))


@register
class Discopop(Loss):
    """DiscoPOP's log-ratio modulated loss (Lu et al. 2024, arXiv:2406.08414, Eq. 5): with x = βd and
    m = σ(x/τ), (1 − m)·(−logσ(x)) + m·e^(−x); τ = --discopop-tau (0.05)."""

    name = "discopop"
    f_divergence = True

    def __call__(self, x, config, context):
        chosen, rejected = x.ratios()
        scored_chosen, scored_rejected = x.scores(config)
        logits = config.beta * (scored_chosen - scored_rejected)
        modulation = torch.sigmoid(logits / config.discopop_tau)
        losses = -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation
        return PreferenceLoss(losses, *_rewards(config.beta, chosen, rejected))


@register
class Sft(Loss):
    """The chosen responses' NLL per token, over the batch: mean_i ℓ_i = −Σ πc / N_c (TRL's
    ``sft``: token-weighted, not a mean of per-pair means). Each pair's share is
    ℓ_i = −πc_i · B / N_c, so the global batch's mean is the same for any split into
    micro-batches and ranks. Reference-free and not length-desensitised; RPO (Pang et al. 2024,
    arXiv:2404.19733) is ``dpo,sft`` with weights 1, α. Rewards: β·π̄c, β·π̄r."""

    name = "sft"
    needs_reference = False
    pairwise = False
    f_divergence = True  # it reads no log-ratio, so any divergence leaves it unchanged
    length_desensitised = False
    needs_token_count = True

    def __call__(self, x, config, context):
        if context is None:
            context = BatchContext(float(x.policy_chosen.numel()), float(x.chosen_num_tokens.sum()))
        losses = -x.policy_chosen * (context.pairs / max(context.chosen_tokens, 1.0))
        chosen = per_token(x.policy_chosen, x.chosen_num_tokens)
        rejected = per_token(x.policy_rejected, x.rejected_num_tokens)
        return PreferenceLoss(losses, *_rewards(config.beta, chosen, rejected))


LOSS_TYPES = tuple(LOSSES)
ALIASES = MappingProxyType({alias: name for name, loss in LOSSES.items() for alias in loss.aliases})
DEFAULT_BETA = MappingProxyType({name: loss.default_beta for name, loss in LOSSES.items()})


def _loss_names() -> str:
    return ", ".join(name + (f" (TRL: {', '.join(loss.aliases)})" if loss.aliases else "") for name, loss in LOSSES.items())


def _parse_loss_type(loss_type: str) -> tuple[tuple[str, ...], str | None]:
    """(canonical names, None) or ((), what is wrong)."""
    names: list[str] = []
    for part in str(loss_type).split(","):
        part = part.strip()
        name = ALIASES.get(part, part)
        if name not in LOSSES:
            return (), f"names {part!r}, which is not one of: {_loss_names()}"
        if name in names:
            return (), f"names {name} twice (give it one weight in --loss-weights)"
        names.append(name)
    return tuple(names), None


def loss_names(loss_type: str) -> tuple[str, ...]:
    """The canonical names of a ``--loss-type`` value (``"sigmoid, sft"`` -> ``("dpo", "sft")``)."""
    names, problem = _parse_loss_type(loss_type)
    if problem:
        raise UsageError(f"--loss-type {problem}, got {loss_type!r}")
    return names


def _loss_type_problem(value: str) -> str | None:
    return _parse_loss_type(value)[1]


def _finite(value: float | None) -> str | None:
    return None if value is None or math.isfinite(value) else "must be a finite number"


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Which loss (or weighted losses), with which hyperparameters: train's options, and evaluate's objective.

    ``beta`` None means the loss's own default; ``resolved()`` fills it in and writes the loss in
    its canonical form (TRL names resolved, ``--rpo-alpha`` as an ``sft`` component, weights of 1
    dropped). That form is what train fingerprints and records (its manifest's ``loss`` section)
    and evaluate rebuilds. Options added with the loss combinations are ``omit_if_default``: a run
    that does not set them keeps the fingerprint it had before they existed.
    """

    PANEL: ClassVar[str] = "Loss"

    loss_type: str = option("dpo", check=_loss_type_problem, separator=",", help=(
        f"The preference loss, or several comma-separated (summed, see --loss-weights): {_loss_names()}. "
        f"Reference-free: {', '.join(n for n, loss in LOSSES.items() if not loss.needs_reference)}."))
    beta: float | None = option(None, check=positive, help=(
        "Strength of the KL penalty / reward scale. Default by (first) loss type: "
        f"{', '.join(f'{b:g} for {n}' for n, b in DEFAULT_BETA.items() if b != Loss.default_beta)}, "
        f"{Loss.default_beta:g} for the others."))
    label_smoothing: float = option(0.0, help=(
        "Label smoothing ε (cDPO) of " + ", ".join(n for n, loss in LOSSES.items() if loss.smoothed)
        + "; robust needs [0, 0.5), exo_pair (0, 0.5]."))
    gamma_beta_ratio: float = option(0.3, check=non_negative, help="SimPO's target margin γ/β.")
    rpo_alpha: float = option(0.0, check=non_negative, help=(
        "RPO: shorthand for adding an sft term with this weight (--loss-type dpo --rpo-alpha 1 is "
        "--loss-type dpo,sft); 0 = off."))
    loss_weights: str | None = option(None, omit_if_default=True, separator=",", help=(
        "Comma-separated weights of the --loss-type components (default 1 each), e.g. --loss-type "
        "dpo,bco_pair,sft --loss-weights 0.8,0.2,1 (MPO); each component is logged as loss/NAME."))
    f_divergence: str = option("reverse_kl", choices=F_DIVERGENCES, omit_if_default=True, help=(
        "f-DPO's divergence from the reference: reverse_kl (standard), forward_kl, js_divergence or "
        "alpha_divergence; for " + ", ".join(n for n, loss in LOSSES.items() if loss.f_divergence) + "."))
    f_alpha_divergence_coef: float = option(0.5, check=_finite, omit_if_default=True, help=(
        "alpha_divergence's coefficient a (TRL's; the f-DPO paper's α is 1 - a)."))
    discopop_tau: float = option(0.05, check=positive, omit_if_default=True, help=(
        "discopop's temperature τ of the mixing between its logistic and exponential parts."))
    ld_alpha: float | None = option(None, check=fraction(high_open=False), omit_if_default=True, help=(
        "LD-DPO: weight of the log-probs of response tokens past the shorter response's length, in [0, 1] "
        "(1 = plain sums); needs a reference cache with shared-prefix columns."))
    bco_reward_shift: bool = option(False, omit_if_default=True, help=(
        "bco_pair: shift the rewards by their running mean δ (the BCO paper; TRL < 1.0). Off: TRL 1.x's bco_pair."))

    # ------------------------------------------------------------------------- the components

    def terms(self) -> tuple[tuple[str, ...], tuple[float, ...]]:
        """(canonical names, weights), with --rpo-alpha as an sft term."""
        names = loss_names(self.loss_type)
        weights = (tuple(float(w) for w in str(self.loss_weights).split(","))
                   if self.loss_weights is not None else (1.0,) * len(names))
        if self.rpo_alpha:
            names, weights = names + ("sft",), weights + (float(self.rpo_alpha),)
        return names, weights

    @property
    def losses(self) -> tuple[Loss, ...]:
        return tuple(LOSSES[name] for name in self.terms()[0])

    @property
    def lead(self) -> Loss:
        """The component whose default β and rewards the whole loss takes: the first pairwise one."""
        losses = self.losses
        return next((loss for loss in losses if loss.pairwise), losses[0])

    @property
    def needs_reference(self) -> bool:
        return any(loss.needs_reference for loss in self.losses)

    @property
    def needs_wpo_term(self) -> bool:
        return any(loss.needs_wpo_term for loss in self.losses)

    @property
    def needs_shared_logps(self) -> bool:
        """Whether the loss reads S_k, the sums over the first min(nc, nr) label tokens (LD-DPO)."""
        return self.ld_alpha is not None

    @property
    def needs_token_count(self) -> bool:
        return any(loss.needs_token_count for loss in self.losses)

    @property
    def sorts_micro_batch(self) -> bool:
        return any(loss.sorts_micro_batch for loss in self.losses)

    # ------------------------------------------------------------------------------ checks

    def check(self) -> None:
        if _loss_type_problem(self.loss_type):
            return  # the field's own check names it
        names = loss_names(self.loss_type)
        if self.loss_weights is not None:
            try:
                weights = [float(w) for w in str(self.loss_weights).split(",")]
            except ValueError:
                raise UsageError(f"--loss-weights {self.loss_weights!r}: expected comma-separated numbers") from None
            if len(weights) != len(names):
                raise UsageError(f"--loss-weights {self.loss_weights!r} has {len(weights)} weights for the "
                                 f"{len(names)} losses of --loss-type {self.loss_type!r}")
            if not all(math.isfinite(w) and w >= 0 for w in weights) or not any(weights):
                raise UsageError(f"--loss-weights {self.loss_weights!r}: weights must be finite, >= 0 and not all 0 "
                                 "(a weight of 0 logs a component without training on it)")
        if self.rpo_alpha and "sft" in names:
            raise UsageError("--rpo-alpha adds an sft term, and --loss-type already has one: weight it in --loss-weights")
        losses = [LOSSES[name] for name in names]
        for loss in losses:
            loss.check(self)
        if not 0.0 <= self.label_smoothing <= 0.5:
            raise UsageError(f"--label-smoothing must lie in [0, 0.5], got {self.label_smoothing}")
        if self.label_smoothing > 0 and not any(loss.smoothed for loss in losses):
            raise UsageError(
                f"--label-smoothing has no effect on the {self.loss_type} loss; it applies to "
                f"{', '.join(name for name, other in LOSSES.items() if other.smoothed)}"
            )
        if self.f_divergence != "reverse_kl":
            refused = [loss.name for loss in losses if not loss.f_divergence]
            if refused:
                raise UsageError(f"--f-divergence {self.f_divergence} does not apply to {', '.join(refused)}; it applies "
                                 f"to {', '.join(n for n, loss in LOSSES.items() if loss.f_divergence)}")
        self._check_effect("f_alpha_divergence_coef", self.f_divergence == "alpha_divergence",
                           "--f-divergence alpha_divergence")
        self._check_effect("discopop_tau", "discopop" in names, "the discopop loss")
        self._check_effect("bco_reward_shift", "bco_pair" in names, "the bco_pair loss")
        self._check_effect("ld_alpha", any(loss.length_desensitised for loss in losses),
                           "a loss other than sft (sft reads the plain sums)")

    def _check_effect(self, name: str, applies: bool, what: str) -> None:
        # An option that changes nothing must not change the fingerprint either.
        field = next(f for f in dataclasses.fields(self) if f.name == name)
        if not applies and getattr(self, name) != field.default:
            raise UsageError(f"--{name.replace('_', '-')} applies only to {what}; --loss-type is {self.loss_type}")

    def resolved(self) -> LossConfig:
        """Checked and canonical: TRL names resolved, --rpo-alpha as an sft term, weights of 1 dropped,
        β filled in from the (first pairwise) loss's default."""
        validate(self)
        names, weights = self.terms()
        return dataclasses.replace(
            self, loss_type=",".join(names), rpo_alpha=0.0,
            loss_weights=None if all(w == 1.0 for w in weights) else ",".join(repr(w) for w in weights),
            beta=self.beta if self.beta is not None else self.lead.default_beta,
        )

    # ------------------------------------------------------------------------------- the loss

    def __call__(self, x: LossInputs, context: BatchContext | None = None) -> PreferenceLoss:
        """The per-example loss (the weighted sum of the components); call on a resolved config.

        ``context``: the batch the trainer averages over (None: the batch ``x`` is).
        """
        names, weights = self.terms()
        missing = [name for name in names if LOSSES[name].needs_reference]
        if missing and (x.reference_chosen is None or x.reference_rejected is None):
            raise ValueError(f"the {', '.join(missing)} loss needs the reference log-probs")
        desensitised = x.length_desensitised(self.ld_alpha) if self.ld_alpha is not None else x
        outs = {name: LOSSES[name](desensitised if LOSSES[name].length_desensitised else x, self, context)
                for name in names}
        total = None
        for name, weight in zip(names, weights, strict=True):
            weighted = outs[name].losses if weight == 1.0 else outs[name].losses * weight
            total = weighted if total is None else total + weighted
        lead = outs[self.lead.name]
        extras = {key: value for out in outs.values() for key, value in out.extras.items()}
        components = {name: out.losses for name, out in outs.items()} if len(names) > 1 else {}
        return PreferenceLoss(total, lead.chosen_rewards, lead.rejected_rewards, components, extras)

    def to_json(self) -> dict[str, Any]:
        """The loss section of a manifest; options left at a default that is not fingerprinted are left out."""
        return {f.name: value for f, value, semantic in leaf_values(self) if semantic}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LossConfig:
        """A loss section as train's manifest records it (or the flat config of older train runs), resolved."""
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{k: data[k] for k in names if k in data}).resolved()


def needs_reference(loss_type: str) -> bool:
    return LossConfig(loss_type=loss_type).needs_reference


def needs_wpo_term(loss_type: str) -> bool:
    return LossConfig(loss_type=loss_type).needs_wpo_term


def check_loss_options(loss_type: str, **options: Any) -> float:
    """Validate the loss options a user gave (LossConfig's fields); return the resolved β. Raises UsageError."""
    return LossConfig(loss_type=loss_type, **options).resolved().beta


def preference_loss(loss_type: str, *, policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                    chosen_num_tokens: torch.Tensor, rejected_num_tokens: torch.Tensor,
                    reference_chosen_logps: torch.Tensor | None = None,
                    reference_rejected_logps: torch.Tensor | None = None,
                    chosen_wpo_term: torch.Tensor | None = None, rejected_wpo_term: torch.Tensor | None = None,
                    policy_chosen_shared_logps: torch.Tensor | None = None,
                    policy_rejected_shared_logps: torch.Tensor | None = None,
                    reference_chosen_shared_logps: torch.Tensor | None = None,
                    reference_rejected_shared_logps: torch.Tensor | None = None,
                    context: BatchContext | None = None, **options: Any) -> PreferenceLoss:
    """The per-example loss of ``loss_type`` from keyword tensors and LossConfig options, in one call."""
    config = LossConfig(loss_type=loss_type, **options).resolved()
    return config(LossInputs(
        _float(policy_chosen_logps), _float(policy_rejected_logps), chosen_num_tokens, rejected_num_tokens,
        _float(reference_chosen_logps), _float(reference_rejected_logps), _float(chosen_wpo_term),
        _float(rejected_wpo_term), _float(policy_chosen_shared_logps), _float(policy_rejected_shared_logps),
        _float(reference_chosen_shared_logps), _float(reference_rejected_shared_logps),
    ), context)


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
