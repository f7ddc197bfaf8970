"""`dpo evaluate`: did alignment work? Preference metrics on held-out pairs, generations, a report.

build:  the model (a full HF folder or a PEFT adapter folder), the tokenized split, the reference
        cache (optional), β and the loss whose implicit reward is reported (from --train, else flags)
run:    summed log-probs of every chosen and rejected response under the model (LabelLogProbs, the
        same code train uses); implicit rewards through the training loss itself; aggregates
        overall and per source; optional completions for held-out prompts
close:  metrics.json, pairs.parquet, generations.jsonl, PNG plots, report.md, then the manifest

Everything here is deterministic except sampled generation, which is seeded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from ..artifacts.errors import ArtifactError, DataError, UsageError
from ..artifacts.fingerprint import fingerprint, semantic_config, sha256_file
from ..artifacts.manifest import MANIFEST, InputRef, Manifest, read_manifest, write_json_atomic
from ..artifacts.runner import StageRun
from ..artifacts.shards import ArtifactReader, file_entry, write_shard
from ..pipeline import report
from ..pipeline.batching import (
    SIDES, forward_batches, length_grouped_batches, pad_token_id, pair_indices, pair_lengths, scored_label_tokens, take_rows,
)
from ..pipeline.config import StageOptions, at_least, flatten, group, non_negative, option, validate
from ..pipeline.formats import FieldError, chat_messages, hh_prompt, prompt_layout, surrogate_problem
from ..pipeline.logprobs import LabelLogProbs, SequenceLogProbs
from ..pipeline.logs import progress
from ..pipeline.losses import BatchContext, LossConfig, LossInputs, RewardShift
from ..pipeline.modeling import DTYPES, check_vocab, load_causal_lm, load_reward_model, model_identity, torch_dtype
from ..pipeline.refcache import load_reference
from ..pipeline.packing import PackingConfig, enable_packing
from ..pipeline.scoring import PairScorer, forward_mode
from ..pipeline.sources import not_utf8, read_lines
from ..pipeline.tokenization import tokenizer_with_template

STAGE = "evaluate"
VERSION = 1
KIND = "eval"
OWNS = ("pairs.parquet", "metrics.json", "report.md", "generations.jsonl", "training_curves.png", "margins.png",
        "logp_shift.png", "generation_lengths.png")  # what a run writes
PAIR_COLUMNS = ("index", "source", "chosen_input_ids", "rejected_input_ids", "prompt_length", "chosen_length",
                "rejected_length")
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvaluateConfig(StageOptions):
    # Inputs enter the fingerprint through their fingerprints (or content identity), not their paths.
    model: str = option(semantic=False, help=(
        "Model folder to evaluate (from `dpo export`, or any Hugging Face model or PEFT adapter folder)."))
    tokenized: str = option(semantic=False, help="Tokenized artifact holding the held-out pairs.")
    out: str = option(semantic=False, help="Output folder: metrics.json, report.md, plots, manifest.json.")
    ref_cache: str | None = option(None, semantic=False, help=(
        "Reference log-probs of the same tokenized artifact: enables implicit rewards and the reference columns."))
    train: str | None = option(None, semantic=False, help=(
        "Train artifact of this model: its loss (type, β, ...) defines the implicit reward, and its metrics.jsonl "
        "is plotted."))
    baseline: str | None = option(None, semantic=False, help=(
        "An earlier `dpo evaluate` output (e.g. of the base model) to compare against, before/after, in report.md."))
    split: str = option("eval", help="Split of the tokenized artifact to evaluate on.")
    # The loss whose implicit reward is reported when no --train is given. The resolved objective
    # (from --train or these) is what enters the fingerprint.
    loss: LossConfig = group(LossConfig, semantic=False)
    generate: int = option(0, check=at_least(0), panel="Generation", help=(
        "Complete this many held-out prompts (or --prompts) and compare lengths; 0 = off."))
    prompts: str | None = option(None, semantic=False, panel="Generation", help=(  # content hashed as an input
        'JSONL of prompts to complete instead: {"prompt": text} or {"messages": [...]} per line.'))
    reward_model: str | None = option(None, semantic=False, panel="Generation", help=(  # content identity is an input
        "Score the completions with this local reward model (a sequence-classification model with one output): "
        "mean reward, and with a --baseline that generated too, the win rate against its completions."))
    temperature: float = option(0.0, check=non_negative, panel="Generation", help=(
        "Sampling temperature for --generate; 0 = greedy."))
    max_new_tokens: int = option(128, check=at_least(1), panel="Generation", help="Longest completion, in tokens.")
    seed: int = option(0, panel="Generation", help="Seed for sampled generation.")
    dtype: str = option("float32", choices=tuple(DTYPES), help=(
        "dtype to load the model in: float32, bfloat16 or float16."))
    batch_size: int = option(16, semantic=False, check=at_least(1), help="Pairs (or prompts) per forward pass.")
    batching: PackingConfig = group(PackingConfig)

    def check(self) -> None:
        if self.prompts and not self.generate:
            raise UsageError("--prompts needs --generate N (how many of its prompts to complete)")
        if self.reward_model and not self.generate:
            raise UsageError("--reward-model scores completions: it needs --generate N")


# ---------------------------------------------------------------------------------------- build


@dataclasses.dataclass(frozen=True)
class Objective:
    """The loss evaluate reports, and what it needs beyond the loss options to equal train's."""

    loss: LossConfig
    source: str
    reward_shift: float = 0.0  # bco_pair's δ at the end of training
    sort_size: int | None = None  # aot: pairs per sorted group, train's --per-device-batch-size

    def fingerprinted(self) -> dict[str, Any]:
        # "source": None keeps the fingerprints of earlier evaluations, whose objective carried the key.
        extra = {"reward_shift": self.reward_shift} if self.loss.bco_reward_shift else {}
        extra.update({"sort_size": self.sort_size} if self.loss.sorts_micro_batch else {})
        return {**self.loss.to_json(), **extra, "source": None}


