"""`dpo train` end to end through the real CLI, on the demo model and a slice of HH-RLHF.

The checks that matter for a DPO trainer:
- before the first update the policy is the reference (dropout off), so the first DPO loss is
  ln 2 and the implicit rewards are 0; likewise the first loss of every reference-based variant
  has a closed form (ipo: (0 − 1/(2β))², hinge: relu(1 − 0) = 1, ...);
- one forward over chosen+rejected and two separate forwards give the same losses;
- gradient accumulation gives the same update as the equivalent larger batch;
- a run killed mid-epoch and resumed reproduces the uninterrupted run's losses (1e-6 on CPU);
- LoRA trains only the adapters and saves an adapter; a mismatched reference cache is refused.
"""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DEMO_MODEL, DPO, HH_DATA, dpo_env, run_dpo

LN2 = math.log(2.0)
METRIC_KEYS = {
    "step", "epoch", "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
    "logps/chosen", "logps/rejected", "learning_rate", "grad_norm", "tokens_per_second", "padding_fraction",
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """A tokenized slice of HH-RLHF (train + eval) and its reference cache from the demo model."""
    root = tmp_path_factory.mktemp("train-data")
    # No prompt limit, as the default was: its drops keep this data (and the test's time) as small as it was sized.
    run_dpo("tokenize", "--data", f"{HH_DATA}:400", "--tokenizer", DEMO_MODEL, "--out", root / "tok",
            "--max-seq-length", "192", "--max-prompt-length", "0", "--eval-fraction", "0.1", check=True)
    run_dpo("cache-ref", "--tokenized", root / "tok", "--model", DEMO_MODEL, "--out", root / "ref", check=True)
    return {"tok": root / "tok", "ref": root / "ref", "root": root}


def train(data: dict[str, Path], out: Path, *extra, ref: bool = True, check: bool = True, env=None):
    args = ["train", "--tokenized", data["tok"], "--model", DEMO_MODEL, "--out", out,
            "--per-device-batch-size", "4", "--logging-steps", "1", "--learning-rate", "1e-3",
            "--warmup-ratio", "0", *extra]
    if ref:
        args[1:1] = ["--ref-cache", data["ref"]]
    return run_dpo(*args, check=check, env=env)


def rows(out: Path, eval_rows: bool = False) -> list[dict]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if ("eval/loss" in r) == eval_rows]


def losses_of(out: Path) -> np.ndarray:
    return np.array([r["loss"] for r in rows(out)])


# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def basic_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("basic") / "run"
    wandb_dir = tmp_path_factory.mktemp("wandb")
    proc = train(data, out, "--max-steps", "4", "--eval-steps", "2", "--save-every", "2",
                 "--wandb-project", "dpo-tests", "--report-to", "wandb,tensorboard", "--wandb-group", "tests",
                 env=dpo_env(WANDB_DIR=str(wandb_dir)))
    return out, proc, wandb_dir


def test_first_step_is_ln2_with_zero_rewards(basic_run):
    out, _, _ = basic_run
    first = rows(out)[0]
    assert first["step"] == 1
    assert abs(first["loss"] - LN2) < 1e-5
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(first[key]) < 1e-5, key
    assert first["logps/chosen"] < 0 and first["logps/rejected"] < 0
    # The model learns: with lr 1e-3 the DPO loss drops below ln 2 within a few steps.
    assert min(r["loss"] for r in rows(out)[1:]) < LN2


def test_metrics_rows_and_eval(basic_run):
    out, _, _ = basic_run
    train_rows = rows(out)
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    for row in train_rows:
        assert set(row) == METRIC_KEYS
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in row.values())
        assert 0.0 <= row["padding_fraction"] < 1.0 and row["tokens_per_second"] > 0
        assert 0.0 <= row["rewards/accuracies"] <= 1.0
        assert abs(row["rewards/margins"] - (row["rewards/chosen"] - row["rewards/rejected"])) < 1e-6
    evals = rows(out, eval_rows=True)
    assert [r["step"] for r in evals] == [2, 4]
    assert {"eval/loss", "eval/rewards/accuracies", "eval/rewards/margins", "eval/logps/chosen"} <= set(evals[0])


