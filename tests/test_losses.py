"""Preference losses against values derived by hand.

Every test uses the same three pairs (summed log-probs and label-token counts):

    example        0      1      2
    πc           -10    -20     -5      nc   4   8   2
    πr           -14    -18     -6      nr   8   5   1
    refc         -11    -19     -6
    refr         -13    -19     -4

Summed log-ratios: πc − refc = 1, −1, 1;  πr − refr = −1, 1, −2;  so z = 2, −2, 3.
Per-token averages: π̄c = −2.5, −2.5, −2.5;  π̄r = −1.75, −3.6, −6;
ref̄c = −2.75, −2.375, −3;  ref̄r = −1.625, −3.8, −4;
so π̄c − ref̄c = 0.25, −0.125, 0.5;  π̄r − ref̄r = −0.125, 0.2, −2;  z̄ = 0.375, −0.325, 2.5.

With β = 0.1: β·lc = 0.1, −0.1, 0.1; β·lr = −0.1, 0.1, −0.2; βz = 0.2, −0.2, 0.3.
Margins: πc − πr = 4, −2, 1 and refc − refr = 2, 0, −2 (aot sorts them).
Batch: B = 3 pairs, N_c = 4 + 8 + 2 = 14 chosen label tokens, Σπc = −35.

The losses below are written with ``softplus(-x) = log(1 + e^-x) = -logσ(x)`` from the math module,
so the expected values never go through the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from dpo.artifacts.errors import UsageError
from dpo.artifacts.fingerprint import hash_json
from dpo.pipeline.losses import (
    ALIASES,
    BCO_REWARD,
    DEFAULT_BETA,
    LOSS_TYPES,
    METRIC_NAMES,
    BatchContext,
    LossConfig,
    RewardShift,
    check_loss_options,
    metric_sums,
    metrics_from_sums,
    needs_reference,
    needs_wpo_term,
    preference_loss,
    preference_metrics,
    wpo_weight,
)

PC = [-10.0, -20.0, -5.0]
PR = [-14.0, -18.0, -6.0]
RC = [-11.0, -19.0, -6.0]
RR = [-13.0, -19.0, -4.0]
NC = [4, 8, 2]
NR = [8, 5, 1]
Z = [2.0, -2.0, 3.0]
Z_BAR = [0.375, -0.325, 2.5]


def neg_logsigmoid(x: float) -> float:
    """−logσ(x) = log(1 + e^−x)."""
    return math.log1p(math.exp(-x))


def t(values, dtype=torch.float32, grad=False) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, requires_grad=grad)


def batch(**overrides):
    kwargs = dict(
        policy_chosen_logps=t(PC),
        policy_rejected_logps=t(PR),
        chosen_num_tokens=t(NC, torch.int64),
        rejected_num_tokens=t(NR, torch.int64),
        reference_chosen_logps=t(RC),
        reference_rejected_logps=t(RR),
    )
    kwargs.update(overrides)
    return kwargs


def assert_close(tensor: torch.Tensor, expected: list[float], tol: float = 1e-6) -> None:
    assert tensor.shape == (len(expected),)
    torch.testing.assert_close(tensor.double(), torch.tensor(expected, dtype=torch.float64), rtol=tol, atol=tol)


def test_dpo_hand_values():
    """β = 0.1: βz = 0.2, −0.2, 0.3, so loss = −logσ(βz) = log(1+e^−0.2) = 0.598138869...,
    log(1+e^0.2) = 0.798138869..., log(1+e^−0.3); rewards β·(π − ref) = ±0.1, −0.2."""
    out = preference_loss("dpo", **batch(), beta=0.1)
    assert_close(out.losses, [0.5981388693815918, 0.7981388693815918, neg_logsigmoid(0.3)])
    assert_close(out.chosen_rewards, [0.1, -0.1, 0.1])
    assert_close(out.rejected_rewards, [-0.1, 0.1, -0.2])


def test_dpo_at_equal_policy_and_reference_is_ln2_with_zero_rewards():
    """π = ref gives z = 0 and −logσ(0) = ln 2 for any β; both rewards are exactly 0."""
    for beta in (0.1, 1.0, 7.0):
        out = preference_loss("dpo", **batch(reference_chosen_logps=t(PC), reference_rejected_logps=t(PR)), beta=beta)
        assert_close(out.losses, [math.log(2)] * 3, tol=1e-7)
        assert torch.equal(out.chosen_rewards, torch.zeros(3))
        assert torch.equal(out.rejected_rewards, torch.zeros(3))


def test_dpo_label_smoothing():
    """cDPO, ε = 0.1, β = 0.1: loss = 0.9·softplus(−βz) + 0.1·softplus(βz) per pair; the rewards
    do not depend on ε."""
    eps = 0.1
    out = preference_loss("dpo", **batch(), beta=0.1, label_smoothing=eps)
    expected = [(1 - eps) * neg_logsigmoid(0.1 * z) + eps * neg_logsigmoid(-0.1 * z) for z in Z]
    assert_close(out.losses, expected)
    assert_close(out.chosen_rewards, [0.1, -0.1, 0.1])


def test_dpo_norm_hand_values():
    """β = 5 on per-token averages: βz̄ = 1.875, −1.625, 12.5; rewards β·(π̄ − ref̄) =
    1.25, −0.625, 2.5 (chosen) and −0.625, 1, −10 (rejected)."""
    out = preference_loss("dpo_norm", **batch(), beta=5.0)
    assert_close(out.losses, [neg_logsigmoid(1.875), neg_logsigmoid(-1.625), neg_logsigmoid(12.5)])
    assert_close(out.chosen_rewards, [1.25, -0.625, 2.5])
    assert_close(out.rejected_rewards, [-0.625, 1.0, -10.0])


def test_dpo_norm_default_beta_is_5_and_zero_tokens_do_not_divide_by_zero():
    """A pair with no label tokens has π = 0 and n = 0: π̄ = 0 / max(0, 1) = 0, so with an empty
    rejected side z̄ = π̄c − ref̄c = (−3 − −4)/2 = 0.5 and the loss is softplus(−5·0.5)."""
    kwargs = batch(
        policy_chosen_logps=t([-3.0]), policy_rejected_logps=t([0.0]),
        reference_chosen_logps=t([-4.0]), reference_rejected_logps=t([0.0]),
        chosen_num_tokens=t([2], torch.int64), rejected_num_tokens=t([0], torch.int64),
    )
    out = preference_loss("dpo_norm", **kwargs)
    assert DEFAULT_BETA["dpo_norm"] == 5.0
    assert_close(out.losses, [neg_logsigmoid(2.5)])
    assert_close(out.rejected_rewards, [0.0])


def test_simpo_hand_values_and_no_reference():
    """β = 2, γ/β = 0.3: z = π̄c − π̄r − 0.3 = −1.05, 0.8, 3.2; βz = −2.1, 1.6, 6.4;
    rewards β·π̄ = −5, −5, −5 and −3.5, −7.2, −12. No reference is passed or needed."""
    kwargs = batch()
    del kwargs["reference_chosen_logps"], kwargs["reference_rejected_logps"]
    out = preference_loss("simpo", **kwargs, beta=2.0, gamma_beta_ratio=0.3)
    assert_close(out.losses, [neg_logsigmoid(-2.1), neg_logsigmoid(1.6), neg_logsigmoid(6.4)], tol=1e-5)
    assert_close(out.chosen_rewards, [-5.0, -5.0, -5.0])
    assert_close(out.rejected_rewards, [-3.5, -7.2, -12.0])
    assert not needs_reference("simpo") and not needs_reference("sft")
    assert all(needs_reference(k) for k in LOSS_TYPES if k not in ("simpo", "sft"))


def test_simpo_label_smoothing():
    """ε = 0.2 on βz = −2.1: 0.8·softplus(2.1) + 0.2·softplus(−2.1)."""
    out = preference_loss("simpo", **batch(), beta=2.0, gamma_beta_ratio=0.3, label_smoothing=0.2)
    assert out.losses[0].item() == pytest.approx(0.8 * neg_logsigmoid(-2.1) + 0.2 * neg_logsigmoid(2.1), rel=1e-5)


WC = [-0.5, 0.3, -1.0]
WR = [-0.2, 0.4, -3.0]


def test_wpo_hand_values():
    """wc + wr = −0.7, 0.7, −4: w = min(1, e^(wc+wr)) = e^−0.7, 1 (capped), e^−4; the loss is
    w times the dpo loss of the pair (β = 0.1), the rewards are dpo's."""
    out = preference_loss("wpo", **batch(), beta=0.1, chosen_wpo_term=t(WC), rejected_wpo_term=t(WR))
    weights = [math.exp(-0.7), 1.0, math.exp(-4.0)]
    assert_close(out.losses, [w * neg_logsigmoid(0.1 * z) for w, z in zip(weights, Z)])
    assert_close(out.chosen_rewards, [0.1, -0.1, 0.1])
    assert needs_wpo_term("wpo") and not needs_wpo_term("dpo")