def _objective(cfg: EvaluateConfig, train: Manifest | None) -> Objective:
    """The loss from the train artifact when given (what the model was trained with), else the flags;
    and where it came from."""
    if train is None:
        source = "--beta" if cfg.loss.beta is not None else "default"
        if cfg.loss.bco_reward_shift:
            log.warning("--bco-reward-shift without --train: δ is 0 (the running mean lives in the train artifact)")
        return Objective(cfg.loss.resolved(), source, sort_size=cfg.batch_size)
    section = train.config.get("loss") or train.config
    if float(section.get("rpo_alpha") or 0.0):
        log.warning("%s was trained with the earlier --rpo-alpha term (each pair's per-token NLL); it is evaluated "
                    "as an sft term (the chosen tokens' mean NLL over the split)", cfg.train)
    trained = LossConfig.from_json(section)
    defaults, given = LossConfig(), cfg.loss.resolved()
    for f in dataclasses.fields(LossConfig):
        flag, used = getattr(cfg.loss, f.name), getattr(trained, f.name)
        if flag != getattr(defaults, f.name) and getattr(given, f.name) != used:
            log.warning("--%s %s ignored: %s was trained with %s %s, which the implicit reward uses",
                        f.name.replace("_", "-"), flag, cfg.train, f.name.replace("_", " "), used)
    shift = RewardShift()
    if "bco_reward_shift" in (train.stats.get("loss_state") or {}):
        shift.load_state_dict(train.stats["loss_state"]["bco_reward_shift"])
    return Objective(trained, f"train {cfg.train}", shift.value,
                     int(train.config.get("per_device_batch_size") or cfg.batch_size))


def _model_input(path: Path, verify: bool) -> InputRef:
    """A dpo model artifact by its fingerprint (its files checked against it); any other model folder by
    its content identity."""
    if (path / MANIFEST).is_file():
        manifest = ArtifactReader(path, verify=verify).manifest
        if manifest.kind != "model":
            hint = (f"evaluate its final model ({path / 'final'}) or `dpo export` it first" if manifest.kind == "train"
                    else "pass a model folder (from `dpo export`, or any Hugging Face model folder)")
            raise UsageError(f"--model {path} is a {manifest.kind!r} artifact, not a model: {hint}")
        return InputRef(manifest.kind, str(path), manifest.fingerprint)
    if (path / "adapter_config.json").is_file():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.startswith("adapter_"))
        digest = sha256_file(files[0]) if len(files) == 1 else json.dumps([sha256_file(p) for p in files])
        return InputRef("model", str(path), fingerprint("adapter", 1, {"files": digest}))
    return InputRef("model", str(path), model_identity(path)["digest"][:16])


def _load_model(path: Path, dtype: str) -> torch.nn.Module:
    if (path / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        from safetensors import SafetensorError

        try:
            model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype))
        except SafetensorError as exc:
            raise ArtifactError(f"model {path}: a weight file of the adapter or its base is corrupt ({exc})") from None
        except (OSError, ValueError) as exc:
            raise UsageError(f"model {path}: cannot load this LoRA adapter with its base model: {exc}") from None
        return model.eval()
    return load_causal_lm(path, dtype=dtype)


def _tokenizer(model_dir: Path, tokenized: Manifest):
    """The model folder's tokenizer when it has one (export saves it), else the one the data was made with."""
    return tokenizer_with_template([model_dir, tokenized.config.get("tokenizer")], tokenized.stats.get("chat_template"))


def _check_baseline(cfg: EvaluateConfig, baseline: Manifest, tokenized_fingerprint: str) -> None:
    """A before/after table compares like with like only if both evaluations scored the same pairs."""
    theirs = next((ref for ref in baseline.inputs if ref.kind == "tokenized"), None)
    split = baseline.config.get("split")
    if theirs is not None and theirs.fingerprint == tokenized_fingerprint and split == cfg.split:
        return
    made_on = (f"split {split!r} of {theirs.path} (tokenized fingerprint {theirs.fingerprint})" if theirs is not None
               else "pairs it does not name")
    raise UsageError(
        f"--baseline {cfg.baseline} evaluated {made_on}, but this run evaluates split {cfg.split!r} of {cfg.tokenized} "
        f"(tokenized fingerprint {tokenized_fingerprint}): a before/after comparison needs the same pairs. Evaluate the "
        f"baseline with --tokenized {cfg.tokenized} --split {cfg.split}, or leave out --baseline"
    )


