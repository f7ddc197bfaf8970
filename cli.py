"""The `dpo` command line: one thin command per stage.

Each command parses its options (and the matching section of ``--config``), builds the stage's
config, calls the stage, and maps the errors a user can act on to exit codes (see ``dpo --help``).
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import __version__
from .pipeline.config import config_callback
from .pipeline.errors import EXIT_CODES, DpoError
from .pipeline.logs import setup_logging

EXIT_CODE_HELP = "Exit codes: " + "; ".join(f"{code} {meaning}" for code, meaning in EXIT_CODES.items()) + "."

app = typer.Typer(
    name="dpo",
    help="Direct Preference Optimization as resumable stages: tokenize -> cache-ref -> train -> export -> evaluate. "
    + EXIT_CODE_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
log = logging.getLogger("dpo")


def _config(ctx: typer.Context, param: typer.CallbackParam, value: Optional[Path]) -> Optional[Path]:
    return config_callback(ctx, param, str(value) if value else None) and value


ConfigOpt = Annotated[
    Optional[Path],
    typer.Option("--config", help="YAML run file; this stage reads its own section. Flags override it.",
                 callback=_config, is_eager=True, show_default=False),
]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace a complete output that was made with a different fingerprint.")
]
LockTimeoutOpt = Annotated[
    float, typer.Option("--lock-timeout", help="Seconds without a heartbeat after which another job's lock on --out is taken over.")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors; no progress bar.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")]


def stage_command(fn):
    """Run a command body, turning a DpoError into its message and exit code (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        setup_logging(quiet=kwargs.get("quiet", False), verbose=kwargs.get("verbose", False))
        try:
            return fn(*args, **kwargs)
        except DpoError as exc:
            typer.echo(f"dpo {fn.__name__.replace('_', '-')}: error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        finally:
            _close_process_group()

    return wrapper


def _close_process_group() -> None:
    """Tear down torch.distributed before exit: a process group left to interpreter shutdown can
    abort the process ("terminate called without an active exception") after a successful run."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dpo {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", callback=_version, is_eager=True)
    ] = False,
) -> None:
    """Direct Preference Optimization as resumable pipeline stages."""


@app.command("tokenize")
@stage_command
def tokenize(
    data: Annotated[list[str], typer.Option("--data", help="Preference data (repeatable): .jsonl/.jsonl.gz/.json/.parquet file or folder, datasets.save_to_disk folder, or hub name. PATH:0.5 takes a fraction, PATH:1000 a row count (sampled with --seed).", show_default=False)],
    tokenizer: Annotated[Path, typer.Option("--tokenizer", help="Tokenizer folder (a model folder works).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Output folder of the tokenized artifact.", show_default=False)],
    config: ConfigOpt = None,
    eval_data: Annotated[Optional[list[str]], typer.Option("--eval-data", help="Sources for the eval split (repeatable, same syntax as --data).", show_default=False)] = None,
    eval_fraction: Annotated[float, typer.Option("--eval-fraction", help="Hold out this fraction of the --data records (seeded, before filtering) as the eval split.")] = 0.0,
    max_seq_length: Annotated[int, typer.Option("--max-seq-length", help="Most tokens in prompt+response, per side.")] = 1024,
    max_prompt_length: Annotated[Optional[int], typer.Option("--max-prompt-length", help="Cut longer prompts from the left, keeping their latest turns (default: no limit).", show_default=False)] = None,
    truncation: Annotated[str, typer.Option("--truncation", help="Pairs over --max-seq-length: keep-start (keep the prompt and the start of the responses) or drop.")] = "keep-start",
    format: Annotated[str, typer.Option("--format", help="Record format: auto (detect per source), text, chat, chat-prompt, hh, sharegpt.")] = "auto",
    columns: Annotated[Optional[str], typer.Option("--columns", help="Map other column names, e.g. prompt=question,chosen=good,rejected=bad.", show_default=False)] = None,
    chat_template: Annotated[Optional[Path], typer.Option("--chat-template", help="Jinja chat template file used instead of the tokenizer's.", show_default=False)] = None,
    apply_chat_template: Annotated[bool, typer.Option("--apply-chat-template", help="Wrap plain-text pairs as one user turn and one assistant turn of the chat template.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the PATH:AMOUNT sampling and the eval split.")] = 42,
    num_proc: Annotated[int, typer.Option("--num-proc", help="Tokenizer processes; the output is byte-identical for any value.")] = 1,
    rows_per_shard: Annotated[int, typer.Option("--rows-per-shard", help="Input records per Parquet shard (before filtering); the unit of resume.")] = 50_000,
    on_bad_record: Annotated[str, typer.Option("--on-bad-record", help="A malformed record: error (stop, exit 2) or skip (list it in rejects.jsonl).")] = "error",
    overwrite: OverwriteOpt = False,
    lock_timeout: LockTimeoutOpt = 600.0,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
):
    """Turn preference data into a tokenized artifact; rerunning the same command resumes or is a no-op."""
    from .stages import tokenize as stage

    stage.run(stage.TokenizeConfig(
        data=tuple(data), tokenizer=str(tokenizer), out=str(out), eval_data=tuple(eval_data or ()),
        eval_fraction=eval_fraction, max_seq_length=max_seq_length, max_prompt_length=max_prompt_length,
        truncation=truncation, format=format, columns=columns, chat_template=str(chat_template) if chat_template else None,
        apply_chat_template=apply_chat_template, seed=seed, rows_per_shard=rows_per_shard, on_bad_record=on_bad_record,
        num_proc=num_proc, overwrite=overwrite, lock_timeout=lock_timeout, quiet=quiet, verbose=verbose,
    ))


@app.command("cache-ref")
@stage_command
def cache_ref(
    tokenized: Annotated[Path, typer.Option("--tokenized", help="Tokenized artifact (from `dpo tokenize`).", show_default=False)],
    model: Annotated[Path, typer.Option("--model", help="Reference model: a Hugging Face model folder (for LoRA runs, the base model).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Output folder for the ref-logps artifact.", show_default=False)],
    config: ConfigOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Pairs per forward; batches are formed from pairs of similar length.")] = 8,
    dtype: Annotated[str, typer.Option("--dtype", help="Weights dtype: float32, bfloat16 or float16 (log-softmax is always float32). Part of the fingerprint.")] = "float32",
    forward: Annotated[str, typer.Option("--forward", help="concatenated: chosen and rejected in one forward; separate: two forwards, less peak memory. Same values.")] = "concatenated",
    split: Annotated[Optional[list[str]], typer.Option("--split", help="Split to compute (repeatable); default: every split of --tokenized.", show_default=False)] = None,
    verify: Annotated[bool, typer.Option("--verify", help="Identify the model by the full sha256 of its weight files (reads them all) instead of a sampled identity; the fingerprint changes with it.")] = False,
    rows_per_shard: Annotated[int, typer.Option("--rows-per-shard", help="Pairs per output shard: the unit of resumption and of work per process.")] = 2048,
    overwrite: OverwriteOpt = False,
    lock_timeout: LockTimeoutOpt = 600.0,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
):
    """Compute the reference model's log-probs of every chosen and rejected response (resumable, multi-process)."""
    from .stages import cache_ref as stage

    stage.run(stage.CacheRefConfig(
        tokenized=str(tokenized), model=str(model), out=str(out), batch_size=batch_size, dtype=dtype,
        forward=forward, splits=tuple(split or ()), verify=verify, rows_per_shard=rows_per_shard,
        overwrite=overwrite, lock_timeout=lock_timeout, quiet=quiet,
    ))


@app.command("train")
@stage_command
def train(
    tokenized: Annotated[Path, typer.Option("--tokenized", help="Tokenized artifact (from `dpo tokenize`).", show_default=False)],
    model: Annotated[Path, typer.Option("--model", help="Hugging Face model folder to train (the policy's starting point).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Output folder: checkpoints/, metrics.jsonl, final/, manifest.json.", show_default=False)],
    config: ConfigOpt = None,
    ref_cache: Annotated[Optional[Path], typer.Option("--ref-cache", help="Reference log-probs (from `dpo cache-ref` on the same tokenized artifact); not needed for simpo.", show_default=False)] = None,
    loss_type: Annotated[str, typer.Option("--loss-type", help="dpo, dpo_norm, simpo, wpo, ipo, hinge or robust.")] = "dpo",
    beta: Annotated[Optional[float], typer.Option("--beta", help="Strength of the KL penalty / reward scale. Default by loss type: 0.1 for dpo, wpo, ipo, hinge, robust; 5 for dpo_norm (Tulu 3); 2 for simpo.", show_default=False)] = None,
    label_smoothing: Annotated[float, typer.Option("--label-smoothing", help="Label smoothing ε (cDPO); for robust it must lie in [0, 0.5).")] = 0.0,
    gamma_beta_ratio: Annotated[float, typer.Option("--gamma-beta-ratio", help="SimPO's target margin γ/β.")] = 0.3,
    rpo_alpha: Annotated[float, typer.Option("--rpo-alpha", help="Add this times the chosen response's per-token NLL (RPO); 0 = off.")] = 0.0,
    learning_rate: Annotated[float, typer.Option("--learning-rate", help="Peak learning rate of AdamW.")] = 1e-6,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay (not applied to biases and norms).")] = 0.0,
    lr_scheduler: Annotated[str, typer.Option("--lr-scheduler", help="linear, cosine or constant (each after the warmup).")] = "linear",
    warmup_ratio: Annotated[float, typer.Option("--warmup-ratio", help="Fraction of the steps spent warming the learning rate up from 0.")] = 0.1,
    epochs: Annotated[int, typer.Option("--epochs", help="Passes over the train split (ignored with --max-steps).")] = 1,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="Optimizer steps to train; overrides --epochs.", show_default=False)] = None,
    per_device_batch_size: Annotated[int, typer.Option("--per-device-batch-size", help="Pairs per process per micro-batch.")] = 8,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Micro-batches per optimizer step (global batch = this x per-device batch x processes).")] = 1,
    max_grad_norm: Annotated[float, typer.Option("--max-grad-norm", help="Clip the gradient norm to this; 0 = no clipping.")] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the data order and of any randomness in training.")] = 42,
    dtype: Annotated[str, typer.Option("--dtype", help="dtype of the loaded weights: float32, bfloat16 or float16.")] = "float32",
    mixed_precision: Annotated[str, typer.Option("--mixed-precision", help="no, bf16 or fp16 autocast through Accelerate (master weights stay in --dtype).")] = "no",
    forward: Annotated[str, typer.Option("--forward", help="concatenated: one pass over chosen+rejected; separate: two passes, less peak memory. Same loss.")] = "concatenated",
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing", help="Recompute activations in backward to save memory.")] = False,
    keep_dropout: Annotated[bool, typer.Option("--keep-dropout", help="Keep the model's dropout (off by default, as in TRL, so the policy starts equal to the reference).")] = False,
    lora: Annotated[bool, typer.Option("--lora", help="Train LoRA adapters (PEFT) instead of all weights; the adapter is what is saved.")] = False,
    lora_rank: Annotated[int, typer.Option("--lora-rank", help="LoRA rank r.")] = 16,
    lora_alpha: Annotated[float, typer.Option("--lora-alpha", help="LoRA scaling alpha.")] = 32.0,
    lora_dropout: Annotated[float, typer.Option("--lora-dropout", help="Dropout on the LoRA input; 0 by default, like every other dropout (see --keep-dropout).")] = 0.0,
    lora_target_modules: Annotated[list[str], typer.Option("--lora-target-modules", help="Module names to adapt (repeatable), or all-linear.")] = ["all-linear"],
    zero_stage: Annotated[Optional[int], typer.Option("--zero-stage", help="DeepSpeed ZeRO stage 0-3 (default: plain DDP).", show_default=False)] = None,
    offload_optimizer: Annotated[bool, typer.Option("--offload-optimizer", help="ZeRO-Offload the optimizer state to CPU (stage >= 1).")] = False,
    offload_params: Annotated[bool, typer.Option("--offload-params", help="Offload parameters to CPU (stage 3).")] = False,
    deepspeed_config: Annotated[Optional[Path], typer.Option("--deepspeed-config", help="DeepSpeed JSON config ('auto' values are filled from these flags).", show_default=False)] = None,
    eval_steps: Annotated[int, typer.Option("--eval-steps", help="Every N steps, the metrics on the eval split as eval/...; 0 = off.")] = 0,
    logging_steps: Annotated[int, typer.Option("--logging-steps", help="Log metrics every N steps (step 1 and the last step always).")] = 10,
    save_every: Annotated[str, typer.Option("--save-every", help="Checkpoint every N steps, or 'epoch'.")] = "500",
    keep_last: Annotated[int, typer.Option("--keep-last", help="Complete checkpoints to keep.")] = 2,
    wandb_project: Annotated[Optional[str], typer.Option("--wandb-project", help="Also log to this Weights & Biases project (WANDB_MODE=offline works).", show_default=False)] = None,
    wandb_entity: Annotated[Optional[str], typer.Option("--wandb-entity", help="W&B entity (team or user).", show_default=False)] = None,
    wandb_run_name: Annotated[Optional[str], typer.Option("--wandb-run-name", help="W&B run name.", show_default=False)] = None,
    overwrite: OverwriteOpt = False,
    lock_timeout: LockTimeoutOpt = 600.0,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
):
    """Train a policy with DPO or a variant; rerunning the same command resumes or is a no-op."""
    from .stages import train as stage

    stage.run(stage.TrainConfig(
        tokenized=str(tokenized), model=str(model), out=str(out), ref_cache=str(ref_cache) if ref_cache else None,
        loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, gamma_beta_ratio=gamma_beta_ratio,
        rpo_alpha=rpo_alpha, learning_rate=learning_rate, weight_decay=weight_decay, lr_scheduler=lr_scheduler,
        warmup_ratio=warmup_ratio, epochs=epochs, max_steps=max_steps, per_device_batch_size=per_device_batch_size,
        grad_accum=grad_accum, max_grad_norm=max_grad_norm, seed=seed, dtype=dtype, mixed_precision=mixed_precision,
        keep_dropout=keep_dropout, lora=lora, lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
        lora_target_modules=tuple(lora_target_modules), zero_stage=zero_stage, offload_optimizer=offload_optimizer,
        offload_params=offload_params, deepspeed_config=str(deepspeed_config) if deepspeed_config else None,
        forward=forward, gradient_checkpointing=gradient_checkpointing, eval_steps=eval_steps,
        logging_steps=logging_steps, save_every=save_every, keep_last=keep_last, wandb_project=wandb_project,
        wandb_entity=wandb_entity, wandb_run_name=wandb_run_name, overwrite=overwrite, lock_timeout=lock_timeout,
        quiet=quiet,
    ))