def test_wpo_batch_equals_per_example():
    """Each pair's weight comes from that pair alone: a batch of 6 gives what 6 batches of 1 give,
    and permuting the batch permutes the losses (no normalisation or broadcast across pairs)."""
    g = torch.Generator().manual_seed(0)
    n = 6
    tensors = {
        "policy_chosen_logps": -torch.rand(n, generator=g) * 50,
        "policy_rejected_logps": -torch.rand(n, generator=g) * 50,
        "reference_chosen_logps": -torch.rand(n, generator=g) * 50,
        "reference_rejected_logps": -torch.rand(n, generator=g) * 50,
        "chosen_num_tokens": torch.randint(1, 40, (n,), generator=g),
        "rejected_num_tokens": torch.randint(1, 40, (n,), generator=g),
        "chosen_wpo_term": torch.randn(n, generator=g),
        "rejected_wpo_term": torch.randn(n, generator=g),
    }
    whole = preference_loss("wpo", **tensors, beta=0.1)
    for i in range(n):
        one = preference_loss("wpo", **{k: v[i : i + 1] for k, v in tensors.items()}, beta=0.1)
        torch.testing.assert_close(whole.losses[i : i + 1], one.losses)
        torch.testing.assert_close(whole.chosen_rewards[i : i + 1], one.chosen_rewards)
    perm = torch.randperm(n, generator=g)
    permuted = preference_loss("wpo", **{k: v[perm] for k, v in tensors.items()}, beta=0.1)
    torch.testing.assert_close(permuted.losses, whole.losses[perm])
    # some weights are capped at 1 and some are not, so both branches were exercised
    w = wpo_weight(tensors["chosen_wpo_term"], tensors["rejected_wpo_term"])
    assert (w == 1).any() and (w < 1).any()


def test_ipo_hand_values():
    """β = 0.1, 1/(2β) = 5: (0.375 − 5)² = 21.390625, (−0.325 − 5)² = 28.355625, (2.5 − 5)² = 6.25;
    rewards β·(π̄ − ref̄) = 0.025, −0.0125, 0.05 and −0.0125, 0.02, −0.2."""
    out = preference_loss("ipo", **batch(), beta=0.1)
    assert_close(out.losses, [21.390625, 28.355625, 6.25], tol=1e-5)
    assert_close(out.chosen_rewards, [0.025, -0.0125, 0.05])
    assert_close(out.rejected_rewards, [-0.0125, 0.02, -0.2])


