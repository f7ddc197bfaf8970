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

from ..artifacts.fingerprint import fingerprint, sha256_file
from ..artifacts.lock import ArtifactLock
from ..artifacts.manifest import MANIFEST, InputRef, Manifest, read_manifest, write_json_atomic
from ..artifacts.output import OutputState, commit_output, prepare_output, say_complete
from ..artifacts.shards import ArtifactReader, file_entry, write_shard
from ..pipeline import losses, report
from ..pipeline.batching import collate_pairs, length_grouped_batches, pad_token_id, pair_lengths
from ..pipeline.errors import ArtifactError, DataError, UsageError
from ..pipeline.logprobs import IGNORE_INDEX, LabelLogProbs
from ..pipeline.logs import progress
from ..pipeline.modeling import DTYPES, load_causal_lm, model_identity, torch_dtype
from ..pipeline.refcache import load_reference

STAGE = "evaluate"
VERSION = 1
KIND = "eval"
DEFAULT_BETA = 0.1
NOT_SEMANTIC = {"semantic": False}
PAIR_COLUMNS = ("index", "source", "chosen_input_ids", "chosen_labels", "rejected_input_ids",
                "rejected_labels", "prompt_length")
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    # Inputs enter the fingerprint through their fingerprints (or content identity), not their paths.
    model: str = dataclasses.field(metadata=NOT_SEMANTIC)
    tokenized: str = dataclasses.field(metadata=NOT_SEMANTIC)
    out: str = dataclasses.field(metadata=NOT_SEMANTIC)
    ref_cache: str | None = dataclasses.field(default=None, metadata=NOT_SEMANTIC)
    train: str | None = dataclasses.field(default=None, metadata=NOT_SEMANTIC)
    baseline: str | None = dataclasses.field(default=None, metadata=NOT_SEMANTIC)
    split: str = "eval"
    # Resolved with --train into the objective, which is what enters the fingerprint.
    beta: float | None = dataclasses.field(default=None, metadata=NOT_SEMANTIC)
    loss_type: str | None = dataclasses.field(default=None, metadata=NOT_SEMANTIC)
    generate: int = 0
    prompts: str | None = dataclasses.field(default=None, metadata=NOT_SEMANTIC)  # content hashed as an input
    temperature: float = 0.0
    max_new_tokens: int = 128
    seed: int = 0
    dtype: str = "float32"
    batch_size: int = dataclasses.field(default=16, metadata=NOT_SEMANTIC)
    overwrite: bool = dataclasses.field(default=False, metadata=NOT_SEMANTIC)
    lock_timeout: float = dataclasses.field(default=600.0, metadata=NOT_SEMANTIC)
    quiet: bool = dataclasses.field(default=False, metadata=NOT_SEMANTIC)

    def check(self) -> None:
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype {self.dtype!r} is not one of: {', '.join(DTYPES)}")
        if self.generate < 0:
            raise UsageError(f"--generate must be >= 0, got {self.generate}")
        if self.temperature < 0:
            raise UsageError(f"--temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise UsageError("--max-new-tokens and --batch-size must be at least 1")
        if self.prompts and not self.generate:
            raise UsageError("--prompts needs --generate N (how many of its prompts to complete)")
        if self.loss_type is not None and self.loss_type not in losses.LOSS_TYPES:
            raise UsageError(f"--loss-type {self.loss_type!r} is not one of: {', '.join(losses.LOSS_TYPES)}")


@dataclasses.dataclass(frozen=True)
class Objective:
    """Which loss's implicit reward (and eval loss) is reported, with which hyperparameters."""

    loss_type: str
    beta: float
    label_smoothing: float = 0.0
    gamma_beta_ratio: float = 0.3
    rpo_alpha: float = 0.0
    source: str = "default"


# ---------------------------------------------------------------------------------------- build


def _objective(cfg: EvaluateConfig, train: Manifest | None) -> Objective:
    """β and the loss from the train artifact when given (what the model was trained with), else flags."""
    if train is not None:
        tc = train.config
        loss_type = tc.get("loss_type", "dpo")
        beta = losses.resolve_beta(loss_type, tc.get("beta"))
        if cfg.beta is not None and cfg.beta != beta:
            log.warning("--beta %g ignored: %s was trained with beta %g, which the implicit reward uses",
                        cfg.beta, cfg.train, beta)
        if cfg.loss_type is not None and cfg.loss_type != loss_type:
            log.warning("--loss-type %s ignored: %s was trained with %s", cfg.loss_type, cfg.train, loss_type)
        return Objective(loss_type, beta, float(tc.get("label_smoothing", 0.0)),
                         float(tc.get("gamma_beta_ratio", 0.3)), float(tc.get("rpo_alpha", 0.0)), f"train {cfg.train}")
    loss_type = cfg.loss_type or "dpo"
    beta = cfg.beta if cfg.beta is not None else (losses.DEFAULT_BETA[loss_type] if cfg.loss_type else DEFAULT_BETA)
    losses.check_loss_options(loss_type, beta)
    return Objective(loss_type, float(beta), source="--beta" if cfg.beta is not None else "default")


def _model_input(path: Path) -> InputRef:
    """A dpo model artifact by its fingerprint; any other model folder by its content identity."""
    if (path / MANIFEST).is_file():
        manifest = read_manifest(path)
        return InputRef(manifest.kind, str(path), manifest.fingerprint)
    if (path / "adapter_config.json").is_file():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.startswith("adapter_"))
        digest = sha256_file(files[0]) if len(files) == 1 else json.dumps([sha256_file(p) for p in files])
        return InputRef("model", str(path), fingerprint("adapter", 1, {"files": digest}))
    return InputRef("model", str(path), model_identity(path)["digest"][:16])


