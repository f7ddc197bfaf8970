"""`dpo run`: the whole pipeline in one job, from one YAML run file.

The run file has one section per step, whose keys are the step's own command-line options
(exactly what ``dpo <stage> --config run.yaml`` reads), plus two top-level keys:

- ``run_dir`` (required): the folder every step writes under unless its section sets ``out``;
- ``model``: the base model, the default ``model`` of cache-ref and train and of evaluate-base.

Steps run in this order; a step whose section is absent is left out (no ``cache-ref`` for simpo,
no ``evaluate-base`` when no before/after comparison is wanted):

    tokenize -> cache-ref -> train -> export -> evaluate-base -> evaluate

Inputs chain by default: each step reads the outputs of the steps before it (a key given in a
section always wins). ``evaluate-base`` evaluates the untrained base model on the same pairs, and
``evaluate`` then reports the trained model's numbers next to it ("before" and "after").

Relative paths in the run file are taken from the run file's folder (``run_dir``, ``out`` and the
inputs always; ``model``, ``tokenizer`` and ``data`` when they exist there, else they may be Hub
ids), so the file works from any directory. ``--set SECTION.OPTION=VALUE`` (or ``run_dir=...``,
``model=...``) overrides one value, parsed as YAML, after that: a sweep is one run file and a
``--set`` per run (paths given with --set are relative to the current folder, like any flag).

Each step's section is read against that stage's config exactly as ``dpo <stage> --config`` reads
it (pipeline/config.py), and the stage runs in this process. A step whose output is already complete with the same
fingerprint is a no-op and the log says "skipped": re-submitting a failed or pre-empted job
continues where it stopped. The resolved run file (every chained path filled in) is written to
``<run_dir>/run.yaml`` so that ``dpo status <run_dir>`` knows the steps and their outputs.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import yaml

from ..artifacts.errors import DpoError, Preempted, UsageError
from ..artifacts.manifest import MANIFEST
from ..pipeline.config import coerce, from_mapping, leaves, load_run_file, resolve_paths, run_file_folder, section_values
from ..pipeline.losses import LossConfig
from ..pipeline.distributed import rank
from . import STAGES

log = logging.getLogger(__name__)

# (step, the command that runs it, the default output folder under run_dir)
STEPS = (
    ("tokenize", "tokenize", "tokenized"),
    ("cache-ref", "cache-ref", "ref-logps"),
    ("train", "train", "train"),
    ("export", "export", "model"),
    ("evaluate-base", "evaluate", "eval-base"),
    ("evaluate", "evaluate", "eval"),
)
STEP_NAMES = tuple(name for name, _, _ in STEPS)
TOP_LEVEL = ("run_dir", "model")
RESOLVED = "run.yaml"
HEADER = b"# Written by `dpo run --config "  # how the resolved copy begins: the mark of a file dpo may rewrite


@dataclasses.dataclass(frozen=True)
class RunConfig:
    config: Path
    steps: tuple[str, ...] = ()  # empty: every step the run file has a section for
    quiet: bool = False
    overrides: tuple[str, ...] = ()  # --set KEY=VALUE, applied in order


def _key(section: dict[str, Any], name: str) -> str | None:
    """The spelling of option ``name`` the section uses (dashes or underscores), if any."""
    for candidate in (name, name.replace("_", "-")):
        if candidate in section:
            return candidate
    return None


def _default(section: dict[str, Any], name: str, value: Any) -> None:
    if value is not None and _key(section, name) is None:
        section[name] = str(value) if isinstance(value, Path) else value


def _get(section: dict[str, Any] | None, name: str) -> Any:
    if section is None:
        return None
    key = _key(section, name)
    return section[key] if key is not None else None


def _override(data: dict[str, Any], item: str) -> None:
    """Apply one ``--set SECTION.OPTION=VALUE`` (or ``run_dir=VALUE``, ``model=VALUE``) to ``data``."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UsageError(f"--set {item!r}: expected SECTION.OPTION=VALUE (e.g. train.beta=0.05) or run_dir=PATH")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise UsageError(f"--set {item!r}: the value is not valid YAML: {exc}") from None
    # A path typed on the command line is from the current folder, as for any flag; made absolute so
    # that <run_dir>/run.yaml means the same from anywhere.
    value = resolve_paths({key.rsplit(".", 1)[-1]: value}, Path.cwd())[key.rsplit(".", 1)[-1]]
    if "." not in key:
        if key not in TOP_LEVEL:
            raise UsageError(f"--set {item!r}: {key!r} is not a top-level key ({', '.join(TOP_LEVEL)}); "
                             "options go as SECTION.OPTION, e.g. train.beta=0.05")
        data[key] = value
        return
    section, option = key.split(".", 1)
    if section not in STEP_NAMES:
        raise UsageError(f"--set {item!r}: no step {section!r}; the steps are {', '.join(STEP_NAMES)}")
    if section not in data:
        raise UsageError(f"--set {item!r}: the run file has no {section!r} section to set {option!r} in")
    target = data[section] if isinstance(data[section], dict) else {}
    for spelling in (option, option.replace("_", "-"), option.replace("-", "_")):
        target.pop(spelling, None)  # the value given here replaces the file's, however the file spells it
    target[option] = value
    data[section] = target


