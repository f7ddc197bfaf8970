"""`dpo export`: loadable Hugging Face folders with the trained policy's logits, LoRA merged or not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import HH_DATA, build_tiny_llama, dpo_env, run_dpo

from dpo.artifacts.fingerprint import sha256_file


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A full-weights run (checkpoints at steps 2 and 4) and a LoRA run of a tiny Llama."""
    root = tmp_path_factory.mktemp("export")
    model = build_tiny_llama(root / "tiny-llama")
    spec = {
        "run_dir": str(root / "run"), "model": str(model),
        "tokenize": {"data": [f"{HH_DATA}:40"], "tokenizer": str(model), "eval_fraction": 0.2,
                     "max_seq_length": 80, "max_prompt_length": 40},
        "cache-ref": {"batch_size": 8},
        "train": {"max_steps": 4, "per_device_batch_size": 4, "learning_rate": 5e-3, "warmup_ratio": 0.0,
                  "logging_steps": 1, "save_every": "2", "keep_last": 3, "eval_steps": 2},
    }
    (root / "run.yaml").write_text(yaml.safe_dump(spec))
    run_dpo("run", "--config", root / "run.yaml", check=True)
    run = root / "run"
    lora = root / "lora-train"
    # A large learning rate so the adapter is far from its zero start: merging must then matter.
    run_dpo("train", "--tokenized", run / "tokenized", "--ref-cache", run / "ref-logps", "--model", model,
            "--out", lora, "--lora", "--lora-rank", "4", "--lora-alpha", "8", "--lora-dropout", "0",
            "--learning-rate", "5e-2", "--max-steps", "2", "--per-device-batch-size", "4", "--warmup-ratio", "0",
            check=True)
    return {"base": model, "run": run, "train": run / "train", "tokenized": run / "tokenized", "lora": lora}


def logits(model_or_dir, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = model_or_dir
    if isinstance(model_or_dir, Path):
        model = AutoModelForCausalLM.from_pretrained(model_or_dir)
    with torch.no_grad():
        return model.eval()(ids).logits.float()


PROBE = torch.tensor([[1, 30, 99, 250, 7, 411, 12, 3, 77, 500]])


def test_full_model_export(runs, tmp_path):
    out = tmp_path / "model"
    proc = run_dpo("export", "--train", runs["train"], "--out", out)
    assert proc.returncode == 0, proc.stderr
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "README.md", "manifest.json"):
        assert (out / name).is_file(), name
    assert torch.equal(logits(out, PROBE), logits(runs["train"] / "final", PROBE))
    assert not torch.allclose(logits(out, PROBE), logits(runs["base"], PROBE))  # it did train

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenized = json.loads((runs["tokenized"] / "manifest.json").read_text())
    assert tokenizer.chat_template and tokenizer.chat_template == AutoTokenizer.from_pretrained(runs["base"]).chat_template
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] is not None and generation["pad_token_id"] is not None

    manifest = json.loads((out / "manifest.json").read_text())
    train_manifest = json.loads((runs["train"] / "manifest.json").read_text())
    assert manifest["kind"] == "model"
    assert manifest["inputs"] == [{"kind": "train", "path": str(runs["train"]),
                                   "fingerprint": train_manifest["fingerprint"]}]
    assert manifest["config"]["checkpoint"] == "final" and manifest["config"]["dtype"] == "float32"
    for entry in manifest["files"]:
        assert sha256_file(out / entry["path"]) == entry["sha256"]
    assert {"model.safetensors", "README.md", "config.json"} <= {f["path"] for f in manifest["files"]}

    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == "tiny-llama" == runs["base"].name  # a local model: its name
    assert front["datasets"] == ["hh-rlhf-harmless-test"] and front["library_name"] == "transformers"
    assert front["tags"][0] == "dpo" and "license" not in front  # the tiny base model has no licence
    assert "\n# tiny-llama-dpo\n" in card  # the folder is called "model": the title says what it is
    assert str(runs["base"]) in card and "hh-rlhf-harmless-test.jsonl.gz" in card
    total = sum(tokenized["stats"]["pairs"].values())
    assert f"| hh | {total:,} |" in card  # the source, its format and its pair count
    assert "| loss_type | `dpo` |" in card and "| beta | `0.1` |" in card and "| learning_rate | `0.005` |" in card
    assert "| total batch size (pairs per step) | `4` |" in card and "| max_seq_length | `80` |" in card
    # Only what mattered: no None, no LoRA settings for a full fine-tune, no unused SimPO margin.
    for absent in ("None", "lora", "gamma_beta_ratio", "zero_stage", "label_smoothing"):
        assert absent not in card, absent
    last = [json.loads(line) for line in (runs["train"] / "metrics.jsonl").read_text().splitlines()]
    last_train, last_eval = [r for r in last if "loss" in r][-1], [r for r in last if "eval/loss" in r][-1]
    assert last_eval["step"] == 4  # the card's eval column is the final eval
    assert (f"| `rewards/accuracies` | {last_train['rewards/accuracies']:.4g} "
            f"| {last_eval['eval/rewards/accuracies']:.4g} |") in card
    assert f"| `loss` | {last_train['loss']:.4g} | {last_eval['eval/loss']:.4g} |" in card
    # HH-RLHF text went in without a chat template: the usage snippet prompts the same way.
    assert 'prompt = "\\n\\nHuman: How do I bake bread?\\n\\nAssistant:"' in card
    assert "apply_chat_template" not in card
    for fingerprint in (tokenized["fingerprint"], train_manifest["fingerprint"], manifest["fingerprint"]):
        assert fingerprint in card

    again = run_dpo("export", "--train", runs["train"], "--out", out)
    assert again.returncode == 0 and "nothing to do" in again.stderr


