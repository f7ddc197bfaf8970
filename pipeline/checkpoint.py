"""Training checkpoints: written atomically, kept K deep, refused when they come from another run.

Layout of ``<out>/checkpoints/step-00000120/``::

    model/                 HF save_pretrained folder (or PEFT adapter folder) with the tokenizer, so it
                           loads on its own; ZeRO-3 gathers it first
    state/optimizer.pt     AdamW state (DDP / single process: identical on every rank, saved once)
    state/scheduler.pt     learning-rate schedule
    state/scaler.pt        fp16 loss scaler, when there is one
    state/deepspeed/       DeepSpeed engine checkpoint (per-rank optimizer partitions) instead of optimizer.pt
    rng/rank-00000.pt      python, numpy, torch CPU and CUDA generator states, one file per rank
    manifest.json          written LAST: step, trainer state (data cursor, tokens, W&B run id), world
                           size, ZeRO stage, the semantic config and inputs, every file with its size
                           and sha256

Every rank writes into ``step-00000120.partial/``; once all are done rank 0 fsyncs the files, writes
the manifest, then renames the folder into place. A folder without a manifest (a crash mid-save) is
never resumed from and is deleted by the next save. This assumes one filesystem shared by all ranks.

Resume policy: a checkpoint whose config fingerprint differs is refused with the differing fields
named. A newest checkpoint whose files do not match its manifest (size, sha256) is skipped with a
warning for the newest intact one; nothing is unpickled before that check. DDP resumes on any number of processes (the trainer keeps its data cursor in global samples);
DeepSpeed's optimizer state is partitioned per rank, so ZeRO resumes only on the saved world size.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..artifacts.faults import fault_point
from ..artifacts.fingerprint import canonical, sha256_file
from ..artifacts.manifest import InputRef, fsync_path, write_json_atomic
from ..artifacts.runner import on_main
from .accel import unwrap, zero_stage_of
from .distributed import COLLECTIVE
from ..artifacts.errors import ArtifactError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
KIND = "checkpoint"
SCHEMA_VERSION = 1
PARTIAL = ".partial"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
DEEPSPEED_TAG = "engine"


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


# ---------------------------------------------------------------------------------------------
# Model folders (checkpoints and the final model share this).


def _pretrained_of(module: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """The object with save_pretrained inside ``module`` (itself, or a wrapper's ``.model`` as in
    LabelLogProbs) and the state-dict prefix that leads to it."""
    if hasattr(module, "save_pretrained"):
        return module, ""
    inner = getattr(module, "model", None)
    if inner is not None and hasattr(inner, "save_pretrained"):
        return inner, "model."
    raise TypeError(f"{type(module).__name__} holds no model with save_pretrained")


def _is_peft(model: torch.nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def save_model(accelerator, model: torch.nn.Module, folder: str | os.PathLike, tokenizer=None) -> None:
    """Write the prepared ``model`` as a from_pretrained folder (a PEFT adapter folder for LoRA).

    Collective: every rank must call it. Under ZeRO-3 the partitions are gathered into full 16-bit
    weights on rank 0 (the config sets stage3_gather_16bit_weights_on_model_save).
    """
    folder = Path(folder)
    state_dict = accelerator.get_state_dict(model) if zero_stage_of(accelerator) == 3 else None
    if accelerator.is_main_process:
        inner, prefix = _pretrained_of(unwrap(accelerator, model))
        kwargs = {}
        if state_dict is not None:
            kwargs["state_dict"] = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        folder.mkdir(parents=True, exist_ok=True)
        inner.save_pretrained(folder, safe_serialization=True, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
    accelerator.wait_for_everyone()


def _read_safetensors_folder(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        names = ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in names:
        if not (folder / name).is_file():
            raise ArtifactError(f"{folder}: missing weight file {name}")
        try:
            state.update(load_file(folder / name, device="cpu"))
        except Exception as exc:  # safetensors' own error type: a corrupt or truncated file
            raise ArtifactError(f"{folder / name}: not a readable safetensors file ({exc})") from None
    return state


def _aliases(model: torch.nn.Module) -> set[str]:
    """State-dict names that share storage with an earlier name (tied embeddings): save_pretrained drops them."""
    seen: dict[int, str] = {}
    aliased = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = tensor.data_ptr() if tensor.numel() else id(tensor)
        if key in seen:
            aliased.add(name)
        else:
            seen[key] = name
    return aliased


def load_model_weights(model: torch.nn.Module, folder: str | os.PathLike) -> None:
    """Copy the weights of a checkpoint's ``model/`` folder into the (unwrapped) model, strictly."""
    folder = Path(folder)
    inner, _ = _pretrained_of(model)
    if _is_peft(inner):
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        try:
            weights = load_peft_weights(str(folder), device="cpu")
        except Exception as exc:  # safetensors' own error type: a corrupt or truncated file
            raise ArtifactError(f"{folder}: not a readable adapter ({exc})") from None
        result = set_peft_model_state_dict(inner, weights)
        trainable = {n for n, p in inner.named_parameters() if p.requires_grad}
        missing = sorted(k for k in result.missing_keys if k in trainable)
        if missing or result.unexpected_keys:
            raise ArtifactError(f"{folder}: adapter does not fit the model (missing {missing[:5]}, "
                                f"unexpected {list(result.unexpected_keys)[:5]})")
        return
    missing, unexpected = inner.load_state_dict(_read_safetensors_folder(folder), strict=False)
    missing = sorted(set(missing) - _aliases(inner))
    if missing or unexpected:
        raise ArtifactError(f"{folder}: weights do not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})")