def resolve(path: Path, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """The run file with its relative paths taken from its folder, ``overrides`` applied and every
    chained default filled in; unknown top-level keys are errors."""
    data = load_run_file(path)
    base = run_file_folder(path)
    data = {k: resolve_paths(v, base) if k in STEP_NAMES and isinstance(v, dict) else v for k, v in data.items()}
    data.update(resolve_paths({k: data[k] for k in TOP_LEVEL if k in data}, base))
    for item in overrides:
        _override(data, item)
    unknown = [k for k in data if k not in STEP_NAMES and k not in TOP_LEVEL]
    if unknown:
        raise UsageError(
            f"{path}: unknown top-level key(s) {', '.join(map(repr, unknown))}; expected sections "
            f"{', '.join(STEP_NAMES)} and keys {', '.join(TOP_LEVEL)}"
        )
    present = [name for name in STEP_NAMES if name in data]
    if not present:
        raise UsageError(f"{path}: no step sections; expected some of {', '.join(STEP_NAMES)}")
    for key in TOP_LEVEL:
        if data.get(key) is not None:
            try:
                data[key] = coerce(data[key], str)
            except ValueError as exc:
                raise UsageError(f"{path}: top-level key {key!r}: {exc} (a folder path)") from None
    run_dir = data.get("run_dir")
    if not run_dir:
        raise UsageError(f"{path}: needs a top-level run_dir (the folder the steps write under)")
    base_model = data.get("model")
    sections: dict[str, dict[str, Any]] = {}
    for name in present:
        section = data[name]
        if section is None:
            section = {}
        if not isinstance(section, dict):
            raise UsageError(f"{path}: section {name!r} must be a mapping of option names to values")
        sections[name] = copy.deepcopy(section)
    outs: dict[str, Any] = {}
    for name, _, folder in STEPS:
        if name not in sections:
            continue
        _default(sections[name], "out", Path(str(run_dir)) / folder)
        outs[name] = _get(sections[name], "out")

    tok, ref, train, export = (sections.get(n) for n in ("tokenize", "cache-ref", "train", "export"))
    if ref is not None:
        _default(ref, "tokenized", outs.get("tokenize"))
        _default(ref, "model", base_model)
    if train is not None:
        _default(train, "tokenized", outs.get("tokenize"))
        _default(train, "ref_cache", outs.get("cache-ref"))
        _default(train, "model", base_model)
    if export is not None:
        _default(export, "train", outs.get("train"))
    tokenized = outs.get("tokenize") or _get(train, "tokenized") or _get(ref, "tokenized")
    ref_cache = outs.get("cache-ref") or _get(train, "ref_cache")
    if "evaluate-base" in sections:
        section = sections["evaluate-base"]
        _default(section, "model", _get(ref, "model") or _get(train, "model") or base_model)
        _default(section, "tokenized", tokenized)
        _default(section, "ref_cache", ref_cache)
        # The base model is judged with the trained loss (type, β, ...) and its implicit reward, so
        # that the before and after numbers measure the same thing.
        for leaf in leaves(LossConfig):
            _default(section, leaf.name, _get(train, leaf.name))
    if "evaluate" in sections:
        section = sections["evaluate"]
        _default(section, "model", outs.get("export"))
        _default(section, "tokenized", tokenized)
        _default(section, "ref_cache", ref_cache)
        _default(section, "train", outs.get("train") or _get(export, "train"))
        _default(section, "baseline", outs.get("evaluate-base"))
    resolved: dict[str, Any] = {k: data[k] for k in TOP_LEVEL if k in data}
    resolved.update(sections)
    return resolved


def steps_of(path: Path, overrides: tuple[str, ...] = ()) -> list[str]:
    """The steps a run file has sections for, in the order `dpo run` runs them."""
    resolved = resolve(path, overrides)
    return [name for name in STEP_NAMES if name in resolved]


def _manifest_identity(out: Path) -> tuple[str, str] | None:
    try:
        data = json.loads((out / MANIFEST).read_text())
        return data.get("fingerprint", ""), data.get("created", "")
    except (OSError, json.JSONDecodeError):
        return None


def _resolved_text(resolved: dict[str, Any], source: Path, overrides: tuple[str, ...] = ()) -> str:
    command = f"{HEADER.decode()}{source}" + "".join(f" --set {item}" for item in overrides)
    header = (f"{command}`: the run file with its paths absolute, the --set values applied and\n"
              f"# every chained default filled in. Each section is what `dpo <stage> --config <this file>` reads.\n")
    return header + yaml.safe_dump(resolved, sort_keys=False)


# The options through which a step reads something (a file or folder run_dir must not lie inside).
INPUT_KEYS = ("data", "eval_data", "tokenizer", "chat_template", "model", "tokenized", "ref_cache", "train",
              "baseline", "prompts", "deepspeed_config")


def _input_paths(resolved: dict[str, Any]) -> list[tuple[str, str]]:
    found = [("model", resolved["model"])] if isinstance(resolved.get("model"), str) else []
    for name in STEP_NAMES:
        section = resolved.get(name) or {}
        for key in INPUT_KEYS:
            value = _get(section, key)
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, str):
                    # --data PATH:AMOUNT: the path is what precedes the amount
                    path = item if os.path.exists(item) or ":" not in item else item.rsplit(":", 1)[0]
                    found.append((f"{name}.{key}", path))
    return found