def _load_model(path: Path, dtype: str) -> torch.nn.Module:
    if (path / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        try:
            model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype))
        except (OSError, ValueError) as exc:
            raise UsageError(f"model {path}: cannot load this LoRA adapter with its base model: {exc}") from None
        return model.eval()
    return load_causal_lm(path, dtype=dtype)


def _tokenizer(model_dir: Path, tokenized: Manifest):
    """The model folder's tokenizer when it has one (export saves it), else the one the data was made with."""
    from transformers import AutoTokenizer

    for source in (model_dir, tokenized.config.get("tokenizer")):
        if source is None:
            continue
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError, TypeError):
            continue
        if tokenized.stats.get("chat_template"):  # the template the pairs were tokenized with
            tokenizer.chat_template = tokenized.stats["chat_template"]
        return tokenizer
    raise UsageError(
        f"no tokenizer in {model_dir} nor at {tokenized.config.get('tokenizer')} (recorded by the tokenized artifact)"
    )


def _read_pairs(reader: ArtifactReader, split: str, tokenized_dir: str) -> list[dict[str, Any]]:
    if split not in reader.splits:
        raise UsageError(
            f"{tokenized_dir} has no split {split!r}; its splits are: {', '.join(reader.splits) or 'none'} "
            "(choose one with --split)"
        )
    rows = reader.read_split(split, columns=list(PAIR_COLUMNS)).to_pylist()
    if not rows:
        raise DataError(f"{tokenized_dir}: split {split!r} has no pairs to evaluate")
    return rows


# ------------------------------------------------------------------------------------------ run


