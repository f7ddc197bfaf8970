"""`dpo cache-ref` end to end: values, fingerprints, reruns, refusals, multi-process, SIGKILL."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from dpo.artifacts.fingerprint import fingerprint
from dpo.artifacts.manifest import read_manifest
from dpo.artifacts.errors import ArtifactError
from dpo.pipeline.modeling import load_causal_lm, model_identity
from dpo.pipeline.refcache import load_reference, reference_model_mismatch
from dpo.stages import cache_ref as stage

from conftest import DEMO_MODEL, DPO, HH_DATA, REPO, dpo_env, free_port, run_dpo

COLUMNS = ["index", "chosen_logps", "rejected_logps", "chosen_num_tokens", "rejected_num_tokens",
           "chosen_shared_logps", "rejected_shared_logps"]


def tokenize(out: Path, *extra: str) -> Path:
    # No prompt limit (the default before it was half of --max-seq-length): the padding bound in
    # test_manifest_records_lineage_identity_and_throughput was set on these lengths.
    run_dpo("tokenize", "--data", f"{HH_DATA}:48", "--tokenizer", DEMO_MODEL, "--out", out,
            "--eval-fraction", "0.25", "--max-seq-length", "384", "--max-prompt-length", "0", "--quiet", *extra,
            check=True)
    return out


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory) -> Path:
    return tokenize(tmp_path_factory.mktemp("tok") / "tokenized")


@pytest.fixture(scope="module")
def reference(tokenized, tmp_path_factory) -> Path:
    """The output of the plain CLI command, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("ref") / "ref"
    run_dpo("cache-ref", "--tokenized", tokenized, "--model", DEMO_MODEL, "--out", out, "--batch-size", "8",
            "--rows-per-shard", "8", check=True)
    return out


def read_values(out: Path) -> dict[str, np.ndarray]:
    """Every split's rows, sorted by index, through the manifest's file list."""
    manifest = read_manifest(out, "ref-logps")
    table = np.concatenate([pq.read_table(out / f.path, columns=COLUMNS).to_pandas().to_records(index=False)
                            for f in manifest.files])
    table.sort(order="index")
    return {name: table[name] for name in COLUMNS}


def textbook(tokenized: Path) -> dict[int, tuple[float, int, float, int, float, float]]:
    """Per pair: model(input_ids).logits, float32 log_softmax, gather at shifted labels, sum; one
    unpadded sequence at a time. Then each side's sum over its first min(nc, nr) label tokens."""
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
    manifest = read_manifest(tokenized, "tokenized")
    result = {}
    for entry in manifest.files:
        if not entry.path.endswith(".parquet"):
            continue
        for row in pq.read_table(tokenized / entry.path).to_pylist():
            values, picked = [], []
            for side in ("chosen", "rejected"):
                ids = torch.tensor([row[f"{side}_input_ids"]])
                labels = torch.tensor(row[f"{side}_labels"][1:])
                with torch.no_grad():
                    logp = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
                keep = labels != -100
                picked.append(logp[keep].gather(-1, labels[keep, None]).squeeze(-1))
                values += [picked[-1].sum().item(), int(keep.sum())]
            k = min(len(p) for p in picked)
            result[row["index"]] = tuple(values) + tuple(p[:k].sum().item() for p in picked)
    return result


def run_in_process(tokenized: Path, out: Path, **overrides) -> Path:
    stage.run(stage.CacheRefConfig(tokenized=str(tokenized), model=str(DEMO_MODEL), out=str(out), quiet=True,
                                   rows_per_shard=8, **overrides))
    return out