def _check_run_dir(resolved: dict[str, Any]) -> None:
    """Refuse a run_dir that is or lies inside something a step reads, before anything is written there."""
    run_dir = Path(os.path.realpath(str(resolved["run_dir"])))
    for where, path in _input_paths(resolved):
        if not os.path.exists(path):
            continue
        there = Path(os.path.realpath(path))
        if there == run_dir or there in run_dir.parents:
            raise UsageError(f"run_dir {resolved['run_dir']} {'is' if there == run_dir else 'lies inside'} {path} "
                             f"({where}), which a step reads: choose a run_dir outside every input")


def _write_resolved(resolved: dict[str, Any], text: str, source: Path) -> None:
    """``<run_dir>/run.yaml``, the record ``dpo status`` reads; rank 0 writes it under accelerate launch.

    Only over a copy dpo wrote: a run.yaml of the user's own (often the very run file given, when
    run_dir is its folder) is never overwritten."""
    if rank() != 0:
        return
    target = Path(str(resolved["run_dir"])) / RESOLVED
    if target.exists() and not _written_by_dpo(target):
        same = target.is_file() and source.is_file() and os.path.samefile(target, source)
        raise UsageError(
            f"{target} {'is the run file given to --config' if same else 'exists and was not written by dpo run'}; "
            f"dpo run keeps its resolved copy of the run file there and will not overwrite yours. Move it, or choose "
            "another run_dir"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.is_file() or target.read_text() != text:
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(target)


def _written_by_dpo(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(HEADER)) == HEADER
    except OSError:
        return False


def run(config: RunConfig) -> tuple[int, Path | None]:
    """Run the steps in order; return 0 or the exit code of the first step that failed, and the report."""
    resolved = resolve(config.config, config.overrides)
    wanted = config.steps or tuple(n for n in STEP_NAMES if n in resolved)
    for name in wanted:
        if name not in STEP_NAMES:
            raise UsageError(f"--step {name!r} is not one of: {', '.join(STEP_NAMES)}")
        if name not in resolved:
            raise UsageError(f"--step {name}: {config.config} has no {name!r} section")
    _check_run_dir(resolved)
    _write_resolved(resolved, _resolved_text(resolved, config.config, config.overrides), config.config)
    for name, command, _ in STEPS:
        if name in wanted:
            code = _run_step(config, name, command, resolved[name])
            if code:
                return code, None
    if rank() != 0:
        return 0, None
    for name in ("evaluate", "evaluate-base"):
        if name in wanted:
            report = Path(str(_get(resolved[name], "out"))) / "report.md"
            return 0, report if report.is_file() else None
    return 0, None


def _run_step(config: RunConfig, name: str, command: str, section: dict[str, Any]) -> int:
    """One step: its section read as ``dpo <command> --config`` reads it, then the stage; its exit code."""
    config_cls, run_stage = STAGES[command].load()
    values = section_values(config.config, name, config_cls, values=section)
    if config.quiet:
        values.setdefault("quiet", True)
    try:
        stage_config = from_mapping(config_cls, values)
    except UsageError as exc:
        raise UsageError(f"{config.config}, section {name!r}: {exc}") from None
    out = Path(str(_get(section, "out")))
    before = _manifest_identity(out)
    log.info("step %s: dpo %s, section %r of %s -> %s", name, command, name, config.config, out)
    started = time.monotonic()
    try:
        run_stage(stage_config)
    except Preempted as exc:
        log.warning("step %s was pre-empted after %.1fs (%s); rerun `dpo run --config %s` to resume (completed "
                    "steps are skipped)", name, time.monotonic() - started, exc, config.config)
        return exc.exit_code
    except DpoError as exc:
        seconds = time.monotonic() - started
        log.error("dpo %s: error: %s", command, exc)
        log.error("step %s failed with exit code %d after %.1fs; fix the cause and rerun `dpo run --config %s`: "
                  "completed steps are skipped", name, exc.exit_code, seconds, config.config)
        return exc.exit_code
    after = _manifest_identity(out)
    if after is None:
        log.error("step %s finished but %s has no %s", name, out, MANIFEST)
        return 3
    skipped = before is not None and before == after
    state = "skipped (output already complete with the same fingerprint)" if skipped else \
        f"done in {time.monotonic() - started:.1f}s"
    log.info("step %s: %s, fingerprint %s", name, state, after[0])
    return 0