GENERATION_SETTINGS = ("generate", "temperature", "max_new_tokens", "seed")


def _check_baseline_generation(cfg: EvaluateConfig, baseline: Manifest, prompts: InputRef | None) -> None:
    """Side-by-side completions compare models only when both were asked the same way."""
    theirs = baseline.config
    if not theirs.get("generate"):
        log.warning("--baseline %s has no generations (it ran without --generate): the report cannot show its "
                    "completions beside these", cfg.baseline)
        return
    differ = [f"--{k.replace('_', '-')} {theirs.get(k)} there, {getattr(cfg, k)} here" for k in GENERATION_SETTINGS
              if theirs.get(k) != getattr(cfg, k)]
    their_prompts = next((i for i in baseline.inputs if i.kind == "prompts"), None)
    if (their_prompts and their_prompts.fingerprint) != (prompts and prompts.fingerprint):
        differ.append(f"--prompts {their_prompts.path if their_prompts else 'none (held-out pairs)'} there, "
                      f"{prompts.path if prompts else 'none (held-out pairs)'} here")
    if differ:
        log.warning("--baseline %s generated with other settings (%s): its completions and lengths are not a like-for-"
                    "like comparison; evaluate the baseline again with this run's generation options", cfg.baseline,
                    "; ".join(differ))


def _check_split(manifest: Manifest, split: str, tokenized_dir: str) -> None:
    if split not in manifest.splits:
        raise UsageError(
            f"{tokenized_dir} has no split {split!r}; its splits are: {', '.join(manifest.splits) or 'none'} "
            "(choose one with --split)"
        )
    if manifest.rows(split) == 0:
        raise DataError(f"{tokenized_dir}: split {split!r} has no pairs to evaluate")


# ------------------------------------------------------------------------------------------ run