@app.command("export")
@stage_command
def export(
    train: Annotated[Path, typer.Option("--train", help="Train artifact (from `dpo train`).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Output folder: a Hugging Face model folder with README.md and manifest.json.", show_default=False)],
    config: ConfigOpt = None,
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="final (the finished run), latest (the newest complete checkpoint, or final) or step-N.")] = "final",
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="float32, bfloat16 or float16 for the saved weights (default: the dtype it trained in).", show_default=False)] = None,
    no_merge: Annotated[bool, typer.Option("--no-merge", help="For a LoRA run, export the adapter instead of merging it into the base model.")] = False,
    push_to_hub: Annotated[Optional[str], typer.Option("--push-to-hub", help="Upload the finished folder to this Hugging Face Hub repo id (after the local export).", show_default=False)] = None,
    private: Annotated[bool, typer.Option("--private", help="Create the Hub repo as private (with --push-to-hub).")] = False,
    overwrite: OverwriteOpt = False,
    lock_timeout: LockTimeoutOpt = 600.0,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
):
    """Write a trained policy as a Hugging Face model folder (LoRA merged by default) with a model card."""
    from .stages import export as stage

    stage.run(stage.ExportConfig(
        train=str(train), out=str(out), checkpoint=checkpoint, dtype=dtype, merge=not no_merge,
        push_to_hub=push_to_hub, private=private, overwrite=overwrite, lock_timeout=lock_timeout,
    ))


