"""Parity with TRL: the same per-sequence log-probs through TRL's own loss code and through dpo's.

Compared against TRL 1.16.0, ``trl.trainer.dpo_trainer.DPOTrainer._compute_loss`` (every loss of
its ``loss_type`` list, their weighted combinations, f-divergences, LD-DPO, ``use_weighting``), and
``trl.experimental.cpo.CPOTrainer.cpo_loss`` for SimPO, which DPOTrainer lacks.

``_compute_loss`` runs the model, takes the per-token log-probs of the fused LM head (exactly 0
off the labels) and only ever sums them, so a model stand-in that puts each response's summed
log-prob on its first label token (and, for LD-DPO, the shared part on token 1 and the tail on
token k + 1) gives TRL the same sequences dpo sees; the reference is a live stand-in too, so TRL
applies LD-DPO's masks to it itself. The per-example losses are locals of ``_compute_loss`` (it
returns their weighted mean): they are read with ``sys.settrace`` at the line that accumulates
them, after WPO's weighting. Per-token values lie on a 1/64 grid, so every sum is exact in
float32 and any difference is in the formulas. One batch is one micro-batch, as in TRL.

Where dpo differs from TRL by design, the test asserts the relation instead of equality:
- ``sft``: TRL broadcasts the batch's token-mean NLL to every example; dpo gives pair i the share
  −πc_i·B/N_c (same mean, exact across micro-batches); its rewards are β·π̄ (it needs no reference);
- ``ipo``, ``sigmoid_norm``: dpo's rewards are per token, β·lc/nc (TRL logs β·lc).
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import sys
import types

import pytest
import torch

from dpo.pipeline.losses import BCO_REWARD, LossConfig, LossInputs, loss_names

try:
    import trl
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.utils import FusedCausalLMOutput
except ImportError:  # pragma: no cover - TRL is in the test extra
    trl = None

TRL_VERSION = "1.16.0"
pytestmark = pytest.mark.skipif(
    trl is None or trl.__version__ != TRL_VERSION,
    reason=f"parity is checked against TRL {TRL_VERSION} (pip install -e '.[test]'); "
           f"found {'no trl' if trl is None else 'trl ' + trl.__version__}",
)

TRL_LOSSES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]
F_DIVERGENCE_LOSSES = ["sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"]
PER_TOKEN_REWARDS = ("ipo", "sigmoid_norm")
TOL = dict(rtol=1e-6, atol=1e-6)
NC = [5, 3, 8, 4, 1, 6]
NR = [3, 7, 8, 2, 4, 1]


def tokens(n: int, generator: torch.Generator) -> torch.Tensor:
    return -torch.randint(8, 161, (n,), generator=generator).float() / 64


def pairs(seed: int = 0) -> dict[str, torch.Tensor]:
    """Six pairs' per-sequence sums, over all label tokens and over the first min(nc, nr)."""
    g = torch.Generator().manual_seed(seed)
    out = collections.defaultdict(list)
    for nc, nr in zip(NC, NR):
        k = min(nc, nr)
        for side, n in (("chosen", nc), ("rejected", nr)):
            policy = tokens(n, g)
            reference = (policy - torch.randint(-24, 25, (n,), generator=g).float() / 64).clamp(max=-1 / 64)
            for who, values in (("policy", policy), ("reference", reference)):
                out[f"{who}_{side}"].append(values.sum())
                out[f"{who}_{side}_shared"].append(values[:k].sum())
            # WPO's Σ_t (log p_t − log Σ_v p_v²) <= 0, so dpo's cap at 1 is never reached
            out[f"{side}_wpo_sum"].append(-torch.randint(0, 64, (), generator=g).float() / 64)
    return {k: torch.stack(v) for k, v in out.items()}


def _layout(full: torch.Tensor, shared: torch.Tensor, ld: bool) -> torch.Tensor:
    """[2B, L-1] per-token log-probs whose row sums are ``full`` (and first-k sums ``shared``)."""
    counts = NC + NR
    width = max(counts)
    out = torch.zeros(len(counts), width)
    for i, n in enumerate(counts):
        k = min(NC[i % len(NC)], NR[i % len(NR)])
        if ld and k < n:
            out[i, 0], out[i, k] = shared[i], full[i] - shared[i]
        else:
            out[i, 0] = full[i]
    return out