def test_values_equal_the_textbook_computation_at_batch_sizes_1_and_8(tokenized, reference, tmp_path):
    want = textbook(tokenized)
    one = read_values(run_in_process(tokenized, tmp_path / "bs1", batch_size=1))
    eight = read_values(reference)
    assert len(want) == len(eight["index"]) > 20
    assert eight["index"].tolist() == sorted(want)  # dense ids of both splits, none missing
    for got in (one, eight):
        for i, index in enumerate(got["index"]):
            chosen, n_chosen, rejected, n_rejected, chosen_shared, rejected_shared = want[int(index)]
            assert abs(got["chosen_logps"][i] - chosen) <= 1e-5 * abs(chosen)
            assert abs(got["rejected_logps"][i] - rejected) <= 1e-5 * abs(rejected)
            assert abs(got["chosen_shared_logps"][i] - chosen_shared) <= 1e-5 * abs(chosen_shared)
            assert abs(got["rejected_shared_logps"][i] - rejected_shared) <= 1e-5 * abs(rejected_shared)
            assert (got["chosen_num_tokens"][i], got["rejected_num_tokens"][i]) == (n_chosen, n_rejected)
    assert read_manifest(tmp_path / "bs1").fingerprint == read_manifest(reference).fingerprint


def test_separate_forward_gives_the_same_values(tokenized, reference, tmp_path):
    separate = read_values(run_in_process(tokenized, tmp_path / "sep", forward="separate", batch_size=3))
    together = read_values(reference)
    np.testing.assert_allclose(separate["chosen_logps"], together["chosen_logps"], rtol=1e-5)
    np.testing.assert_allclose(separate["rejected_logps"], together["rejected_logps"], rtol=1e-5)
    assert separate["index"].tolist() == together["index"].tolist()


