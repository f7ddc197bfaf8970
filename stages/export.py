"""`dpo export`: a trained policy as a Hugging Face model folder people can load, serve and share.

build:  the train artifact and the checkpoint to export (final, latest or step-N), the dtype
run:    load the weights (merging a LoRA adapter into its base unless --no-merge), cast, and save
        with safetensors, config, generation config, the tokenizer and its chat template
close:  README.md (model card: base model, data, loss and hyperparameters, final metrics, lineage),
        then the manifest; only then, with --push-to-hub, the upload

The upload comes after the commit on purpose: a network failure must never cost the local export,
and rerunning the same command (a no-op locally) retries the upload.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from ..artifacts.errors import ArtifactError, PushError, UsageError
from ..artifacts.fingerprint import fingerprint
from ..artifacts.lock import LOCK_NAME
from ..artifacts.manifest import MANIFEST, InputRef, Manifest, read_manifest
from ..artifacts.faults import fault_point
from ..artifacts.output import PARTIAL, is_dpo_file
from ..artifacts.runner import StageRun
from ..artifacts.shards import ArtifactReader, file_entry
from ..pipeline import report
from ..pipeline.checkpoint import complete_checkpoints, damage, step_dir_name
from ..pipeline.config import StageOptions, flatten, option, validate
from ..pipeline.formats import prompt_layout
from ..pipeline.lora import count_parameters
from ..pipeline.modeling import DTYPES, load_causal_lm, torch_dtype
from ..pipeline.tokenization import tokenizer_with_template

STAGE = "export"
VERSION = 1
KIND = "model"
STEP = re.compile(r"^step-(\d+)$")
# What a run writes besides its manifest: a Hugging Face model or adapter folder (weights, configs, the
# tokenizer's files) and its card, all at the top level. Named closely, so that a file of the user's that
# finds its way into a partial export (notes.txt, results.json) is refused, never cleared or listed.
OWNS = ("model*.safetensors", "model.safetensors.index.json", "adapter_model*.safetensors", "*config.json",
        "tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template*", "vocab*", "merges*",
        "*.model", "*.tiktoken", "README.md")
log = logging.getLogger(__name__)


def _checkpoint_spec(value: str) -> str | None:
    if value in ("final", "latest") or STEP.match(value):
        return None
    return "must be final, latest or step-N (e.g. step-120)"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExportConfig(StageOptions):
    train: str = option(semantic=False, panel="Data", help="Train artifact (from `dpo train`).")  # enters the fingerprint through its own
    out: str = option(semantic=False, panel="Data", help="Output folder: a Hugging Face model folder with README.md and manifest.json.")
    checkpoint: str = option("final", check=_checkpoint_spec, panel="Data", help=(
        "final (the finished run), latest (the newest complete checkpoint, or final) or step-N."))
    dtype: str | None = option(None, choices=tuple(DTYPES), panel="Model", help=(
        "float32, bfloat16 or float16 for the saved weights (default: the dtype it trained in)."))
    merge: bool = option(True, panel="Model", help="For a LoRA run, merge the adapter into the base model (--no-merge exports the adapter).")
    push_to_hub: str | None = option(None, semantic=False, panel="Hugging Face Hub", help=(
        "Upload the finished folder to this Hugging Face Hub repo id (after the local export)."))
    private: bool = option(False, semantic=False, panel="Hugging Face Hub", help="Create the Hub repo as private (with --push-to-hub).")


@dataclasses.dataclass(frozen=True)
class Source:
    """The weights to export and what is known about the run that made them."""

    name: str  # "final" or "step-00000120"
    folder: Path  # HF model folder or PEFT adapter folder
    step: int | None
    train_fingerprint: str
    train_config: dict[str, Any]
    train_inputs: list[InputRef]
    complete_train: Manifest | None

    @property
    def adapter(self) -> bool:
        return (self.folder / "adapter_config.json").is_file()


# ---------------------------------------------------------------------------------------- build


def resolve_source(train_dir: Path, spec: str, verify: bool = True) -> Source:
    """``final``, ``latest`` (final if training finished, else the newest complete checkpoint) or ``step-N``,
    its files checked against the manifest that lists them."""
    if not train_dir.is_dir():
        raise UsageError(f"--train {train_dir}: no such directory")
    complete = ArtifactReader(train_dir, "train", verify).manifest if (train_dir / MANIFEST).is_file() else None
    checkpoints = complete_checkpoints(train_dir / "checkpoints")
    available = ", ".join(f"step-{c.step}" for c in checkpoints) or "none"
    if spec == "final" or (spec == "latest" and complete is not None):
        if complete is None:
            raise ArtifactError(
                f"{train_dir}: training has not finished (no {MANIFEST}), so there is no final model; export a "
                f"checkpoint with --checkpoint latest or step-N (complete checkpoints: {available})"
            )
        return Source("final", train_dir / "final", complete.stats.get("steps"), complete.fingerprint,
                      complete.config, complete.inputs, complete)
    if not checkpoints:
        raise ArtifactError(f"{train_dir}: has no complete checkpoint to export (and no final model)")
    if spec == "latest":
        chosen = checkpoints[-1]
    else:
        wanted = int(STEP.match(spec).group(1))
        matches = [c for c in checkpoints if c.step == wanted]
        if not matches:
            raise ArtifactError(f"{train_dir}: has no complete checkpoint {spec} (complete checkpoints: {available})")
        chosen = matches[0]
    problem = damage(chosen, verify)
    if problem is not None:
        raise ArtifactError(f"checkpoint {chosen.path} is damaged: {problem}")
    meta = chosen.manifest
    config = complete.config if complete is not None else dict(meta.get("config", {}))
    inputs = complete.inputs if complete is not None else [InputRef(**i) for i in meta.get("inputs", [])]
    return Source(step_dir_name(chosen.step), chosen.path / "model", chosen.step, meta.get("fingerprint", ""), config,
                  inputs, complete)


def _base_model_path(source: Source) -> Path:
    """The LoRA base model: the path train was given, else the one PEFT recorded in the adapter."""
    recorded = json.loads((source.folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    for candidate in (source.train_config.get("model"), recorded):
        if candidate and (Path(candidate) / "config.json").is_file():
            return Path(candidate).resolve()
    raise ArtifactError(
        f"{source.folder}: is a LoRA adapter, and its base model ({source.train_config.get('model') or recorded}) "
        "is not a local model folder any more; it is needed to merge or load the adapter"
    )


def _tokenizer(source: Source, train_dir: Path):
    """The tokenizer with the chat template the data was made with (train saves it into final/)."""
    tokenized = _tokenized_manifest(source)
    candidates = [source.folder, train_dir / "final", tokenized and tokenized.config.get("tokenizer"),
                  source.train_config.get("model")]
    return tokenizer_with_template(candidates, tokenized.stats.get("chat_template") if tokenized else None)


def _tokenized_manifest(source: Source) -> Manifest | None:
    for ref in source.train_inputs:
        if ref.kind == "tokenized":
            try:
                return read_manifest(ref.path, "tokenized")
            except ArtifactError:
                log.warning("the tokenized artifact %s recorded by the train run is gone: the model card "
                            "will not list data counts", ref.path)
    return None


# ------------------------------------------------------------------------------------------ run


def run(cfg: ExportConfig) -> Manifest:
    validate(cfg)
    train_dir, out = Path(cfg.train), Path(cfg.out)
    source = resolve_source(train_dir, cfg.checkpoint, cfg.verify_inputs)
    dtype = cfg.dtype or str(source.train_config.get("dtype") or "float32")
    merge = cfg.merge and source.adapter
    if not cfg.merge and not source.adapter:
        raise UsageError(f"--no-merge: {train_dir} trained all weights, not a LoRA adapter; there is nothing to keep unmerged")
    semantic = {"checkpoint": source.name, "dtype": dtype, "merge": merge}
    fp = fingerprint(STAGE, VERSION, semantic, [source.train_fingerprint])

    # Besides --train, export reads what the train run read: its model (the LoRA base, the tokenizer) and
    # its tokenized artifact (the chat template, the card's data counts).
    inputs = [("--train", cfg.train), ("the train run's --model", source.train_config.get("model"))]
    inputs += [(f"the train run's {ref.kind} artifact", ref.path) for ref in source.train_inputs]
    with StageRun(STAGE, out, KIND, fp, overwrite=cfg.overwrite, lock_timeout=cfg.lock_timeout, inputs=inputs,
                  owns=OWNS) as stage_run:
        manifest = stage_run.manifest if stage_run.complete else _export(cfg, source, train_dir, stage_run, dtype,
                                                                          merge, fp)
    if cfg.push_to_hub:
        push(out, cfg.push_to_hub, cfg.private)
    return manifest


def _export(cfg: ExportConfig, source: Source, train_dir: Path, stage_run: StageRun, dtype: str, merge: bool,
            fp: str) -> Manifest:
    work = stage_run.dir
    model, base = _load(source, dtype, merge)
    if stage_run.stop_requested():
        raise stage_run.preempted("before writing the export (nothing is committed until it is complete)")
    tokenizer = _tokenizer(source, train_dir)
    _fill_generation_config(model, tokenizer)
    model.save_pretrained(work, safe_serialization=True)
    if source.adapter and not merge:
        # transformers loads an adapter folder through its base_model_name_or_path: keep it absolute.
        _set_adapter_base(work, base)
        model.get_base_model().generation_config.save_pretrained(work)
    tokenizer.save_pretrained(work)
    trainable, total = count_parameters(model)
    tokenized = _tokenized_manifest(source)
    info = _card_info(cfg, source, train_dir, stage_run.out, dtype, merge, base, tokenized, fp)
    (work / "README.md").write_text(report.model_card(info))
    fault_point("export-save")
    files = [file_entry(work, relative) for relative in
             (p.relative_to(work).as_posix() for p in sorted(work.rglob("*")) if p.is_file())
             if not is_dpo_file(relative)]
    stats = {
        "checkpoint": source.name, "step": source.step, "dtype": dtype, "adapter": source.adapter and not merge,
        "merged": merge, "parameters": total, "base_model": str(base) if base else source.train_config.get("model"),
        "loss_type": source.train_config.get("loss_type"), "train_fingerprint": source.train_fingerprint,
        "final_metrics": info["final_metrics"],
    }
    inputs = [InputRef("train", str(train_dir), source.train_fingerprint)]
    manifest = Manifest(kind=KIND, fingerprint=fp, inputs=inputs, files=files, stats=stats,
                        config=flatten(cfg) | {"checkpoint": source.name, "dtype": dtype, "merge": merge})
    stage_run.commit(manifest)
    log.info("exported %s of %s as %s (%s%s, %s parameters) to %s", source.name, train_dir,
             "an adapter" if stats["adapter"] else "a full model", dtype, ", LoRA merged" if merge else "",
             f"{total:,}", stage_run.out)
    return manifest


def _load(source: Source, dtype: str, merge: bool) -> tuple[torch.nn.Module, Path | None]:
    """The model to save, and the LoRA base path (None for a full-weights run)."""
    if not source.folder.is_dir():
        raise ArtifactError(f"{source.folder}: missing; the train artifact is incomplete")
    if not source.adapter:
        return load_causal_lm(source.folder, dtype=dtype), None
    from peft import PeftModel

    base_path = _base_model_path(source)
    # Merge in float32 whatever the target dtype: W + BA rounded once, not twice.
    base = load_causal_lm(base_path, dtype="float32" if merge else dtype)
    from safetensors import SafetensorError

    try:
        model = PeftModel.from_pretrained(base, str(source.folder))
    except SafetensorError as exc:
        raise ArtifactError(f"{source.folder}: the adapter's weight file is corrupt ({exc})") from None
    if merge:
        model = model.merge_and_unload().to(torch_dtype(dtype))
    else:
        model = model.to(torch_dtype(dtype))
    return model.eval(), base_path


def _set_adapter_base(out: Path, base: Path | None) -> None:
    path = out / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = str(base)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _fill_generation_config(model, tokenizer) -> None:
    """Generation stops where the chat template ends a turn, and pads with a real token."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    gen = target.generation_config
    if gen.eos_token_id is None and tokenizer.eos_token_id is not None:
        gen.eos_token_id = tokenizer.eos_token_id
    if gen.pad_token_id is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        gen.pad_token_id = pad
    if gen.bos_token_id is None and tokenizer.bos_token_id is not None:
        gen.bos_token_id = tokenizer.bos_token_id