def trl_losses(p: dict[str, torch.Tensor], loss_type, *, weights=None, beta=0.1, label_smoothing=0.0,
               f_divergence="reverse_kl", f_alpha=0.5, discopop_tau=0.05, ld_alpha=None, use_weighting=False):
    """TRL's ``DPOTrainer._compute_loss`` on pairs ``p``: (loss, [(type, per-example)], chosen, rejected rewards)."""
    B, counts = len(NC), NC + NR
    mask = torch.zeros(2 * B, 1 + max(counts), dtype=torch.long)  # one prompt token, then the response
    for i, n in enumerate(counts):
        mask[i, 1:1 + n] = 1
    both = lambda who, suffix="": torch.cat([p[f"{who}_chosen{suffix}"], p[f"{who}_rejected{suffix}"]])  # noqa: E731
    policy = _layout(both("policy"), both("policy", "_shared"), ld_alpha is not None).requires_grad_(True)
    reference = _layout(both("reference"), both("reference", "_shared"), ld_alpha is not None)
    lssp = torch.zeros_like(reference)
    lssp[:, 0] = policy.detach().sum(1) - torch.cat([p["chosen_wpo_sum"], p["rejected_wpo_sum"]])
    zeros = torch.zeros_like(reference)

    def model(out):
        return lambda **kwargs: FusedCausalLMOutput(log_probs=out, entropy=zeros, mean_logits=zeros,
                                                    is_top1=zeros.bool(), log_sum_sq_probs=lssp)

    types_ = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    accelerator = types.SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x,
                                        autocast=contextlib.nullcontext)
    trained = torch.nn.Module()  # what _compute_loss asks of self.model: .training, not a PEFT model
    trained.is_gradient_checkpointing = False
    stub = types.SimpleNamespace(
        model=trained, ref_model=model(reference),
        accelerator=accelerator, precompute_ref_logps=False, aux_loss_enabled=False,
        args=types.SimpleNamespace(discopop_tau=discopop_tau, gradient_checkpointing_kwargs=None), beta=beta,
        loss_types=types_, loss_weights=weights or [1.0] * len(types_), ld_alpha=ld_alpha,
        f_divergence_type=f_divergence, f_alpha_divergence_coef=f_alpha, label_smoothing=label_smoothing,
        use_weighting=use_weighting, _metrics={"train": collections.defaultdict(list)}, _total_train_tokens=0,
        _tp_size=1)
    inputs = {"input_ids": torch.ones_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask}
    code = DPOTrainer._compute_loss.__code__
    source, first = inspect.getsourcelines(DPOTrainer._compute_loss)
    accumulate = first + next(i for i, line in enumerate(source) if "loss += per_sequence_loss.mean()" in line)
    per_loss, final = [], {}

    def local(frame, event, arg):
        if event == "line" and frame.f_lineno == accumulate:
            per_loss.append((frame.f_locals["loss_type"], frame.f_locals["per_sequence_loss"].detach().clone()))
        elif event == "return" and "chosen_rewards" in frame.f_locals:  # not when it raised
            final.update({k: frame.f_locals[k].detach() for k in ("chosen_rewards", "rejected_rewards")})
        return local

    previous = sys.gettrace()
    sys.settrace(lambda frame, event, arg: local if frame.f_code is code else None)
    try:
        loss = DPOTrainer._compute_loss(stub, model(policy), inputs, False)
    finally:
        sys.settrace(previous)
    assert [name for name, _ in per_loss] == types_, "the trace missed TRL's accumulation line"
    return loss.detach(), per_loss, final["chosen_rewards"], final["rejected_rewards"]


