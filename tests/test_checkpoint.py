"""CheckpointManager: atomic saves, exact restore, retention, and refusing checkpoints of other runs.

These run in one process on CPU with a real (tiny) Llama, a real Accelerator and AdamW; the
multi-process and crash tests are in test_distributed_train.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from dpo.artifacts.manifest import InputRef
from dpo.pipeline.accel import generate_deepspeed_config
from dpo.pipeline.checkpoint import MANIFEST, CheckpointManager, describe_difference
from dpo.artifacts.errors import ArtifactError

from conftest import REPO, build_tiny_llama

CONFIG = {"learning_rate": 1e-5, "beta": 0.1, "loss_type": "dpo"}
INPUTS = [InputRef("tokenized", "/data/tok", "aaaa"), InputRef("ref-logps", "/data/ref", "rrrr")]


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(True)


def _setup(accelerator, model_dir: Path, lora: bool = False):
    from transformers import AutoModelForCausalLM, get_scheduler

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=10)
    return model, optimizer, scheduler


def _step(model, optimizer, scheduler, accelerator) -> float:
    # Random data and dropout-like noise from the global RNG: a restored RNG is needed to match.
    ids = torch.randint(0, 512, (2, 12))
    loss = model(input_ids=ids, labels=ids).loss * (1 + 0.1 * torch.rand(()))
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()
    return loss.item()


def _manager(root: Path, accelerator, config=CONFIG, inputs=INPUTS, fp="fp-1", keep_last=0):
    return CheckpointManager(root, accelerator=accelerator, fingerprint=fp, config=config, keep_last=keep_last,
                             inputs=inputs)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_resume_continues_exactly(tmp_path, accelerator, lora):
    model_dir = build_tiny_llama(tmp_path / "m")
    model, optimizer, scheduler = _setup(accelerator, model_dir, lora)
    manager = _manager(tmp_path / "checkpoints", accelerator)
    for _ in range(3):
        _step(model, optimizer, scheduler, accelerator)
    path = manager.save(3, model, optimizer, scheduler, {"step": 3, "tokens_seen": 72, "wandb_run_id": "abc"},
                        data_cursor={"epoch": 0, "samples": 6})
    expected = [_step(model, optimizer, scheduler, accelerator) for _ in range(3)]
    expected_params = {n: p.detach().clone() for n, p in model.named_parameters()}

    assert path.name == "step-00000003" and (path / MANIFEST).is_file()
    saved = json.loads((path / MANIFEST).read_text())
    assert saved["world_size"] == 1 and saved["zero_stage"] is None and saved["config"]["learning_rate"] == 1e-5
    assert (path / "model" / ("adapter_model.safetensors" if lora else "model.safetensors")).is_file()
    if lora:  # only the adapter is saved, not the frozen base
        assert not (path / "model" / "model.safetensors").exists()

    torch.manual_seed(1234)  # a fresh process: other weights, other RNG
    model2, optimizer2, scheduler2 = _setup(accelerator, model_dir, lora)
    with torch.no_grad():
        for p in model2.parameters():
            if p.requires_grad:
                p.add_(0.5)
    state = _manager(tmp_path / "checkpoints", accelerator).load_latest(model2, optimizer2, scheduler2)
    assert state == {"step": 3, "tokens_seen": 72, "wandb_run_id": "abc", "data_cursor": {"epoch": 0, "samples": 6}}
    resumed = [_step(model2, optimizer2, scheduler2, accelerator) for _ in range(3)]
    assert resumed == expected  # bit-exact on CPU
    for name, p in model2.named_parameters():
        assert torch.equal(p, expected_params[name]), name


def test_nothing_to_resume(tmp_path, accelerator):
    assert _manager(tmp_path / "checkpoints", accelerator).load_latest(None, None, None) is None


def test_manifest_last_partial_ignored_and_cleaned(tmp_path, accelerator):
    model, optimizer, scheduler = _setup(accelerator, build_tiny_llama(tmp_path / "m"))
    root = tmp_path / "checkpoints"
    manager = _manager(root, accelerator)
    manager.save(1, model, optimizer, scheduler, {"step": 1})
    # What crashes leave behind: a save interrupted before its rename, and a step folder without
    # a manifest (e.g. copied by hand or a filesystem that lost the manifest).
    shutil.copytree(root / "step-00000001", root / "step-00000002.partial")
    (root / "step-00000002.partial" / MANIFEST).unlink()
    shutil.copytree(root / "step-00000001", root / "step-00000003")
    (root / "step-00000003" / MANIFEST).unlink()
    assert manager.latest().step == 1
    assert [p.name for p in manager.incomplete()] == ["step-00000002.partial", "step-00000003"]

    manager.save(2, model, optimizer, scheduler, {"step": 2})
    assert sorted(p.name for p in root.iterdir()) == ["step-00000001", "step-00000002"]
    assert manager.latest().step == 2
    # Saving the same step again (a pre-emption right after a periodic save) is a no-op.
    before = (root / "step-00000002" / MANIFEST).read_text()
    manager.save(2, model, optimizer, scheduler, {"step": 2, "other": 1})
    assert (root / "step-00000002" / MANIFEST).read_text() == before


def test_keep_last(tmp_path, accelerator):
    model, optimizer, scheduler = _setup(accelerator, build_tiny_llama(tmp_path / "m"))
    manager = _manager(tmp_path / "checkpoints", accelerator, keep_last=2)
    for step in range(1, 5):
        manager.save(step, model, optimizer, scheduler, {"step": step})
    assert [c.step for c in manager.complete()] == [3, 4]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000003", "step-00000004"]


def test_damaged_checkpoint_named(tmp_path, accelerator):
    model, optimizer, scheduler = _setup(accelerator, build_tiny_llama(tmp_path / "m"))
    manager = _manager(tmp_path / "checkpoints", accelerator)
    path = manager.save(1, model, optimizer, scheduler, {"step": 1})
    with open(path / "state" / "optimizer.pt", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ArtifactError, match=r"optimizer\.pt: 10 bytes, the checkpoint manifest says \d+ bytes"):
        manager.load_latest(model, optimizer, scheduler)


def test_other_config_or_inputs_refused_with_what_differs(tmp_path, accelerator):
    model, optimizer, scheduler = _setup(accelerator, build_tiny_llama(tmp_path / "m"))
    _manager(tmp_path / "checkpoints", accelerator).save(1, model, optimizer, scheduler, {"step": 1})
    changed = _manager(tmp_path / "checkpoints", accelerator, config={**CONFIG, "learning_rate": 2e-5},
                       inputs=[InputRef("tokenized", "/data/tok2", "bbbb"), INPUTS[1]], fp="fp-2")
    with pytest.raises(ArtifactError) as info:
        changed.load_latest(model, optimizer, scheduler)
    message = str(info.value)
    assert "step-00000001 was made by a run with another config or inputs" in message
    assert "learning_rate: 1e-05 -> 2e-05" in message
    assert "tokenized artifact fingerprint aaaa -> bbbb (/data/tok -> /data/tok2)" in message
    assert "beta" not in message and "ref-logps" not in message
    # The same check is available before anything is loaded (before the output folder is touched).
    with pytest.raises(ArtifactError, match="learning_rate"):
        changed.check_latest()


def test_difference_of_fingerprint_only():
    lines = describe_difference({"fingerprint": "a", "config": CONFIG, "inputs": []},
                                {"fingerprint": "b", "config": dict(CONFIG), "inputs": []})
    assert lines == ["fingerprint a -> b with the same config and inputs: the --model weights or the dpo train "
                     "version changed"]


def _fake_accelerator(stage: int | None, world: int):
    from accelerate.utils import DistributedType

    plugin = SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": stage}})
    return SimpleNamespace(
        distributed_type=DistributedType.MULTI_CPU if stage is None else DistributedType.DEEPSPEED,
        state=SimpleNamespace(deepspeed_plugin=plugin), num_processes=world)


def _saved(tmp_path: Path, stage: int | None, world: int):
    manager = _manager(tmp_path / "checkpoints", None)
    path = tmp_path / "checkpoints" / "step-00000005"
    path.mkdir(parents=True)
    (path / MANIFEST).write_text(json.dumps({"kind": "checkpoint", "schema_version": 1, "step": 5,
                                             **manager.identity, "world_size": world, "zero_stage": stage}))
    return manager.latest()


def test_zero_world_size_change_refused(tmp_path):
    checkpoint = _saved(tmp_path, stage=2, world=2)
    manager = _manager(tmp_path / "checkpoints", _fake_accelerator(2, 4))
    with pytest.raises(ArtifactError, match="saved by DeepSpeed ZeRO-2 with world size 2; this run has 4 processes"):
        manager.check(checkpoint)
    _manager(tmp_path / "checkpoints", _fake_accelerator(2, 2)).check(checkpoint)


def test_ddp_world_size_change_allowed_but_not_switching_to_zero(tmp_path):
    checkpoint = _saved(tmp_path, stage=None, world=2)
    _manager(tmp_path / "checkpoints", _fake_accelerator(None, 3)).check(checkpoint)
    with pytest.raises(ArtifactError, match="saved without DeepSpeed on 2 process.*ZeRO-3 on 2.*no --zero-stage"):
        _manager(tmp_path / "checkpoints", _fake_accelerator(3, 2)).check(checkpoint)


def test_shipped_deepspeed_configs_match_the_generated_ones():
    expected = {
        "zero0": generate_deepspeed_config(0), "zero1": generate_deepspeed_config(1),
        "zero2": generate_deepspeed_config(2), "zero3": generate_deepspeed_config(3),
        "zero2_offload": generate_deepspeed_config(2, offload_optimizer=True),
        "zero3_offload": generate_deepspeed_config(3, offload_optimizer=True, offload_params=True),
    }
    for name, config in expected.items():
        assert json.loads((REPO / "configs" / "deepspeed" / f"{name}.json").read_text()) == config, name
    assert expected["zero3"]["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    for path in sorted((REPO / "configs" / "accelerate").glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        assert config["distributed_type"] in ("MULTI_GPU", "DEEPSPEED"), path
        ds_file = config.get("deepspeed_config", {}).get("deepspeed_config_file")
        if ds_file:
            assert (REPO / ds_file).is_file(), path


def test_a_single_process_unwraps_without_importing_deepspeed():
    """Accelerate's unwrap_model imports DeepSpeed (0.7 s) to test for its engine, even in a plain run."""
    code = """
import sys, torch
from dpo.pipeline.accel import build_accelerator, unwrap
accelerator = build_accelerator(cpu=True)
model = torch.nn.Linear(2, 2)
prepared = accelerator.prepare(model)
assert unwrap(accelerator, prepared) is model
assert "deepspeed" not in sys.modules, "deepspeed was imported"
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