def _card_info(cfg: ExportConfig, source: Source, train_dir: Path, out: Path, dtype: str, merge: bool,
               base: Path | None, tokenized: Manifest | None, fp: str) -> dict[str, Any]:
    """What the model card says, gathered from the train run, its tokenized input and the base model."""
    import transformers

    from .. import __version__

    train_cfg = source.train_config
    base_path = str(base) if base else train_cfg.get("model")
    base_id = report.hub_or_local_name(base_path)
    loss_type = (train_cfg.get("loss") or {}).get("loss_type") or train_cfg.get("loss_type", "dpo")
    data: dict[str, Any] = {}
    datasets: list[str] = []
    tokenization: dict[str, Any] = {}
    formats: list[str] = []
    layout = "text"
    if tokenized is not None:
        per_split = tokenized.stats.get("pairs_per_source") or {}
        sources: dict[str, int] = {}
        for split_counts in per_split.values():
            for name, count in split_counts.items():
                sources[name] = sources.get(name, 0) + int(count)
        by_spec = {report.hub_or_local_name(s.get("data")): s.get("format") for s in tokenized.stats.get("sources") or []}
        formats = [f for f in by_spec.values() if f]
        data = {"sources": sources, "splits": {s: tokenized.rows(s) for s in tokenized.splits},
                "rejected": tokenized.stats.get("dropped_total"),
                "formats": {name: by_spec.get(report.hub_or_local_name(name)) or "–" for name in sources}}
        datasets = list(dict.fromkeys(report.hub_or_local_name(i.path) for i in tokenized.inputs if i.kind == "data"))
        layout = prompt_layout(tokenized.config, tokenized.stats)
        tokenization = _tokenization(tokenized.config, formats, layout == "chat")
    results: dict[str, Any] = {}
    metrics_path = train_dir / "metrics.jsonl"
    if metrics_path.is_file():
        rows = [r for r in report.read_metrics_jsonl(metrics_path) if source.step is None or r.get("step", 0) <= source.step]
        results = {"train": report.last_row_with(rows, "loss") or {}, "eval": report.last_row_with(rows, "eval/loss") or {}}
    keys = ("step", "epoch", "loss", "rewards/accuracies", "rewards/margins", "rewards/chosen",
            "rewards/rejected", "logps/chosen", "logps/rejected")
    final_metrics = {k: results["train"][k] for k in keys if k in results.get("train", {})}
    final_metrics.update({k: v for k, v in results.get("eval", {}).items() if k.startswith("eval/")})
    train_stats = dict(source.complete_train.stats) if source.complete_train is not None else {}
    train_stats.setdefault("steps", source.step)
    lineage = [(ref.kind, ref.path, ref.fingerprint) for ref in source.train_inputs]
    lineage += [("train", str(train_dir), source.train_fingerprint), ("model", str(out), fp)]
    versions = {"dpo": __version__, "transformers": transformers.__version__, "torch": torch.__version__}
    if source.adapter:
        import peft

        versions["peft"] = peft.__version__
    return {
        "title": _title(cfg, out, base_id, loss_type), "base_model": base_path, "base_model_id": base_id,
        "license": report.model_license(base_path), "datasets": datasets, "chat": layout == "chat",
        "hh": layout == "hh", "checkpoint": source.name, "dtype": dtype, "merged": merge,
        "adapter": source.adapter and not merge, "train_config": train_cfg, "train_stats": train_stats,
        "tokenization": tokenization, "data": data, "results": results, "final_metrics": final_metrics,
        "lineage": lineage, "producer_version": __version__, "versions": versions,
        "load_path": cfg.push_to_hub or str(out),
    }