# ---------------------------------------------------------------------------------------------
# Random number generators: one file per rank, so each rank's dropout stream continues exactly.


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _torch_save(obj: Any, path: Path) -> None:
    # Streamed to the file, never serialised in memory first: an optimizer state can be most of the
    # host's memory. A full disk then surfaces as the C++ writer's errno-less RuntimeError, which
    # runner.environment_error recognises.
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------
# Comparing a checkpoint with the run that wants to resume from it.


def _short(value: Any) -> str:
    text = json.dumps(canonical(value), sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def describe_difference(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Human-readable differences of two checkpoint identities (config and inputs), one per line."""
    lines = []
    old_cfg, new_cfg = saved.get("config", {}), current.get("config", {})
    for key in sorted(set(old_cfg) | set(new_cfg)):
        old, new = old_cfg.get(key, "<unset>"), new_cfg.get(key, "<unset>")
        if canonical(old) != canonical(new):
            lines.append(f"{key}: {_short(old)} -> {_short(new)}")
    old_in = {i["kind"]: i for i in saved.get("inputs", [])}
    new_in = {i["kind"]: i for i in current.get("inputs", [])}
    for kind in sorted(set(old_in) | set(new_in)):
        old, new = old_in.get(kind), new_in.get(kind)
        if old is None or new is None:
            lines.append(f"{kind} artifact: {'none' if old is None else old['path']} -> "
                         f"{'none' if new is None else new['path']}")
        elif old["fingerprint"] != new["fingerprint"]:
            where = f" ({old['path']} -> {new['path']})" if old["path"] != new["path"] else f" ({new['path']})"
            lines.append(f"{kind} artifact fingerprint {old['fingerprint']} -> {new['fingerprint']}{where}")
    if not lines and saved.get("fingerprint") != current.get("fingerprint"):
        lines.append(f"fingerprint {saved.get('fingerprint')} -> {current.get('fingerprint')} with the same "
                     "config and inputs: the --model weights or the dpo train version changed")
    return lines


# ---------------------------------------------------------------------------------------------


class Checkpoint:
    """A complete checkpoint folder and its manifest."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = path
        self.manifest = manifest

    @property
    def step(self) -> int:
        return int(_STEP_DIR.match(self.path.name).group(1))

    @property
    def trainer_state(self) -> dict[str, Any]:
        return dict(self.manifest.get("trainer_state", {}))

    def __repr__(self) -> str:
        return f"Checkpoint({self.path})"


def complete_checkpoints(root: str | os.PathLike) -> list[Checkpoint]:
    """The complete checkpoints under ``root`` (``<out>/checkpoints``), oldest first: a step folder
    counts once its manifest exists and reads as a JSON object (whether its files are intact is
    ``damage``'s to say)."""
    root = Path(root)
    found = []
    if not root.is_dir():
        return found
    for child in root.iterdir():
        if not _STEP_DIR.match(child.name) or not (child / MANIFEST).is_file():
            continue
        try:
            manifest = json.loads((child / MANIFEST).read_bytes().decode("utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("ignoring checkpoint %s: unreadable %s (%s)", child, MANIFEST, exc)
            continue
        if not isinstance(manifest, dict):
            log.warning("ignoring checkpoint %s: its %s is not a JSON object", child, MANIFEST)
            continue
        found.append(Checkpoint(child, manifest))
    return sorted(found, key=lambda c: c.step)


# The fields a checkpoint manifest must have, with their types, before anything in it is trusted.
_FIELDS = {"kind": str, "schema_version": int, "step": int, "fingerprint": str, "config": dict, "inputs": list,
           "world_size": int, "zero_stage": (int, type(None)), "trainer_state": dict,
           "data_cursor": (dict, type(None)), "files": list}
_FILE_FIELDS = {"path": str, "bytes": int, "sha256": str}
_INPUT_FIELDS = {"kind": str, "path": str, "fingerprint": str}


def _typed(value: Any, types) -> bool:
    return isinstance(value, types) and not (isinstance(value, bool) and bool not in (
        types if isinstance(types, tuple) else (types,)))


def schema_problem(checkpoint: Checkpoint) -> str | None:
    """What makes a checkpoint's manifest unusable (a missing or mistyped field), or None."""
    manifest, where = checkpoint.manifest, checkpoint.path / MANIFEST
    for name, types in _FIELDS.items():
        if name not in manifest:
            return f"{where}: field {name!r} is missing"
        if not _typed(manifest[name], types):
            return f"{where}: field {name!r} has the wrong type ({type(manifest[name]).__name__})"
    for group, fields in (("files", _FILE_FIELDS), ("inputs", _INPUT_FIELDS)):
        for i, item in enumerate(manifest[group]):
            if not isinstance(item, dict) or not all(_typed(item.get(k), t) for k, t in fields.items()):
                return f"{where}: {group}[{i}] is not an object with {', '.join(fields)}"
    return None


class CheckpointManager:
    """Saves, finds, checks and restores the checkpoints of one training run.

    ``root`` is ``<out>/checkpoints``. ``fingerprint``, ``config`` (the semantic config, for naming
    what differs) and ``inputs`` (InputRefs of the tokenized and ref-logps artifacts) identify the
    run. ``keep_last`` K > 0 keeps the newest K complete checkpoints; 0 or None keeps all.
    ``save`` and ``load_latest`` are collective: every rank calls them.
    """

    def __init__(self, root: str | os.PathLike, *, accelerator, fingerprint: str, config: Mapping[str, Any],
                 keep_last: int | None = None, inputs: Sequence[InputRef] = (), verify: bool = True):
        self.root = Path(root)
        self.accelerator = accelerator
        self.keep_last = keep_last or 0
        self.verify = verify
        self.identity = {
            "fingerprint": fingerprint,
            "config": canonical(dict(config)),
            "inputs": [{"kind": i.kind, "path": str(i.path), "fingerprint": i.fingerprint} for i in inputs],
        }

    # ---- finding

    def complete(self) -> list[Checkpoint]:
        """Complete checkpoints (manifest present and readable), oldest first."""
        return complete_checkpoints(self.root)

    def latest(self) -> Checkpoint | None:
        done = self.complete()
        return done[-1] if done else None

    def latest_path(self) -> Path | None:
        newest = self.latest()
        return newest.path if newest else None

    def incomplete(self) -> list[Path]:
        """Leftovers of saves that crashed: partial folders and step folders without a manifest."""
        if not self.root.is_dir():
            return []
        return sorted(
            child for child in self.root.iterdir()
            if child.is_dir() and (child.name.endswith(PARTIAL) or
                                   (_STEP_DIR.match(child.name) and not (child / MANIFEST).is_file()))
        )

    # ---- checking

    def check(self, checkpoint: Checkpoint) -> None:
        """Refuse a checkpoint of another run, or one this distributed setup cannot restore (its manifest's
        schema checked first: ``schema_problem``)."""
        saved = checkpoint.manifest
        if saved.get("kind") != KIND or saved.get("schema_version", 0) > SCHEMA_VERSION:
            raise ArtifactError(f"{checkpoint.path}: not a dpo checkpoint this version can read "
                                f"(kind {saved.get('kind')!r}, schema_version {saved.get('schema_version')})")
        if saved.get("fingerprint") != self.identity["fingerprint"]:
            differences = "\n  ".join(describe_difference(saved, self.identity))
            raise ArtifactError(
                f"{checkpoint.path} was made by a run with another config or inputs, so resuming from it would "
                f"mix two trainings:\n  {differences}\nRerun with the original settings, or use another --out "
                "(or --overwrite to discard the old run)"
            )
        if self.accelerator is None:
            return
        saved_stage, stage = saved.get("zero_stage"), zero_stage_of(self.accelerator)
        saved_world, world = int(saved["world_size"]), self.accelerator.num_processes
        if (saved_stage is None) != (stage is None) or saved_stage != stage:
            raise ArtifactError(
                f"{checkpoint.path} was saved {_setup(saved_stage, saved_world)}; this run is "
                f"{_setup(stage, world)}. Their optimizer states are stored differently: resume with "
                f"{'no --zero-stage' if saved_stage is None else f'--zero-stage {saved_stage}'}"
            )
        if stage is not None and saved_world != world:
            raise ArtifactError(
                f"{checkpoint.path} was saved by DeepSpeed ZeRO-{stage} with world size {saved_world}; this run "
                f"has {world} processes. ZeRO partitions the optimizer state per rank, so resume with "
                f"{saved_world} processes (plain DDP checkpoints resume on any number)"
            )

    def check_latest(self) -> Checkpoint | None:
        """Check the newest complete checkpoint whose manifest is whole, without loading or hashing it (call
        before touching ``out``)."""
        usable = [c for c in self.complete() if schema_problem(c) is None]
        if usable:
            self.check(usable[-1])
        return usable[-1] if usable else None

    # ---- saving

    def save(self, step: int, model, optimizer, scheduler, trainer_state: Mapping[str, Any],
             data_cursor: Mapping[str, Any] | None = None, tokenizer=None) -> Path:
        """Write ``step-%08d`` for the prepared ``model``, ``optimizer`` and ``scheduler``; collective.

        ``trainer_state`` (JSON-able: step, tokens seen, W&B run id, ...) and ``data_cursor`` come
        back from ``load_latest``. ``tokenizer`` (rank 0's) is saved into ``model/``. Saving a step
        that already has a complete checkpoint is a no-op.
        """
        acc = self.accelerator
        final = self.root / step_dir_name(step)
        acc.wait_for_everyone()
        if on_main(COLLECTIVE, lambda: self._intact_at(final)):
            return final
        partial = self.root / (final.name + PARTIAL)
        if acc.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            if final.is_dir():
                # A damaged checkpoint of this step (resumed from an older one past it): replaced, not kept.
                log.warning("replacing the damaged checkpoint %s", final)
                (final / MANIFEST).unlink(missing_ok=True)
                shutil.rmtree(final)
            for leftover in self.incomplete():
                log.warning("removing %s, left by a checkpoint save that did not finish", leftover)
                shutil.rmtree(leftover)
            for sub in ("state", "rng"):
                (partial / sub).mkdir(parents=True)
        acc.wait_for_everyone()

        save_model(acc, model, partial / "model", tokenizer=tokenizer)
        stage = zero_stage_of(acc)
        if stage is not None:
            # DeepSpeed keeps the fp32 master weights and optimizer partitions in its own per-rank files.
            frozen = any(not p.requires_grad for p in model.parameters())
            model.save_checkpoint(str(partial / "state" / "deepspeed"), tag=DEEPSPEED_TAG, save_latest=False,
                                  exclude_frozen_parameters=frozen)
        if acc.is_main_process:
            if stage is None:
                _torch_save(optimizer.state_dict(), partial / "state" / "optimizer.pt")
            _torch_save(scheduler.state_dict(), partial / "state" / "scheduler.pt")
            if getattr(acc, "scaler", None) is not None:
                _torch_save(acc.scaler.state_dict(), partial / "state" / "scaler.pt")
        _torch_save(_rng_state(), partial / "rng" / f"rank-{acc.process_index:05d}.pt")
        fault_point("checkpoint-save")
        acc.wait_for_everyone()

        if acc.is_main_process:
            files = []
            for path in sorted(p for p in partial.rglob("*") if p.is_file()):
                fsync_path(path)
                files.append({"path": path.relative_to(partial).as_posix(), "bytes": path.stat().st_size,
                              "sha256": sha256_file(path)})
            from .. import __version__

            manifest = {
                "kind": KIND, "schema_version": SCHEMA_VERSION, "step": step, **self.identity,
                "world_size": acc.num_processes, "zero_stage": stage,
                "distributed_type": str(acc.distributed_type.value), "mixed_precision": acc.mixed_precision,
                "trainer_state": canonical(dict(trainer_state)),
                "data_cursor": canonical(dict(data_cursor)) if data_cursor is not None else None,
                "files": files, "producer": {"name": "dpo", "version": __version__},
            }
            write_json_atomic(partial / MANIFEST, manifest)
            os.replace(partial, final)
            fsync_path(self.root)
            self._prune()
            log.info("saved checkpoint %s", final)
        acc.wait_for_everyone()
        return final

    def _intact_at(self, folder: Path) -> bool:
        """Whether ``folder`` holds a complete, intact checkpoint of this run (then saving its step again is a no-op)."""
        found = [c for c in complete_checkpoints(self.root) if c.path.name == folder.name]
        return bool(found) and damage(found[0], self.verify) is None and found[0].manifest.get(
            "fingerprint") == self.identity["fingerprint"]

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for old in self.complete()[: -self.keep_last]:
            # Manifest first: a crash mid-delete leaves an incomplete folder, never a complete-looking wreck.
            (old.path / MANIFEST).unlink()
            shutil.rmtree(old.path)

    # ---- loading

    def load_latest(self, model, optimizer, scheduler) -> dict[str, Any] | None:
        """Restore the newest intact checkpoint into the prepared objects; collective.

        A newest checkpoint whose files no longer match its own manifest is skipped with a warning
        naming it, for the one before it; only when none is intact is it an error. Returns the trainer
        state (with ``data_cursor`` added when one was saved), or None when there is nothing to resume from.
        """
        chosen = on_main(COLLECTIVE, self._newest_intact)
        if chosen is None:
            return None
        checkpoint = Checkpoint(self.root / chosen, json.loads((self.root / chosen / MANIFEST).read_text()))
        self.load(checkpoint, model, optimizer, scheduler)
        state = checkpoint.trainer_state
        if checkpoint.manifest.get("data_cursor") is not None:
            state["data_cursor"] = checkpoint.manifest["data_cursor"]
        return state

    def _newest_intact(self) -> str | None:
        """The folder name of the newest checkpoint this run may resume from and whose files are intact."""
        done = self.complete()
        if not done:
            return None
        problems = []
        for checkpoint in reversed(done):
            problem = damage(checkpoint, self.verify)
            if problem is None:
                self.check(checkpoint)
                return checkpoint.path.name
            problems.append(problem)
            log.warning("skipping the damaged checkpoint %s (%s)", checkpoint.path, problem)
        raise ArtifactError(f"no intact checkpoint to resume from in {self.root}: {problems[0]}. Delete the damaged "
                            "checkpoints to start over, or rerun with --overwrite")

    def load(self, checkpoint: Checkpoint, model, optimizer, scheduler) -> None:
        """Restore ``checkpoint`` (checked: ``load_latest`` picks one); collective."""
        acc, path = self.accelerator, checkpoint.path
        stage = zero_stage_of(acc)
        if stage is not None:
            frozen = any(not p.requires_grad for p in model.parameters())
            loaded, _ = model.load_checkpoint(str(path / "state" / "deepspeed"), tag=DEEPSPEED_TAG,
                                              load_module_strict=not frozen, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
            if loaded is None:
                raise ArtifactError(f"{path}/state/deepspeed: DeepSpeed could not load its checkpoint")
        else:
            load_model_weights(unwrap(acc, model), path / "model")
            optimizer.load_state_dict(_torch_load(path / "state" / "optimizer.pt"))
        scheduler.load_state_dict(_torch_load(path / "state" / "scheduler.pt"))
        if getattr(acc, "scaler", None) is not None and (path / "state" / "scaler.pt").is_file():
            acc.scaler.load_state_dict(_torch_load(path / "state" / "scaler.pt"))
        rng = path / "rng" / f"rank-{acc.process_index:05d}.pt"
        if rng.is_file():
            _set_rng_state(_torch_load(rng))
        else:
            log.warning("%s: no random state for rank %d (saved with %d processes): this rank's random "
                        "streams (dropout) start fresh", path, acc.process_index, checkpoint.manifest["world_size"])
        log.info("resumed from %s (step %d)", path, checkpoint.step)
        acc.wait_for_everyone()


def _setup(stage: int | None, world: int) -> str:
    return f"{'without DeepSpeed' if stage is None else f'with DeepSpeed ZeRO-{stage}'} on {world} process(es)"


def damage(checkpoint: Checkpoint, verify: bool = True) -> str | None:
    """What is wrong with a checkpoint against its own manifest (a missing or mistyped field; a file it
    does not list, or that is missing, or of another size, or with another sha256 unless ``verify`` is
    off), or None when it is intact. Nothing (DeepSpeed's pickled optimizer state included) is loaded
    from a checkpoint before this says None, and every file a load reads is one the manifest lists."""
    problem = schema_problem(checkpoint)
    if problem is not None:
        return problem
    listed = {}
    for entry in checkpoint.manifest["files"]:
        relative = entry["path"]
        if os.path.isabs(relative) or ".." in Path(relative).parts or "\\" in relative:
            return f"{checkpoint.path / MANIFEST}: file path {relative!r} leads outside the checkpoint"
        listed[relative] = entry
    present = {p.relative_to(checkpoint.path).as_posix() for p in checkpoint.path.rglob("*") if not p.is_dir()}
    present.discard(MANIFEST)
    unlisted = sorted(present - set(listed))
    if unlisted:
        return f"{checkpoint.path / unlisted[0]}: a file the checkpoint manifest does not list"
    for relative, entry in listed.items():
        path = checkpoint.path / relative
        size = path.stat().st_size if path.is_file() else None
        if size != entry["bytes"]:
            return (f"{path}: {'missing' if size is None else f'{size} bytes'}, the checkpoint manifest says "
                    f"{entry['bytes']} bytes")
        if verify and sha256_file(path) != entry["sha256"]:
            return f"{path}: its sha256 differs from the checkpoint manifest's (changed or corrupt)"
    return None


def _torch_load(path: Path) -> Any:
    # Our own files (checked by ``damage`` first); RNG states hold numpy arrays and Python tuples, which
    # weights_only refuses. Unreadable (possible only with --no-verify): an artifact error naming the file.
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError) as exc:
        raise ArtifactError(f"{path}: unreadable checkpoint file ({type(exc).__name__}: {exc}); rerun without "
                            "--no-verify to skip damaged checkpoints") from None


