"""Padding-free packing: every sequence in one row, each attending only to itself, equal to the padded
computation for cache-ref, train (loss and gradients) and evaluate."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import DEMO_MODEL, HH_DATA, build_tiny_llama, run_dpo

from dpo.artifacts.errors import UsageError
from dpo.artifacts.shards import ArtifactReader
from dpo.pipeline.batching import token_budget_batches
from dpo.pipeline.logprobs import LabelLogProbs
from dpo.pipeline.modeling import load_causal_lm
from dpo.pipeline.packing import enable_packing, layout
from dpo.pipeline.scoring import PairScorer

REL = 1e-5  # per-pair summed log-probs, relative


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """HH pairs of mixed lengths (some truncated, some short) and a GQA Llama with the demo tokenizer."""
    root = tmp_path_factory.mktemp("packing")
    run_dpo("tokenize", "--data", f"{HH_DATA}:96", "--tokenizer", DEMO_MODEL, "--out", root / "tok",
            "--max-seq-length", "160", "--max-prompt-length", "0", "--eval-fraction", "0.25", check=True)
    run_dpo("cache-ref", "--tokenized", root / "tok", "--model", DEMO_MODEL, "--out", root / "ref", check=True)
    return {"root": root, "tok": root / "tok", "ref": root / "ref", "gqa": build_tiny_llama(root / "gqa")}


def assert_same(got, want):
    for side in ("chosen", "rejected"):
        a, b = getattr(got, side), getattr(want, side)
        assert torch.equal(a.num_tokens, b.num_tokens), side
        rel = ((a.logps - b.logps).abs() / b.logps.abs().clamp(min=1)).max().item()
        assert rel < REL, (side, rel)
        if b.wpo_term is not None:
            torch.testing.assert_close(a.wpo_term, b.wpo_term, rtol=0, atol=1e-5)
        if b.shared_logps is not None:  # LD-DPO's sums over the pair's shared length
            rel = ((a.shared_logps - b.shared_logps).abs() / b.shared_logps.abs().clamp(min=1)).max().item()
            assert rel < REL, (side, "shared", rel)


@pytest.mark.parametrize("model_key", ["demo", "gqa"])
def test_packed_log_probs_equal_the_padded_ones(data, model_key):
    model = load_causal_lm(DEMO_MODEL if model_key == "demo" else data["gqa"])
    table = ArtifactReader(data["tok"]).read_split("train")
    lengths = table.column("chosen_length").to_numpy()
    assert lengths.min() < 40 and lengths.max() == 160  # mixed: short pairs and truncated ones
    module = LabelLogProbs(model)
    with torch.no_grad():
        padded = [PairScorer(module, "concatenated", 0, "cpu", with_wpo_term=True, with_shared=True)(table.slice(s, 12))
                  for s in range(0, table.num_rows, 12)]
        enable_packing(model)
        packed_scorer = PairScorer(module, "packed", 0, "cpu", with_wpo_term=True, with_shared=True)
        packed = [packed_scorer(table.slice(s, 12)) for s in range(0, table.num_rows, 12)]
    for got, want in zip(packed, padded):
        assert_same(got, want)
        assert got.tokens == got.slots == want.tokens  # no padding at all


def test_packed_gradients_equal_the_padded_ones(data):
    table = ArtifactReader(data["tok"]).read_split("train").slice(0, 8)
    grads = {}
    for mode in ("concatenated", "packed"):
        model = load_causal_lm(data["gqa"])
        if mode == "packed":
            enable_packing(model)
        scores = PairScorer(LabelLogProbs(model), mode, 0, "cpu")(table)
        (scores.chosen.logps.sum() - 0.5 * scores.rejected.logps.sum()).backward()
        grads[mode] = {n: p.grad for n, p in model.named_parameters()}
    for name, grad in grads["concatenated"].items():
        torch.testing.assert_close(grads["packed"][name], grad, rtol=1e-4, atol=1e-6)


def across_the_row(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Causal attention over the whole packed row: every sequence sees the ones before it."""
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                                           enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


