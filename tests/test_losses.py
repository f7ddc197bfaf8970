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

The losses below are written with ``softplus(-x) = log(1 + e^-x) = -logσ(x)`` from the math module,
so the expected values never go through the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from dpo.artifacts.errors import UsageError
from dpo.pipeline.losses import (
    DEFAULT_BETA,
    LOSS_TYPES,
    METRIC_NAMES,
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
    assert not needs_reference("simpo") and all(needs_reference(k) for k in LOSS_TYPES if k != "simpo")


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
    whole = preference_loss("wpo", **tensors, beta=0.1, rpo_alpha=0.3)
    for i in range(n):
        one = preference_loss("wpo", **{k: v[i : i + 1] for k, v in tensors.items()}, beta=0.1, rpo_alpha=0.3)
        torch.testing.assert_close(whole.losses[i : i + 1], one.losses)
        torch.testing.assert_close(whole.chosen_rewards[i : i + 1], one.chosen_rewards)
    perm = torch.randperm(n, generator=g)
    permuted = preference_loss("wpo", **{k: v[perm] for k, v in tensors.items()}, beta=0.1, rpo_alpha=0.3)
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


def test_rpo_term_adds_alpha_times_chosen_per_token_nll():
    """RPO: + α·(−π̄c) = 0.5·2.5 = 1.25 for every pair here (π̄c = −2.5 throughout); the rejected
    side and the rewards are untouched."""
    for loss_type in LOSS_TYPES:
        plain = preference_loss(loss_type, **batch(), chosen_wpo_term=t(WC), rejected_wpo_term=t(WR))
        rpo = preference_loss(loss_type, **batch(), chosen_wpo_term=t(WC), rejected_wpo_term=t(WR), rpo_alpha=0.5)
        assert_close(rpo.losses - plain.losses, [1.25, 1.25, 1.25], tol=1e-5)
        assert torch.equal(rpo.chosen_rewards, plain.chosen_rewards)
    # with different per-token means: π̄c = −3/3, −8/2 → α = 2 adds 2, 8
    kwargs = batch(
        policy_chosen_logps=t([-3.0, -8.0]), policy_rejected_logps=t([-1.0, -1.0]),
        reference_chosen_logps=t([-3.0, -8.0]), reference_rejected_logps=t([-1.0, -1.0]),
        chosen_num_tokens=t([3, 2], torch.int64), rejected_num_tokens=t([1, 1], torch.int64),
    )
    out = preference_loss("dpo", **kwargs, rpo_alpha=2.0)
    assert_close(out.losses, [math.log(2) + 2.0, math.log(2) + 8.0])


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
            chosen_wpo_term=t(WC), rejected_wpo_term=t(WR), rpo_alpha=0.1,
        )
        out.losses.mean().backward()
        assert pc.grad is not None and torch.isfinite(pc.grad).all() and pr.grad is not None, loss_type
        assert rc.grad is None, loss_type


def test_default_betas():
    assert dict(DEFAULT_BETA) == {
        "dpo": 0.1, "dpo_norm": 5.0, "simpo": 2.0, "wpo": 0.1, "ipo": 0.1, "hinge": 0.1, "robust": 0.1
    }
    with pytest.raises(TypeError):
        DEFAULT_BETA["dpo"] = 1.0  # read-only
    for loss_type, beta in DEFAULT_BETA.items():
        assert check_loss_options(loss_type) == beta
        kw = dict(chosen_wpo_term=t(WC), rejected_wpo_term=t(WR))
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