def test_manifest_records_lineage_identity_and_throughput(tokenized, reference):
    manifest = read_manifest(reference, "ref-logps")
    tok = read_manifest(tokenized, "tokenized")
    assert [(i.kind, i.fingerprint) for i in manifest.inputs] == [("tokenized", tok.fingerprint)]
    assert manifest.config["model"] == str(DEMO_MODEL) and manifest.config["splits"] == ["train", "eval"]
    stats = manifest.stats
    assert stats["model_identity"]["digest"] == model_identity(DEMO_MODEL)["digest"]
    assert stats["tokens"] == tok.stats["total_tokens"]
    assert stats["tokens_per_second"] > 0 and 0 <= stats["padding_fraction"] < 0.5
    shards = {s: -(-tok.rows(s) // 8) for s in tok.splits}
    assert [f.path for f in manifest.files] == [
        f"{s}/part-{k:05d}-of-{n:05d}.parquet" for s, n in shards.items() for k in range(n)
    ]
    assert sum(f.rows for f in manifest.files) == sum(tok.rows(s) for s in tok.splits)


def test_fingerprint_is_pinned_and_blind_to_plumbing():
    config = stage.CacheRefConfig(tokenized="a", model="m", out="o", splits=("train",))
    semantic = {"dtype": "float32", "splits": ("train",), "rows_per_shard": 2048, "model_identity": "0" * 32}
    fp = fingerprint(stage.STAGE, stage.VERSION, {**stage.semantic_config(config), "model_identity": "0" * 32}, ["t"])
    # Version 2 (the shared-prefix columns of LD-DPO); version 1 pinned "c5fb9d26051ea1cb".
    assert fp == fingerprint(stage.STAGE, stage.VERSION, semantic, ["t"]) == "4cfc81be2f1148b8"
    other = stage.CacheRefConfig(tokenized="b", model="n", out="p", splits=("train",), batch_size=1,
                                 forward="separate", quiet=True, lock_timeout=1)
    assert stage.semantic_config(other) == stage.semantic_config(config)
    assert stage.semantic_config(stage.CacheRefConfig(tokenized="a", model="m", out="o", dtype="bfloat16")) != \
        stage.semantic_config(config)


def test_rerun_is_a_no_op_and_other_dtype_needs_overwrite(tokenized, reference):
    before = (reference / "manifest.json").stat().st_mtime_ns
    again = run_dpo("cache-ref", "--tokenized", tokenized, "--model", DEMO_MODEL, "--out", reference,
                    "--batch-size", "2", "--rows-per-shard", "8")
    assert again.returncode == 0 and "nothing to do" in again.stderr
    assert (reference / "manifest.json").stat().st_mtime_ns == before
    # --verify-model checks a finished cache (sampled identity is the key) instead of asking to redo it.
    verified = run_dpo("cache-ref", "--tokenized", tokenized, "--model", DEMO_MODEL, "--out", reference,
                       "--rows-per-shard", "8", "--verify-model")
    assert verified.returncode == 0 and "no full sha256 recorded" in verified.stderr, verified.stderr
    other = run_dpo("cache-ref", "--tokenized", tokenized, "--model", DEMO_MODEL, "--out", reference,
                    "--dtype", "bfloat16", "--rows-per-shard", "8")
    assert other.returncode == 3 and "--overwrite" in other.stderr and "Traceback" not in other.stderr


def test_refuses_a_model_with_a_smaller_vocabulary(tokenized, tmp_path):
    small = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    small.save_pretrained(tmp_path / "small")
    proc = run_dpo("cache-ref", "--tokenized", tokenized, "--model", tmp_path / "small", "--out", tmp_path / "out")
    assert proc.returncode == 2, proc.stderr
    assert "vocabulary of 100 tokens" in proc.stderr and "tokenizer of 512" in proc.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_load_reference_indexes_by_pair_id(tokenized, reference):
    ref = load_reference(reference, tokenized, ["train", "eval"])
    values = read_values(reference)
    assert ref.present.all() and len(ref.present) == len(values["index"])
    assert ref.chosen_logps.dtype == torch.float32
    torch.testing.assert_close(ref.chosen_logps[torch.from_numpy(values["index"])],
                               torch.from_numpy(values["chosen_logps"]))
    got = ref.lookup(torch.tensor([3, 0]))
    assert got["rejected_num_tokens"].tolist() == [values["rejected_num_tokens"][3], values["rejected_num_tokens"][0]]
    assert reference_model_mismatch(ref, DEMO_MODEL) is None


def test_a_cache_without_shared_prefix_columns_serves_all_but_ld_dpo(tokenized, reference, tmp_path):
    """A version-1 cache (no chosen/rejected_shared_logps) loads as before; asked for LD-DPO's sums it
    is refused with the command that recomputes it."""
    from dpo.artifacts.manifest import write_manifest
    from dpo.artifacts.shards import write_shard

    old = tmp_path / "v1"
    shutil.copytree(reference, old)
    manifest = read_manifest(old)
    files = [write_shard(old, f.path, pq.read_table(old / f.path).drop_columns(["chosen_shared_logps",
                                                                                 "rejected_shared_logps"]))
             for f in manifest.files]
    write_manifest(old, dataclasses.replace(manifest, files=files))
    plain = load_reference(old, tokenized, ["train"])
    assert set(plain.lookup(torch.tensor([0]))) == {"chosen_logps", "rejected_logps", "chosen_num_tokens",
                                                    "rejected_num_tokens"}
    with pytest.raises(ArtifactError, match=r"no chosen_shared_logps.*--ld-alpha.*dpo cache-ref .*--overwrite"):
        load_reference(old, tokenized, ["train"], shared=True)
    shared = load_reference(reference, tokenized, ["train"], shared=True).lookup(torch.tensor([0, 1]))
    values = read_values(reference)
    assert shared["rejected_shared_logps"].tolist() == values["rejected_shared_logps"][:2].tolist()


def test_load_reference_refuses_other_tokens_and_gaps(tokenized, reference, tmp_path):
    other = tokenize(tmp_path / "other", "--seed", "7")
    with pytest.raises(ArtifactError, match=re.escape(f"computed from the tokenized artifact {tokenized} (")):
        load_reference(reference, other, ["train"])
    train_only = run_in_process(tokenized, tmp_path / "train-only", splits=("train",))
    with pytest.raises(ArtifactError, match="no reference log-probs for split 'eval'"):
        load_reference(train_only, tokenized, ["eval"])
    ref = load_reference(train_only, tokenized, ["train"])
    eval_ids = pq.read_table(tokenized / read_manifest(tokenized).files_of("eval")[0].path).column("index").to_pylist()
    with pytest.raises(ArtifactError, match=f"pair index \\[{eval_ids[0]}"):
        ref.lookup(torch.tensor(eval_ids[:2]))


def test_model_identity_is_content_not_path(tmp_path):
    copy = shutil.copytree(DEMO_MODEL, tmp_path / "copy")
    config = json.loads((copy / "config.json").read_text())
    config["transformers_version"] = "0.0.0"  # rewritten by every save: not identity
    (copy / "config.json").write_text(json.dumps(config))
    assert model_identity(copy)["digest"] == model_identity(DEMO_MODEL)["digest"]
    exact = model_identity(copy, exact=True)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2 + 12345] ^= 1  # one bit, in the middle of the tensors
    weights.write_bytes(bytes(data))
    changed = model_identity(copy, exact=True)
    assert changed["sha256_digest"] != exact["sha256_digest"]
    assert changed["sampled_digest"] != exact["sampled_digest"]  # small files are hashed whole


def test_load_causal_lm_turns_dropout_off(tmp_path):
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, attention_dropout=0.3))
    model.save_pretrained(tmp_path / "m")
    loaded = load_causal_lm(tmp_path / "m")
    assert loaded.model.layers[0].self_attn.attention_dropout == 0.0
    ids = torch.randint(0, 64, (2, 8))
    loaded.train()
    assert torch.equal(loaded(ids).logits, loaded(ids).logits)  # no dropout noise even in train mode
    # ...but what it saves keeps the base model's rate, for whoever fine-tunes the result later.
    assert loaded.config.attention_dropout == 0.3
    kept = load_causal_lm(tmp_path / "m", keep_dropout=True, dtype="bfloat16")
    assert kept.config.attention_dropout == 0.3 and next(kept.parameters()).dtype == torch.bfloat16
    assert not kept.training