def test_hinge_hand_values():
    """relu(1 − βz): β = 0.1 gives 0.8, 1.2, 0.7; β = 1 gives relu(−1), relu(3), relu(−2) = 0, 3, 0."""
    assert_close(preference_loss("hinge", **batch(), beta=0.1).losses, [0.8, 1.2, 0.7])
    out = preference_loss("hinge", **batch(), beta=1.0)
    assert_close(out.losses, [0.0, 3.0, 0.0])
    assert_close(out.chosen_rewards, [1.0, -1.0, 1.0])


def test_robust_hand_values():
    """ε = 0.1, β = 0.1, βz = 0.2: [−0.9·logσ(0.2) + 0.1·logσ(−0.2)] / 0.8
    = [0.9·softplus(−0.2) − 0.1·softplus(0.2)] / 0.8; at ε = 0 it is plain dpo."""
    eps = 0.1
    out = preference_loss("robust", **batch(), beta=0.1, label_smoothing=eps)
    expected = [((1 - eps) * neg_logsigmoid(0.1 * z) - eps * neg_logsigmoid(-0.1 * z)) / (1 - 2 * eps) for z in Z]
    assert_close(out.losses, expected)
    assert expected[0] == pytest.approx((0.9 * 0.5981388693815918 - 0.1 * 0.7981388693815918) / 0.8)
    torch.testing.assert_close(
        preference_loss("robust", **batch(), beta=0.1).losses, preference_loss("dpo", **batch(), beta=0.1).losses
    )


@pytest.mark.parametrize("eps", [0.5, 0.7, -0.1])
def test_robust_refuses_label_smoothing_outside_0_to_half(eps):
    with pytest.raises(UsageError, match=r"\[0, 0.5\)"):
        preference_loss("robust", **batch(), label_smoothing=eps)


def test_rpo_alpha_is_an_sft_term_with_weight_alpha():
    """--rpo-alpha α adds α·ℓ_sft, ℓ_sft,i = −πc_i·B/N_c (B = 3, N_c = 14): 30/14, 60/14, 15/14,
    whose mean is the chosen tokens' NLL −Σπc/N_c = 35/14 = 2.5; the rewards are untouched."""
    for loss_type in LOSS_TYPES:
        if loss_type == "sft":
            continue
        options = dict(label_smoothing=1e-3) if loss_type == "exo_pair" else {}
        plain = preference_loss(loss_type, **batch(), chosen_wpo_term=t(WC), rejected_wpo_term=t(WR), **options)
        rpo = preference_loss(loss_type, **batch(), chosen_wpo_term=t(WC), rejected_wpo_term=t(WR), rpo_alpha=0.5,
                              **options)
        assert_close(rpo.losses - plain.losses, [0.5 * 30 / 14, 0.5 * 60 / 14, 0.5 * 15 / 14], tol=1e-5)
        assert torch.equal(rpo.chosen_rewards, plain.chosen_rewards)
    # It is the same loss as naming sft: the same resolved config, hence the same fingerprint.
    assert LossConfig(loss_type="dpo", rpo_alpha=2.0).resolved() == LossConfig(loss_type="dpo,sft",
                                                                              loss_weights="1,2").resolved()
    # Token-weighted, unlike the per-pair mean RPO term before: π̄c = −1, −4 with nc = 3, 2 gave
    # α·mean(1, 4) = 5 for α = 2; now α·Σ(−πc)/Σnc = 2·11/5 = 4.4.
    kwargs = batch(
        policy_chosen_logps=t([-3.0, -8.0]), policy_rejected_logps=t([-1.0, -1.0]),
        reference_chosen_logps=t([-3.0, -8.0]), reference_rejected_logps=t([-1.0, -1.0]),
        chosen_num_tokens=t([3, 2], torch.int64), rejected_num_tokens=t([1, 1], torch.int64),
    )
    out = preference_loss("dpo", **kwargs, rpo_alpha=2.0)
    assert out.losses.mean().item() == pytest.approx(math.log(2) + 4.4, rel=1e-6)


def test_gradients_flow_only_through_policy_logps():
    """d/dπc of w·softplus(−βz) = −w·β·σ(−βz) and d/dπr = +w·β·σ(−βz); the reference log-probs and
    the wpo terms get no gradient (they are constants of the update)."""
    beta = 0.1
    pc, pr = t(PC, grad=True), t(PR, grad=True)
    rc, rr = t(RC, grad=True), t(RR, grad=True)
    wc, wr = t(WC, grad=True), t(WR, grad=True)
    out = preference_loss(
        "wpo", **batch(policy_chosen_logps=pc, policy_rejected_logps=pr,
                       reference_chosen_logps=rc, reference_rejected_logps=rr),
        beta=beta, chosen_wpo_term=wc, rejected_wpo_term=wr,
    )
    out.losses.sum().backward()
    weights = [math.exp(-0.7), 1.0, math.exp(-4.0)]
    dz = [w * beta / (1 + math.exp(beta * z)) for w, z in zip(weights, Z)]  # w·β·σ(−βz)
    assert_close(pc.grad, [-d for d in dz])
    assert_close(pr.grad, dz)
    assert rc.grad is None and rr.grad is None and wc.grad is None and wr.grad is None
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