def test_dtype_and_checkpoints(runs, tmp_path):
    out = tmp_path / "bf16"
    run_dpo("export", "--train", runs["train"], "--out", out, "--dtype", "bfloat16", check=True)
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"

    step2 = tmp_path / "step2"
    run_dpo("export", "--train", runs["train"], "--out", step2, "--checkpoint", "step-2", check=True)
    checkpoint = runs["train"] / "checkpoints" / "step-00000002" / "model"
    assert torch.equal(logits(step2, PROBE), logits(checkpoint, PROBE))
    assert not torch.equal(logits(step2, PROBE), logits(runs["train"] / "final", PROBE))
    card = (step2 / "README.md").read_text()
    assert "checkpoint `step-00000002`" in card and "last logged training step (2)" in card
    # A checkpoint's model/ carries the tokenizer: it loads on its own.
    from transformers import AutoTokenizer

    own, base = AutoTokenizer.from_pretrained(checkpoint), AutoTokenizer.from_pretrained(runs["base"])
    assert own.chat_template == base.chat_template and own("Human: hi").input_ids == base("Human: hi").input_ids

    proc = run_dpo("export", "--train", runs["train"], "--out", tmp_path / "x", "--checkpoint", "step-3")
    assert proc.returncode == 3
    assert "no complete checkpoint step-3 (complete checkpoints: step-2)" in proc.stderr
    proc = run_dpo("export", "--train", runs["train"], "--out", tmp_path / "y", "--no-merge")
    assert proc.returncode == 2 and "not a LoRA adapter" in proc.stderr


def test_lora_merged_and_adapter_exports_give_the_peft_logits(runs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(runs["base"]), runs["lora"] / "final")
    expected = logits(peft, PROBE)
    assert not torch.allclose(expected, logits(runs["base"], PROBE), atol=1e-3)  # the adapter matters

    merged = tmp_path / "merged"
    run_dpo("export", "--train", runs["lora"], "--out", merged, check=True)
    assert not (merged / "adapter_config.json").exists()
    torch.testing.assert_close(logits(merged, PROBE), expected, atol=1e-5, rtol=1e-5)
    card = (merged / "README.md").read_text()
    assert "the LoRA adapter is merged into the base weights" in card and "library_name: transformers" in card
    assert "| lora_rank | `4` |" in card and "| lora_alpha | `8` |" in card

    adapter = tmp_path / "adapter"
    run_dpo("export", "--train", runs["lora"], "--out", adapter, "--no-merge", check=True)
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "model.safetensors").exists()
    # transformers loads an adapter folder through the base model path it records.
    torch.testing.assert_close(logits(adapter, PROBE), expected, atol=1e-6, rtol=1e-6)
    card = (adapter / "README.md").read_text()
    assert "library_name: peft" in card and "A LoRA adapter for `tiny-llama`" in card and "- lora" in card


def test_push_to_hub_offline_keeps_the_local_export(runs, tmp_path):
    out = tmp_path / "model"
    proc = run_dpo("export", "--train", runs["train"], "--out", out, "--push-to-hub", "someone/dpo-demo",
                   env=dpo_env(HF_HUB_OFFLINE="1"))
    assert proc.returncode == 5, proc.stderr
    assert "upload failed" in proc.stderr and f"The local export in {out} is complete" in proc.stderr
    assert (out / "manifest.json").is_file()


def test_card_names_hub_ids_licence_and_chat_usage(tmp_path):
    from dpo.pipeline import report

    base = tmp_path / "Qwen2-0.5B-Instruct"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n- chat\n---\n# Qwen\n")
    assert report.model_license(str(base)) == "apache-2.0" and report.model_license(str(tmp_path)) is None
    assert report.hub_or_local_name("HuggingFaceH4/ultrafeedback_binarized:0.5") == "HuggingFaceH4/ultrafeedback_binarized"
    assert report.hub_or_local_name("/hf/hub/models--Qwen--Qwen2-0.5B/snapshots/abc") == "Qwen/Qwen2-0.5B"
    assert report.hub_or_local_name("/data/my prefs.jsonl:100") == "my-prefs"

    card = report.model_card({
        "title": "qwen-dpo", "base_model": str(base), "base_model_id": report.hub_or_local_name(str(base)),
        "license": report.model_license(str(base)), "datasets": ["HuggingFaceH4/ultrafeedback_binarized"],
        "chat": True, "load_path": "org/qwen-dpo", "checkpoint": "final", "dtype": "bfloat16",
        "train_config": {"loss": {"loss_type": "dpo,sft", "beta": 0.1, "loss_weights": [1.0, 0.5]},
                         "learning_rate": 5e-7, "lora": False, "lora_rank": 16, "zero_stage": None},
    })
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == "Qwen2-0.5B-Instruct" and front["license"] == "apache-2.0"
    assert front["datasets"] == ["HuggingFaceH4/ultrafeedback_binarized"] and front["library_name"] == "transformers"
    assert front["tags"][:3] == ["dpo", "sft", "preference-optimization"]  # each loss of the combination, once
    assert "tokenizer.apply_chat_template(messages, add_generation_prompt=True" in card
    assert "| loss_weights | `1.0, 0.5` |" in card and "lora_rank" not in card and "None" not in card