def test_batch_log_has_a_line_per_logging_step_and_the_eval_metrics(basic_run):
    """stderr is a pipe here, as in a Slurm job: one progress line per logged step, eval when computed."""
    out, proc, _ = basic_run
    lines = [line.split(": ", 1)[1] for line in proc.stderr.splitlines() if " INFO dpo.stages.train: " in line]
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split(" ", 2)[1] for line in steps] == ["1/4", "2/4", "3/4", "4/4"], proc.stderr
    pattern = (r"step \d/4 \(\d+%\) \| epoch [\d.]+ \| loss [\d.]+ \| rewards/accuracies [\d.]+ \| "
               r"rewards/margins -?[\d.]+ \| lr [\d.e+-]+ \| [\d,]+ tokens/s \| elapsed \d+:\d\d \| ETA \d+:\d\d$")
    assert all(re.match(pattern, line) for line in steps), steps
    first = rows(out)[0]
    assert f"loss {first['loss']:.4f}" in steps[0] and "lr 0.001" in steps[0]
    evals = [line for line in lines if line.startswith("eval at step")]
    assert [line.split(":")[0] for line in evals] == ["eval at step 2/4", "eval at step 4/4"]
    eval_row = rows(out, eval_rows=True)[0]
    assert f"eval/loss {eval_row['eval/loss']:.4g}" in evals[0] and "eval/rewards/accuracies" in evals[0]
    assert "Loading weights" not in proc.stderr and "Writing model shards" not in proc.stderr


def test_final_model_manifest_and_wandb(basic_run, data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, proc, wandb_dir = basic_run
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "train"
    assert {i["kind"] for i in manifest["inputs"]} == {"tokenized", "ref-logps"}
    assert manifest["config"]["beta"] == 0.1 and manifest["config"]["loss_type"] == "dpo"
    stats = manifest["stats"]
    assert stats["steps"] == 4 and stats["tokens"] > 0 and stats["peak_cpu_rss_bytes"] > 0
    assert stats["tokens_per_second"] > 0
    paths = {f["path"] for f in manifest["files"]}
    assert {"metrics.jsonl", "final/model.safetensors", "final/config.json", "final/tokenizer.json"} <= paths
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    base = AutoModelForCausalLM.from_pretrained(DEMO_MODEL)
    assert not torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)
    assert AutoTokenizer.from_pretrained(out / "final").chat_template
    # keep_last 2 of the checkpoints at step 2 (step 4 is the end: final/ holds it).
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]
    run_ids = [p.name.rsplit("-", 1)[-1] for p in (wandb_dir / "wandb").glob("offline-run-*")]
    assert run_ids == [stats["wandb_run_id"]]


def test_tensorboard_has_trl_names_and_the_whole_lineage(basic_run, data):
    """--report-to wandb,tensorboard: the event files read back with TRL's keys; the config that W&B and
    TensorBoard get holds train's options, tokenize's and cache-ref's settings, the data and fingerprints."""
    from test_tracking import read_tensorboard

    out, _, _ = basic_run
    scalars, text = read_tensorboard(out / "tensorboard")
    train_rows = rows(out)
    assert [s for s, _ in scalars["train/loss"]] == [r["step"] for r in train_rows]
    assert [v for _, v in scalars["train/rewards/margins"]] == pytest.approx([r["rewards/margins"] for r in train_rows])
    assert [s for s, _ in scalars["eval/rewards/accuracies"]] == [2, 4]
    config = json.loads(text.split("```json\n", 1)[1].rsplit("\n```", 1)[0])
    tok = json.loads((data["tok"] / "manifest.json").read_text())
    ref = json.loads((data["ref"] / "manifest.json").read_text())
    assert config["beta"] == 0.1 and config["fingerprint"] == json.loads((out / "manifest.json").read_text())["fingerprint"]
    assert config["tokenize"]["fingerprint"] == tok["fingerprint"] and config["tokenize"]["max_seq_length"] == 192
    assert config["cache_ref"]["fingerprint"] == ref["fingerprint"] and config["cache_ref"]["dtype"] == "float32"
    assert config["data"] == [{"source": f"{HH_DATA}:400", "sha256": tok["inputs"][0]["fingerprint"]}]
    assert "overwrite" not in config["tokenize"] and config["global_batch_size"] == 4