def dpo_loss(p: dict[str, torch.Tensor], loss_type: str, **options):
    """dpo's LossConfig on the same pairs (TRL's names: aliases resolve them)."""
    nc, nr = torch.tensor(NC), torch.tensor(NR)
    x = LossInputs(p["policy_chosen"], p["policy_rejected"], nc, nr, p["reference_chosen"], p["reference_rejected"],
                   p["chosen_wpo_sum"] / nc, p["rejected_wpo_sum"] / nr, p["policy_chosen_shared"],
                   p["policy_rejected_shared"], p["reference_chosen_shared"], p["reference_rejected_shared"])
    return LossConfig(loss_type=loss_type, **options).resolved()(x)


MAX_DIFFERENCE: dict[str, float] = {}


def close(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> None:
    torch.testing.assert_close(ours.double(), theirs.double(), **TOL, msg=lambda m: f"{name}: {m}")
    MAX_DIFFERENCE[name] = max(MAX_DIFFERENCE.get(name, 0.0), float((ours.double() - theirs.double()).abs().max()))


def compare(name: str, p, trl_kwargs: dict, ours_type: str, ours_kwargs: dict) -> None:
    """Per-example losses (each component, and the weighted total) and rewards, TRL against dpo."""
    loss, per_loss, chosen, rejected = trl_losses(p, **trl_kwargs)
    out = dpo_loss(p, ours_type, **ours_kwargs)
    components = out.components or {loss_names(ours_type)[0]: out.losses}
    weights = trl_kwargs.get("weights") or [1.0] * len(per_loss)
    for (trl_name, theirs), (ours_name, ours) in zip(per_loss, components.items(), strict=True):
        if trl_name == "sft":  # TRL: the batch's token mean on every example; dpo: each pair's share of it
            close(f"{name}/{trl_name}", ours.mean().reshape(1), theirs[:1])
            assert torch.allclose(theirs, theirs[0])
        else:
            close(f"{name}/{trl_name}", ours, theirs)
    close(f"{name}/loss", out.losses.mean().reshape(1), loss.reshape(1))
    assert loss.item() == pytest.approx(sum(w * t.mean().item() for w, (_, t) in zip(weights, per_loss)), rel=1e-6)
    lead = next((t for t in (trl_kwargs["loss_type"] if isinstance(trl_kwargs["loss_type"], list)
                             else [trl_kwargs["loss_type"]]) if t != "sft"), None)
    if lead is None:
        return  # sft alone: β·π̄ rewards, no reference
    scale = (torch.tensor(NC).float(), torch.tensor(NR).float()) if lead in PER_TOKEN_REWARDS else (1.0, 1.0)
    close(f"{name}/rewards", torch.cat([out.chosen_rewards * scale[0], out.rejected_rewards * scale[1]]),
          torch.cat([chosen, rejected]))


@pytest.fixture(scope="module")
def p() -> dict[str, torch.Tensor]:
    return pairs()


@pytest.mark.parametrize("loss_type", TRL_LOSSES)
def test_every_trl_loss_type(p, loss_type):
    smoothing = 1e-3 if loss_type == "exo_pair" else 0.0
    compare(loss_type, p, dict(loss_type=loss_type, label_smoothing=smoothing), loss_type,
            dict(beta=0.1, label_smoothing=smoothing))


@pytest.mark.parametrize("loss_type", ["robust", "exo_pair", "aot", "aot_unpaired"])
def test_label_smoothing_where_trl_reads_it(p, loss_type):
    compare(f"{loss_type}(eps=0.1)", p, dict(loss_type=loss_type, label_smoothing=0.1, beta=0.5), loss_type,
            dict(beta=0.5, label_smoothing=0.1))


def test_mpo_and_rpo_combinations(p):
    """MPO (sigmoid, bco_pair, sft with 0.8, 0.2, 1.0) and RPO as --rpo-alpha 0.5 (sigmoid, sft with 1, 0.5)."""
    compare("mpo", p, dict(loss_type=["sigmoid", "bco_pair", "sft"], weights=[0.8, 0.2, 1.0]), "sigmoid,bco_pair,sft",
            dict(loss_weights="0.8,0.2,1.0"))
    compare("rpo", p, dict(loss_type=["sigmoid", "sft"], weights=[1.0, 0.5]), "dpo", dict(rpo_alpha=0.5))


@pytest.mark.parametrize("divergence", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("loss_type", F_DIVERGENCE_LOSSES)
def test_f_divergences(p, loss_type, divergence):
    smoothing = 1e-3 if loss_type == "exo_pair" else 0.0
    compare(f"{loss_type}/{divergence}", p, dict(loss_type=loss_type, f_divergence=divergence, f_alpha=0.3,
                                                label_smoothing=smoothing),
            loss_type, dict(beta=0.1, f_divergence=divergence, label_smoothing=smoothing,
                            **({"f_alpha_divergence_coef": 0.3} if divergence == "alpha_divergence" else {})))


@pytest.mark.parametrize("ld_alpha", [0.0, 0.5])
@pytest.mark.parametrize("loss_type", [t for t in TRL_LOSSES if t != "sft"])  # sft alone refuses --ld-alpha
def test_ld_dpo(p, loss_type, ld_alpha):
    smoothing = 1e-3 if loss_type == "exo_pair" else 0.0
    compare(f"{loss_type}/ld={ld_alpha}", p, dict(loss_type=loss_type, ld_alpha=ld_alpha, label_smoothing=smoothing),
            loss_type, dict(beta=0.1, ld_alpha=ld_alpha, label_smoothing=smoothing))


def test_ld_dpo_in_a_combination_leaves_sft_plain(p):
    compare("mpo/ld=0.5", p, dict(loss_type=["sigmoid", "bco_pair", "sft"], weights=[0.8, 0.2, 1.0], ld_alpha=0.5),
            "sigmoid,bco_pair,sft", dict(loss_weights="0.8,0.2,1.0", ld_alpha=0.5))


def test_discopop_tau(p):
    compare("discopop(tau=0.5)", p, dict(loss_type="discopop", discopop_tau=0.5, beta=0.3), "discopop",
            dict(beta=0.3, discopop_tau=0.5))


def test_wpo_is_sigmoid_with_use_weighting(p):
    """dpo's wpo caps the weight at 1; with Σ(log p − log Σp²) <= 0 on both sides the cap is idle."""
    compare("wpo", p, dict(loss_type="sigmoid", use_weighting=True), "wpo", dict(beta=0.1))


def test_bco_reward_shift_off_is_trl_1x():
    """TRL 1.16's bco_pair has no running mean: dpo's default (the shift off) is it, and the shift
    only adds the per-pair rewards the running mean needs."""
    data = pairs(seed=1)
    compare("bco_pair(seed 1)", data, dict(loss_type="bco_pair"), "bco_pair", {})
    out = dpo_loss(data, "bco_pair", bco_reward_shift=True)
    torch.testing.assert_close(out.extras[BCO_REWARD], (out.chosen_rewards + out.rejected_rewards) / 2)


def test_simpo_against_trl_cpo_trainer(p):
    """TRL's SimPO is CPOTrainer's loss_type="simpo" on per-token averaged log-probs, with
    simpo_gamma = γ = β·(dpo's --gamma-beta-ratio); rewards β·π̄ in both."""
    from trl.experimental.cpo import CPOTrainer

    beta, gamma = 2.0, 0.6
    nc, nr = torch.tensor(NC).float(), torch.tensor(NR).float()
    for smoothing in (0.0, 0.1):
        stub = types.SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta,
                                     label_smoothing=smoothing,
                                     accelerator=types.SimpleNamespace(device=torch.device("cpu")))
        losses, chosen, rejected = CPOTrainer.cpo_loss(stub, p["policy_chosen"] / nc, p["policy_rejected"] / nr)
        out = dpo_loss(p, "simpo", beta=beta, gamma_beta_ratio=gamma / beta, label_smoothing=smoothing)
        close(f"simpo(eps={smoothing})", out.losses, losses)
        close("simpo/rewards", torch.cat([out.chosen_rewards, out.rejected_rewards]), torch.cat([chosen, rejected]))