def test_every_loss_is_differentiable_in_the_policy_only():
    for loss_type in LOSS_TYPES:
        pc, pr, rc = t(PC, grad=True), t(PR, grad=True), t(RC, grad=True)
        out = preference_loss(
            loss_type, **batch(policy_chosen_logps=pc, policy_rejected_logps=pr, reference_chosen_logps=rc),
            chosen_wpo_term=t(WC), rejected_wpo_term=t(WR), rpo_alpha=0.0 if loss_type == "sft" else 0.1,
            label_smoothing=1e-3 if loss_type == "exo_pair" else 0.0,
        )
        out.losses.mean().backward()
        assert pc.grad is not None and torch.isfinite(pc.grad).all(), loss_type
        assert (pr.grad is None) == (loss_type == "sft"), loss_type  # sft reads the chosen side only
        assert rc.grad is None, loss_type


def test_default_betas():
    assert dict(DEFAULT_BETA) == {
        "dpo": 0.1, "dpo_norm": 5.0, "simpo": 2.0, "wpo": 0.1, "ipo": 0.1, "hinge": 0.1, "robust": 0.1,
        "exo_pair": 0.1, "nca_pair": 0.1, "bco_pair": 0.1, "sppo_hard": 0.1, "aot": 0.1, "aot_unpaired": 0.1,
        "apo_zero": 0.1, "apo_down": 0.1, "discopop": 0.1, "sft": 0.1,
    }
    with pytest.raises(TypeError):
        DEFAULT_BETA["dpo"] = 1.0  # read-only
    for loss_type, beta in DEFAULT_BETA.items():
        smoothing = dict(label_smoothing=1e-3) if loss_type == "exo_pair" else {}
        assert check_loss_options(loss_type, **smoothing) == beta
        kw = dict(chosen_wpo_term=t(WC), rejected_wpo_term=t(WR), **smoothing)
        torch.testing.assert_close(
            preference_loss(loss_type, **batch(), **kw).losses, preference_loss(loss_type, **batch(), beta=beta, **kw).losses
        )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(loss_type="kto"), "not one of"),
        (dict(loss_type="dpo", beta=0.0), "--beta"),
        (dict(loss_type="dpo", beta=float("nan")), "--beta"),
        (dict(loss_type="dpo", label_smoothing=0.6), r"\[0, 0.5\]"),
        (dict(loss_type="ipo", label_smoothing=0.1), "no effect on the ipo"),
        (dict(loss_type="hinge", label_smoothing=0.1), "no effect on the hinge"),
        (dict(loss_type="simpo", gamma_beta_ratio=-1.0), "--gamma-beta-ratio"),
        (dict(loss_type="dpo", rpo_alpha=-0.5), "--rpo-alpha"),
        (dict(loss_type="dpo,kto"), "'kto', which is not one of"),
        (dict(loss_type="dpo,sigmoid"), "names dpo twice"),
        (dict(loss_type="dpo,sft", loss_weights="1"), "1 weights for the 2 losses"),
        (dict(loss_type="dpo,sft", loss_weights="1,x"), "comma-separated numbers"),
        (dict(loss_type="dpo,sft", loss_weights="1,-1"), ">= 0"),
        (dict(loss_type="dpo,sft", loss_weights="0,0"), "not all 0"),
        (dict(loss_type="dpo,sft", rpo_alpha=1.0), "already has one"),
        (dict(loss_type="exo_pair"), r"ε in \(0, 0.5\]"),
        (dict(loss_type="sft", label_smoothing=0.1), "no effect on the sft"),
        (dict(loss_type="nca_pair", f_divergence="js_divergence"), "does not apply to nca_pair"),
        (dict(loss_type="dpo", f_divergence="chi2"), "--f-divergence 'chi2' is not one of"),
        (dict(loss_type="dpo", f_alpha_divergence_coef=0.3), "only to --f-divergence alpha_divergence"),
        (dict(loss_type="dpo", discopop_tau=0.1), "only to the discopop loss"),
        (dict(loss_type="discopop", discopop_tau=0.0), "--discopop-tau must be a positive number"),
        (dict(loss_type="dpo", bco_reward_shift=True), "only to the bco_pair loss"),
        (dict(loss_type="dpo", ld_alpha=1.5), r"--ld-alpha must lie in \[0, 1\]"),
        (dict(loss_type="sft", ld_alpha=0.5), "sft reads the plain sums"),
    ],
)
def test_bad_options_are_usage_errors(kwargs, match):
    with pytest.raises(UsageError, match=match):
        check_loss_options(**kwargs)


def test_missing_inputs_are_bugs_not_silent_defaults():
    kwargs = batch()
    del kwargs["reference_chosen_logps"]
    with pytest.raises(ValueError, match="reference"):
        preference_loss("dpo", **kwargs)
    with pytest.raises(ValueError, match="wpo terms"):
        preference_loss("wpo", **batch())


def test_float32_ln2_for_realistic_magnitudes():
    """Summed log-probs of long responses are in the hundreds: with π = ref exactly, the float32
    loss must still be ln 2 to 1e-5 (what the end-to-end first-step check relies on)."""
    big = torch.tensor([-873.25, -1204.5], dtype=torch.float32)
    out = preference_loss("dpo", **batch(
        policy_chosen_logps=big, policy_rejected_logps=big - 17.0,
        reference_chosen_logps=big.clone(), reference_rejected_logps=big - 17.0,
        chosen_num_tokens=t([300, 400], torch.int64), rejected_num_tokens=t([310, 420], torch.int64),
    ))
    assert (out.losses - math.log(2)).abs().max().item() < 1e-5