def run(cfg: EvaluateConfig) -> Manifest | None:
    cfg.check()
    out = Path(cfg.out)
    tokenized = ArtifactReader(cfg.tokenized, kind="tokenized")
    train = read_manifest(cfg.train, "train") if cfg.train else None
    baseline = read_manifest(cfg.baseline, KIND) if cfg.baseline else None
    reference = ArtifactReader(cfg.ref_cache, kind="ref-logps") if cfg.ref_cache else None
    objective = _objective(cfg, train)
    model_dir = Path(cfg.model)
    if not model_dir.is_dir():
        raise UsageError(f"--model {model_dir}: no such directory")
    inputs = [_model_input(model_dir), InputRef("tokenized", cfg.tokenized, tokenized.fingerprint)]
    for kind, path, manifest in (("ref-logps", cfg.ref_cache, reference and reference.manifest),
                                 ("train", cfg.train, train), ("eval", cfg.baseline, baseline)):
        if manifest is not None:
            inputs.append(InputRef(kind, str(path), manifest.fingerprint))
    if cfg.prompts:
        if not Path(cfg.prompts).is_file():
            raise UsageError(f"--prompts {cfg.prompts}: no such file")
        inputs.append(InputRef("prompts", cfg.prompts, sha256_file(cfg.prompts)[:16]))
    semantic = {**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.metadata.get("semantic", True)},
                "objective": dataclasses.asdict(objective) | {"source": None}}
    fp = fingerprint(STAGE, VERSION, semantic, [i.fingerprint for i in inputs])

    with ArtifactLock(out, timeout_s=cfg.lock_timeout):
        state = prepare_output(out, KIND, fp, cfg.overwrite)
        if state is OutputState.COMPLETE:
            say_complete(out, KIND, fp)
            return read_manifest(out)
        started = time.perf_counter()
        rows = _read_pairs(tokenized, cfg.split, cfg.tokenized)
        # One device: evaluation is a forward pass per batch, fast enough without data parallelism.
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = _load_model(model_dir, cfg.dtype).to(device)
        pairs = _score(model, rows, pad_token_id(tokenized.manifest.stats), objective, cfg)
        if reference is not None:
            _add_reference(pairs, rows, cfg, tokenized.manifest)
        if objective.loss_type == "simpo" or "ref_chosen_logps" in pairs:
            _add_rewards(pairs, objective)
        else:
            log.warning("no --ref-cache: implicit rewards (β·log-ratio to the reference) are not reported")
        sources = [r["source"] for r in rows]
        metrics: dict[str, Any] = report.pair_metrics(pairs)
        generations = []
        if cfg.generate:
            generations = _generate(model, _tokenizer(model_dir, tokenized.manifest), rows, cfg)
            metrics.update(report.generation_metrics(generations))
        metrics["by_source"] = report.grouped_metrics(pairs, sources)
        metrics["evaluated"] = {
            "model": cfg.model, "tokenized": cfg.tokenized, "split": cfg.split, "reference": cfg.ref_cache,
            "loss_type": objective.loss_type, "beta": objective.beta, "objective_from": objective.source,
            "seconds": round(time.perf_counter() - started, 2),
        }
        if baseline is not None:
            metrics["baseline"] = {"path": cfg.baseline, "fingerprint": baseline.fingerprint,
                                   "metrics": _metrics_of(Path(cfg.baseline), baseline)}
        files = _write_outputs(out, cfg, pairs, [r["index"] for r in rows], sources, metrics, generations, train, objective)
        manifest = Manifest(kind=KIND, fingerprint=fp, config=dataclasses.asdict(cfg) | {"objective": dataclasses.asdict(objective)},
                            inputs=inputs, files=files, stats={k: v for k, v in metrics.items() if k != "by_source"})
        commit_output(out, manifest)
    log.info("evaluated %d pairs of split %r in %.1fs: %s", len(rows), cfg.split, time.perf_counter() - started,
             ", ".join(f"{k} {report.fmt(metrics.get(k))}" for k in ("rewards/accuracies", "rewards/margins",
                                                                      "logp_accuracies/summed") if k in metrics))
    log.info("report: %s", out / "report.md")
    return manifest


def _score(model, rows: list[dict], pad_id: int, objective: Objective, cfg: EvaluateConfig) -> dict[str, np.ndarray]:
    """The model's summed label log-probs (and WPO terms when the loss needs them) of every pair."""
    scorer = LabelLogProbs(model)
    device = next(model.parameters()).device
    want_wpo = losses.needs_wpo_term(objective.loss_type)
    n = len(rows)
    out = {name: np.zeros(n, dtype=np.float64) for name in
           ("policy_chosen_logps", "policy_rejected_logps", "chosen_num_tokens", "rejected_num_tokens")}
    if want_wpo:
        out["chosen_wpo_term"], out["rejected_wpo_term"] = np.zeros(n), np.zeros(n)
    batches = length_grouped_batches(pair_lengths(rows), cfg.batch_size)
    bar = progress(n, "evaluate", unit="pair", quiet=cfg.quiet)
    with torch.no_grad():
        for positions in batches:
            batch = collate_pairs([rows[p] for p in positions], pad_id, mode="concatenated")
            batch = {k: v.to(device) for k, v in batch.items()}
            result = scorer(batch["input_ids"], batch["attention_mask"], batch["labels"], with_wpo_term=want_wpo)
            b = len(positions)
            for side, sl in (("chosen", slice(0, b)), ("rejected", slice(b, 2 * b))):
                out[f"policy_{side}_logps"][positions] = result.logps[sl].double().cpu().numpy()
                out[f"{side}_num_tokens"][positions] = result.num_tokens[sl].double().cpu().numpy()
                if want_wpo:
                    out[f"{side}_wpo_term"][positions] = result.wpo_term[sl].double().cpu().numpy()
            bar.update(b)
    bar.close()
    return out