def test_rerun_after_completion_is_noop(basic_run, data):
    out, _, _ = basic_run
    before = (out / "manifest.json").read_text(), (out / "metrics.jsonl").read_text()
    proc = train(data, out, "--max-steps", "4", "--eval-steps", "2", "--save-every", "2",
                 "--wandb-project", "dpo-tests")
    assert "nothing to do" in proc.stderr
    assert ((out / "manifest.json").read_text(), (out / "metrics.jsonl").read_text()) == before


def test_concatenated_equals_separate_and_checkpointed(data, tmp_path):
    train(data, tmp_path / "c", "--max-steps", "3", "--forward", "concatenated")
    train(data, tmp_path / "s", "--max-steps", "3", "--forward", "separate", "--gradient-checkpointing")
    np.testing.assert_allclose(losses_of(tmp_path / "c"), losses_of(tmp_path / "s"), rtol=0, atol=1e-5)
    c, s = rows(tmp_path / "c"), rows(tmp_path / "s")
    # Separate batches pad each side to its own length: never more padding than one shared length.
    assert all(b["padding_fraction"] <= a["padding_fraction"] + 1e-9 for a, b in zip(c, s))


def test_grad_accumulation_equals_bigger_batch(data, tmp_path):
    from safetensors.torch import load_file

    train(data, tmp_path / "big", "--max-steps", "3", "--per-device-batch-size", "8")
    train(data, tmp_path / "acc", "--max-steps", "3", "--per-device-batch-size", "2", "--grad-accum", "4")
    big, acc = rows(tmp_path / "big"), rows(tmp_path / "acc")
    for a, b in zip(big, acc):
        for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (a["step"], key)
    # Adam's first steps are ~lr·sign(g), so a gradient near 0 turns rounding into a visible weight
    # difference; 1e-4 is a tenth of one update. grad_norm above compares the gradients themselves.
    wa = load_file(tmp_path / "big" / "final" / "model.safetensors")
    wb = load_file(tmp_path / "acc" / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=1e-4)


# First-step loss of every variant when policy == reference (z = 0, per-token ratios 0); beta defaults.
FIRST_LOSS = {
    "dpo": LN2,
    "dpo_norm": LN2,
    "ipo": (0 - 1 / (2 * 0.1)) ** 2,
    "hinge": 1.0,
    "robust": LN2,
}


def test_every_loss_type_trains(data, tmp_path):
    """In one process (the CLI only builds this config): six subprocesses would cost a minute of imports."""
    from dpo.pipeline.config import from_mapping
    from dpo.stages import train as stage

    for loss_type in ("dpo_norm", "simpo", "wpo", "ipo", "hinge", "robust"):
        out = tmp_path / loss_type
        stage.run(from_mapping(stage.TrainConfig, dict(
            tokenized=str(data["tok"]), model=str(DEMO_MODEL), out=str(out),
            ref_cache=None if loss_type == "simpo" else str(data["ref"]), loss_type=loss_type, max_steps=2,
            per_device_batch_size=4, logging_steps=1, learning_rate=1e-3, warmup_ratio=0.0, quiet=True)))
        first = rows(out)[0]
        assert all(math.isfinite(r["loss"]) for r in rows(out)), loss_type
        if loss_type in FIRST_LOSS:
            assert abs(first["loss"] - FIRST_LOSS[loss_type]) < 1e-4, (loss_type, first["loss"])
            assert abs(first["rewards/margins"]) < 1e-5, loss_type
        elif loss_type == "wpo":
            # Each pair's loss is ln 2 times a weight in (0, 1].
            assert 0 < first["loss"] <= LN2 + 1e-6
        else:
            # simpo: rewards are β times average log-probs, negative for any real model.
            assert first["rewards/chosen"] < 0 and first["rewards/rejected"] < 0
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["config"]["beta"] == {"dpo_norm": 5.0, "simpo": 2.0}.get(loss_type, 0.1)
        assert [i["kind"] for i in manifest["inputs"]] == (["tokenized"] if loss_type == "simpo" else
                                                             ["tokenized", "ref-logps"])


