"""`dpo train`: preference optimisation of a causal LM from a tokenized artifact and a reference cache.

build:  accelerator (ZeRO-3 must exist before from_pretrained) -> inputs and fingerprint -> the
        output (StageRun) -> policy (optionally LoRA) wrapped in LabelLogProbs -> AdamW and schedule
        -> data order -> resume state -> tracker
run:    one optimizer step per global batch: each rank runs its micro-batches, the loss is the
        mean over the global batch, metrics are reduced across ranks; eval, checkpoints and
        pre-emption at step boundaries
close:  <out>/final/ (model or adapter, with the tokenizer) and the manifest, written last

The batch order is a pure function of (seed, epoch), so the data cursor in TrainState plus the
model, optimizer, scheduler and RNG states is all a resumed run needs to reproduce an uninterrupted
one step for step. The reference model is never loaded: its log-probs come from the cache (for
LoRA, the cache of the base model), which keeps one model in memory.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import resource
import time
from pathlib import Path
from typing import Any

import torch

from ..artifacts.errors import UsageError
from ..artifacts.fingerprint import fingerprint, semantic_config
from ..artifacts.manifest import InputRef, Manifest, read_manifest
from ..artifacts.runner import StageRun
from ..artifacts.shards import ArtifactReader, file_entry
from ..pipeline import distributed as dist
from ..pipeline import metrics
from ..pipeline.accel import DistributedConfig, build_accelerator, make_adamw, unwrap
from ..pipeline.batching import (
    length_grouped_batches, pad_token_id, pair_indices, pair_lengths, scored_label_tokens, sequence_lengths, take_rows,
)
from ..pipeline.checkpoint import CheckpointManager, save_model
from ..pipeline.config import (
    StageOptions, at_least, flatten, fraction, group, non_negative, option, positive, validate,
)
from ..pipeline.data_order import BatchOrder, Cursor, micro_batches
from ..pipeline.logprobs import LabelLogProbs
from ..pipeline.logs import Progress, duration, progress
from ..pipeline.lora import LoraConfig, apply_lora, count_parameters
from ..pipeline.losses import BCO_REWARD, BatchContext, LossConfig, LossInputs, RewardShift
from ..pipeline.modeling import DTYPES, check_vocab, load_causal_lm, model_identity
from ..pipeline.refcache import ReferenceLogProbs, load_reference, reference_model_mismatch
from ..pipeline.packing import PACKING_HELP, enable_packing
from ..pipeline.profiling import PhaseTimer, model_flops_per_token
from ..pipeline.scoring import FORWARDS, PairScorer, forward_mode
from ..pipeline.tokenization import tokenizer_with_template
from ..pipeline.tracking import Tracker, TrackingConfig

STAGE = "train"
VERSION = 1
KIND = "train"
FINAL = "final"
OWNS = ("checkpoints/", "wandb/", "tensorboard/", "metrics.jsonl", FINAL + "/")  # what a (partial) run writes besides the manifest
SCHEDULERS = ("linear", "cosine", "constant")
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig(StageOptions):
    # Inputs enter the fingerprint through their own fingerprints, so moving them is harmless.
    tokenized: str = option(semantic=False, panel="Data", help="Tokenized artifact (from `dpo tokenize`).")
    model: str = option(semantic=False, panel="Data", help=(
        "Hugging Face model folder to train (the policy's starting point)."))
    out: str = option(semantic=False, panel="Data", help=(
        "Output folder: checkpoints/, metrics.jsonl, final/, manifest.json."))
    ref_cache: str | None = option(None, semantic=False, panel="Data", help=(
        "Reference log-probs (from `dpo cache-ref` on the same tokenized artifact); not needed for simpo or sft."))
    loss: LossConfig = group(LossConfig)
    learning_rate: float = option(1e-6, check=positive, panel="Optimisation", help="Peak learning rate of AdamW.")
    weight_decay: float = option(0.0, check=non_negative, panel="Optimisation", help=(
        "AdamW weight decay (not applied to biases and norms)."))
    lr_scheduler: str = option("linear", choices=SCHEDULERS, panel="Optimisation", help=(
        "linear, cosine or constant (each after the warmup)."))
    warmup_ratio: float = option(0.1, check=fraction(), panel="Optimisation", help=(
        "Fraction of the steps spent warming the learning rate up from 0."))
    epochs: int = option(1, check=at_least(1), panel="Optimisation", help=(
        "Passes over the train split (ignored with --max-steps)."))
    max_steps: int | None = option(None, check=at_least(1), panel="Optimisation", help=(
        "Optimizer steps to train; overrides --epochs."))
    # The fingerprint holds the global batch (per device x accumulation x processes) instead: the
    # same run on 8 GPUs x 1 or 2 GPUs x 4 accumulation is the same training, and may resume across.
    per_device_batch_size: int = option(8, semantic=False, check=at_least(1), panel="Optimisation", help=(
        "Pairs per process per micro-batch."))
    grad_accum: int = option(1, semantic=False, check=at_least(1), panel="Optimisation", help=(
        "Micro-batches per optimizer step (global batch = this x per-device batch x processes)."))
    max_grad_norm: float = option(1.0, check=non_negative, panel="Optimisation", help=(
        "Clip the gradient norm to this; 0 = no clipping."))
    seed: int = option(42, panel="Optimisation", help="Seed of the data order and of any randomness in training.")
    dtype: str = option("float32", choices=tuple(DTYPES), panel="Model", help=(
        "dtype of the loaded weights: float32, bfloat16 or float16."))
    # Same result either way (tested), so switching them on a resumed run is allowed.
    forward: str = option("concatenated", semantic=False, choices=tuple(FORWARDS), panel="Model", help=(
        "concatenated: one pass over chosen+rejected; separate: two passes, less peak memory. Same loss."))
    packing: bool = option(False, semantic=False, panel="Model", help=(
        PACKING_HELP + " A micro-batch stays --per-device-batch-size pairs, so the global batch, the loss and "
        "resume are those of the unpacked run."))
    gradient_checkpointing: bool = option(False, semantic=False, panel="Model", help=(
        "Recompute activations in backward to save memory."))
    keep_dropout: bool = option(False, panel="Model", help=(
        "Keep the model's dropout (off by default, as in TRL, so the policy starts equal to the reference)."))
    lora: LoraConfig = group(LoraConfig)
    distributed: DistributedConfig = group(DistributedConfig)
    eval_steps: int = option(0, semantic=False, check=at_least(0), panel="Checkpoints and eval", help=(
        "Every N steps, the metrics on the eval split as eval/...; 0 = off."))
    save_every: str = option("500", semantic=False, panel="Checkpoints and eval", help=(
        "Checkpoint every N steps, or 'epoch'."))
    keep_last: int | None = option(2, semantic=False, check=at_least(1), panel="Checkpoints and eval", help=(
        "Complete checkpoints to keep."))
    tracking: TrackingConfig = group(TrackingConfig)

    @property
    def save_every_epoch(self) -> bool:
        return self.save_every == "epoch"

    @property
    def save_every_steps(self) -> int:
        return 0 if self.save_every_epoch else int(self.save_every)

    def check(self) -> None:
        if not self.save_every_epoch and not (self.save_every.isdigit() and int(self.save_every) >= 1):
            raise UsageError(f"--save-every must be a number of steps (>= 1) or 'epoch', got {self.save_every!r}")
        if self.loss.needs_reference and not self.ref_cache:
            needing = [loss.name for loss in self.loss.losses if loss.needs_reference]
            raise UsageError(
                f"--loss-type {self.loss.loss_type}: {', '.join(needing)} compares the policy with a reference: pass "
                "--ref-cache DIR (made by `dpo cache-ref` from the same tokenized artifact)"
            )


@dataclasses.dataclass
class TrainState:
    """The trainer's own state, all a checkpoint needs besides the model, optimizer and schedule."""

    step: int = 0
    cursor: Cursor = Cursor()
    tokens: float = 0.0
    pairs: float = 0.0
    train_seconds: float = 0.0
    wandb_run_id: str | None = None
    loss_state: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. bco_pair's RewardShift

    def state_dict(self, global_batch: int) -> dict[str, Any]:
        state = {"step": self.step, "global_batch": global_batch, "wandb_run_id": self.wandb_run_id,
                 "train_seconds": self.train_seconds, "tokens": self.tokens, "pairs": self.pairs}
        return {**state, "loss_state": self.loss_state} if self.loss_state else state

    def data_cursor(self, global_batch: int) -> dict[str, int]:
        # In pairs, so DDP resumed on another number of processes continues at the same place in the data.
        return {"epoch": self.cursor.epoch, "samples_done": self.cursor.batches_done * global_batch}

    @classmethod
    def from_state_dict(cls, saved: dict[str, Any], global_batch: int) -> TrainState:
        cursor = saved.get("data_cursor") or {"epoch": 0, "samples_done": 0}
        return cls(step=int(saved.get("step", 0)),
                   cursor=Cursor(int(cursor["epoch"]), int(cursor["samples_done"]) // global_batch),
                   tokens=float(saved.get("tokens", 0)), pairs=float(saved.get("pairs", 0)),
                   train_seconds=float(saved.get("train_seconds", 0.0)), wandb_run_id=saved.get("wandb_run_id"),
                   loss_state=dict(saved.get("loss_state") or {}))


@dataclasses.dataclass
class Inputs:
    tokenized: ArtifactReader
    reference: ReferenceLogProbs | None
    refs: list[InputRef]
    splits: list[str]


# ---------------------------------------------------------------------------------------- build


def run(cfg: TrainConfig) -> None:
    validate(cfg)
    cfg = dataclasses.replace(cfg, loss=cfg.loss.resolved())
    accelerator = build_accelerator(cfg.distributed, grad_accum=cfg.grad_accum,
                                    per_device_batch_size=cfg.per_device_batch_size, max_grad_norm=cfg.max_grad_norm)
    inputs = _inputs(cfg)
    global_batch = cfg.per_device_batch_size * cfg.grad_accum * accelerator.num_processes
    semantic = {**semantic_config(cfg), "global_batch": global_batch}
    if cfg.loss.sorts_micro_batch:
        # aot sorts within a micro-batch, so which pairs share one (set by this size) changes the loss.
        semantic["per_device_batch_size"] = cfg.per_device_batch_size
    fp = fingerprint(STAGE, VERSION, semantic, [r.fingerprint for r in inputs.refs] + [model_identity(cfg.model)["digest"]])
    def checkpoints_in(folder: Path) -> CheckpointManager:
        return CheckpointManager(folder / "checkpoints", accelerator=accelerator, fingerprint=fp, config=semantic,
                                 keep_last=cfg.keep_last, inputs=inputs.refs, verify=cfg.verify_inputs)

    # Checkpoints of another config are refused with what differs before a partial run of another
    # fingerprint would be discarded.
    with StageRun(STAGE, cfg.out, KIND, fp, overwrite=cfg.overwrite, lock_timeout=cfg.lock_timeout,
                  collective=dist.COLLECTIVE, inputs=_input_paths(cfg), owns=OWNS,
                  inspect=lambda out: checkpoints_in(out).check_latest()) as stage_run:
        if stage_run.complete:
            return
        trainer = Trainer(cfg, accelerator, inputs, checkpoints_in(stage_run.dir), stage_run, fp)
        try:
            trainer.fit()
            trainer.close()
        except BaseException as exc:
            # W&B marks a pre-empted run as stopped (75), not crashed; the rerun continues it.
            trainer.tracker.close(getattr(exc, "exit_code", 1))
            raise
    accelerator.wait_for_everyone()


def _input_paths(cfg: TrainConfig) -> list[tuple[str, str | None]]:
    return [("--tokenized", cfg.tokenized), ("--ref-cache", cfg.ref_cache), ("--model", cfg.model),
            ("--deepspeed-config", cfg.distributed.deepspeed_config)]


def _inputs(cfg: TrainConfig) -> Inputs:
    tokenized = ArtifactReader(cfg.tokenized, kind="tokenized", verify=cfg.verify_inputs, in_background=True)
    if cfg.eval_steps and "eval" not in tokenized.splits:
        raise UsageError(f"--eval-steps {cfg.eval_steps}: {cfg.tokenized} has no eval split "
                         "(make one with `dpo tokenize --eval-fraction` or --eval-data)")
    check_vocab(cfg.model, cfg.tokenized, tokenized.manifest)
    splits = ["train"] + (["eval"] if cfg.eval_steps else [])
    refs = [InputRef("tokenized", str(cfg.tokenized), tokenized.fingerprint)]
    reference = None
    if cfg.loss.needs_reference:
        reference = load_reference(cfg.ref_cache, tokenized.manifest, splits, shared=cfg.loss.needs_shared_logps,
                                   verify=cfg.verify_inputs)
        mismatch = reference_model_mismatch(reference, cfg.model)
        if mismatch:
            # Allowed on purpose: continuing from a DPO checkpoint with the SFT model as reference.
            log.warning("%s; training proceeds with the cache as the reference", mismatch)
        refs.append(InputRef("ref-logps", str(cfg.ref_cache), reference.fingerprint))
    elif cfg.ref_cache:
        log.info("--loss-type %s is reference-free: not reading --ref-cache %s", cfg.loss.loss_type, cfg.ref_cache)
    return Inputs(tokenized, reference, refs, splits)


class Trainer:
    """The policy, its optimizer and schedule, the data and its order, the state, and the loop."""

    def __init__(self, cfg: TrainConfig, accelerator, inputs: Inputs, checkpoints: CheckpointManager,
                 stage_run: StageRun, fingerprint: str):
        self.cfg, self.accelerator, self.inputs, self.checkpoints = cfg, accelerator, inputs, checkpoints
        self.stage_run, self.fingerprint = stage_run, fingerprint
        self.started = time.perf_counter()
        self.world = accelerator.num_processes
        self.global_batch = cfg.per_device_batch_size * cfg.grad_accum * self.world
        self._check_data()
        # The model first: the data's sha256 check runs on meanwhile, and reading the data waits for it.
        self.policy, self.optimizer, self.n_trainable, self.n_total = self._build_policy()
        self.train_rows, self.eval_rows = self._read_data()
        self.lengths = pair_lengths(self.train_rows)
        self.order = BatchOrder(self.lengths, self.global_batch, cfg.seed)
        self.trainable = [p for p in self.policy.parameters() if p.requires_grad]
        self.total_steps = cfg.max_steps or cfg.epochs * self.order.steps_per_epoch
        self.scheduler = _scheduler(self.optimizer, cfg, self.total_steps)
        # The tokenizer the data was made with (and its chat template) goes into every checkpoint's
        # model/ and into final/, so each of them loads on its own.
        tokenized = inputs.tokenized.manifest
        self.tokenizer = tokenizer_with_template([tokenized.config.get("tokenizer"), cfg.model],
                                                 tokenized.stats.get("chat_template")) if accelerator.is_main_process else None
        saved = checkpoints.load_latest(self.policy, self.optimizer, self.scheduler)
        self.state = TrainState.from_state_dict(saved, self.global_batch) if saved else TrainState()
        self.reward_shift = RewardShift() if cfg.loss.bco_reward_shift else None
        if self.reward_shift is not None and "bco_reward_shift" in self.state.loss_state:
            self.reward_shift.load_state_dict(self.state.loss_state["bco_reward_shift"])
        self.scorer = PairScorer(self.policy, forward_mode(cfg.forward, cfg.packing),
                                 pad_token_id(inputs.tokenized.manifest.stats), accelerator.device,
                                 with_wpo_term=cfg.loss.needs_wpo_term, agree=dist.COLLECTIVE,
                                 with_shared=cfg.loss.needs_shared_logps)
        self.timer = PhaseTimer(accelerator.device)
        self.scorer.timer = unwrap(accelerator, self.policy).timer = self.timer
        self.tracker = Tracker(stage_run.dir, cfg.tracking, is_main=accelerator.is_main_process,
                               resume_step=self.state.step, run_id=self.state.wandb_run_id,
                               config=self._tracker_config() if accelerator.is_main_process else {})
        self.state.wandb_run_id = self.tracker.run_id
        if self.state.step:
            log.info("resuming from step %d (epoch %d, batch %d of %d)", self.state.step, self.state.cursor.epoch,
                     self.state.cursor.batches_done, self.order.steps_per_epoch)
        log.info("training %s of %s parameters on %d pairs: %d steps of %d pairs (%d per device x %d accumulation "
                 "x %d processes), loss %s beta %g", f"{self.n_trainable:,}", f"{self.n_total:,}",
                 self.train_rows.num_rows, self.total_steps, self.global_batch, cfg.per_device_batch_size,
                 cfg.grad_accum, self.world, cfg.loss.loss_type, cfg.loss.beta)

    def _tracker_config(self) -> dict[str, Any]:
        """The run's whole lineage for W&B's config (and TensorBoard's "config" text): train's options at
        the top level, as TRL's config, then what made its inputs: tokenize's and cache-ref's settings,
        the data sources with their content hashes, and every fingerprint."""
        cfg, tokenized = self.cfg, self.inputs.tokenized.manifest
        config: dict[str, Any] = {
            **flatten(cfg), "loss": cfg.loss.to_json(), "fingerprint": self.fingerprint, "world_size": self.world,
            "global_batch_size": self.global_batch, "total_steps": self.total_steps,
            "train_pairs": self.train_rows.num_rows, "model_identity": model_identity(cfg.model)["digest"],
            "data": [{"source": i.path, "sha256": i.fingerprint} for i in tokenized.inputs if i.kind == "data"],
            "tokenize": {"path": str(cfg.tokenized), "fingerprint": tokenized.fingerprint, **_settings(tokenized.config),
                         "pairs": {s: tokenized.rows(s) for s in tokenized.splits}},
        }
        if self.inputs.reference is not None:
            ref = read_manifest(cfg.ref_cache, "ref-logps")
            config["cache_ref"] = {"path": str(cfg.ref_cache), "fingerprint": ref.fingerprint, **_settings(ref.config),
                                   "model_identity": (ref.stats.get("model_identity") or {}).get("sampled_digest")}
        return config

    def _check_data(self) -> None:
        manifest, cfg = self.inputs.tokenized.manifest, self.cfg
        if cfg.eval_steps and manifest.rows("eval") == 0:
            raise UsageError(f"--eval-steps {cfg.eval_steps}: the eval split of {cfg.tokenized} has no pairs "
                             "(all were filtered out?); see its rejects.jsonl, or pass --eval-steps 0")
        if manifest.rows("train") < self.global_batch:
            raise UsageError(
                f"{cfg.tokenized}: the train split has {manifest.rows('train')} pairs, fewer than one global batch "
                f"({cfg.per_device_batch_size} per device x {cfg.grad_accum} accumulation x {self.world} processes)"
            )

    def _read_data(self):
        tokenized = self.inputs.tokenized
        return tokenized.read_split("train"), tokenized.read_split("eval") if self.cfg.eval_steps else None

    def _build_policy(self):
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        model = load_causal_lm(cfg.model, dtype=cfg.dtype, keep_dropout=cfg.keep_dropout)
        if cfg.packing:
            enable_packing(model)
        if cfg.gradient_checkpointing:
            # Non-reentrant checkpointing needs no input grads, so it also works for frozen LoRA bases.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora.lora:
            model = apply_lora(model, cfg.lora)
        n_trainable, n_total = count_parameters(model)
        optimizer = make_adamw(self.accelerator, _param_groups(model, cfg.weight_decay), lr=cfg.learning_rate,
                               weight_decay=cfg.weight_decay)
        # LabelLogProbs is what runs forward, so DDP and DeepSpeed wrap it, not the bare model.
        policy, optimizer = self.accelerator.prepare(LabelLogProbs(model), optimizer)
        return policy, optimizer, n_trainable, n_total

    # ------------------------------------------------------------------------------------- run

    def fit(self) -> None:
        cfg, state = self.cfg, self.state
        bar = progress(total=self.total_steps, desc="train", unit="steps", quiet=cfg.quiet, initial=state.step,
                       log_every=None, logger=log)
        window = metrics.Window()
        self.session_start = time.perf_counter()
        self.policy.train()
        with bar:
            while state.step < self.total_steps:
                learning_rate = self.scheduler.get_last_lr()[0]
                window.add(self.train_step(self.order.batch(state.cursor)))
                window.grad_norm = self.grad_norm
                self.scheduler.step()
                state.step += 1
                state.cursor = self.order.advance(state.cursor)
                stop = self.stage_run.stop_requested()
                save = stop or self._save_due()
                # A checkpoint step is always logged, so no half-filled metric window is lost on resume.
                if state.step in (1, self.total_steps) or state.step % cfg.tracking.logging_steps == 0 or save:
                    self._log(window, learning_rate, bar)
                if cfg.eval_steps and (state.step % cfg.eval_steps == 0 or state.step == self.total_steps):
                    self._log_eval()
                bar.update(1)
                if save:
                    self.save()
                if stop:
                    raise self.stage_run.preempted(f"after step {state.step} and saved a checkpoint in "
                                                   f"{self.checkpoints.latest_path()}")

    def train_step(self, batch: list[int]) -> dict[str, torch.Tensor]:
        """One optimizer step over this rank's micro-batches of the global batch; the metric sums."""
        sums, self.grad_norm, timer = None, None, self.timer
        context = self._context(self.train_rows, batch)
        with timer.step():
            for micro in micro_batches(batch, self.lengths, self.cfg.per_device_batch_size, self.cfg.grad_accum,
                                       self.world, self.accelerator.process_index):
                with self.accelerator.accumulate(self.policy):
                    with timer.phase("data"):
                        pairs = take_rows(self.train_rows, micro)
                    loss, micro_sums = self._loss_and_sums(pairs, context)
                    with timer.phase("backward"):
                        self.accelerator.backward(loss)
                    with timer.phase("optimizer"):
                        if self.accelerator.sync_gradients:
                            # 0 turns clipping off; an infinite bound still measures the norm.
                            self.grad_norm = float(self.accelerator.clip_grad_norm_(
                                self.trainable, self.cfg.max_grad_norm or math.inf))
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                sums = metrics.add(sums, micro_sums)
        if self.reward_shift is not None:
            # After the step, from every rank's pairs: the next step's δ, the same for any split.
            moved = metrics.reduced({k: sums[k] for k in (BCO_REWARD, "pairs")}, self._sum_over_ranks,
                                    self.accelerator.device)
            self.reward_shift.update(moved[BCO_REWARD], moved["pairs"])
        return sums

    def _context(self, rows, positions: list[int] | None = None) -> BatchContext:
        """The batch the loss is averaged over (a global batch, or the eval split), counted before any forward.

        Every rank counts the same pairs, so every micro-batch of every rank gets the same context.
        """
        chosen_tokens = 0.0
        if self.cfg.loss.needs_token_count:
            chosen_tokens = float(scored_label_tokens(rows, "chosen", positions).sum())
        shift = self.reward_shift.value if self.reward_shift is not None else 0.0
        return BatchContext(float(rows.num_rows if positions is None else len(positions)), chosen_tokens, shift)

    def _loss_and_sums(self, pairs, context: BatchContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """A micro-batch's mean loss (to backpropagate) and its metric sums (to log)."""
        scores = self.scorer(pairs)
        with self.timer.phase("loss"):
            reference = None
            if self.inputs.reference is not None:
                index = torch.from_numpy(pair_indices(pairs)).to(self.accelerator.device)
                reference = self.inputs.reference.lookup(index)
            out = self.cfg.loss(LossInputs.of(scores.chosen, scores.rejected, reference), context)
            return out.losses.mean(), metrics.batch_sums(out, scores)

    def _save_due(self) -> bool:
        step, cfg = self.state.step, self.cfg
        return step < self.total_steps and bool(
            (cfg.save_every_steps and step % cfg.save_every_steps == 0)
            or (cfg.save_every_epoch and self.state.cursor.batches_done == 0))

    def _epoch(self) -> float:
        return self.order.epoch_progress(self.state.cursor)

    def _log(self, window: metrics.Window, learning_rate: float, bar: Progress) -> None:
        row, counts = window.flush(self._sum_over_ranks, self.accelerator.device)
        self.state.tokens += counts["tokens"]
        self.state.pairs += counts["pairs"]
        row = {"step": self.state.step, "epoch": self._epoch(), **metrics.means_of(row),
               "learning_rate": learning_rate, "grad_norm": row["grad_norm"],
               "tokens_per_second": row["tokens_per_second"], "padding_fraction": row["padding_fraction"]}
        self.tracker.log(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}")
        bar.line(self._progress_line(row, bar))

    def _progress_line(self, row: dict[str, Any], bar: Progress) -> str:
        """What a log file shows every logging step, in place of the bar: the row's headline numbers,
        throughput, the training time so far (all sessions) and this session's ETA."""
        step, total = row["step"], self.total_steps
        eta = bar.eta(done=step)  # the bar counts this step after the row is logged
        return " | ".join([
            f"step {step}/{total} ({100 * step / total:.0f}%)", f"epoch {row['epoch']:.2f}", f"loss {row['loss']:.4f}",
            f"rewards/accuracies {row['rewards/accuracies']:.3f}", f"rewards/margins {row['rewards/margins']:.4f}",
            f"lr {row['learning_rate']:.3g}", f"{row['tokens_per_second']:,.0f} tokens/s",
            f"elapsed {duration(self._train_seconds())}", f"ETA {duration(eta) if eta is not None else '?'}",
        ])

    def _log_eval(self) -> None:
        """Eval metrics to metrics.jsonl and the trackers, and always to the log (above the bar on a terminal)."""
        started = time.perf_counter()
        values = self.evaluate()
        self.tracker.log({"step": self.state.step, "epoch": self._epoch(), **values})
        log.info("eval at step %d/%d: %s (%d pairs, %.1fs)", self.state.step, self.total_steps, " | ".join(
            f"{k} {values[k]:.4g}" for k in ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins",
                                             "eval/logps/chosen", "eval/logps/rejected") if k in values),
            self.eval_rows.num_rows, time.perf_counter() - started)

    def _sum_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(values, reduction="sum")

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The training metrics on the eval split, each rank taking every world-th length-sorted batch.

        Every rank runs the same number of forwards (the last ones may be repeats counted with weight
        0): under DDP and ZeRO-3 a forward is collective, so unequal counts would hang.
        """
        self.policy.eval()
        batches = length_grouped_batches(pair_lengths(self.eval_rows), self.cfg.per_device_batch_size)
        rank = self.accelerator.process_index
        context = self._context(self.eval_rows)
        total = None
        for r in range(math.ceil(len(batches) / self.world)):
            j = r * self.world + rank
            _, sums = self._loss_and_sums(take_rows(self.eval_rows, batches[min(j, len(batches) - 1)]), context)
            total = metrics.add(total, sums, weight=1.0 if j < len(batches) else 0.0)
        self.policy.train()
        means = metrics.means(metrics.reduced(total, self._sum_over_ranks, self.accelerator.device))
        return {f"eval/{k}": v for k, v in means.items()}

    def save(self) -> None:
        state = dataclasses.replace(self.state, train_seconds=self._train_seconds(), loss_state=self._loss_state())
        self.checkpoints.save(state.step, self.policy, self.optimizer, self.scheduler,
                              state.state_dict(self.global_batch), data_cursor=state.data_cursor(self.global_batch),
                              tokenizer=self.tokenizer)

    def _loss_state(self) -> dict[str, Any]:
        return {"bco_reward_shift": self.reward_shift.state_dict()} if self.reward_shift is not None else {}

    def _train_seconds(self) -> float:
        return self.state.train_seconds + time.perf_counter() - self.session_start

    # ----------------------------------------------------------------------------------- close

    def close(self) -> None:
        """final/ (the model or adapter with its tokenizer), then the manifest: the commit."""
        cfg, out = self.cfg, self.stage_run.dir
        self.state.train_seconds = self._train_seconds()
        final = out / FINAL
        save_model(self.accelerator, self.policy, final, tokenizer=self.tokenizer)
        manifest_stats = self._stats()
        manifest = None
        if self.accelerator.is_main_process:
            files = [file_entry(out, "metrics.jsonl")] + [
                file_entry(out, p.relative_to(out).as_posix()) for p in sorted(final.rglob("*")) if p.is_file()]
            manifest = Manifest(kind=KIND, fingerprint=self.fingerprint, config={**flatten(cfg), "loss": cfg.loss.to_json()},
                                inputs=self.inputs.refs, files=files, stats=manifest_stats)
        self.tracker.close(0)
        self.stage_run.commit(manifest)
        if manifest is not None:
            log.info("trained %d steps in %.0fs (%.0f tokens/s, peak RSS %.0f MiB); final model in %s", self.state.step,
                     self.state.train_seconds, manifest_stats["tokens_per_second"],
                     manifest_stats["peak_cpu_rss_bytes"] / 2**20, final)

    def _stats(self) -> dict[str, Any]:
        # ru_maxrss is in KiB on Linux; every rank reports, the manifest keeps the largest.
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
        peaks = self.accelerator.reduce(torch.tensor([float(rss), float(gpu)], dtype=torch.float64,
                                                     device=self.accelerator.device), reduction="max")
        state = self.state
        stats = {
            "steps": state.step, "pairs": int(state.pairs), "tokens": int(state.tokens),
            "train_seconds": round(state.train_seconds, 3),
            "wall_seconds_last_session": round(time.perf_counter() - self.started, 3),
            "tokens_per_second": state.tokens / max(state.train_seconds, 1e-9),
            "peak_cpu_rss_bytes": int(peaks[0]), "peak_gpu_allocated_bytes": int(peaks[1]),
            "world_size": self.world, "global_batch_size": self.global_batch,
            "trainable_parameters": self.n_trainable, "parameters": self.n_total, "beta": self.cfg.loss.beta,
            "wandb_run_id": self.tracker.run_id if "wandb" in self.cfg.tracking.destinations else None,
            "time_breakdown": self.timer.breakdown(),
        }
        flops = model_flops_per_token(unwrap(self.accelerator, self.policy).hf_model,
                                      *sequence_lengths(self.train_rows), backward=True)
        stats.update(flops, model_flops_per_second=flops["model_flops_per_token"] * stats["tokens_per_second"])
        if self._loss_state():
            stats["loss_state"] = self._loss_state()  # what evaluate needs to compute the same objective
        self.tracker.summary(stats)
        return stats


def _settings(config: dict[str, Any]) -> dict[str, Any]:
    """A stage's recorded options without the ones that say only how it was run."""
    return {k: v for k, v in config.items()
            if k not in ("overwrite", "lock_timeout", "quiet", "verify_inputs", "out", "num_proc")}


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