@app.command("evaluate")
@stage_command
def evaluate(
    model: Annotated[Path, typer.Option("--model", help="Model folder to evaluate (from `dpo export`, or any Hugging Face model or PEFT adapter folder).", show_default=False)],
    tokenized: Annotated[Path, typer.Option("--tokenized", help="Tokenized artifact holding the held-out pairs.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Output folder: metrics.json, report.md, plots, manifest.json.", show_default=False)],
    config: ConfigOpt = None,
    ref_cache: Annotated[Optional[Path], typer.Option("--ref-cache", help="Reference log-probs of the same tokenized artifact: enables implicit rewards and the reference columns.", show_default=False)] = None,
    split: Annotated[str, typer.Option("--split", help="Split of the tokenized artifact to evaluate on.")] = "eval",
    train: Annotated[Optional[Path], typer.Option("--train", help="Train artifact of this model: its β and loss define the implicit reward, and its metrics.jsonl is plotted.", show_default=False)] = None,
    baseline: Annotated[Optional[Path], typer.Option("--baseline", help="An earlier `dpo evaluate` output (e.g. of the base model) to compare against, before/after, in report.md.", show_default=False)] = None,
    beta: Annotated[Optional[float], typer.Option("--beta", help="β of the implicit reward when no --train is given (default 0.1, or the loss type's default with --loss-type).", show_default=False)] = None,
    loss_type: Annotated[Optional[str], typer.Option("--loss-type", help="Loss whose implicit reward and loss are reported when no --train is given (default dpo).", show_default=False)] = None,
    generate: Annotated[int, typer.Option("--generate", help="Complete this many held-out prompts (or --prompts) and compare lengths; 0 = off.")] = 0,
    prompts: Annotated[Optional[Path], typer.Option("--prompts", help="JSONL of prompts to complete instead: {\"prompt\": text} or {\"messages\": [...]} per line.", show_default=False)] = None,
    temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature for --generate; 0 = greedy.")] = 0.0,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Longest completion, in tokens.")] = 128,
    seed: Annotated[int, typer.Option("--seed", help="Seed for sampled generation.")] = 0,
    dtype: Annotated[str, typer.Option("--dtype", help="dtype to load the model in: float32, bfloat16 or float16.")] = "float32",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Pairs (or prompts) per forward pass.")] = 16,
    overwrite: OverwriteOpt = False,
    lock_timeout: LockTimeoutOpt = 600.0,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
):
    """Preference accuracy, margins and log-prob movement on held-out pairs, generations, report.md."""
    from .stages import evaluate as stage

    stage.run(stage.EvaluateConfig(
        model=str(model), tokenized=str(tokenized), out=str(out), ref_cache=str(ref_cache) if ref_cache else None,
        train=str(train) if train else None, baseline=str(baseline) if baseline else None, split=split, beta=beta,
        loss_type=loss_type, generate=generate, prompts=str(prompts) if prompts else None, temperature=temperature,
        max_new_tokens=max_new_tokens, seed=seed, dtype=dtype, batch_size=batch_size, overwrite=overwrite,
        lock_timeout=lock_timeout, quiet=quiet,
    ))