def _title(cfg: ExportConfig, out: Path, base_id: str | None, loss_type: str) -> str:
    """The Hub repo's name, else the output folder's, else ``<base>-<loss>`` when that folder is just "model"."""
    if cfg.push_to_hub:
        return cfg.push_to_hub.split("/")[-1]
    name = out.resolve().name
    if name.lower() not in report.GENERIC_NAMES:
        return name
    return f"{(base_id or 'model').split('/')[-1]}-{loss_type}"


def _tokenization(config: dict[str, Any], formats: list[str], chat: bool) -> dict[str, Any]:
    """How the pairs were turned into tokens, for the card: what a user must reproduce at inference."""
    template = config.get("chat_template")
    out: dict[str, Any] = {"formats": ", ".join(dict.fromkeys(formats)) or None,
                           "chat template": (f"from {template}" if template else "the tokenizer's") if chat
                           else "none (plain text: prompt + response + EOS)",
                           "max_seq_length": config.get("max_seq_length"),
                           "max_prompt_length": config.get("max_prompt_length"),
                           "truncation": config.get("truncation"),
                           "eval_fraction": config.get("eval_fraction") or None}
    return {k: v for k, v in out.items() if v is not None}


# ---------------------------------------------------------------------------------------- close


def push(out: Path, repo_id: str, private: bool) -> None:
    """Upload the complete export to the Hub; any failure says the local folder is complete."""
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(out), repo_id=repo_id, repo_type="model",
                          ignore_patterns=[PARTIAL, f"{LOCK_NAME}*"],
                          commit_message=f"dpo export ({read_manifest(out).fingerprint})")
    except Exception as exc:  # network, auth and offline errors all mean the same thing to the user
        raise PushError(
            f"--push-to-hub {repo_id}: upload failed ({type(exc).__name__}: {exc}). The local export in {out} is "
            "complete; rerun the same command to retry the upload (the export itself will be a no-op)"
        ) from None
    log.info("pushed %s to https://huggingface.co/%s", out, repo_id)