def test_metrics_hand_values_and_sums_add_up():
    """dpo, β = 0.1: rewards chosen 0.1, −0.1, 0.1 and rejected −0.1, 0.1, −0.2, so
    accuracies = 2/3 (pairs 0 and 2), margins = (0.2 − 0.2 + 0.3)/3 = 0.1, rewards/chosen = 0.1/3,
    rewards/rejected = −0.2/3, logps/chosen = −35/3, logps/rejected = −38/3, loss = mean of the three."""
    out = preference_loss("dpo", **batch(), beta=0.1)
    metrics = preference_metrics(out, t(PC), t(PR))
    assert list(metrics) == list(METRIC_NAMES)
    expected = {
        "loss": (0.5981388693815918 + 0.7981388693815918 + neg_logsigmoid(0.3)) / 3,
        "rewards/chosen": 0.1 / 3,
        "rewards/rejected": -0.2 / 3,
        "rewards/accuracies": 2 / 3,
        "rewards/margins": 0.1,
        "logps/chosen": -35 / 3,
        "logps/rejected": -38 / 3,
    }
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, rel=1e-6, abs=1e-7), name
    # micro-batches: summed sums of the parts give the whole batch's means
    parts = [slice(0, 1), slice(1, 3)]
    total = sum(
        metric_sums(preference_loss("dpo", **{k: v[s] for k, v in batch().items()}, beta=0.1), t(PC)[s], t(PR)[s])
        for s in parts
    )
    assert metrics_from_sums(total) == pytest.approx(metrics)
    # a tie counts as not accurate, as in TRL (chosen > rejected)
    tie = preference_loss("dpo", **batch(reference_chosen_logps=t(PC), reference_rejected_logps=t(PR)))
    assert preference_metrics(tie, t(PC), t(PR))["rewards/accuracies"] == 0.0


# ---------------------------------------------------------------------------------------------
# The losses TRL has that dpo lacked (issue #12); TRL parity is in test_losses_trl.py.

LC, LR = [1.0, -1.0, 1.0], [-1.0, 1.0, -2.0]


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_nca_pair_hand_values():
    """−logσ(β·lc) − ½·logσ(−β·lc) − ½·logσ(−β·lr), on absolute log-ratios; 2·ln 2 at lc = lr = 0."""
    out = preference_loss("nca_pair", **batch(), beta=0.1)
    expected = [neg_logsigmoid(0.1 * c) + 0.5 * neg_logsigmoid(-0.1 * c) + 0.5 * neg_logsigmoid(-0.1 * r)
                for c, r in zip(LC, LR)]
    assert_close(out.losses, expected)
    assert expected[0] == pytest.approx(0.6443966600735709 + 0.5 * 0.7443966600735709 + 0.5 * 0.6443966600735709)
    assert_close(out.chosen_rewards, [0.1, -0.1, 0.1])
    assert_close(out.rejected_rewards, [-0.1, 0.1, -0.2])


def test_bco_pair_hand_values_and_reward_shift():
    """−logσ(β·lc − δ) − logσ(−(β·lr − δ)): δ = 0 is TRL 1.x's; with --bco-reward-shift δ comes from
    the batch context (here 0.05), and each pair adds (β·lc + β·lr)/2 = 0, 0, −0.05 to its running mean."""
    out = preference_loss("bco_pair", **batch(), beta=0.1)
    assert_close(out.losses, [neg_logsigmoid(0.1 * c) + neg_logsigmoid(-0.1 * r) for c, r in zip(LC, LR)])
    assert not out.extras
    shifted = preference_loss("bco_pair", **batch(), beta=0.1, bco_reward_shift=True,
                              context=BatchContext(3, 14, reward_shift=0.05))
    assert_close(shifted.losses, [neg_logsigmoid(0.1 * c - 0.05) + neg_logsigmoid(-(0.1 * r - 0.05))
                                  for c, r in zip(LC, LR)])
    assert_close(shifted.extras[BCO_REWARD], [0.0, 0.0, -0.05])
    assert_close(shifted.chosen_rewards, [0.1, -0.1, 0.1])  # unshifted, as TRL < 1.0 logged them
    # The flag without a context (one batch on its own) shifts by nothing.
    torch.testing.assert_close(preference_loss("bco_pair", **batch(), bco_reward_shift=True).losses, out.losses)


def test_reward_shift_is_a_running_mean_with_a_state_dict():
    shift = RewardShift()
    assert shift.value == 0.0
    shift.update(reward_sum=-0.3, pairs=3)
    shift.update(reward_sum=0.9, pairs=6)
    assert shift.value == pytest.approx(0.6 / 9)
    resumed = RewardShift()
    resumed.load_state_dict(shift.state_dict())
    assert resumed.value == shift.value and resumed.state_dict() == {"reward_sum": -0.3 + 0.9, "pairs": 9.0}


def test_sppo_hard_hand_values():
    """(lc − 1/(2β))² + (lr + 1/(2β))², 1/(2β) = 5: 16 + 16, 36 + 36, 16 + 9."""
    out = preference_loss("sppo_hard", **batch(), beta=0.1)
    assert_close(out.losses, [32.0, 72.0, 25.0], tol=1e-5)
    assert_close(out.chosen_rewards, [0.1, -0.1, 0.1])


def test_apo_zero_and_apo_down_hand_values():
    """apo_zero: 1 − σ(β·lc) + σ(β·lr); apo_down: σ(β·lc) + 1 − σ(βz)."""
    zero = preference_loss("apo_zero", **batch(), beta=0.1)
    assert_close(zero.losses, [1 - sigmoid(0.1 * c) + sigmoid(0.1 * r) for c, r in zip(LC, LR)])
    down = preference_loss("apo_down", **batch(), beta=0.1)
    assert_close(down.losses, [sigmoid(0.1 * c) + 1 - sigmoid(0.1 * z) for c, z in zip(LC, Z)])
    assert_close(down.rejected_rewards, [-0.1, 0.1, -0.2])