def run(cfg: EvaluateConfig) -> Manifest | None:
    validate(cfg)
    verify = cfg.verify_inputs
    tokenized = ArtifactReader(cfg.tokenized, kind="tokenized", verify=verify, in_background=True)
    train_reader = ArtifactReader(cfg.train, kind="train", verify=verify) if cfg.train else None
    baseline_reader = ArtifactReader(cfg.baseline, kind=KIND, verify=verify) if cfg.baseline else None
    train = train_reader.manifest if train_reader else None
    baseline = baseline_reader.manifest if baseline_reader else None
    if baseline is not None:
        _check_baseline(cfg, baseline, tokenized.fingerprint)
        baseline_reader.read_json("metrics.json")  # a damaged one stops the run before anything is scored
    reference = ArtifactReader(cfg.ref_cache, kind="ref-logps", verify=verify) if cfg.ref_cache else None
    objective = _objective(cfg, train)
    model_dir = Path(cfg.model)
    if not model_dir.is_dir():
        raise UsageError(f"--model {model_dir}: no such directory")
    model_input = _model_input(model_dir, verify)  # first: a train artifact given as --model is named as such
    check_vocab(model_dir, cfg.tokenized, tokenized.manifest)
    inputs = [model_input, InputRef("tokenized", cfg.tokenized, tokenized.fingerprint)]
    for kind, path, manifest in (("ref-logps", cfg.ref_cache, reference and reference.manifest),
                                 ("train", cfg.train, train), ("eval", cfg.baseline, baseline)):
        if manifest is not None:
            inputs.append(InputRef(kind, str(path), manifest.fingerprint))
    if cfg.prompts:
        if not Path(cfg.prompts).is_file():
            raise UsageError(f"--prompts {cfg.prompts}: no such file")
        inputs.append(InputRef("prompts", cfg.prompts, sha256_file(cfg.prompts)[:16]))
    if cfg.reward_model:
        if not Path(cfg.reward_model).is_dir():
            raise UsageError(f"--reward-model {cfg.reward_model}: no such directory")
        inputs.append(InputRef("reward-model", cfg.reward_model, model_identity(cfg.reward_model)["digest"][:16]))
    tokenizer = _tokenizer(model_dir, tokenized.manifest) if cfg.generate else None
    layout = prompt_layout(tokenized.manifest.config, tokenized.manifest.stats)
    prompts = _read_prompts(cfg.prompts, tokenizer, cfg.generate, layout) if cfg.prompts else None
    if baseline is not None and cfg.generate:
        _check_baseline_generation(cfg, baseline, next((i for i in inputs if i.kind == "prompts"), None))
    semantic = {**semantic_config(cfg), "objective": objective.fingerprinted()}
    fp = fingerprint(STAGE, VERSION, semantic, [i.fingerprint for i in inputs])
    _check_split(tokenized.manifest, cfg.split, cfg.tokenized)

    input_paths = [("--model", cfg.model), ("--tokenized", cfg.tokenized), ("--ref-cache", cfg.ref_cache),
                   ("--train", cfg.train), ("--baseline", cfg.baseline), ("--prompts", cfg.prompts),
                   ("--reward-model", cfg.reward_model)]
    with StageRun(STAGE, cfg.out, KIND, fp, overwrite=cfg.overwrite, lock_timeout=cfg.lock_timeout,
                  inputs=input_paths, owns=OWNS) as stage_run:
        if stage_run.complete:
            return stage_run.manifest
        started = time.perf_counter()
        # One device: evaluation is a forward pass per batch, fast enough without data parallelism.
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = _load_model(model_dir, cfg.dtype).to(device)  # while the data's sha256 check runs on
        rows = tokenized.read_split(cfg.split, columns=list(PAIR_COLUMNS))
        if cfg.batching.packing:
            enable_packing(model.get_base_model() if hasattr(model, "get_base_model") else model)
        pairs = _score(model, rows, pad_token_id(tokenized.manifest.stats), objective.loss, cfg, stage_run)
        if reference is not None:
            _add_reference(pairs, rows, cfg, tokenized.manifest, objective.loss.needs_shared_logps)
        if not objective.loss.needs_reference or "ref_chosen_logps" in pairs:
            _add_rewards(pairs, rows, objective)
        else:
            log.warning("no --ref-cache: implicit rewards (β·log-ratio to the reference) are not reported")
        generations = []
        if cfg.generate:
            generations = _generate(model, tokenizer, rows, cfg, stage_run, prompts)
            _pair_with_baseline(generations, baseline_reader)
            if cfg.reward_model:
                del model  # the policy is done with: its memory goes to the reward model
                _score_rewards(generations, cfg, device)
        metrics = _metrics(cfg, pairs, rows, generations, objective.loss, objective.source, baseline_reader, started)
        files = _write_outputs(stage_run.dir, cfg, pairs, rows, metrics, generations, train_reader, objective.loss)
        stage_run.commit(Manifest(
            kind=KIND, fingerprint=fp,
            config={**flatten(cfg), "objective": {**objective.fingerprinted(), "source": objective.source}},
            inputs=inputs, files=files, stats={k: v for k, v in metrics.items() if k != "by_source"}))
    # The folder, not "report: PATH": `dpo run` prints that once, as its result, for the last evaluation.
    log.info("evaluated %d pairs of split %r in %.1fs: %s; report.md and plots in %s", rows.num_rows, cfg.split,
             time.perf_counter() - started,
             ", ".join(f"{k} {report.fmt(metrics.get(k))}" for k in ("rewards/accuracies", "rewards/margins",
                                                                      "logp_accuracies/summed") if k in metrics),
             cfg.out)
    return read_manifest(cfg.out, KIND)


def _stop_point(stage_run: StageRun) -> None:
    if stage_run.stop_requested():
        raise stage_run.preempted("before the evaluation was complete (nothing is committed until it is)")


def _score(model, rows: pa.Table, pad_id: int, objective: LossConfig, cfg: EvaluateConfig,
           stage_run: StageRun) -> dict[str, np.ndarray]:
    """The model's summed label log-probs (and WPO terms, shared-prefix sums when the loss needs them) of every pair."""
    want_wpo, want_shared = objective.needs_wpo_term, objective.needs_shared_logps
    mode = forward_mode("concatenated", cfg.batching.packing)
    scorer = PairScorer(LabelLogProbs(model), mode, pad_id, next(model.parameters()).device, want_wpo,
                        with_shared=want_shared)
    n = rows.num_rows
    names = ["policy_chosen_logps", "policy_rejected_logps", "chosen_num_tokens", "rejected_num_tokens"]
    names += ["chosen_wpo_term", "rejected_wpo_term"] if want_wpo else []
    names += ["policy_chosen_shared_logps", "policy_rejected_shared_logps"] if want_shared else []
    out = {name: np.zeros(n, dtype=np.float64) for name in names}
    bar = progress(n, "evaluate", unit="pairs", quiet=cfg.quiet, logger=log)
    with torch.no_grad(), bar:
        for positions in forward_batches(rows, cfg.batch_size, cfg.batching.max_tokens_per_batch):
            _stop_point(stage_run)
            scores = scorer(take_rows(rows, positions))
            for side, values in (("chosen", scores.chosen), ("rejected", scores.rejected)):
                out[f"policy_{side}_logps"][positions] = values.logps.double().cpu().numpy()
                out[f"{side}_num_tokens"][positions] = values.num_tokens.double().cpu().numpy()
                if want_wpo:
                    out[f"{side}_wpo_term"][positions] = values.wpo_term.double().cpu().numpy()
                if want_shared:
                    out[f"policy_{side}_shared_logps"][positions] = values.shared_logps.double().cpu().numpy()
            bar.update(len(positions))
    return out