@app.command("run")
@stage_command
def run(
    config: Annotated[Path, typer.Option("--config", help="Run file: top-level run_dir and model, one section per step (see examples/demo.yaml).", show_default=False)],
    step: Annotated[Optional[list[str]], typer.Option("--step", help="Run only this step (repeatable): tokenize, cache-ref, train, export, evaluate-base, evaluate.", show_default=False)] = None,
    list_steps: Annotated[bool, typer.Option("--list-steps", help="Print the steps the run file has, in order, and exit (for job scripts).")] = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
):
    """Run tokenize -> cache-ref -> train -> export -> evaluate in one job; complete steps are skipped."""
    from .stages import run as stage

    if list_steps:
        typer.echo("\n".join(stage.steps_of(config)))
        return
    code = stage.run(stage.RunConfig(config=config, steps=tuple(step or ()), quiet=quiet, verbose=verbose),
                     typer.main.get_command(app))
    if code:
        raise typer.Exit(code)


@app.command("status")
@stage_command
def status(
    path: Annotated[Path, typer.Argument(help="A run folder (from `dpo run`) or one artifact folder.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
):
    """Show each artifact (complete or partial), its fingerprint, inputs, key stats, and what runs next."""
    from .stages import status as stage

    typer.echo(stage.render(stage.status(path), as_json=as_json))


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
