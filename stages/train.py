"""`dpo train`: preference optimisation of a causal LM from a tokenized artifact and a reference cache.

build:  accelerator -> inputs (tokens, cached reference log-probs) -> fingerprint and output dir ->
        policy (optionally LoRA) wrapped in LabelLogProbs -> AdamW + schedule -> resume state
run:    one optimizer step per global batch: each rank runs its micro-batches, the loss is the
        mean over the global batch, metrics are gathered across ranks; eval, checkpoints and
        pre-emption at step boundaries
close:  <out>/final/ (model or adapter, with the tokenizer) and the manifest, written last

The batch order is a pure function of (seed, epoch), so the data cursor (epoch, batches done)
plus the model, optimizer, scheduler and RNG states is all a resumed run needs to reproduce an
uninterrupted one step for step. The reference model is never loaded: its log-probs come from
the cache (for LoRA, the cache of the base model), which keeps one model in memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..artifacts.fingerprint import fingerprint, semantic_config
from ..artifacts.lock import ArtifactLock
from ..artifacts.manifest import InputRef, Manifest
from ..artifacts.output import OutputState, commit_output, prepare_output, say_complete
from ..artifacts.shards import ArtifactReader, file_entry
from ..pipeline import losses
from ..pipeline.accel import build_accelerator, make_adamw
from ..pipeline.batching import collate_pairs, length_grouped_batches, pad_token_id, pair_lengths
from ..pipeline.checkpoint import CheckpointManager, save_model
from ..pipeline.errors import Preempted, UsageError
from ..pipeline.logprobs import LabelLogProbs
from ..pipeline.logs import progress
from ..pipeline.lora import LoraSettings, apply_lora, count_parameters
from ..pipeline.modeling import load_causal_lm, model_identity
from ..pipeline.preemption import PreemptionWatcher
from ..pipeline.refcache import load_reference, reference_model_mismatch
from ..pipeline.tracking import Tracker

STAGE = "train"
VERSION = 1
KIND = "train"
FINAL = "final"
SCHEDULERS = ("linear", "cosine", "constant")
FORWARDS = ("concatenated", "separate")
DTYPES = ("float32", "bfloat16", "float16")
PRECISIONS = ("no", "bf16", "fp16")
NOT_SEMANTIC = {"semantic": False}
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # Inputs enter the fingerprint through their own fingerprints, so moving them is harmless.
    tokenized: str = dataclasses.field(metadata=NOT_SEMANTIC)
    model: str = dataclasses.field(metadata=NOT_SEMANTIC)
    out: str = dataclasses.field(metadata=NOT_SEMANTIC)
    ref_cache: str | None = dataclasses.field(default=None, metadata=NOT_SEMANTIC)
    loss_type: str = "dpo"
    beta: float | None = None  # None: the loss type's default (losses.DEFAULT_BETA); resolved in run()
    label_smoothing: float = 0.0
    gamma_beta_ratio: float = 0.3
    rpo_alpha: float = 0.0
    learning_rate: float = 1e-6
    weight_decay: float = 0.0
    lr_scheduler: str = "linear"
    warmup_ratio: float = 0.1
    epochs: int = 1
    max_steps: int | None = None
    # The fingerprint holds the global batch (per device x accumulation x processes) instead: the
    # same run on 8 GPUs x 1 or 2 GPUs x 4 accumulation is the same training, and may resume across.
    per_device_batch_size: int = dataclasses.field(default=8, metadata=NOT_SEMANTIC)
    grad_accum: int = dataclasses.field(default=1, metadata=NOT_SEMANTIC)
    max_grad_norm: float = 1.0
    seed: int = 42
    dtype: str = "float32"
    mixed_precision: str = "no"
    keep_dropout: bool = False
    lora: bool = False
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_target_modules: tuple[str, ...] = ("all-linear",)
    # How the work is laid out, not what is computed; CheckpointManager refuses a ZeRO layout change.
    zero_stage: int | None = dataclasses.field(default=None, metadata=NOT_SEMANTIC)
    offload_optimizer: bool = dataclasses.field(default=False, metadata=NOT_SEMANTIC)
    offload_params: bool = dataclasses.field(default=False, metadata=NOT_SEMANTIC)
    deepspeed_config: str | None = dataclasses.field(default=None, metadata=NOT_SEMANTIC)
    # Same result either way (tested), so switching them on a resumed run is allowed.
    forward: str = dataclasses.field(default="concatenated", metadata=NOT_SEMANTIC)
    gradient_checkpointing: bool = dataclasses.field(default=False, metadata=NOT_SEMANTIC)
    eval_steps: int = dataclasses.field(default=0, metadata=NOT_SEMANTIC)
    logging_steps: int = dataclasses.field(default=10, metadata=NOT_SEMANTIC)
    save_every: str = dataclasses.field(default="500", metadata=NOT_SEMANTIC)
    keep_last: int | None = dataclasses.field(default=2, metadata=NOT_SEMANTIC)
    wandb_project: str | None = dataclasses.field(default=None, metadata=NOT_SEMANTIC)
    wandb_entity: str | None = dataclasses.field(default=None, metadata=NOT_SEMANTIC)
    wandb_run_name: str | None = dataclasses.field(default=None, metadata=NOT_SEMANTIC)
    overwrite: bool = dataclasses.field(default=False, metadata=NOT_SEMANTIC)
    lock_timeout: float = dataclasses.field(default=600.0, metadata=NOT_SEMANTIC)
    quiet: bool = dataclasses.field(default=False, metadata=NOT_SEMANTIC)

    @property
    def lora_settings(self) -> LoraSettings | None:
        if not self.lora:
            return None
        return LoraSettings(self.lora_rank, self.lora_alpha, self.lora_dropout, tuple(self.lora_target_modules))

    @property
    def save_every_epoch(self) -> bool:
        return self.save_every == "epoch"

    @property
    def save_every_steps(self) -> int:
        return 0 if self.save_every_epoch else int(self.save_every)


def check_config(cfg: TrainConfig) -> TrainConfig:
    """Validate options a user can get wrong; return the config with β resolved."""
    beta = losses.check_loss_options(cfg.loss_type, cfg.beta, cfg.label_smoothing, cfg.gamma_beta_ratio, cfg.rpo_alpha)
    choices = {"lr_scheduler": SCHEDULERS, "forward": FORWARDS, "dtype": DTYPES, "mixed_precision": PRECISIONS}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(cfg, name)!r} is not one of: {', '.join(allowed)}")
    positive = {"per_device_batch_size": cfg.per_device_batch_size, "grad_accum": cfg.grad_accum,
                "epochs": cfg.epochs, "logging_steps": cfg.logging_steps}
    for name, value in positive.items():
        if value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise UsageError(f"--max-steps must be at least 1, got {cfg.max_steps}")
    if not (cfg.learning_rate > 0 and math.isfinite(cfg.learning_rate)):
        raise UsageError(f"--learning-rate must be a positive number, got {cfg.learning_rate}")
    if not 0.0 <= cfg.warmup_ratio < 1.0:
        raise UsageError(f"--warmup-ratio must lie in [0, 1), got {cfg.warmup_ratio}")
    if cfg.weight_decay < 0 or cfg.max_grad_norm < 0:
        raise UsageError("--weight-decay and --max-grad-norm must not be negative")
    if cfg.eval_steps < 0:
        raise UsageError(f"--eval-steps must be 0 (off) or positive, got {cfg.eval_steps}")
    if cfg.keep_last is not None and cfg.keep_last < 1:
        raise UsageError(f"--keep-last must be at least 1, got {cfg.keep_last}")
    if not cfg.save_every_epoch and not (cfg.save_every.isdigit() and int(cfg.save_every) >= 1):
        raise UsageError(f"--save-every must be a number of steps (>= 1) or 'epoch', got {cfg.save_every!r}")
    if losses.needs_reference(cfg.loss_type) and not cfg.ref_cache:
        raise UsageError(
            f"--loss-type {cfg.loss_type} compares the policy with a reference: pass --ref-cache DIR "
            "(made by `dpo cache-ref` from the same tokenized artifact)"
        )
    if cfg.lora_settings is not None:
        cfg.lora_settings.check()
    return dataclasses.replace(cfg, beta=beta)


def run(cfg: TrainConfig) -> None:
    cfg = check_config(cfg)
    out = Path(cfg.out)

    # ---- build: the distributed context comes first (ZeRO-3 must exist before from_pretrained)
    accelerator = build_accelerator(
        mixed_precision=cfg.mixed_precision, grad_accum=cfg.grad_accum,
        per_device_batch_size=cfg.per_device_batch_size, max_grad_norm=cfg.max_grad_norm,
        zero_stage=cfg.zero_stage, offload_optimizer=cfg.offload_optimizer, offload_params=cfg.offload_params,
        deepspeed_config=cfg.deepspeed_config,
    )
    tokenized = ArtifactReader(cfg.tokenized, kind="tokenized")
    splits = ["train"] + (["eval"] if cfg.eval_steps and "eval" in tokenized.splits else [])
    if cfg.eval_steps and "eval" not in tokenized.splits:
        raise UsageError(f"--eval-steps {cfg.eval_steps}: {cfg.tokenized} has no eval split "
                         "(make one with `dpo tokenize --eval-fraction` or --eval-data)")
    reference = None
    if losses.needs_reference(cfg.loss_type):
        reference = load_reference(cfg.ref_cache, tokenized.manifest, splits)
        mismatch = reference_model_mismatch(reference, cfg.model)
        if mismatch:
            # Allowed on purpose: continuing from a DPO checkpoint with the SFT model as reference.
            log.warning("%s; training proceeds with the cache as the reference", mismatch)
    elif cfg.ref_cache:
        log.info("--loss-type simpo is reference-free: not reading --ref-cache %s", cfg.ref_cache)
    input_refs = [InputRef("tokenized", str(cfg.tokenized), tokenized.fingerprint)]
    if reference is not None:
        input_refs.append(InputRef("ref-logps", str(cfg.ref_cache), reference.fingerprint))
    semantic = {**semantic_config(cfg),
                "global_batch": cfg.per_device_batch_size * cfg.grad_accum * accelerator.num_processes}
    fp = fingerprint(STAGE, VERSION, semantic, [r.fingerprint for r in input_refs] + [model_identity(cfg.model)["digest"]])

    checkpoints = CheckpointManager(out / "checkpoints", accelerator=accelerator, fingerprint=fp,
                                    config=semantic, keep_last=cfg.keep_last, inputs=input_refs)
    with contextlib.ExitStack() as stack:
        state = error = None
        if accelerator.is_main_process:
            # Any failure here is handed to every rank: the others would wait in the broadcast forever.
            try:
                stack.enter_context(ArtifactLock(out, timeout_s=cfg.lock_timeout))
                if not cfg.overwrite:
                    # Before prepare_output, which would wipe a partial run of another config:
                    # its checkpoints are refused with what differs, never silently discarded.
                    checkpoints.check_latest()
                state = prepare_output(out, KIND, fp, cfg.overwrite)
            except Exception as exc:  # noqa: BLE001 - re-raised on every rank just below
                error = exc
        state, error = _broadcast(accelerator, (state, error))
        if error is not None:
            raise error
        if state is OutputState.COMPLETE:
            if accelerator.is_main_process:
                say_complete(out, KIND, fp)
            return
        _train(cfg, accelerator, tokenized, reference, input_refs, fp, out, checkpoints)


def _train(cfg: TrainConfig, accelerator, tokenized: ArtifactReader, reference, input_refs: list[InputRef],
           fp: str, out: Path, checkpoints: CheckpointManager) -> None:
    started = time.perf_counter()
    train_rows = tokenized.read_split("train")
    eval_rows = tokenized.read_split("eval").to_pylist() if cfg.eval_steps else []
    if cfg.eval_steps and not eval_rows:
        raise UsageError(f"--eval-steps {cfg.eval_steps}: the eval split of {cfg.tokenized} has no pairs "
                         "(all were filtered out?); see its rejects.jsonl, or pass --eval-steps 0")
    pad_id = pad_token_id(tokenized.manifest.stats)
    world = accelerator.num_processes
    global_batch = cfg.per_device_batch_size * cfg.grad_accum * world
    if train_rows.num_rows < global_batch:
        raise UsageError(
            f"{cfg.tokenized}: the train split has {train_rows.num_rows} pairs, fewer than one global batch "
            f"({cfg.per_device_batch_size} per device x {cfg.grad_accum} accumulation x {world} processes)"
        )
    lengths = pair_lengths(train_rows.select(["chosen_input_ids", "rejected_input_ids"]).to_pylist())
    order = BatchOrder(lengths, global_batch, cfg.seed)

    torch.manual_seed(cfg.seed)
    model = load_causal_lm(cfg.model, dtype=cfg.dtype, keep_dropout=cfg.keep_dropout)
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input grads, so it also works for frozen LoRA bases.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora_settings is not None:
        model = apply_lora(model, cfg.lora_settings)
    n_trainable, n_total = count_parameters(model)
    optimizer = make_adamw(accelerator, _param_groups(model, cfg.weight_decay), lr=cfg.learning_rate,
                           weight_decay=cfg.weight_decay)
    # LabelLogProbs is what runs forward, so DDP and DeepSpeed wrap it, not the bare model.
    policy, optimizer = accelerator.prepare(LabelLogProbs(model), optimizer)
    trainable = [p for p in policy.parameters() if p.requires_grad]

    total_steps = cfg.max_steps or cfg.epochs * order.steps_per_epoch
    scheduler = _scheduler(optimizer, cfg, total_steps)
    trainer = checkpoints.load_latest(policy, optimizer, scheduler) or {}
    step = int(trainer.get("step", 0))
    saved_cursor = trainer.get("data_cursor", {"epoch": 0, "samples_done": 0})
    # In pairs, so DDP resumed on another number of processes continues at the same place in the data.
    cursor = Cursor(int(saved_cursor["epoch"]), int(saved_cursor["samples_done"]) // global_batch)
    totals = {"tokens": float(trainer.get("tokens", 0)), "pairs": float(trainer.get("pairs", 0)),
              "train_seconds": float(trainer.get("train_seconds", 0.0))}
    if step:
        log.info("resuming from step %d (epoch %d, batch %d of %d)", step, cursor.epoch, cursor.batches_done,
                 order.steps_per_epoch)
    tracker = Tracker(out, is_main=accelerator.is_main_process, resume_step=step,
                      run_id=trainer.get("wandb_run_id"), wandb_project=cfg.wandb_project,
                      wandb_entity=cfg.wandb_entity, wandb_run_name=cfg.wandb_run_name,
                      config={**dataclasses.asdict(cfg), "fingerprint": fp, "world_size": world})
    log.info("training %s of %s parameters on %d pairs: %d steps of %d pairs (%d per device x %d accumulation x %d "
             "processes), loss %s beta %g", f"{n_trainable:,}", f"{n_total:,}", train_rows.num_rows, total_steps,
             global_batch, cfg.per_device_batch_size, cfg.grad_accum, world, cfg.loss_type, cfg.beta)

    def trainer_state() -> dict[str, Any]:
        return {"step": step, "global_batch": global_batch, "world_size": world, "wandb_run_id": tracker.run_id,
                "train_seconds": totals["train_seconds"] + time.perf_counter() - session_start, **
                {k: totals[k] for k in ("tokens", "pairs")}}

    # ---- run
    device = accelerator.device
    bar = progress(total=total_steps, desc="train", unit="step", quiet=cfg.quiet, initial=step)
    window = Window(device)
    session_start = time.perf_counter()
    exit_code = 1
    policy.train()
    try:
        with PreemptionWatcher() as preemption:
            while step < total_steps:
                batch = order.batch(cursor)
                learning_rate = scheduler.get_last_lr()[0]
                grad_norm = None
                for micro in _my_micro_batches(batch, lengths, cfg.per_device_batch_size, cfg.grad_accum, world,
                                               accelerator.process_index):
                    rows = train_rows.take(micro).to_pylist()
                    with accelerator.accumulate(policy):
                        loss, sums = _loss_and_sums(policy, rows, pad_id, reference, cfg, device)
                        accelerator.backward(loss)
                        if accelerator.sync_gradients:
                            # 0 turns clipping off; an infinite bound still measures the norm.
                            grad_norm = accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm or math.inf)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                    window.add(sums)
                scheduler.step()
                step += 1
                cursor = order.advance(cursor)
                window.grad_norm = grad_norm

                stop = preemption.should_stop(accelerator)
                save = stop or step < total_steps and (
                    (cfg.save_every_steps and step % cfg.save_every_steps == 0)
                    or (cfg.save_every_epoch and cursor.batches_done == 0))
                # A checkpoint step is always logged, so no half-filled metric window is lost on resume.
                if step == 1 or step % cfg.logging_steps == 0 or step == total_steps or save:
                    row = window.flush(accelerator)
                    totals["tokens"] += row.pop("_tokens")
                    totals["pairs"] += row.pop("_pairs")
                    row.update(step=step, epoch=order.epoch_progress(cursor), learning_rate=learning_rate)
                    tracker.log(_ordered(row))
                    bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
                if cfg.eval_steps and (step % cfg.eval_steps == 0 or step == total_steps):
                    tracker.log({"step": step, "epoch": order.epoch_progress(cursor),
                                 **evaluate(policy, eval_rows, pad_id, reference, cfg, accelerator)})
                bar.update(1)
                if save:
                    checkpoints.save(step, policy, optimizer, scheduler, trainer_state(),
                                     data_cursor={"epoch": cursor.epoch,
                                                  "samples_done": cursor.batches_done * global_batch})
                if stop:
                    raise Preempted(f"stopped by {preemption.signal_name} after step {step} and saved a checkpoint "
                                    f"in {checkpoints.latest_path()}; rerun the same command to resume")
        bar.close()

        # ---- close
        totals["train_seconds"] += time.perf_counter() - session_start
        final = out / FINAL
        _save_final(accelerator, policy, cfg, tokenized, final)
        stats = _stats(accelerator, cfg, step, totals, global_batch, world, n_trainable, n_total,
                       time.perf_counter() - started, tracker)
        if accelerator.is_main_process:
            files = [file_entry(out, "metrics.jsonl")] + [
                file_entry(out, p.relative_to(out).as_posix()) for p in sorted(final.rglob("*")) if p.is_file()]
            manifest = Manifest(kind=KIND, fingerprint=fp, config=dataclasses.asdict(cfg), inputs=input_refs,
                                files=files, stats=stats)
            tracker.close(0)
            commit_output(out, manifest)
            log.info("trained %d steps in %.0fs (%.0f tokens/s, peak RSS %.0f MiB); final model in %s", step,
                     totals["train_seconds"], stats["tokens_per_second"], stats["peak_cpu_rss_bytes"] / 2**20, final)
        exit_code = 0
    except Preempted as exc:
        exit_code = exc.exit_code  # W&B marks the run as stopped, not crashed; the rerun continues it
        raise
    finally:
        bar.close()
        tracker.close(exit_code)
    accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------------------------
# Data order: a pure function of (seed, epoch), so a cursor is all a resumed run needs.


@dataclasses.dataclass(frozen=True)
class Cursor:
    epoch: int
    batches_done: int  # global batches of this epoch already trained on


class BatchOrder:
    """Global batches of one epoch: seeded, shuffled, grouped by length within megabatches."""

    def __init__(self, lengths: np.ndarray, global_batch: int, seed: int):
        self.lengths = lengths
        self.global_batch = global_batch
        self.seed = seed
        self.steps_per_epoch = len(lengths) // global_batch
        self._epoch = -1
        self._batches: list[list[int]] = []

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        if epoch != self._epoch:
            # Incomplete global batches are dropped: every rank then gets the same number of
            # equal micro-batches, so the accumulated mean equals the big batch's mean exactly.
            self._batches = length_grouped_batches(self.lengths, self.global_batch, shuffle=True,
                                                   seed=self.seed * 100_003 + epoch, drop_last=True)
            self._epoch = epoch
        return self._batches

    def batch(self, cursor: Cursor) -> list[int]:
        return self._epoch_batches(cursor.epoch)[cursor.batches_done]

    def advance(self, cursor: Cursor) -> Cursor:
        if cursor.batches_done + 1 >= self.steps_per_epoch:
            return Cursor(cursor.epoch + 1, 0)
        return Cursor(cursor.epoch, cursor.batches_done + 1)

    def epoch_progress(self, cursor: Cursor) -> float:
        return round(cursor.epoch + cursor.batches_done / self.steps_per_epoch, 6)


def _my_micro_batches(batch: list[int], lengths: np.ndarray, per_device: int, grad_accum: int, world: int,
                      rank: int) -> list[list[int]]:
    """This rank's ``grad_accum`` micro-batches of a global batch, each of similar-length pairs.

    Micro-batch ``m * world + rank`` of the length-sorted batch: at every accumulation step the
    ranks get neighbouring lengths, so no rank waits long for another at the gradient all-reduce.
    """
    ordered = sorted(batch, key=lambda i: (-int(lengths[i]), i))
    micros = [ordered[j * per_device:(j + 1) * per_device] for j in range(world * grad_accum)]
    return [micros[m * world + rank] for m in range(grad_accum)]


# ---------------------------------------------------------------------------------------------
# One micro-batch: policy log-probs, loss, metric sums.


def _policy_logps(policy, rows: list[dict], pad_id: int, cfg: TrainConfig, device) -> tuple[Any, Any, float, float]:
    """(chosen, rejected) SequenceLogProbs and the micro-batch's (real tokens, padded slots)."""
    wpo = losses.needs_wpo_term(cfg.loss_type)
    batch = {k: v.to(device) for k, v in collate_pairs(rows, pad_id, cfg.forward).items()}
    if cfg.forward == "concatenated":
        both = policy(batch["input_ids"], batch["attention_mask"], batch["labels"], with_wpo_term=wpo)
        half = len(rows)
        chosen, rejected = (
            dataclasses.replace(both, **{f: _part(getattr(both, f), sl) for f in ("logps", "num_tokens", "wpo_term")})
            for sl in (slice(0, half), slice(half, None))
        )
        masks = [batch["attention_mask"]]
    else:
        chosen = policy(batch["chosen_input_ids"], batch["chosen_attention_mask"], batch["chosen_labels"],
                        with_wpo_term=wpo)
        rejected = policy(batch["rejected_input_ids"], batch["rejected_attention_mask"], batch["rejected_labels"],
                          with_wpo_term=wpo)
        masks = [batch["chosen_attention_mask"], batch["rejected_attention_mask"]]
    tokens = float(sum(int(m.sum()) for m in masks))
    slots = float(sum(m.numel() for m in masks))
    return chosen, rejected, tokens, slots