def test_lora_trains_only_the_adapter(data, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    train(data, out, "--max-steps", "3", "--lora", "--lora-rank", "4", "--lora-target-modules", "q_proj",
          "--lora-target-modules", "v_proj", "--save-every", "2")
    assert abs(rows(out)[0]["loss"] - LN2) < 1e-5
    final = out / "final"
    assert (final / "adapter_config.json").is_file() and not (final / "model.safetensors").exists()
    adapter = load_file(final / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert {k.split(".")[-3] for k in adapter} == {"q_proj", "v_proj"}
    assert any(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at 0: it trained
    base = AutoModelForCausalLM.from_pretrained(DEMO_MODEL)
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, final)
    for name, value in merged.get_base_model().state_dict().items():
        if "lora_" not in name:
            key = name.replace(".base_layer", "")
            torch.testing.assert_close(value, reference[key], rtol=0, atol=0)
    assert (out / "checkpoints" / "step-00000002" / "model" / "adapter_config.json").is_file()


def test_cache_of_other_tokens_is_refused(data, tmp_path):
    other = tmp_path / "tok-other"
    run_dpo("tokenize", "--data", f"{HH_DATA}:400", "--tokenizer", DEMO_MODEL, "--out", other,
            "--max-seq-length", "160", check=True)
    proc = run_dpo("train", "--tokenized", other, "--ref-cache", data["ref"], "--model", DEMO_MODEL,
                   "--out", tmp_path / "run", "--max-steps", "1")
    assert proc.returncode == 3, proc.stderr
    assert str(data["ref"]) in proc.stderr and "tokenized" in proc.stderr
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_cache_of_another_model_warns_and_trains(data, tmp_path, tiny_llama):
    # As when continuing from a DPO checkpoint with the SFT model's cache as the reference.
    proc = run_dpo("train", "--tokenized", data["tok"], "--ref-cache", data["ref"], "--model", tiny_llama,
                   "--out", tmp_path / "run", "--max-steps", "1", "--per-device-batch-size", "2", check=True)
    assert "WARNING" in proc.stderr and str(tiny_llama) in proc.stderr
    assert (tmp_path / "run" / "manifest.json").is_file()


def test_model_with_a_smaller_vocabulary_is_refused(data, tmp_path):
    """Token ids past the model's embedding table: exit 2 naming both sizes, before anything runs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from refusals import file_hashes

    small = tmp_path / "small"
    LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(small)
    before = file_hashes(data["tok"], data["ref"], small)
    proc = run_dpo("train", "--tokenized", data["tok"], "--ref-cache", data["ref"], "--model", small,
                   "--out", tmp_path / "run", "--max-steps", "1")
    assert proc.returncode == 2, proc.stderr
    assert f"model {small} has a vocabulary of 100 tokens" in proc.stderr
    assert f"--tokenizer {DEMO_MODEL}, a tokenizer of 512 tokens" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "manifest.json").exists()
    assert file_hashes(data["tok"], data["ref"], small) == before


def test_bad_options_exit_2(data, tmp_path):
    proc = train(data, tmp_path / "r", "--loss-type", "robust", "--label-smoothing", "0.5", check=False)
    assert proc.returncode == 2 and "label-smoothing" in proc.stderr
    proc = train(data, tmp_path / "r", "--max-steps", "1", ref=False, check=False)
    assert proc.returncode == 2 and "--ref-cache" in proc.stderr


# ---------------------------------------------------------------------------------------------
# Faults: SIGKILL mid-epoch, SIGTERM (pre-emption), then resume.


def _start(data, out: Path, *extra, env: dict | None = None) -> subprocess.Popen:
    args = [*DPO, "train", "--tokenized", data["tok"], "--ref-cache", data["ref"], "--model", DEMO_MODEL,
            "--out", out, "--per-device-batch-size", "2", "--logging-steps", "1", "--learning-rate", "1e-3",
            *extra]
    return subprocess.Popen([str(a) for a in args], env=env or dpo_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_step(out: Path, proc: subprocess.Popen, step: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training ended before step {step}: {proc.communicate()[1][-2000:]}")
        path = out / "metrics.jsonl"
        if path.is_file() and any(json.loads(line)["step"] >= step for line in path.read_text().splitlines()
                                  if line.endswith("}")):
            return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout}s")


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted(data, tmp_path):
    common = ("--epochs", "2", "--save-every", "5", "--seed", "7", "--lr-scheduler", "cosine")
    ref = _start(data, tmp_path / "ref", *common)
    assert ref.wait(timeout=600) == 0, ref.communicate()[1][-2000:]
    total = len(rows(tmp_path / "ref"))
    assert total > 30  # two epochs: the kill lands in the first, past a checkpoint

    out = tmp_path / "killed"
    proc = _start(data, out, *common)
    _wait_for_step(out, proc, 13)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    time.sleep(1.5)  # the killed job's lock heartbeat goes stale after --lock-timeout 1
    resumed = _start(data, out, *common, "--lock-timeout", "1")
    stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr[-2000:]
    resumed_from = int(stderr.split("resuming from step ")[1].split()[0])
    assert resumed_from >= 10 and resumed_from % 5 == 0 and resumed_from < total // 2  # mid first epoch
    a, b = rows(tmp_path / "ref"), rows(out)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=0, atol=1e-6)
    np.testing.assert_allclose([r["learning_rate"] for r in b], [r["learning_rate"] for r in a], rtol=1e-12)


@pytest.mark.slow
def test_sigterm_checkpoints_exits_75_and_refuses_other_config(data, tmp_path):
    out = tmp_path / "run"
    common = ("--max-steps", "40", "--save-every", "100", "--seed", "3", "--wandb-project", "dpo-tests")
    env = dpo_env(WANDB_DIR=str(tmp_path))
    proc = _start(data, out, *common, env=env)
    _wait_for_step(out, proc, 3)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr[-2000:]
    # A pause, not a failure: worded as such.
    assert "dpo train: pre-empted: stopped by SIGTERM after step" in stderr and "error" not in stderr, stderr[-2000:]
    saved = sorted((out / "checkpoints").iterdir())
    assert len(saved) == 1 and (saved[0] / "manifest.json").is_file()
    stopped_at = int(saved[0].name.split("-")[1])
    assert stopped_at >= 3

    other = _start(data, out, "--max-steps", "40", "--save-every", "100", "--seed", "3", "--learning-rate", "2e-3")
    _, stderr = other.communicate(timeout=120)
    assert other.returncode == 3 and "learning_rate" in stderr, stderr[-2000:]

    resumed = _start(data, out, *common, env=env)
    _, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr[-2000:]
    assert f"resuming from step {stopped_at}" in stderr
    assert [r["step"] for r in rows(out)] == list(range(1, 41))
    # Both sessions logged to one W&B run: the id came back from the checkpoint.
    run_ids = {p.name.rsplit("-", 1)[-1] for p in (tmp_path / "wandb").glob("offline-run-*")}
    assert run_ids == {json.loads((out / "manifest.json").read_text())["stats"]["wandb_run_id"]}
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 2


# ---------------------------------------------------------------------------------------------
# The losses of issue #12 through the trainer: values, micro-batch semantics, state, fingerprints.


@pytest.fixture(scope="module")
def moved_policy(tmp_path_factory) -> Path:
    """The demo model with every weight nudged by 2% of its tensor's spread: a policy that differs
    from the reference the cache was made with (summed log-ratios of a few nats)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("moved") / "model"
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02 * p.std())
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(DEMO_MODEL).save_pretrained(out)
    return out


def train_in_process(data, out: Path, model: Path, *, ref: bool = True, **options):
    from dpo.pipeline.config import from_mapping
    from dpo.stages import train as stage

    settings = dict(tokenized=str(data["tok"]), model=str(model), out=str(out), ref_cache=str(data["ref"]) if ref else None,
                    max_steps=3, per_device_batch_size=4, logging_steps=1, learning_rate=1e-6, warmup_ratio=0.0,
                    quiet=True)
    stage.run(from_mapping(stage.TrainConfig, {**settings, **options}))
    return rows(out)


def step_one_scores(data, model: Path, per_device: int, grad_accum: int) -> list[dict[str, np.ndarray]]:
    """Per micro-batch of step 1: the policy's summed (and shared-length) log-probs, scored as the
    trainer scores them, and the reference cache's values, as float64 arrays."""
    from dpo.artifacts.shards import ArtifactReader
    from dpo.pipeline.batching import pad_token_id
    from dpo.pipeline.data_order import BatchOrder, Cursor, micro_batches
    from dpo.pipeline.logprobs import LabelLogProbs
    from dpo.pipeline.modeling import load_causal_lm
    from dpo.pipeline.refcache import load_reference
    from dpo.pipeline.scoring import PairScorer
    from dpo.pipeline.batching import pair_indices, pair_lengths

    reader = ArtifactReader(data["tok"], kind="tokenized")
    table = reader.read_split("train")
    lengths = pair_lengths(table)
    batch = BatchOrder(lengths, per_device * grad_accum, seed=42).batch(Cursor())
    scorer = PairScorer(LabelLogProbs(load_causal_lm(model)), "concatenated", pad_token_id(reader.manifest.stats),
                        "cpu", with_shared=True)
    reference = load_reference(data["ref"], data["tok"], ["train"], shared=True)
    out = []
    for micro in micro_batches(batch, lengths, per_device, grad_accum, 1, 0):
        pairs = table.take(micro)
        with torch.no_grad():
            scores = scorer(pairs)
        ref = reference.lookup(torch.from_numpy(pair_indices(pairs)))
        f = lambda x: x.double().numpy()  # noqa: E731
        out.append({"pc": f(scores.chosen.logps), "pr": f(scores.rejected.logps), "nc": f(scores.chosen.num_tokens),
                    "nr": f(scores.rejected.num_tokens), "pc_k": f(scores.chosen.shared_logps),
                    "pr_k": f(scores.rejected.shared_logps), "rc": f(ref["chosen_logps"]), "rr": f(ref["rejected_logps"]),
                    "rc_k": f(ref["chosen_shared_logps"]), "rr_k": f(ref["rejected_shared_logps"])})
    return out


def softplus(x):
    return np.logaddexp(0.0, x)


def sigma(x):
    return 1 / (1 + np.exp(-x))


def formula(name: str, v: dict, batch_nll: float, beta: float = 0.1, eps: float = 0.0, tau: float = 0.05,
            ld_alpha: float | None = None, phi=lambda x: x) -> np.ndarray:
    """One component's per-example loss on a micro-batch, written from the papers (not losses.py)."""
    if ld_alpha is not None:
        v = {**v, **{k: v[f"{k}_k"] + ld_alpha * (v[k] - v[f"{k}_k"]) for k in ("pc", "pr", "rc", "rr")}}
    lc, lr = v["pc"] - v["rc"], v["pr"] - v["rr"]
    d = phi(lc) - phi(lr)
    cdpo = lambda x: (1 - eps) * softplus(-x) + eps * softplus(x)  # noqa: E731
    if name == "dpo":
        return cdpo(beta * d)
    if name == "dpo_norm":
        return cdpo(beta * (phi(lc) / v["nc"] - phi(lr) / v["nr"]))
    if name == "exo_pair":
        q = sigma(beta * d)
        return q * (np.log(q) - np.log1p(-eps)) + (1 - q) * (np.log(1 - q) - np.log(eps))
    if name == "nca_pair":
        return softplus(-beta * lc) + 0.5 * softplus(beta * lc) + 0.5 * softplus(beta * lr)
    if name == "bco_pair":
        return softplus(-beta * lc) + softplus(beta * lr)
    if name == "sppo_hard":
        return (lc - 0.5 / beta) ** 2 + (lr + 0.5 / beta) ** 2
    if name == "aot":
        return cdpo(beta * (np.sort(v["pc"] - v["pr"]) - np.sort(v["rc"] - v["rr"])))
    if name == "aot_unpaired":
        return cdpo(beta * (np.sort(lc) - np.sort(lr)))
    if name == "apo_zero":
        return 1 - sigma(beta * lc) + sigma(beta * lr)
    if name == "apo_down":
        return sigma(beta * lc) + 1 - sigma(beta * (lc - lr))
    if name == "discopop":
        m = sigma(beta * d / tau)
        return (1 - m) * softplus(-beta * d) + m * np.exp(-beta * d)
    if name == "sft":
        return np.full(len(lc), batch_nll)
    raise AssertionError(name)


# (options, components with weights, per-device batch, accumulation); the global batch is 4 pairs.
NEW_LOSS_RUNS = {
    "exo_pair": (dict(loss_type="exo_pair", label_smoothing=1e-3), {"exo_pair": 1.0}, 4, 1),
    "nca_pair": (dict(loss_type="nca_pair"), {"nca_pair": 1.0}, 4, 1),
    "bco_pair": (dict(loss_type="bco_pair"), {"bco_pair": 1.0}, 4, 1),
    "sppo_hard": (dict(loss_type="sppo_hard"), {"sppo_hard": 1.0}, 4, 1),
    "aot": (dict(loss_type="aot"), {"aot": 1.0}, 2, 2),  # sorted within each of two micro-batches
    "aot_unpaired": (dict(loss_type="aot_unpaired", label_smoothing=0.1), {"aot_unpaired": 1.0}, 2, 2),
    "apo_zero": (dict(loss_type="apo_zero"), {"apo_zero": 1.0}, 4, 1),
    "apo_down": (dict(loss_type="apo_down"), {"apo_down": 1.0}, 4, 1),
    "discopop": (dict(loss_type="discopop", discopop_tau=0.5), {"discopop": 1.0}, 4, 1),
    "sft": (dict(loss_type="sft"), {"sft": 1.0}, 2, 2),  # reference-free
    "mpo": (dict(loss_type="sigmoid,bco_pair,sft", loss_weights="0.8,0.2,1", bco_reward_shift=True),
            {"dpo": 0.8, "bco_pair": 0.2, "sft": 1.0}, 2, 2),
    "ld": (dict(loss_type="sigmoid_norm", ld_alpha=0.5, beta=0.1), {"dpo_norm": 1.0}, 4, 1),
    "js": (dict(loss_type="dpo", f_divergence="js_divergence"), {"dpo": 1.0}, 4, 1),
}


def test_new_losses_first_step_equals_their_formula(data, moved_policy, tmp_path):
    """Every new loss trains 3 steps through `dpo train` (in one process: 13 runs), from a policy that
    is not the reference, and its first logged loss (and each component's) is the paper's formula on
    step 1's pairs: the mean over the global batch of each micro-batch's per-example losses."""
    from safetensors.torch import load_file

    start = load_file(moved_policy / "model.safetensors")
    for name, (options, weights, per_device, accum) in NEW_LOSS_RUNS.items():
        out = tmp_path / name
        logged = train_in_process(data, out, moved_policy, ref=name != "sft", per_device_batch_size=per_device,
                                  grad_accum=accum, **options)
        assert [r["step"] for r in logged] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in logged), name
        micros = step_one_scores(data, moved_policy, per_device, accum)
        batch_nll = -sum(v["pc"].sum() for v in micros) / sum(v["nc"].sum() for v in micros)
        kwargs = dict(eps=options.get("label_smoothing", 0.0), tau=options.get("discopop_tau", 0.05),
                      ld_alpha=options.get("ld_alpha"),
                      phi=(lambda x: math.log(2) - softplus(-x)) if "f_divergence" in options else (lambda x: x))
        expected = {k: np.mean([formula(k, v, batch_nll, **kwargs).mean() for v in micros]) for k in weights}
        first = logged[0]
        assert first["loss"] == pytest.approx(sum(w * expected[k] for k, w in weights.items()), rel=1e-5), name
        if len(weights) > 1:
            assert [k for k in first if k.startswith("loss/")] == [f"loss/{k}" for k in weights]
            for k in weights:
                assert first[f"loss/{k}"] == pytest.approx(expected[k], rel=1e-5), (name, k)
        lc = np.concatenate([v["pc"] - v["rc"] for v in micros])
        assert np.abs(lc).max() > 0.5, "the policy must differ from the reference for the check to mean anything"
        if name == "ld":  # dpo_norm's rewards: β·lc/nc of the length-desensitised sums
            alpha = options["ld_alpha"]
            lc = np.concatenate([(v["pc_k"] - v["rc_k"] + alpha * (v["pc"] - v["pc_k"] - v["rc"] + v["rc_k"])) / v["nc"]
                                 for v in micros])
        if name != "sft":
            assert first["rewards/chosen"] == pytest.approx(0.1 * lc.mean(), rel=1e-5, abs=1e-7), name
        # it trained: a tiny learning rate, not zero (zero is refused)
        final = load_file(out / "final" / "model.safetensors")
        assert any(not torch.equal(final[k], start[k]) for k in start), name