def _add_reference(pairs: dict[str, np.ndarray], rows: pa.Table, cfg: EvaluateConfig, tokenized: Manifest,
                   shared: bool) -> None:
    # The cache's files were checked when evaluate opened it (--no-verify aside).
    ref = load_reference(cfg.ref_cache, tokenized, [cfg.split], shared=shared, verify=False)
    indices = pair_indices(rows)
    values = ref.lookup(torch.from_numpy(indices))
    for side in SIDES:
        counted = values[f"{side}_num_tokens"].double().numpy()
        bad = np.nonzero(counted != pairs[f"{side}_num_tokens"])[0]
        if len(bad):
            raise ArtifactError(
                f"{cfg.ref_cache}: pair index {int(indices[bad[0]])} has {int(counted[bad[0]])} {side} label tokens "
                f"in the cache but {int(pairs[f'{side}_num_tokens'][bad[0]])} in {cfg.tokenized}; the cache does "
                "not belong to these tokens"
            )
        pairs[f"ref_{side}_logps"] = values[f"{side}_logps"].double().numpy()
        if shared:
            pairs[f"ref_{side}_shared_logps"] = values[f"{side}_shared_logps"].double().numpy()


def _add_rewards(pairs: dict[str, np.ndarray], rows: pa.Table, objective: Objective) -> None:
    """Implicit rewards and per-pair loss exactly as training computes them (pipeline/losses.py).

    The split is the batch the loss is averaged over (sft's token count), with bco_pair's δ as
    training left it; aot sorts within groups of train's per-device batch size, formed by
    length as train's micro-batches are.
    """
    t = {k: torch.from_numpy(v) for k, v in pairs.items()}

    def side(name: str) -> SequenceLogProbs:
        return SequenceLogProbs(t[f"policy_{name}_logps"], t[f"{name}_num_tokens"], t.get(f"{name}_wpo_term"),
                                t.get(f"policy_{name}_shared_logps"))

    reference = {f"{s}_{kind}": t[f"ref_{s}_{kind}"] for s in SIDES for kind in ("logps", "shared_logps")
                 if f"ref_{s}_{kind}" in t}
    inputs = LossInputs.of(side("chosen"), side("rejected"), reference)
    chosen_tokens = float(scored_label_tokens(rows, "chosen").sum())
    context = BatchContext(float(rows.num_rows), chosen_tokens, objective.reward_shift)
    groups = [list(range(rows.num_rows))]
    if objective.loss.sorts_micro_batch:
        groups = length_grouped_batches(pair_lengths(rows), objective.sort_size)
    names = ("losses", "rewards_chosen", "rewards_rejected", *(f"loss/{n}" for n in objective.loss.terms()[0]))
    out = {name: np.zeros(rows.num_rows) for name in names}
    for members in groups:
        index = torch.tensor(members, dtype=torch.long)
        part = inputs if len(groups) == 1 else LossInputs(**{
            f.name: None if getattr(inputs, f.name) is None else getattr(inputs, f.name)[index]
            for f in dataclasses.fields(inputs)})
        result = objective.loss(part, context)
        out["losses"][members] = result.losses.detach().double().numpy()
        out["rewards_chosen"][members] = result.chosen_rewards.double().numpy()
        out["rewards_rejected"][members] = result.rejected_rewards.double().numpy()
        for name, values in result.components.items():
            out[f"loss/{name}"][members] = values.detach().double().numpy()
    if len(objective.loss.terms()[0]) == 1:
        out.pop(f"loss/{objective.loss.loss_type}")
    pairs.update(out)


def _metrics(cfg: EvaluateConfig, pairs: dict[str, np.ndarray], rows: pa.Table, generations: list[dict],
             objective: LossConfig, source: str, baseline: ArtifactReader | None, started: float) -> dict[str, Any]:
    metrics: dict[str, Any] = report.pair_metrics(pairs)
    if generations:
        metrics.update(report.generation_metrics(generations))
    metrics["by_source"] = report.grouped_metrics(pairs, rows.column("source").to_pylist())
    metrics["evaluated"] = {
        "model": cfg.model, "tokenized": cfg.tokenized, "split": cfg.split, "reference": cfg.ref_cache,
        "loss_type": objective.loss_type, "beta": objective.beta, "objective_from": source,
        "seconds": round(time.perf_counter() - started, 2),
    }
    if baseline is not None:
        metrics["baseline"] = {"path": cfg.baseline, "fingerprint": baseline.fingerprint,
                               "metrics": baseline.read_json("metrics.json")}
    return metrics


# ----------------------------------------------------------------------------------- generation