def test_discopop_hand_values():
    """x = βz = 0.2, −0.2, 0.3; m = σ(x/τ) = σ(4), σ(−4), σ(6) at τ = 0.05; (1−m)·softplus(−x) + m·e^(−x).
    τ = 1 moves the mix: m = σ(x)."""
    def expected(x, tau):
        m = sigmoid(x / tau)
        return (1 - m) * neg_logsigmoid(x) + m * math.exp(-x)

    assert_close(preference_loss("discopop", **batch(), beta=0.1).losses, [expected(0.1 * z, 0.05) for z in Z])
    assert_close(preference_loss("discopop", **batch(), beta=0.1, discopop_tau=1.0).losses,
                 [expected(0.1 * z, 1.0) for z in Z])


def test_exo_pair_hand_values_and_its_minimum():
    """ε = 1e-3: σ(βz)·[logσ(βz) − log(1−ε)] + σ(−βz)·[logσ(−βz) − log ε], the KL of (σ(βz), σ(−βz))
    from (1−ε, ε); it is 0 at βz = log((1−ε)/ε), where its gradient changes sign."""
    eps = 1e-3

    def expected(x):
        return sigmoid(x) * (-neg_logsigmoid(x) - math.log1p(-eps)) + sigmoid(-x) * (-neg_logsigmoid(-x) - math.log(eps))

    out = preference_loss("exo_pair", **batch(), beta=0.1, label_smoothing=eps)
    assert_close(out.losses, [expected(0.1 * z) for z in Z], tol=2e-6)
    best = math.log((1 - eps) / eps)
    for x, sign in ((best - 0.5, -1), (best + 0.5, 1)):
        pc = t([x], grad=True)
        one = preference_loss("exo_pair", policy_chosen_logps=pc, policy_rejected_logps=t([0.0]),
                              reference_chosen_logps=t([0.0]), reference_rejected_logps=t([0.0]),
                              chosen_num_tokens=t([1], torch.int64), rejected_num_tokens=t([1], torch.int64),
                              beta=1.0, label_smoothing=eps)
        one.losses.sum().backward()
        assert math.copysign(1, pc.grad.item()) == sign
    at_best = preference_loss("exo_pair", **batch(policy_chosen_logps=t([best]), policy_rejected_logps=t([0.0]),
                                                   reference_chosen_logps=t([0.0]), reference_rejected_logps=t([0.0]),
                                                   chosen_num_tokens=t([1], torch.int64),
                                                   rejected_num_tokens=t([1], torch.int64)),
                              beta=1.0, label_smoothing=eps)
    assert abs(at_best.losses.item()) < 1e-5


def test_aot_sorts_margins_within_the_batch():
    """aot: sort(πc − πr) = −2, 1, 4 against sort(refc − refr) = −2, 0, 2: δ = 0, 1, 2.
    aot_unpaired: sort(lc) = −1, 1, 1 against sort(lr) = −2, −1, 1: δ = 1, 2, 0.
    ε = 0.1 gives the cDPO form; example i is rank i; the rewards stay per pair."""
    out = preference_loss("aot", **batch(), beta=0.1)
    assert_close(out.losses, [math.log(2), neg_logsigmoid(0.1), neg_logsigmoid(0.2)])
    assert_close(out.chosen_rewards, [0.1, -0.1, 0.1])
    unpaired = preference_loss("aot_unpaired", **batch(), beta=0.1, label_smoothing=0.1)
    assert_close(unpaired.losses, [0.9 * neg_logsigmoid(0.1 * d) + 0.1 * neg_logsigmoid(-0.1 * d) for d in (1, 2, 0)])
    # Permuting the pairs leaves the sorted losses unchanged: the loss is of the batch, not of pairs.
    perm = [2, 0, 1]
    permuted = preference_loss("aot", **{k: v[perm] for k, v in batch().items()}, beta=0.1)
    torch.testing.assert_close(permuted.losses, out.losses)


def test_sft_is_the_chosen_token_mean_nll_of_the_batch_for_any_split():
    """ℓ_i = −πc_i·B/N_c = 30/14, 60/14, 15/14: mean −Σπc/N_c = 35/14 = 2.5. Split into micro-batches
    of 1 and 2 pairs that carry the whole batch's context, the mean of the parts is still 2.5;
    without the context each part would be its own batch (10/4 and 25/10: 2.5 too here, so a
    second split with other counts shows the difference). Rewards: β·π̄ (sft is reference-free)."""
    out = preference_loss("sft", **batch(), beta=0.1)
    assert_close(out.losses, [30 / 14, 60 / 14, 15 / 14])
    assert out.losses.mean().item() == pytest.approx(2.5)
    assert_close(out.chosen_rewards, [-0.25, -0.25, -0.25])
    assert_close(out.rejected_rewards, [-0.175, -0.36, -0.6])
    kwargs = batch(chosen_num_tokens=t([4, 1, 2], torch.int64))  # N_c = 7: −Σπc/N_c = 5
    context = BatchContext(pairs=3, chosen_tokens=7)
    parts = [preference_loss("sft", **{k: v[s] for k, v in kwargs.items()}, context=context).losses
             for s in (slice(0, 1), slice(1, 3))]
    assert torch.cat(parts).mean().item() == pytest.approx(5.0)
    alone = [preference_loss("sft", **{k: v[s] for k, v in kwargs.items()}).losses.mean().item()
             for s in (slice(0, 1), slice(1, 3))]
    assert alone == pytest.approx([2.5, 25 / 3])  # each part's own token mean: not the batch's
    del kwargs["reference_chosen_logps"], kwargs["reference_rejected_logps"]
    preference_loss("sft", **kwargs)  # needs no reference