def _part(value, sl):
    return None if value is None else value[sl]


def _loss_and_sums(policy, rows: list[dict], pad_id: int, reference, cfg: TrainConfig, device):
    """The micro-batch's mean loss (to backpropagate) and its metric sums (to log)."""
    chosen, rejected, tokens, slots = _policy_logps(policy, rows, pad_id, cfg, device)
    ref = {}
    if reference is not None:
        cached = reference.lookup(torch.tensor([int(r["index"]) for r in rows], dtype=torch.long, device=device))
        ref = {"reference_chosen_logps": cached["chosen_logps"], "reference_rejected_logps": cached["rejected_logps"]}
    out = losses.preference_loss(
        cfg.loss_type, policy_chosen_logps=chosen.logps, policy_rejected_logps=rejected.logps,
        chosen_num_tokens=chosen.num_tokens, rejected_num_tokens=rejected.num_tokens, beta=cfg.beta,
        label_smoothing=cfg.label_smoothing, gamma_beta_ratio=cfg.gamma_beta_ratio, rpo_alpha=cfg.rpo_alpha,
        chosen_wpo_term=chosen.wpo_term, rejected_wpo_term=rejected.wpo_term, **ref,
    )
    sums = losses.metric_sums(out, chosen.logps, rejected.logps)
    extra = torch.tensor([tokens, slots], dtype=torch.float64, device=sums.device)
    return out.losses.mean(), torch.cat([sums, extra])