def _add_reference(pairs: dict[str, np.ndarray], rows: list[dict], cfg: EvaluateConfig, tokenized: Manifest) -> None:
    ref = load_reference(cfg.ref_cache, tokenized, [cfg.split])
    values = ref.lookup(torch.tensor([r["index"] for r in rows], dtype=torch.long))
    for side in ("chosen", "rejected"):
        counted = values[f"{side}_num_tokens"].double().numpy()
        bad = np.nonzero(counted != pairs[f"{side}_num_tokens"])[0]
        if len(bad):
            row = rows[int(bad[0])]
            raise ArtifactError(
                f"{cfg.ref_cache}: pair index {row['index']} has {int(counted[bad[0]])} {side} label tokens in the "
                f"cache but {int(pairs[f'{side}_num_tokens'][bad[0]])} in {cfg.tokenized}; the cache does not "
                "belong to these tokens"
            )
        pairs[f"ref_{side}_logps"] = values[f"{side}_logps"].double().numpy()


def _add_rewards(pairs: dict[str, np.ndarray], objective: Objective) -> None:
    """Implicit rewards and per-pair loss exactly as training computes them (pipeline/losses.py)."""
    t = {k: torch.from_numpy(v) for k, v in pairs.items()}
    result = losses.preference_loss(
        objective.loss_type,
        policy_chosen_logps=t["policy_chosen_logps"], policy_rejected_logps=t["policy_rejected_logps"],
        chosen_num_tokens=t["chosen_num_tokens"], rejected_num_tokens=t["rejected_num_tokens"],
        reference_chosen_logps=t.get("ref_chosen_logps"), reference_rejected_logps=t.get("ref_rejected_logps"),
        beta=objective.beta, label_smoothing=objective.label_smoothing,
        gamma_beta_ratio=objective.gamma_beta_ratio, rpo_alpha=objective.rpo_alpha,
        chosen_wpo_term=t.get("chosen_wpo_term"), rejected_wpo_term=t.get("rejected_wpo_term"),
    )
    pairs["rewards_chosen"] = result.chosen_rewards.double().numpy()
    pairs["rewards_rejected"] = result.rejected_rewards.double().numpy()
    pairs["losses"] = result.losses.detach().double().numpy()


# ----------------------------------------------------------------------------------- generation


def _read_prompts(path: str, tokenizer, limit: int) -> list[dict[str, Any]]:
    """Prompts from a JSONL file: {"prompt": text} or {"messages": [...]} (or a bare JSON string) per line.

    Text prompts become one user turn through the chat template when the tokenizer has one.
    """
    prompts = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, line {number}: not valid JSON: {exc}") from None
            if isinstance(record, str):
                record = {"prompt": record}
            if not isinstance(record, dict) or not ({"prompt", "messages"} & record.keys()):
                raise DataError(f"{path}, line {number}: expected a string or an object with 'prompt' or 'messages'")
            messages = record.get("messages")
            if messages is None:
                if not isinstance(record["prompt"], str):
                    raise DataError(f"{path}, line {number}, field 'prompt': expected a string")
                if tokenizer.chat_template:
                    messages = [{"role": "user", "content": record["prompt"]}]
            if messages is not None:
                if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                             for m in messages):
                    raise DataError(f"{path}, line {number}, field 'messages': expected a list of {{role, content}}")
                ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)["input_ids"]
            else:
                ids = tokenizer(record["prompt"], add_special_tokens=True)["input_ids"]
            prompts.append({"line": number, "prompt_ids": list(ids)})
            if len(prompts) == limit:
                break
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