def _read_prompts(path: str, tokenizer, limit: int, layout: str) -> list[dict[str, Any]]:
    """Prompts from a JSONL file: {"prompt": text} or {"messages": [...]} (or a bare JSON string) per line.

    Each is laid out as the training prompts were (``layout``, from the tokenized artifact): a text
    prompt becomes one user turn through the chat template for chat data, a Human turn for HH-RLHF
    text, and stays as it is for plain text. Read before anything is scored, so a bad line stops
    the run at once (exit 2 naming file and line).
    """
    prompts = []
    for number, line in read_lines(Path(path)):
        where = f"{path}, line {number}"
        if isinstance(line, bytes):
            raise DataError(f"{where}: {not_utf8(line)}")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON: {exc}") from None
        if isinstance(record, str):
            record = {"prompt": record}
        if not isinstance(record, dict) or not ({"prompt", "messages"} & record.keys()):
            raise DataError(f"{where}: expected a string or an object with 'prompt' or 'messages'")
        messages = record.get("messages")
        try:
            if messages is None:
                if not isinstance(record["prompt"], str):
                    raise FieldError("prompt", "expected a string")
                problem = surrogate_problem(record["prompt"])
                if problem:
                    raise FieldError("prompt", problem)
                if layout == "chat":
                    messages = [{"role": "user", "content": record["prompt"]}]
            else:
                messages = list(chat_messages(messages, "messages"))
        except FieldError as exc:
            raise DataError(f"{where}, {exc}") from None
        text = record.get("prompt")
        if messages is not None and layout == "hh":
            messages, text = None, hh_prompt(messages)
        elif messages is not None and layout == "text":
            raise DataError(f"{where}: 'messages' given, but the model was trained on plain-text prompts (no chat "
                            'template); write this prompt as {"prompt": text}')
        elif messages is None and layout == "hh" and not text.lstrip().startswith("Human:"):
            text = hh_prompt([{"role": "user", "content": text}])
        if messages is not None:
            try:
                ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)["input_ids"]
            except Exception as exc:  # noqa: BLE001 - templates raise their own errors
                raise DataError(f"{where}: the chat template cannot render these messages: "
                                f"{type(exc).__name__}: {exc}") from None
        else:
            ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        prompts.append({"line": number, "prompt_ids": list(ids)})
        if len(prompts) == limit:
            break
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