class Window:
    """Metric sums of the steps since the last logged row, reduced across ranks when logged."""

    def __init__(self, device):
        self.device = device
        self.sums = None
        self.grad_norm = None
        self.started = time.perf_counter()

    def add(self, sums: torch.Tensor) -> None:
        self.sums = sums if self.sums is None else self.sums + sums

    def flush(self, accelerator) -> dict[str, float]:
        total = accelerator.reduce(self.sums.to(self.device), reduction="sum")
        metrics = losses.metrics_from_sums(total[:-2])
        tokens, slots = total[-2:].tolist()
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        grad_norm = float(self.grad_norm) if self.grad_norm is not None else float("nan")
        row = {**metrics, "grad_norm": grad_norm, "tokens_per_second": tokens / elapsed,
               "padding_fraction": 1.0 - tokens / max(slots, 1.0), "_tokens": tokens,
               "_pairs": float(total[-3])}
        self.sums, self.started = None, time.perf_counter()
        return row


ROW_ORDER = ("step", "epoch", *losses.METRIC_NAMES, "learning_rate", "grad_norm", "tokens_per_second",
             "padding_fraction")


def _ordered(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ROW_ORDER}


@torch.no_grad()
def evaluate(policy, rows: list[dict], pad_id: int, reference, cfg: TrainConfig, accelerator) -> dict[str, float]:
    """The training metrics on the eval split, each rank taking every world-th length-sorted batch.

    Every rank runs the same number of forwards (the last ones may be repeats counted with weight
    0): under DDP and ZeRO-3 a forward is collective, so unequal counts would hang.
    """
    policy.eval()
    batches = length_grouped_batches(pair_lengths(rows), cfg.per_device_batch_size)
    world, rank = accelerator.num_processes, accelerator.process_index
    rounds = math.ceil(len(batches) / world)
    total = None
    for r in range(rounds):
        j = r * world + rank
        weight = 1.0 if j < len(batches) else 0.0
        _, sums = _loss_and_sums(policy, [rows[i] for i in batches[min(j, len(batches) - 1)]], pad_id, reference,
                                 cfg, accelerator.device)
        total = sums * weight if total is None else total + sums * weight
    total = accelerator.reduce(total, reduction="sum")
    policy.train()
    return {f"eval/{k}": v for k, v in losses.metrics_from_sums(total[:-2]).items()}