def _held_out_prompts(rows: list[dict], limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` pairs by index; the prompt is the shared prefix before the response labels."""
    chosen = sorted(rows, key=lambda r: r["index"])[:limit]
    out = []
    for row in chosen:
        length = int(row["prompt_length"])
        out.append({
            "index": row["index"], "source": row["source"], "prompt_ids": list(row["chosen_input_ids"][:length]),
            "chosen_tokens": sum(1 for t in row["chosen_labels"] if t != IGNORE_INDEX),
            "rejected_tokens": sum(1 for t in row["rejected_labels"] if t != IGNORE_INDEX),
            "chosen_ids": [t for t in row["chosen_labels"] if t != IGNORE_INDEX],
        })
    return out


def _stop_ids(model, tokenizer) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None) if hasattr(model, "generation_config") else None
    if eos is None:
        eos = tokenizer.eos_token_id
    ids = eos if isinstance(eos, list) else [eos]
    return [int(i) for i in ids if i is not None]


def _generate(model, tokenizer, rows: list[dict], cfg: EvaluateConfig) -> list[dict[str, Any]]:
    """Greedy (temperature 0) or sampled completions, left-padded in batches, with token counts."""
    items = _read_prompts(cfg.prompts, tokenizer, cfg.generate) if cfg.prompts else _held_out_prompts(rows, cfg.generate)
    stop = _stop_ids(model, tokenizer)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    limit = getattr(model.config, "max_position_embeddings", None)
    generator_seed = cfg.seed
    results = []
    bar = progress(len(items), "generate", unit="prompt", quiet=cfg.quiet)
    for start in range(0, len(items), cfg.batch_size):
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


def _metrics_of(path: Path, manifest: Manifest) -> dict[str, Any]:
    if not any(f.path == "metrics.json" for f in manifest.files):
        raise ArtifactError(f"{path}: eval artifact lists no metrics.json")
    return json.loads((path / "metrics.json").read_text())


def _write_outputs(out: Path, cfg: EvaluateConfig, pairs: dict[str, np.ndarray], indices: list[int], sources: list[str],
                   metrics: dict[str, Any], generations: list[dict], train: Manifest | None,
                   objective: Objective) -> list:
    files = []
    table = pa.table({"index": pa.array(indices, pa.int64()), "source": pa.array(sources, pa.string()),
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
    if train is not None and (Path(cfg.train) / "metrics.jsonl").is_file():
        training_rows = report.read_metrics_jsonl(Path(cfg.train) / "metrics.jsonl")
        if report.plot_training_curves(training_rows, out / "training_curves.png",
                                       f"training of {_short(cfg.train)} ({objective.loss_type}, β={objective.beta:g})"):
            plots.append(("Training curves", "training_curves.png"))
    report.plot_margins(pairs, out / "margins.png", title)
    plots.append(("Preference margins", "margins.png"))
    if "ref_chosen_logps" in pairs:
        report.plot_logp_shift(pairs, out / "logp_shift.png", title)
        plots.append(("Log-prob change against the reference", "logp_shift.png"))
    if generations:
        report.plot_generation_lengths(generations, out / "generation_lengths.png", title)
        plots.append(("Generation lengths", "generation_lengths.png"))
    write_json_atomic(out / "metrics.json", metrics)
    files.append(file_entry(out, "metrics.json"))
    (out / "report.md").write_text(_report_md(cfg, metrics, generations, plots, training_rows, objective))
    files.append(file_entry(out, "report.md"))
    files.extend(file_entry(out, name) for _, name in plots)
    return files


def _report_md(cfg: EvaluateConfig, metrics: dict[str, Any], generations: list[dict],
               plots: list[tuple[str, str]], training_rows: list[dict], objective: Objective) -> str:
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
        lines += [report.table(["", "value"], rows), ""]
        for g in generations[:3]:
            lines += [f"**Prompt** ({'pair ' + str(g['index']) if 'index' in g else 'line ' + str(g.get('line'))}):", "",
                      "```", _clip(g["prompt"], 600), "```", "", f"**Completion** ({g['completion_tokens']} tokens):", "",
                      "```", _clip(g["completion"], 600), "```", ""]
        lines += ["All completions: `generations.jsonl`.", ""]
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