@pytest.mark.slow
def test_two_processes_equal_one(tokenized, reference, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "dpo.cli", "cache-ref", "--tokenized", str(tokenized), "--model", str(DEMO_MODEL),
           "--out", str(out), "--rows-per-shard", "8", "--batch-size", "8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dpo_env(), timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    manifest, single = read_manifest(out), read_manifest(reference)
    assert manifest.stats["world_size"] == 2 and manifest.fingerprint == single.fingerprint
    # Shards are computed identically whichever rank runs them: the files are byte-identical.
    assert [(f.path, f.sha256) for f in manifest.files] == [(f.path, f.sha256) for f in single.files]


@pytest.mark.slow
def test_sigkill_and_rerun_equals_an_uninterrupted_run(tokenized, tmp_path):
    def args(out):
        return ["cache-ref", "--tokenized", str(tokenized), "--model", str(DEMO_MODEL), "--out", str(out),
                "--rows-per-shard", "2", "--batch-size", "2"]

    run_dpo(*args(tmp_path / "whole"), check=True)
    uninterrupted = read_manifest(tmp_path / "whole")
    out = tmp_path / "killed"
    victim = subprocess.Popen([*DPO, *args(out)], env=dpo_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(out.glob("*/part-*.parquet"))) < 2 and time.monotonic() < deadline and victim.poll() is None:
        time.sleep(0.005)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not (out / "manifest.json").exists(), "the run finished before it could be killed"
    committed = len(list(out.glob("*/part-*.parquet")))
    assert committed >= 2
    # The killed job's lock has no heartbeat any more: a short --lock-timeout takes it over.
    time.sleep(1.5)
    proc = run_dpo(*args(out), "--lock-timeout", "1", check=True)
    manifest = read_manifest(out)
    assert manifest.stats["shards"]["resumed"] >= committed
    assert manifest.stats["shards"]["computed"] >= 1
    assert manifest.fingerprint == uninterrupted.fingerprint
    assert [(f.path, f.sha256) for f in manifest.files] == [(f.path, f.sha256) for f in uninterrupted.files]
    assert "Traceback" not in proc.stderr
