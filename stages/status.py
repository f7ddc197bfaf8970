"""`dpo status DIR`: what a run folder (or one artifact) holds, and what would run next.

For each artifact: complete (a manifest) or partial (the stage started and did not finish), its
fingerprint, its inputs (and whether each still matches the artifact at that path), key stats.
A run folder written by `dpo run` carries its resolved run file, which gives the steps and their
order; any other folder is scanned one level deep for artifacts.

Read-only: it never takes a lock, so it is safe to run while a stage is writing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from ..artifacts.manifest import MANIFEST, Manifest, read_manifest
from ..artifacts.output import PARTIAL, partial_marker
from ..artifacts.errors import ArtifactError, UsageError
from ..pipeline.checkpoint import complete_checkpoints
from ..pipeline.report import last_row_with, read_metrics_jsonl
from .run import RESOLVED, STEPS

# kind -> the step that writes it, in pipeline order
KIND_STEPS = {"tokenized": "tokenize", "ref-logps": "cache-ref", "train": "train", "model": "export", "eval": "evaluate",
              "comparison": "compare"}


def _checkpoints(train_dir: Path) -> list[str]:
    """Complete checkpoints of a train folder, oldest first."""
    return [c.path.name for c in complete_checkpoints(train_dir / "checkpoints")]


def _key_stats(manifest: Manifest, root: Path) -> dict[str, Any]:
    s = manifest.stats
    out: dict[str, Any] = {}
    if manifest.kind == "tokenized":
        out["pairs"] = s.get("pairs") or {split: manifest.rows(split) for split in manifest.splits}
        for key in ("dropped_total", "truncated", "prompt_truncated", "total_tokens"):
            if key in s:
                out[key] = s[key]
        for number, warning in enumerate(s.get("warnings", []), 1):
            out[f"warning {number}"] = warning
    elif manifest.kind == "ref-logps":
        out["pairs"] = {split: manifest.rows(split) for split in manifest.splits}
        out["model"] = manifest.config.get("model")
    elif manifest.kind == "train":
        if "steps" in s:
            out["trained"] = _trained(s, root)
        for key in ("tokens", "train_seconds", "tokens_per_second", "world_size", "trainable_parameters"):
            if key in s:
                out[key] = s[key]
        for key in ("peak_cpu_rss_bytes", "peak_gpu_allocated_bytes"):
            if s.get(key):
                out[key.replace("_bytes", "_gib")] = round(s[key] / 2**30, 2)
        out.update(_last_logged(root))
        out["loss_type"] = manifest.config.get("loss_type")
        out["beta"] = manifest.config.get("beta")
        out["model"] = manifest.config.get("model")
    elif manifest.kind == "model":
        for key in ("checkpoint", "dtype", "merged", "adapter", "parameters", "base_model"):
            if key in s:
                out[key] = s[key]
    elif manifest.kind == "eval":
        for key in ("pairs", "rewards/accuracies", "rewards/margins", "logp_accuracies/summed",
                    "ref/logp_accuracies/summed", "generation/mean_tokens"):
            if s.get(key) is not None:
                out[key] = s[key]
        out["report"] = str(root / "report.md")
    return out


def _trained(stats: dict[str, Any], root: Path) -> dict[str, Any]:
    """Steps x global batch = pairs seen (counting repeats over epochs), and the epochs that makes."""
    out = {"steps": stats["steps"], "global_batch": stats.get("global_batch_size"), "pairs": stats.get("pairs")}
    path = root / "metrics.jsonl"
    if path.is_file():
        last = last_row_with(read_metrics_jsonl(path), "epoch")
        if last is not None:
            out["epochs"] = last["epoch"]
    return out


def _last_logged(train_dir: Path) -> dict[str, Any]:
    """The newest logged training and eval metrics of a train folder (complete or still running)."""
    path = train_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    rows = read_metrics_jsonl(path)
    out: dict[str, Any] = {}
    train = last_row_with(rows, "loss")
    if train:
        out["last logged"] = {k: train[k] for k in ("step", "loss", "rewards/accuracies", "rewards/margins") if k in train}
    evals = last_row_with(rows, "eval/loss")
    if evals:
        out["last eval"] = {k: evals[k] for k in ("step", "eval/loss", "eval/rewards/accuracies") if k in evals}
    return out


def _input_state(ref) -> str:
    """Whether the artifact recorded as an input still has the fingerprint recorded for it."""
    path = Path(ref.path)
    if ref.kind not in KIND_STEPS:
        return "external"
    if not (path / MANIFEST).is_file():
        if not path.exists():
            return "missing"
        # A model folder dpo did not make (the base model of evaluate-base) is not a dpo artifact.
        external = ref.kind == "model" and any((path / f).is_file() for f in ("config.json", "adapter_config.json"))
        return "external" if external else "incomplete"
    try:
        current = read_manifest(path).fingerprint
    except ArtifactError:
        return "unreadable"
    return "ok" if current == ref.fingerprint else f"changed (now {current})"


def describe(path: Path, step: str | None = None) -> dict[str, Any]:
    """The status of one artifact folder: missing, partial or complete, with details."""
    info: dict[str, Any] = {"path": str(path), "step": step}
    if (path / MANIFEST).is_file():
        try:
            manifest = read_manifest(path)
        except ArtifactError as exc:
            info.update(state="corrupt", error=str(exc))
            return info
        problem = _size_problem(path, manifest)  # sizes only: status reads no data, and hashes nothing
        if problem is not None:
            info.update(state="damaged", kind=manifest.kind, fingerprint=manifest.fingerprint,
                        step=step or KIND_STEPS.get(manifest.kind), error=problem)
            return info
        info.update(
            state="complete", kind=manifest.kind, fingerprint=manifest.fingerprint, created=manifest.created,
            step=step or KIND_STEPS.get(manifest.kind),
            inputs=[{"kind": i.kind, "path": i.path, "fingerprint": i.fingerprint, "state": _input_state(i)}
                    for i in manifest.inputs],
            files=len(manifest.files), bytes=sum(f.bytes for f in manifest.files),
            stats=_key_stats(manifest, path),
        )
        info["stale"] = [i["path"] for i in info["inputs"] if i["state"].startswith("changed")]
        return info
    if (path / PARTIAL).is_file():
        partial = partial_marker(path)
        info.update(state="partial", kind=partial.get("kind"), fingerprint=partial.get("fingerprint"),
                    step=step or KIND_STEPS.get(partial.get("kind", "")))
        if partial.get("kind") == "train":
            info["checkpoints"] = _checkpoints(path)
            info["stats"] = _last_logged(path)
        shards = [p for p in path.rglob("part-*.parquet")]
        if shards:
            info["committed_shards"] = len(shards)
        return info
    info["state"] = "missing" if not path.exists() else "not an artifact"
    return info


def _size_problem(path: Path, manifest: Manifest) -> str | None:
    for entry in manifest.files:
        file = path / entry.path
        size = file.stat().st_size if file.is_file() else None
        if size != entry.bytes:
            return (f"{entry.path}: {'missing' if size is None else f'{size} bytes'}, the manifest says {entry.bytes}; "
                    "rerun the stage that made it, with --overwrite")
    return None


def _resume_hint(entry: dict[str, Any]) -> str:
    if entry["state"] in ("damaged", "corrupt"):
        return "rerun it with --overwrite, which rebuilds it"
    if entry.get("checkpoints"):
        return f"resumes from checkpoint {entry['checkpoints'][-1]}"
    if entry.get("committed_shards"):
        return f"resumes after {entry['committed_shards']} committed shard(s)"
    return "resumes (nothing committed yet)" if entry["state"] == "partial" else "starts"


def status(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise UsageError(f"{path} is a file; `dpo status` takes a run folder or an artifact folder")
    if (path / MANIFEST).is_file() or (path / PARTIAL).is_file():
        entry = describe(path)
        result = {"path": str(path), "type": "artifact", "artifacts": [entry]}
        if entry["state"] == "complete":
            downstream = list(KIND_STEPS.values())
            position = downstream.index(entry["step"]) if entry["step"] in downstream else -1
            nxt = downstream[position + 1] if 0 <= position < len(downstream) - 1 else None
            result["next"] = (f"nothing for {entry['step']} (complete); the next stage is {nxt}" if nxt
                              else f"nothing: {entry['step']} is complete")
        else:
            result["next"] = f"{entry['step']} ({_resume_hint(entry)})"
        return result
    run_file = path / RESOLVED
    if run_file.is_file():
        try:
            resolved = yaml.safe_load(run_file.read_bytes().decode("utf-8")) or {}
        except (yaml.YAMLError, ValueError) as exc:
            raise UsageError(f"{run_file}: not valid YAML: {exc}") from None
        if not isinstance(resolved, dict):
            raise UsageError(f"{run_file}: not a run file (a mapping with one section per step)")
        entries = []
        for name, _, _ in STEPS:
            section = resolved.get(name)
            if isinstance(section, dict) and section.get("out"):
                entries.append(describe(Path(str(section["out"])), step=name))
        result = {"path": str(path), "type": "run", "run_file": str(run_file), "artifacts": entries}
    else:
        children = sorted(p for p in path.iterdir() if p.is_dir() and ((p / MANIFEST).is_file() or (p / PARTIAL).is_file()))
        if not children:
            raise UsageError(f"{path}: neither an artifact (no {MANIFEST} or {PARTIAL}) nor a folder holding artifacts")
        order = list(KIND_STEPS)
        entries = sorted((describe(p) for p in children),
                         key=lambda e: (order.index(e["kind"]) if e.get("kind") in order else len(order), e["path"]))
        result = {"path": str(path), "type": "folder", "artifacts": entries}
    pending = [e for e in result["artifacts"] if e["state"] != "complete"]
    stale = [e for e in result["artifacts"] if e.get("stale")]
    if pending:
        result["next"] = f"{pending[0]['step']} ({_resume_hint(pending[0])})"
    elif stale:
        result["next"] = (f"{stale[0]['step']}: its input {stale[0]['stale'][0]} changed since it was made; rerunning "
                          "refuses unless --overwrite")
    else:
        result["next"] = "nothing: every step is complete"
    return result


def _fmt(value: Any) -> str:
    if isinstance(value, dict) and all(value.get(k) is not None for k in ("steps", "global_batch", "pairs")):
        text = f"{value['steps']:,} steps x {value['global_batch']} pairs = {value['pairs']:,} pairs"
        return text + (f" ({value['epochs']:.2f} epochs)" if value.get("epochs") is not None else "")
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    return str(value)


def render(result: dict[str, Any], as_json: bool = False) -> str:
    if as_json:
        return json.dumps(result, indent=2)
    lines = [f"{result['path']} ({result['type']}" + (f", run file {result['run_file']})" if "run_file" in result else ")")]
    for e in result["artifacts"]:
        head = f"  {(e.get('step') or '?'):<14} {e['state']:<9} {e['path']}"
        if e.get("fingerprint"):
            head += f"  [{e.get('kind')} {e['fingerprint']}]"
        lines.append(head)
        if e["state"] == "complete":
            for i in e["inputs"]:
                lines.append(f"      input {i['kind']:<10} {i['path']}  {i['fingerprint']}  {i['state']}")
            for k, v in e["stats"].items():
                if v is not None:
                    lines.append(f"      {k}: {_fmt(v)}")
            lines.append(f"      {e['files']} files, {e['bytes'] / 1e6:.1f} MB, created {e['created']}")
        elif e["state"] == "partial":
            if e.get("checkpoints"):
                lines.append(f"      complete checkpoints: {', '.join(e['checkpoints'])}")
            if e.get("committed_shards"):
                lines.append(f"      committed shards: {e['committed_shards']}")
            for k, v in e.get("stats", {}).items():
                lines.append(f"      {k}: {_fmt(v)}")
        elif e.get("error"):
            lines.append(f"      {e['error']}")
    lines.append(f"next: {result['next']}")
    return "\n".join(lines)