GRADIENT_SIGNS = ["dpo", "dpo_norm", "wpo", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair",
                  "sppo_hard", "aot", "aot_unpaired", "apo_zero", "discopop", "sft"]


@pytest.mark.parametrize("loss_type", GRADIENT_SIGNS)
def test_raising_the_chosen_log_prob_lowers_the_loss(loss_type):
    """At the three pairs (βz = 0.2, −0.2, 0.3, far from every loss's optimum) each loss falls as the
    chosen response's log-prob rises and rises with the rejected's (sft ignores the rejected)."""
    pc, pr = t(PC, grad=True), t(PR, grad=True)
    options = dict(label_smoothing=1e-3) if loss_type == "exo_pair" else {}
    out = preference_loss(loss_type, **batch(policy_chosen_logps=pc, policy_rejected_logps=pr),
                          chosen_wpo_term=t(WC), rejected_wpo_term=t(WR), beta=0.1, **options)
    out.losses.sum().backward()
    assert (pc.grad < 0).all(), pc.grad
    assert (pr.grad > 0).all() if loss_type != "sft" else pr.grad is None, pr.grad


def test_apo_down_lowers_both_responses():
    """APO-down's purpose: d/dπc = β·σ′(β·lc) − β·σ′(βz) > 0 where lc < z (pairs 0 and 2), so the chosen
    log-prob is pushed down too; d/dπr = β·σ′(βz) > 0."""
    pc, pr = t(PC, grad=True), t(PR, grad=True)
    preference_loss("apo_down", **batch(policy_chosen_logps=pc, policy_rejected_logps=pr), beta=0.1).losses.sum().backward()
    d_sigmoid = [sigmoid(x) * (1 - sigmoid(x)) for x in (0.1, -0.1, 0.1)], [sigmoid(x) * (1 - sigmoid(x)) for x in (0.2, -0.2, 0.3)]
    assert_close(pc.grad, [0.1 * (a - b) for a, b in zip(*d_sigmoid)])
    assert pc.grad[0] > 0 and pc.grad[2] > 0 and (pr.grad > 0).all()


@pytest.mark.parametrize("loss_type, limit", [
    ("dpo", math.log(2)), ("dpo_norm", math.log(2)), ("robust", math.log(2)), ("hinge", 1.0),
    ("exo_pair", -math.log(2) - 0.5 * math.log(1e-3 * (1 - 1e-3))), ("nca_pair", 2 * math.log(2)),
    ("bco_pair", 2 * math.log(2)), ("aot", math.log(2)), ("aot_unpaired", math.log(2)), ("apo_zero", 1.0),
    ("apo_down", 1.0), ("discopop", (1 + math.log(2)) / 2),
])
def test_beta_to_zero_limits(loss_type, limit):
    """As β → 0 every pair's βd → 0: the loss tends to its value at a zero margin, whatever the
    log-ratios (ipo and sppo_hard have none: their targets 1/(2β) run off to infinity)."""
    options = dict(label_smoothing=1e-3) if loss_type == "exo_pair" else {}
    out = preference_loss(loss_type, **batch(), beta=1e-7, **options)
    assert_close(out.losses, [limit] * 3, tol=1e-5)


def f_score(x: float, kind: str, a: float = 0.5) -> float:
    return {"reverse_kl": x, "forward_kl": 1 - math.exp(-x), "js_divergence": math.log(2) - neg_logsigmoid(x),
            "alpha_divergence": (math.exp((a - 1) * x) - 1) / (a - 1)}[kind]


