"""`dpo evaluate`: metrics checked against a textbook log-prob computation, reports, plots, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from conftest import HH_DATA, build_tiny_llama, run_dpo
from refusals import assert_refused, dpo_in_process

BETA = 0.1
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> dict[str, Path]:
    """tokenized (train + eval splits), reference cache and a 4-step train run of a tiny Llama."""
    root = tmp_path_factory.mktemp("evaluate")
    model = build_tiny_llama(root / "base")
    spec = {
        "run_dir": str(root / "run"), "model": str(model),
        "tokenize": {"data": [f"{HH_DATA}:60"], "tokenizer": str(model), "eval_fraction": 0.3,
                     "max_seq_length": 96, "max_prompt_length": 48},
        "cache-ref": {"batch_size": 8},
        "train": {"max_steps": 4, "per_device_batch_size": 4, "learning_rate": 5e-3, "warmup_ratio": 0.0,
                  "logging_steps": 1, "beta": BETA},
    }
    (root / "run.yaml").write_text(yaml.safe_dump(spec))
    run_dpo("run", "--config", root / "run.yaml", check=True)
    run = root / "run"
    return {"root": root, "base": model, "tokenized": run / "tokenized", "ref": run / "ref-logps",
            "train": run / "train", "trained": run / "train" / "final"}


def textbook_logps(model_dir: Path, ids: list[int], labels: list[int]) -> float:
    """log p(response | prompt) from a full log-softmax over the vocabulary: the definition."""
    from transformers import AutoModelForCausalLM

    model = _models.get(model_dir)
    if model is None:
        model = _models[model_dir] = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0, :-1].double().log_softmax(-1)
    target = torch.tensor(labels[1:])
    keep = target != -100
    return float(logp[keep].gather(-1, target[keep][:, None]).sum())


_models: dict[Path, object] = {}


def test_metrics_match_the_definitions(pipeline, tmp_path):
    out = tmp_path / "eval"
    proc = run_dpo("evaluate", "--model", pipeline["trained"], "--tokenized", pipeline["tokenized"],
                   "--ref-cache", pipeline["ref"], "--train", pipeline["train"], "--out", out,
                   "--generate", "3", "--max-new-tokens", "6", "--batch-size", "5")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())

    rows = pq.read_table(sorted((pipeline["tokenized"] / "eval").glob("part-*.parquet"))[0]).to_pylist()
    assert metrics["pairs"] == len(rows) > 5
    pc = np.array([textbook_logps(pipeline["trained"], r["chosen_input_ids"], r["chosen_labels"]) for r in rows])
    pr = np.array([textbook_logps(pipeline["trained"], r["rejected_input_ids"], r["rejected_labels"]) for r in rows])
    rc = np.array([textbook_logps(pipeline["base"], r["chosen_input_ids"], r["chosen_labels"]) for r in rows])
    rr = np.array([textbook_logps(pipeline["base"], r["rejected_input_ids"], r["rejected_labels"]) for r in rows])
    nc = np.array([sum(t != -100 for t in r["chosen_labels"]) for r in rows])
    nr = np.array([sum(t != -100 for t in r["rejected_labels"]) for r in rows])
    margins = BETA * ((pc - rc) - (pr - rr))
    assert np.abs(margins).min() > 1e-4, "a near-tie would make the accuracy comparison fragile"
    assert metrics["rewards/accuracies"] == pytest.approx(np.mean(margins > 0), abs=1e-12)
    assert metrics["rewards/margins"] == pytest.approx(margins.mean(), rel=1e-4, abs=1e-6)
    assert metrics["rewards/chosen"] == pytest.approx(BETA * (pc - rc).mean(), rel=1e-4, abs=1e-6)
    assert metrics["loss"] == pytest.approx(np.mean(np.log1p(np.exp(-margins))), rel=1e-4)
    assert metrics["logps/chosen"] == pytest.approx(pc.mean(), rel=1e-5)
    assert metrics["logp_accuracies/summed"] == pytest.approx(np.mean(pc > pr))
    assert metrics["logp_accuracies/per_token"] == pytest.approx(np.mean(pc / nc > pr / nr))
    assert metrics["ref/logp_accuracies/summed"] == pytest.approx(np.mean(rc > rr))
    assert metrics["logratios/rejected"] == pytest.approx((pr - rr).mean(), rel=1e-4, abs=1e-5)
    assert metrics["decreased/chosen"] == pytest.approx(np.mean(pc < rc))
    assert metrics["evaluated"]["beta"] == BETA and metrics["evaluated"]["loss_type"] == "dpo"
    # One source in the data: its per-source numbers are the overall ones.
    (source, per_source), = metrics["by_source"].items()
    assert source.endswith("hh-rlhf-harmless-test.jsonl.gz")
    assert per_source["rewards/accuracies"] == metrics["rewards/accuracies"]

    # Generations: the first 3 held-out prompts by index, lengths against their chosen responses.
    generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    first = sorted(rows, key=lambda r: r["index"])[:3]
    assert [g["index"] for g in generations] == [r["index"] for r in first]
    assert all(1 <= g["completion_tokens"] <= 6 for g in generations)
    assert metrics["generation/mean_chosen_tokens"] == pytest.approx(
        np.mean([sum(t != -100 for t in r["chosen_labels"]) for r in first]))
    assert metrics["generation/mean_tokens"] == pytest.approx(np.mean([g["completion_tokens"] for g in generations]))

    report = (out / "report.md").read_text()
    for heading in ("## Preference metrics", "## How the log-probs moved against the reference", "## Generations",
                    "## Training", "![Training curves](training_curves.png)"):
        assert heading in report
    assert f"{metrics['rewards/accuracies']:.1%}" in report
    manifest = json.loads((out / "manifest.json").read_text())
    listed = {f["path"] for f in manifest["files"]}
    assert {"metrics.json", "report.md", "pairs.parquet", "generations.jsonl", "training_curves.png",
            "margins.png", "logp_shift.png", "generation_lengths.png"} <= listed
    for name in listed:
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == PNG
    assert {i["kind"] for i in manifest["inputs"]} == {"model", "tokenized", "ref-logps", "train"}
    assert manifest["kind"] == "eval" and manifest["stats"]["rewards/accuracies"] == metrics["rewards/accuracies"]

    again = run_dpo("evaluate", "--model", pipeline["trained"], "--tokenized", pipeline["tokenized"],
                    "--ref-cache", pipeline["ref"], "--train", pipeline["train"], "--out", out,
                    "--generate", "3", "--max-new-tokens", "6", "--batch-size", "2")
    assert again.returncode == 0 and "nothing to do" in again.stderr  # batch size is not semantic


def test_base_model_against_its_own_cache_and_before_after(pipeline, tmp_path):
    base_out, after_out = tmp_path / "base", tmp_path / "after"
    run_dpo("evaluate", "--model", pipeline["base"], "--tokenized", pipeline["tokenized"], "--ref-cache",
            pipeline["ref"], "--out", base_out, "--beta", "0.5", check=True)
    before = json.loads((base_out / "metrics.json").read_text())
    assert before["evaluated"]["beta"] == 0.5 and before["evaluated"]["objective_from"] == "--beta"
    assert before["rewards/accuracies"] == 0.0 and abs(before["rewards/margins"]) < 1e-5
    assert before["logp_accuracies/summed"] == before["ref/logp_accuracies/summed"]
    assert before["logps/chosen"] == pytest.approx(before["ref/logps/chosen"], abs=1e-4)
    assert not (base_out / "training_curves.png").exists()

    # --train's β wins over --beta (the reward must be the one the model was trained for), with a warning.
    proc = run_dpo("evaluate", "--model", pipeline["trained"], "--tokenized", pipeline["tokenized"],
                   "--ref-cache", pipeline["ref"], "--train", pipeline["train"], "--beta", "0.5",
                   "--baseline", base_out, "--out", after_out)
    assert proc.returncode == 0, proc.stderr
    assert "--beta 0.5 ignored" in proc.stderr
    after = json.loads((after_out / "metrics.json").read_text())
    assert after["evaluated"]["beta"] == BETA
    assert after["baseline"]["metrics"]["rewards/accuracies"] == 0.0
    report = (after_out / "report.md").read_text()
    assert "## Before and after" in report and "pp" in report


def test_reference_free_without_cache(pipeline, tmp_path):
    proc = run_dpo("evaluate", "--model", pipeline["trained"], "--tokenized", pipeline["tokenized"],
                   "--out", tmp_path / "e", "--split", "train")
    assert proc.returncode == 0, proc.stderr
    assert "implicit rewards" in proc.stderr  # says why they are missing
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert "rewards/accuracies" not in metrics and "ref/logps/chosen" not in metrics
    assert 0.0 <= metrics["logp_accuracies/summed"] <= 1.0
    assert metrics["evaluated"]["split"] == "train"


def test_unknown_split_lists_the_splits(pipeline, tmp_path):
    proc = run_dpo("evaluate", "--model", pipeline["base"], "--tokenized", pipeline["tokenized"],
                   "--out", tmp_path / "e", "--split", "test")
    assert proc.returncode == 2
    assert "has no split 'test'" in proc.stderr and "train, eval" in proc.stderr
    assert not (tmp_path / "e" / "manifest.json").exists()


def test_baseline_of_other_pairs_is_refused_naming_both(pipeline, tmp_path):
    """A before/after table of two evaluations on different pairs would compare nothing."""
    on_train = tmp_path / "base-train"
    done = dpo_in_process("evaluate", "--model", pipeline["base"], "--tokenized", pipeline["tokenized"], "--split", "train",
                          "--out", on_train, "--quiet")
    assert done.exit_code == 0, done.output
    fingerprint = json.loads((pipeline["tokenized"] / "manifest.json").read_text())["fingerprint"]
    args = ["evaluate", "--model", pipeline["trained"], "--tokenized", pipeline["tokenized"], "--out", tmp_path / "e"]
    assert_refused(args + ["--baseline", on_train],
                   f"--baseline {on_train} evaluated split 'train' of {pipeline['tokenized']} (tokenized fingerprint "
                   f"{fingerprint}), but this run evaluates split 'eval' of {pipeline['tokenized']} (tokenized "
                   f"fingerprint {fingerprint})", out=tmp_path / "e", inputs=[on_train, pipeline["tokenized"]])
    # the same split of another tokenized artifact
    other = tmp_path / "tok-other"
    done = dpo_in_process("tokenize", "--data", f"{HH_DATA}:20", "--tokenizer", pipeline["base"], "--out", other,
                          "--eval-fraction", "0.5", "--max-seq-length", "96", "--quiet")
    assert done.exit_code == 0, done.output
    other_fp = json.loads((other / "manifest.json").read_text())["fingerprint"]
    assert_refused(["evaluate", "--model", pipeline["trained"], "--tokenized", other, "--out", tmp_path / "e",
                    "--baseline", on_train], f"of {pipeline['tokenized']} (tokenized fingerprint {fingerprint}), but "
                   f"this run evaluates split 'eval' of {other} (tokenized fingerprint {other_fp})",
                   out=tmp_path / "e", inputs=[on_train, other])


def test_model_with_a_smaller_vocabulary_is_refused(pipeline, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    small = tmp_path / "small"
    LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(small)
    assert_refused(["evaluate", "--model", small, "--tokenized", pipeline["tokenized"], "--out", tmp_path / "e"],
                   f"model {small} has a vocabulary of 100 tokens", f"--tokenizer {pipeline['base']}, a tokenizer of 512 tokens",
                   out=tmp_path / "e", inputs=[small, pipeline["tokenized"]])


def test_prompts_file(pipeline, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Tell me a story."}\n"Hello"\n{"messages": [{"role": "user", "content": "Hi"}]}\n')
    out = tmp_path / "e"
    run_dpo("evaluate", "--model", pipeline["trained"], "--tokenized", pipeline["tokenized"], "--out", out,
            "--generate", "2", "--prompts", prompts, "--max-new-tokens", "4", "--temperature", "0.8", check=True)
    generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [g["line"] for g in generations] == [1, 2]
    assert "user: Tell me a story." in generations[0]["prompt"]  # the chat template was applied

    prompts.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    proc = run_dpo("evaluate", "--model", pipeline["trained"], "--tokenized", pipeline["tokenized"],
                   "--out", tmp_path / "bad", "--generate", "2", "--prompts", prompts)
    assert proc.returncode == 2
    assert f"{prompts}, line 2, field 'prompt'" in proc.stderr

    # read before anything is scored: bytes that are not UTF-8, a lone surrogate, an unknown role
    args = ["evaluate", "--model", pipeline["trained"], "--tokenized", pipeline["tokenized"], "--out", tmp_path / "bad",
            "--generate", "2", "--prompts", prompts]
    for line, expected in [(b'{"prompt": "caf\xe9"}', "line 2: not UTF-8 text (byte 0xe9 at byte 16 of the line)"),
                           (b'{"prompt": "a\\udc00"}', "line 2, field 'prompt': holds U+DC00 at character 1"),
                           (b'{"messages": [{"role": "bot", "content": "x"}]}',
                            "line 2, field 'messages[0].role': unknown role 'bot'")]:
        prompts.write_bytes(b'{"prompt": "ok"}\n' + line + b"\n")
        assert_refused(args, f"{prompts}, {expected}", out=tmp_path / "bad", inputs=[prompts])

# Global batches of 8 (4 x 2): this split's first three are full. A shuffled epoch may hold one short
# batch, which batching.length_grouped_batches drops only when it comes last.
@pytest.mark.parametrize("options", [
    dict(loss_type="sigmoid,bco_pair,sft", loss_weights="0.8,0.2,1", bco_reward_shift=True, ld_alpha=0.5),
    dict(loss_type="aot_unpaired", label_smoothing=0.1),
], ids=["mpo-ld-shift", "aot"])
def test_evaluate_computes_the_objective_train_did(pipeline, tmp_path, options):
    """evaluate reads the loss from train's manifest (with bco_pair's final δ, sft's token count over the
    split, aot's groups of train's per-device batch): its loss and components equal train's own eval
    of the same final model on the same split."""
    from dpo.pipeline.config import from_mapping
    from dpo.stages import evaluate, train

    out = tmp_path / "train"
    train.run(from_mapping(train.TrainConfig, dict(
        tokenized=str(pipeline["tokenized"]), ref_cache=str(pipeline["ref"]), model=str(pipeline["base"]), out=str(out),
        max_steps=3, eval_steps=3, learning_rate=5e-3, warmup_ratio=0.0, quiet=True,
        per_device_batch_size=4, grad_accum=2, **options)))
    trained = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    evaluate.run(from_mapping(evaluate.EvaluateConfig, dict(
        model=str(out / "final"), tokenized=str(pipeline["tokenized"]), ref_cache=str(pipeline["ref"]),
        train=str(out), out=str(tmp_path / "eval"), batch_size=3, quiet=True)))
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    keys = [k[len("eval/"):] for k in trained if k.startswith("eval/")]
    assert ("loss/sft" in keys) == ("sft" in options["loss_type"])
    for key in keys:
        assert metrics[key] == pytest.approx(trained[f"eval/{key}"], rel=1e-5, abs=1e-7), key
    assert abs(metrics["loss"] - 0.693) > 1e-3  # the model moved: a real comparison
    objective = json.loads((tmp_path / "eval" / "manifest.json").read_text())["config"]["objective"]
    assert objective["loss_type"] == train.LossConfig(loss_type=options["loss_type"], label_smoothing=0.1
                                                      if "label_smoothing" in options else 0.0).resolved().loss_type


def test_every_loss_round_trips_through_the_train_manifest():
    """What train records (its manifest's loss section, flat config, final trainer state) rebuilds the
    same resolved LossConfig in evaluate, for every loss and the new options."""
    from dpo.artifacts.manifest import Manifest
    from dpo.pipeline.config import from_mapping
    from dpo.pipeline.losses import LOSS_TYPES, LossConfig
    from dpo.stages import evaluate

    cfg = from_mapping(evaluate.EvaluateConfig, {"model": "m", "tokenized": "t", "out": "o", "train": "tr"})
    variants = [dict(loss_type=n, label_smoothing=1e-3 if n == "exo_pair" else 0.0) for n in LOSS_TYPES]
    variants += [dict(loss_type="dpo,bco_pair,sft", loss_weights="0.8,0.2,1", bco_reward_shift=True, ld_alpha=0.3),
                 dict(loss_type="discopop", discopop_tau=0.2, f_divergence="alpha_divergence",
                      f_alpha_divergence_coef=0.3),
                 dict(loss_type="dpo", rpo_alpha=0.5)]
    for options in variants:
        loss = LossConfig(**options).resolved()
        manifest = Manifest(kind="train", fingerprint="0" * 16, config={"loss": loss.to_json(), "per_device_batch_size": 6},
                            stats={"loss_state": {"bco_reward_shift": {"reward_sum": -3.0, "pairs": 12.0}}})
        objective = evaluate._objective(cfg, manifest)
        assert objective.loss == loss, options
        assert objective.sort_size == 6
        assert objective.reward_shift == -0.25