def _held_out_prompts(rows: pa.Table, limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` pairs by index; the prompt is the shared prefix before the responses."""
    chosen = rows.take(np.argsort(pair_indices(rows), kind="stable")[:limit]).to_pylist()
    out = []
    for row in chosen:
        length = int(row["prompt_length"])
        out.append({
            "index": row["index"], "source": row["source"], "prompt_ids": list(row["chosen_input_ids"][:length]),
            "chosen_tokens": int(row["chosen_length"]) - length,
            "rejected_tokens": int(row["rejected_length"]) - length,
            "chosen_ids": list(row["chosen_input_ids"][length:]),
        })
    return out


def _generation_key(generation: dict[str, Any]) -> tuple[str, Any]:
    return ("index", generation["index"]) if "index" in generation else ("line", generation.get("line"))


def _pair_with_baseline(generations: list[dict[str, Any]], baseline: ArtifactReader | None) -> None:
    """Put the baseline's completion of the same prompt (same pair index or --prompts line) beside each one."""
    if baseline is None or not any(f.path == "generations.jsonl" for f in baseline.manifest.files):
        return
    theirs = {}
    for line in baseline.path("generations.jsonl").read_text().splitlines():
        record = json.loads(line)
        theirs[_generation_key(record)] = record
    for g in generations:
        match = theirs.get(_generation_key(g))
        if match is not None:
            g["baseline_completion"] = match["completion"]
            g["baseline_completion_tokens"] = match["completion_tokens"]


def _score_rewards(generations: list[dict[str, Any]], cfg: EvaluateConfig, device: torch.device) -> None:
    """The reward model's score of prompt + completion (the prompt as the policy saw it), one text at a
    time (no padding to get wrong), for this model's completions and the baseline's beside them."""
    model, tokenizer = load_reward_model(cfg.reward_model, cfg.dtype)
    model.to(device)
    limit = getattr(model.config, "max_position_embeddings", None)

    def score(prompt: str, completion: str) -> float:
        # The decoded prompt starts with the policy's BOS text; the reward tokenizer adds its own.
        if tokenizer.bos_token:
            prompt = prompt.removeprefix(tokenizer.bos_token)
        ids = tokenizer(prompt + completion, add_special_tokens=True)["input_ids"]
        if limit is not None and len(ids) > limit:
            ids = ids[-limit:]  # the completion's end is what is being judged
        with torch.no_grad():
            return float(model(input_ids=torch.tensor([ids], device=device)).logits[0, 0].float())

    bar = progress(len(generations), "reward", unit="completions", quiet=cfg.quiet, logger=log)
    for g in generations:
        g["reward"] = score(g["prompt"], g["completion"])
        if "baseline_completion" in g:
            g["baseline_reward"] = score(g["prompt"], g["baseline_completion"])
        bar.update(1)
    bar.close()


def _stop_ids(model, tokenizer) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None) if hasattr(model, "generation_config") else None
    if eos is None:
        eos = tokenizer.eos_token_id
    ids = eos if isinstance(eos, list) else [eos]
    return [int(i) for i in ids if i is not None]


def _generate(model, tokenizer, rows: pa.Table, cfg: EvaluateConfig, stage_run: StageRun,
              prompts: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Greedy (temperature 0) or sampled completions, left-padded in batches, with token counts."""
    items = prompts if prompts is not None else _held_out_prompts(rows, cfg.generate)
    stop = _stop_ids(model, tokenizer)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    limit = getattr(model.config, "max_position_embeddings", None)
    generator_seed = cfg.seed
    results = []
    bar = progress(len(items), "generate", unit="prompts", quiet=cfg.quiet, logger=log)
    for start in range(0, len(items), cfg.batch_size):
        _stop_point(stage_run)
        chunk = items[start: start + cfg.batch_size]
        longest = max(len(i["prompt_ids"]) for i in chunk)
        new_tokens = cfg.max_new_tokens if limit is None else max(1, min(cfg.max_new_tokens, limit - longest))
        ids = torch.full((len(chunk), longest), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, item in enumerate(chunk):
            n = len(item["prompt_ids"])
            ids[i, longest - n:] = torch.tensor(item["prompt_ids"], dtype=torch.long)
            mask[i, longest - n:] = 1
        torch.manual_seed(generator_seed + start)
        sampling = {"do_sample": True, "temperature": cfg.temperature, "top_k": 0, "top_p": 1.0} \
            if cfg.temperature > 0 else {"do_sample": False}
        with torch.no_grad():
            generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens,
                                       eos_token_id=stop, pad_token_id=pad, **sampling)
        for item, seq in zip(chunk, generated[:, longest:].cpu().tolist()):
            cut = next((k for k, t in enumerate(seq) if t in stop), None)
            completion = seq if cut is None else seq[: cut + 1]
            result = {k: v for k, v in item.items() if k not in ("prompt_ids", "chosen_ids")}
            result.update(
                prompt=tokenizer.decode(item["prompt_ids"]),
                completion=tokenizer.decode(completion, skip_special_tokens=True),
                completion_tokens=len(completion),
                stopped=cut is not None,
            )
            if "chosen_ids" in item:
                result["chosen"] = tokenizer.decode(item["chosen_ids"], skip_special_tokens=True)
            results.append(result)
        bar.update(len(chunk))
    bar.close()
    return results


# ---------------------------------------------------------------------------------------- close


def _write_outputs(out: Path, cfg: EvaluateConfig, pairs: dict[str, np.ndarray], rows: pa.Table,
                   metrics: dict[str, Any], generations: list[dict], train: ArtifactReader | None,
                   objective: LossConfig) -> list:
    files = []
    table = pa.table({"index": pa.array(pair_indices(rows), pa.int64()), "source": rows.column("source").cast(pa.string()),
                      **{k: pa.array(v) for k, v in pairs.items()}})
    files.append(write_shard(out, "pairs.parquet", table))
    if generations:
        with open(out / "generations.jsonl", "w") as f:
            for g in generations:
                f.write(json.dumps(g, ensure_ascii=False) + "\n")
        files.append(dataclasses.replace(file_entry(out, "generations.jsonl"), rows=len(generations)))
    plots = []
    title = f"{_short(cfg.model)} on {_short(cfg.tokenized)}/{cfg.split} ({int(metrics['pairs'])} pairs)"
    training_rows = []
    if train is not None:
        training_rows = report.read_metrics_jsonl(train.path("metrics.jsonl"))
        if report.plot_training_curves(training_rows, out / "training_curves.png",
                                       f"training of {_short(cfg.train)} ({objective.loss_type}, β={objective.beta:g})"):
            plots.append(("Training curves", "training_curves.png"))
    report.plot_margins(pairs, out / "margins.png", title)
    plots.append(("Preference margins", "margins.png"))
    if "ref_chosen_logps" in pairs:
        report.plot_logp_shift(pairs, out / "logp_shift.png", title)
        plots.append(("Log-prob change against the reference", "logp_shift.png"))
    if generations:
        report.plot_generation_lengths(generations, out / "generation_lengths.png", title, cfg.max_new_tokens)
        plots.append(("Generation lengths", "generation_lengths.png"))
    write_json_atomic(out / "metrics.json", metrics)
    files.append(file_entry(out, "metrics.json"))
    (out / "report.md").write_text(_report_md(cfg, metrics, generations, plots, training_rows, objective))
    files.append(file_entry(out, "report.md"))
    files.extend(file_entry(out, name) for _, name in plots)
    return files


def _report_md(cfg: EvaluateConfig, metrics: dict[str, Any], generations: list[dict],
               plots: list[tuple[str, str]], training_rows: list[dict], objective: LossConfig) -> str:
    ev = metrics["evaluated"]
    lines = [f"# Evaluation of `{cfg.model}`", ""]
    lines.append(f"{metrics['pairs']:,} held-out pairs from split `{cfg.split}` of `{cfg.tokenized}`; "
                 f"reference log-probs: {f'`{cfg.ref_cache}`' if cfg.ref_cache else 'none given'}; implicit reward of the "
                 f"`{ev['loss_type']}` loss with β = {ev['beta']:g} (from {ev['objective_from']}). "
                 f"{report.ACCURACY_NOTE}.")
    lines.append("")
    if "baseline" in metrics:
        base = metrics["baseline"]
        lines += ["## Before and after", "",
                  f"Against the evaluation in `{base['path']}` (model `{base['metrics'].get('evaluated', {}).get('model')}`):", "",
                  report.comparison_table(base["metrics"], metrics, "before", "after"), ""]
        if base["metrics"].get("rewards/margins") is not None and abs(base["metrics"]["rewards/margins"]) < report.REWARD_TIE:
            lines += ["The \"before\" model is its own reference, so its implicit rewards are 0 and its reward "
                      "accuracy is 0 by construction (its loss is ln 2 = 0.693); the log-prob accuracies and the loss "
                      "are the numbers that compare like with like.", ""]
    lines += ["## Preference metrics", "", report.headline_table(metrics), ""]
    movement = report.movement_table(metrics)
    if movement:
        lines += ["## How the log-probs moved against the reference", "",
                  "DPO-style losses often lower the log-probs of both responses and win by lowering the rejected "
                  "one faster; negative values below mean the model finds the dataset's responses less likely than "
                  "the reference did.", "", movement, ""]
    if len(metrics["by_source"]) > 1 or cfg.ref_cache:
        lines += ["## By source", "", report.source_table(metrics["by_source"]), ""]
    if generations:
        lines += ["## Generations", "",
                  f"{len(generations)} completions ({'greedy' if cfg.temperature == 0 else f'temperature {cfg.temperature:g}'}, "
                  f"at most {cfg.max_new_tokens} new tokens); lengths in tokens, including the stop token when one was "
                  "produced.", ""]
        rows = [["mean generated length", report.fmt(metrics.get("generation/mean_tokens"))],
                ["mean chosen response length", report.fmt(metrics.get("generation/mean_chosen_tokens"))],
                ["mean rejected response length", report.fmt(metrics.get("generation/mean_rejected_tokens"))],
                ["generated / chosen length", report.fmt(metrics.get("generation/length_ratio_to_chosen"))],
                ["stopped before the token limit", report.fmt(metrics.get("generation/stopped_fraction"), True)]]
        if "generation/reward_mean" in metrics:
            rows.append([f"mean reward (`{cfg.reward_model}`)", report.fmt(metrics["generation/reward_mean"])])
        if "generation/win_rate" in metrics:
            rows += [["baseline's mean reward, same prompts", report.fmt(metrics["generation/baseline_reward_mean"])],
                     ["win rate against the baseline (ties count half)", report.fmt(metrics["generation/win_rate"], True)]]
        lines += [report.table(["", "value"], rows), ""]
        paired = [g for g in generations if "baseline_completion" in g]
        if paired:
            before = [g["baseline_completion_tokens"] for g in paired]
            lines += ["### Baseline and this model, side by side", "",
                      f"The same {len(paired)} prompts completed by the baseline's model "
                      f"(`{metrics['baseline']['metrics'].get('evaluated', {}).get('model')}`) and by this one; mean "
                      f"length {report.fmt(float(np.mean(before)))} → "
                      f"{report.fmt(float(np.mean([g['completion_tokens'] for g in paired])))} tokens.", ""]
        for g in (paired or generations)[:5 if paired else 3]:
            lines += [f"**Prompt** ({'pair ' + str(g['index']) if 'index' in g else 'line ' + str(g.get('line'))}):", "",
                      "```", _clip(g["prompt"], 600), "```", ""]
            if "baseline_completion" in g:
                lines += [f"**Baseline** ({g['baseline_completion_tokens']} tokens):", "", "```",
                          _clip(g["baseline_completion"], 600), "```", ""]
            lines += [f"**{'This model' if 'baseline_completion' in g else 'Completion'}** "
                      f"({g['completion_tokens']} tokens):", "", "```", _clip(g["completion"], 600), "```", ""]
        lines += ["All completions" + (" (with the baseline's beside them)" if paired else "") + ": `generations.jsonl`.", ""]
    if training_rows:
        final = report.last_row_with(training_rows, "loss")
        final_eval = report.last_row_with(training_rows, "eval/loss")
        lines += ["## Training", ""]
        keys = ["step", "epoch", "loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"]
        rows = [[f"`{k}`", report.fmt((final or {}).get(k)), report.fmt((final_eval or {}).get(f"eval/{k}") if k not in ("step", "epoch") else (final_eval or {}).get(k))]
                for k in keys if final and k in final]
        lines += [report.table(["metric", "last logged train step", "last eval"], rows), ""]
    for caption, name in plots:
        lines += [f"## {caption}", "", f"![{caption}]({name})", ""]
    lines += ["Per-pair values: `pairs.parquet`; every number above: `metrics.json`.", ""]
    return "\n".join(lines)


def _short(path: str) -> str:
    """The last two components of a path: enough to tell runs apart in a plot title."""
    return "/".join(Path(path).resolve().parts[-2:])


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + " …"