def test_aot_fingerprints_the_micro_batch_and_reference_free_losses(data, tmp_path):
    """aot's value depends on which pairs share a micro-batch: the same global batch split another way
    is another run. dpo's is not (only the global batch is fingerprinted). A combination that needs the
    reference refuses to run without it, naming the loss."""
    from dpo.artifacts.errors import ArtifactError, UsageError

    train_in_process(data, tmp_path / "aot", DEMO_MODEL, loss_type="aot", max_steps=1)
    with pytest.raises(ArtifactError, match="fingerprint"):
        train_in_process(data, tmp_path / "aot", DEMO_MODEL, loss_type="aot", max_steps=1, per_device_batch_size=2,
                         grad_accum=2)
    train_in_process(data, tmp_path / "dpo", DEMO_MODEL, max_steps=1)
    train_in_process(data, tmp_path / "dpo", DEMO_MODEL, max_steps=1, per_device_batch_size=2, grad_accum=2)
    with pytest.raises(UsageError, match="--loss-type sft,apo_zero: apo_zero compares the policy with a reference"):
        train_in_process(data, tmp_path / "x", DEMO_MODEL, ref=False, loss_type="sft,apo_zero", max_steps=1)


def test_batch_level_sft_is_the_same_for_any_micro_batch_split(data, tmp_path):
    """sft is the token-weighted NLL of the global batch: with the global batch's token count in every
    micro-batch, 4 micro-batches of 2 give the loss and gradient of one batch of 8 (TRL's per-device
    token mean would not)."""
    options = dict(loss_type="sigmoid,bco_pair,sft", loss_weights="0.8,0.2,1", learning_rate=1e-3, eval_steps=3)
    big = train_in_process(data, tmp_path / "big", DEMO_MODEL, per_device_batch_size=8, **options)
    acc = train_in_process(data, tmp_path / "acc", DEMO_MODEL, per_device_batch_size=2, grad_accum=4, **options)
    for a, b in zip(big, acc):
        for key in ("loss", "loss/dpo", "loss/bco_pair", "loss/sft", "rewards/margins", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (a["step"], key)
    evals = rows(tmp_path / "big", eval_rows=True)
    assert {"eval/loss/dpo", "eval/loss/bco_pair", "eval/loss/sft"} <= set(evals[0])


def test_bco_reward_shift_is_checkpointed_and_resumes_exactly(data, tmp_path, monkeypatch):
    """bco_pair's running mean is trainer state: a run stopped after step 2 and resumed logs the same
    losses as an uninterrupted one. Step 3 is the first whose δ is not 0 (the step-1 policy is the
    reference), and it differs from a run without the shift, so a resume that lost δ would too."""
    from dpo.artifacts.errors import Preempted
    from dpo.artifacts.runner import StageRun

    options = dict(loss_type="bco_pair", bco_reward_shift=True, max_steps=3, learning_rate=1e-3, save_every="100")
    whole = train_in_process(data, tmp_path / "whole", DEMO_MODEL, **options)
    calls = []

    def stop_after_step_2(self):
        calls.append(1)
        return len(calls) == 2

    with monkeypatch.context() as patch:
        patch.setattr(StageRun, "stop_requested", stop_after_step_2)
        with pytest.raises(Preempted):
            train_in_process(data, tmp_path / "resumed", DEMO_MODEL, **options)
    saved = json.loads((tmp_path / "resumed" / "checkpoints" / "step-00000002" / "manifest.json").read_text())
    assert saved["trainer_state"]["loss_state"]["bco_reward_shift"]["pairs"] == 8
    resumed = train_in_process(data, tmp_path / "resumed", DEMO_MODEL, **options)
    np.testing.assert_allclose([r["loss"] for r in resumed], [r["loss"] for r in whole], rtol=0, atol=1e-6)
    plain = train_in_process(data, tmp_path / "plain", DEMO_MODEL, **{**options, "bco_reward_shift": False})
    assert [r["loss"] for r in plain[:2]] == pytest.approx([r["loss"] for r in whole[:2]], abs=1e-7)
    assert abs(plain[2]["loss"] - whole[2]["loss"]) > 1e-4
    manifest = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert manifest["stats"]["loss_state"]["bco_reward_shift"]["pairs"] == 12  # what evaluate reads