@pytest.mark.parametrize("kind", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergences_transform_the_log_ratios(kind):
    """d = φ(lc) − φ(lr): forward KL φ(x) = 1 − e^(−x), JS φ(x) = log 2 + logσ(x), α (a = 0.5)
    φ(x) = (e^(−x/2) − 1)/(−1/2). dpo: softplus(−βd); ipo: (φ(lc)/nc − φ(lr)/nr − 5)²; the rewards
    stay β·lc (TRL logs the raw log-ratios)."""
    dpo = preference_loss("dpo", **batch(), beta=0.1, f_divergence=kind)
    d = [f_score(c, kind) - f_score(r, kind) for c, r in zip(LC, LR)]
    assert_close(dpo.losses, [neg_logsigmoid(0.1 * x) for x in d])
    assert_close(dpo.chosen_rewards, [0.1, -0.1, 0.1])
    ipo = preference_loss("ipo", **batch(), beta=0.1, f_divergence=kind)
    assert_close(ipo.losses, [(f_score(c, kind) / a - f_score(r, kind) / b - 5) ** 2
                              for c, r, a, b in zip(LC, LR, NC, NR)], tol=1e-5)


def test_alpha_divergence_coefficient():
    """a = 0.2: φ(x) = (e^(−0.8x) − 1)/(−0.8); a = 1 is the reverse-KL limit (TRL's convention: the
    f-DPO paper's α is 1 − a)."""
    out = preference_loss("hinge", **batch(), beta=0.1, f_divergence="alpha_divergence", f_alpha_divergence_coef=0.2)
    assert_close(out.losses, [max(0.0, 1 - 0.1 * (f_score(c, "alpha_divergence", 0.2) - f_score(r, "alpha_divergence", 0.2)))
                              for c, r in zip(LC, LR)])
    torch.testing.assert_close(
        preference_loss("dpo", **batch(), f_divergence="alpha_divergence", f_alpha_divergence_coef=1.0).losses,
        preference_loss("dpo", **batch()).losses)


SHARED = dict(policy_chosen_shared_logps=t([-10.0, -13.0, -3.0]), policy_rejected_shared_logps=t([-9.0, -18.0, -6.0]),
              reference_chosen_shared_logps=t([-11.0, -11.0, -4.0]), reference_rejected_shared_logps=t([-8.0, -19.0, -4.0]))


def test_ld_alpha_weighs_the_tail_past_the_shared_length():
    """LD-DPO, α = 0.5: S_k + α(S_n − S_k) for all four sums. k = min(nc, nr) = 4, 5, 1: pair 0's chosen
    (nc = 4) is the shorter side, S_k = S_n = −10. Weighted: πc = −10, −16.5, −4; πr = −11.5, −18, −6;
    refc = −11, −15, −5; refr = −10.5, −19, −4; so lc = 1, −1.5, 1, lr = −1, 1, −2, z = 2, −2.5, 3.
    sft still reads the plain sums; α = 1 is plain DPO."""
    out = preference_loss("dpo", **batch(), **SHARED, beta=0.1, ld_alpha=0.5)
    assert_close(out.losses, [neg_logsigmoid(0.2), neg_logsigmoid(-0.25), neg_logsigmoid(0.3)])
    assert_close(out.chosen_rewards, [0.1, -0.15, 0.1])
    combined = preference_loss("dpo,sft", **batch(), **SHARED, beta=0.1, ld_alpha=0.5)
    assert_close(combined.components["sft"], [30 / 14, 60 / 14, 15 / 14])
    torch.testing.assert_close(preference_loss("dpo", **batch(), **SHARED, ld_alpha=1.0).losses,
                               preference_loss("dpo", **batch()).losses)
    with pytest.raises(ValueError, match="policy_chosen_shared"):
        preference_loss("dpo", **batch(), ld_alpha=0.5)


def test_weighted_combination_logs_each_component():
    """MPO: 0.8·dpo + 0.2·bco_pair + 1·sft per pair; each component unweighted in ``components``;
    the rewards are dpo's (the first loss that compares the responses)."""
    out = preference_loss("sigmoid,bco_pair,sft", **batch(), loss_weights="0.8,0.2,1.0", beta=0.1)
    parts = {name: preference_loss(name, **batch(), beta=0.1).losses for name in ("dpo", "bco_pair", "sft")}
    assert list(out.components) == ["dpo", "bco_pair", "sft"]
    for name, values in parts.items():
        torch.testing.assert_close(out.components[name], values)
    torch.testing.assert_close(out.losses, 0.8 * parts["dpo"] + 0.2 * parts["bco_pair"] + parts["sft"])
    assert_close(out.chosen_rewards, [0.1, -0.1, 0.1])
    # the lead loss sets the rewards and the default β, wherever sft stands
    lead = preference_loss("sft,dpo_norm", **batch())
    assert_close(lead.chosen_rewards, [1.25, -0.625, 2.5])
    assert check_loss_options("sft,dpo_norm") == 5.0 and check_loss_options("sft") == 0.1
    assert not preference_loss("dpo", **batch()).components  # a single loss logs no components


def test_trl_names_are_aliases_resolved_before_fingerprinting():
    """--loss-type sigmoid and dpo are one run: the same resolved config and fingerprinted JSON."""
    assert dict(ALIASES) == {"sigmoid": "dpo", "sigmoid_norm": "dpo_norm"}
    for alias, name in ALIASES.items():
        assert LossConfig(loss_type=alias).resolved() == LossConfig(loss_type=name).resolved()
        assert hash_json(LossConfig(loss_type=alias).resolved().to_json()) == \
            hash_json(LossConfig(loss_type=name).resolved().to_json())
    assert LossConfig(loss_type=" sigmoid , sft").resolved().loss_type == "dpo,sft"
    # weights are canonical numbers, and all-ones weights are the default
    assert LossConfig(loss_type="dpo,sft", loss_weights="1,1.0").resolved().loss_weights is None
    assert LossConfig(loss_type="dpo,sft", loss_weights="0.80,1").resolved().loss_weights == "0.8,1.0"


def test_new_options_stay_out_of_the_fingerprint_until_set():
    """The objective evaluate hashes (LossConfig.to_json() + {"source": None}) and train's loss options
    for runs that set no new option, pinned from the code before the loss combinations existed."""
    plain = LossConfig().resolved()
    assert plain.to_json() == {"loss_type": "dpo", "beta": 0.1, "label_smoothing": 0.0, "gamma_beta_ratio": 0.3,
                               "rpo_alpha": 0.0}
    assert hash_json({**plain.to_json(), "source": None})[:16] == "a66fe2001f918085"
    smoothed = LossConfig(label_smoothing=0.1, beta=0.2).resolved()
    assert hash_json({**smoothed.to_json(), "source": None})[:16] == "c8dcd52606b54c3e"
    assert hash_json({**LossConfig(loss_type="ipo").resolved().to_json(), "source": None})[:16] == "48ef3d65d4cca1c9"
    assert LossConfig(discopop_tau=0.05, loss_type="discopop").resolved().to_json().keys() == plain.to_json().keys()
    assert LossConfig(ld_alpha=0.5).resolved().to_json()["ld_alpha"] == 0.5
    # rpo_alpha > 0 is now another loss (dpo,sft), so it must not keep its old fingerprint
    rpo = LossConfig(rpo_alpha=0.5).resolved().to_json()
    assert rpo["loss_type"] == "dpo,sft" and rpo["loss_weights"] == "1.0,0.5" and rpo["rpo_alpha"] == 0.0