# ---------------------------------------------------------------------------------------------
# Build and close helpers.


def _broadcast(accelerator, value):
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No decay on biases and norm weights (1-D tensors), as in every modern LM recipe."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _scheduler(optimizer, cfg: TrainConfig, total_steps: int):
    from transformers import get_scheduler

    name = "constant_with_warmup" if cfg.lr_scheduler == "constant" else cfg.lr_scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=math.ceil(cfg.warmup_ratio * total_steps),
                         num_training_steps=total_steps)


def _tokenizer(cfg: TrainConfig, tokenized: ArtifactReader):
    """The tokenizer the data was made with, carrying the chat template that made it."""
    from transformers import AutoTokenizer

    source = tokenized.manifest.config.get("tokenizer") or cfg.model
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):
        log.warning("cannot load the tokenizer %s recorded by %s; saving --model's", source, cfg.tokenized)
        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    template = tokenized.manifest.stats.get("chat_template")
    if template:
        tokenizer.chat_template = template
    return tokenizer


def _save_final(accelerator, policy, cfg: TrainConfig, tokenized: ArtifactReader, final: Path) -> None:
    """The trained model (or LoRA adapter) with its tokenizer, as a from_pretrained folder."""
    save_model(accelerator, policy, final, tokenizer=_tokenizer(cfg, tokenized) if accelerator.is_main_process else None)


def _stats(accelerator, cfg: TrainConfig, step: int, totals: dict, global_batch: int, world: int,
           n_trainable: int, n_total: int, wall: float, tracker: Tracker) -> dict[str, Any]:
    # ru_maxrss is in KiB on Linux; every rank reports, the manifest keeps the largest.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    peaks = accelerator.reduce(torch.tensor([float(rss), float(gpu)], dtype=torch.float64, device=accelerator.device),
                               reduction="max")
    stats = {
        "steps": step, "pairs": int(totals["pairs"]), "tokens": int(totals["tokens"]),
        "train_seconds": round(totals["train_seconds"], 3), "wall_seconds_last_session": round(wall, 3),
        "tokens_per_second": totals["tokens"] / max(totals["train_seconds"], 1e-9),
        "peak_cpu_rss_bytes": int(peaks[0]), "peak_gpu_allocated_bytes": int(peaks[1]),
        "world_size": world, "global_batch_size": global_batch, "trainable_parameters": n_trainable,
        "parameters": n_total, "beta": cfg.beta, "wandb_run_id": tracker.run_id if cfg.wandb_project else None,
    }
    tracker.summary(stats)
    return stats