def test_a_model_that_lets_packed_sequences_see_each_other_is_refused(data):
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register("dpo_test_across_the_row", across_the_row)
    model = load_causal_lm(DEMO_MODEL)
    enable_packing(model)
    model.set_attn_implementation("dpo_test_across_the_row")
    table = ArtifactReader(data["tok"]).read_split("train").slice(0, 8)
    with pytest.raises(UsageError, match="does not keep packed sequences apart"):
        PairScorer(LabelLogProbs(model), "packed", 0, "cpu")(table)

    class NotRouted(torch.nn.Module):
        config = model.config

        def _can_set_attn_implementation(self) -> bool:
            return False

    model.config._attn_implementation = "eager"
    with pytest.raises(UsageError, match="run without --packing"):
        enable_packing(NotRouted())


def test_layout_and_token_budget():
    packed = layout([3, 1, 2])
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 0, 1]]
    assert packed.sequence_ids.tolist() == [[0, 0, 0, 1, 2, 2]]
    assert packed.cu_seqlens.tolist() == [0, 3, 4, 6] and packed.max_length == 3
    assert token_budget_batches(np.array([5, 9, 3, 3, 7, 1]), 10) == [[1], [4], [0, 2], [3, 5]]
    with pytest.raises(UsageError, match="pair index 42 has 12 tokens .* --max-tokens-per-batch 10"):
        token_budget_batches(np.array([12, 3]), 10, indices=np.array([42, 7]))


def test_cache_ref_train_and_evaluate_with_packing_equal_the_padded_runs(data, tmp_path):
    run_dpo("cache-ref", "--tokenized", data["tok"], "--model", DEMO_MODEL, "--out", tmp_path / "ref", "--packing",
            "--max-tokens-per-batch", "1500", check=True)
    for split in ("train", "eval"):
        want = pq.read_table(data["ref"] / split / "part-00000-of-00001.parquet").to_pandas()
        got = pq.read_table(tmp_path / "ref" / split / "part-00000-of-00001.parquet").to_pandas()
        assert (got["index"] == want["index"]).all()
        for side in ("chosen", "rejected"):
            assert (got[f"{side}_num_tokens"] == want[f"{side}_num_tokens"]).all()
            rel = (abs(got[f"{side}_logps"] - want[f"{side}_logps"]) / abs(want[f"{side}_logps"]).clip(1)).max()
            assert rel < REL, (split, side, rel)
    stats = json.loads((tmp_path / "ref" / "manifest.json").read_text())["stats"]
    assert stats["padding_fraction"] == 0.0

    common = ["--tokenized", data["tok"], "--ref-cache", data["ref"], "--model", DEMO_MODEL, "--max-steps", "3",
              "--per-device-batch-size", "4", "--logging-steps", "1", "--learning-rate", "1e-3", "--warmup-ratio", "0"]
    run_dpo("train", *common, "--out", tmp_path / "padded", check=True)
    run_dpo("train", *common, "--out", tmp_path / "packed", "--packing", check=True)
    rows = {k: [json.loads(line) for line in (tmp_path / k / "metrics.jsonl").read_text().splitlines()]
            for k in ("padded", "packed")}
    assert rows["packed"][0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for a, b in zip(rows["padded"], rows["packed"]):
        for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
        assert b["padding_fraction"] == 0.0 and a["padding_fraction"] > 0

    evals = {}
    for name, extra in (("padded", []), ("packed", ["--packing", "--max-tokens-per-batch", "1000"])):
        run_dpo("evaluate", "--model", DEMO_MODEL, "--tokenized", data["tok"], "--ref-cache", data["ref"],
                "--out", tmp_path / f"eval-{name}", *extra, check=True)
        evals[name] = json.loads((tmp_path / f"eval-{name}" / "metrics.json").read_text())
    for key in ("logps/chosen", "logps/rejected", "logp_accuracies/summed", "loss"):
        assert evals["packed"][key] == pytest.approx(evals["padded"][key], rel=1e-5, abs=1e-5), key
