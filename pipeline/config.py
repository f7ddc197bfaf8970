"""Stage options, declared once: a dataclass field with its default, help text and check.

Each stage's config is a frozen dataclass of ``option()`` fields. The CLI builds every command's
flags from them (cli.py), a YAML run file's section is read against them (``section_values``),
``dpo run`` builds configs straight from its sections (``from_mapping``), and a fingerprint takes
the fields marked semantic. A component that owns a group of options (the loss, LoRA, distribution,
tracking) declares them in its own small dataclass, which stage configs nest with ``group()``;
groups are flattened wherever a user meets options, so ``--beta`` is ``beta:`` in a run file and
``beta`` in a manifest's config.

Validation has one style: ``validate(config)`` tests each field's own constraint (``choices`` or
``check``), then every (nested) config's ``check()`` method for rules that involve several fields.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import NoneType, UnionType
from typing import Any

import yaml

from ..artifacts.errors import UsageError
from ..artifacts.fingerprint import leaf_values

# A constraint on one value: None when it is fine, else what is wrong ("must be at least 1").
Check = Callable[[Any], "str | None"]


def option(default: Any = dataclasses.MISSING, *, help: str, semantic: bool = True, choices: tuple | None = None,
           check: Check | None = None, flag: str | None = None, short: str | None = None, panel: str | None = None,
           factory: Callable[[], Any] | Any = dataclasses.MISSING, omit_if_default: bool = False,
           separator: str | None = None) -> Any:
    """A config field. ``semantic``: it changes what the stage computes (so it enters the
    fingerprint). ``omit_if_default``: it enters the fingerprint only when set to another value
    than its default (for options added later, so existing runs keep their fingerprints).
    ``flag``: the option's name when it is not the field's (``--split`` for ``splits``);
    ``short``: a one-letter alias. ``panel``: the --help section; a group's fields default to the
    group's PANEL. ``separator``: a string option that lists values (``dpo,sft``), which a run file
    may also give as a YAML list."""
    metadata = {"help": help, "semantic": semantic, "choices": choices, "check": check, "flag": flag, "short": short,
                "panel": panel, "omit_if_default": omit_if_default, "separator": separator}
    return dataclasses.field(default=default, default_factory=factory, metadata=metadata)


def group(cls: type, *, semantic: bool = True) -> Any:
    """A nested group of options (a dataclass of ``option()`` fields with its own ``check``)."""
    return dataclasses.field(default_factory=cls, metadata={"group": True, "semantic": semantic})


# ------------------------------------------------------------------------------ field constraints


def at_least(low: float) -> Check:
    return lambda v: None if v is None or v >= low else f"must be at least {low:g}"


def positive(v: float | None) -> str | None:
    return None if v is None or (v > 0 and math.isfinite(v)) else "must be a positive number"


def non_negative(v: float | None) -> str | None:
    return None if v is None or (v >= 0 and math.isfinite(v)) else "must be a non-negative number"


def fraction(low_open: bool = False, high_open: bool = True) -> Check:
    """A value in [0, 1) (or (0, 1), [0, 1] ... as asked)."""
    low, high = ("(" if low_open else "["), (")" if high_open else "]")

    def check(v: float | None) -> str | None:
        if v is None:
            return None
        ok = (v > 0 if low_open else v >= 0) and (v < 1 if high_open else v <= 1)
        return None if ok else f"must lie in {low}0, 1{high}"

    return check


# ------------------------------------------------------------------------------ the fields of a config


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One option of a config class: its field, resolved type, and where it sits in the nesting."""

    field: dataclasses.Field
    type: Any
    path: tuple[str, ...]  # attribute names from the stage config down to the field
    panel: str | None
    semantic: bool

    @property
    def name(self) -> str:
        return self.field.name

    @property
    def option_name(self) -> str:
        flag = self.field.metadata.get("flag")
        return self.flag.lstrip("-").replace("-", "_") if flag else self.name

    @property
    def flag(self) -> str:
        """The option's flag (of an on/off pair like ``--verify-inputs/--no-verify``, the first)."""
        return (self.field.metadata.get("flag") or "--" + self.name.replace("_", "-")).split("/")[0]

    @property
    def flag_declaration(self) -> str:
        """What the CLI declares: the flag, or the on/off pair a field names."""
        return self.field.metadata.get("flag") or self.flag

    @property
    def has_default(self) -> bool:
        return self.field.default is not dataclasses.MISSING or self.field.default_factory is not dataclasses.MISSING

    @property
    def default(self) -> Any:
        if self.field.default is not dataclasses.MISSING:
            return self.field.default
        return self.field.default_factory()


def leaves(cls: type, path: tuple[str, ...] = (), panel: str | None = None, semantic: bool = True) -> list[Leaf]:
    """Every option of config class ``cls``, nested groups flattened, in declaration order."""
    hints = typing.get_type_hints(cls)
    panel = getattr(cls, "PANEL", panel)
    out: list[Leaf] = []
    for f in dataclasses.fields(cls):
        inner_semantic = semantic and f.metadata.get("semantic", True)
        if f.metadata.get("group"):
            out.extend(leaves(hints[f.name], path + (f.name,), panel, inner_semantic))
        else:
            out.append(Leaf(f, hints[f.name], path + (f.name,), f.metadata.get("panel") or panel, inner_semantic))
    return out


def flatten(config: Any) -> dict[str, Any]:
    """The config's options as one flat mapping (what a manifest records as its ``config``)."""
    return {f.name: _plain(value) for f, value, _ in leaf_values(config)}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def from_mapping(cls: type, values: Mapping[str, Any]) -> Any:
    """Build ``cls`` (nested groups too) from flat option values; missing ones take their default."""
    return _build(cls, dict(values), ())


def _build(cls: type, values: dict[str, Any], path: tuple[str, ...]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("group"):
            kwargs[f.name] = _build(hints[f.name], values, path + (f.name,))
        elif f.name in values:
            kwargs[f.name] = values[f.name]
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise UsageError(f"{f.metadata.get('flag') or '--' + f.name.replace('_', '-')} is required")
    return cls(**kwargs)


def replace(config: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` by flat option name, reaching into nested groups."""
    return from_mapping(type(config), {**{f.name: v for f, v, _ in leaf_values(config)}, **changes})


def validate(config: Any) -> None:
    """Each option's own constraint, then every (nested) config's ``check()``; a UsageError naming the flag."""
    for leaf in leaves(type(config)):
        value = _get(config, leaf.path)
        choices = leaf.field.metadata.get("choices")
        if choices is not None and value is not None and value not in choices:
            raise UsageError(f"{leaf.flag} {value!r} is not one of: {', '.join(map(str, choices))}")
        check = leaf.field.metadata.get("check")
        problem = check(value) if check is not None else None
        if problem:
            raise UsageError(f"{leaf.flag} {problem}, got {value!r}")
    for obj in _groups(config):
        if hasattr(obj, "check"):
            obj.check()


def _get(config: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        config = getattr(config, name)
    return config


def _groups(config: Any) -> Iterator[Any]:
    """Nested group objects first, the stage config last (its checks may rely on the groups')."""
    for f in dataclasses.fields(config):
        if f.metadata.get("group"):
            yield from _groups(getattr(config, f.name))
    yield config


# ------------------------------------------------------------------------------ YAML run files


def load_run_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"config file {path} is a folder; pass the YAML run file inside it")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"config file {path}: cannot read it ({exc})") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping with one section per stage, got {type(data).__name__}")
    return data


# Options whose values are files or folders: a relative one in a run file is taken from the run
# file's folder, so a run file works from any working directory and sweeps need no copies of it.
PATH_OPTIONS = frozenset({"run_dir", "out", "tokenized", "ref_cache", "train", "baseline", "prompts",
                          "deepspeed_config", "chat_template"})
# Options that name a local path or a Hugging Face Hub id (``data`` and ``eval_data`` with an optional
# ``:AMOUNT``): a relative value is taken from the run file's folder when it exists there, and is
# otherwise passed on as written (a Hub id, or a path from the current folder).
PATH_OR_HUB_OPTIONS = frozenset({"model", "tokenizer", "data", "eval_data"})
_AMOUNT_SUFFIX = re.compile(r":(\d+|\d+\.\d*|\.\d+)$")


def resolve_paths(values: Mapping[str, Any], base: str | Path) -> dict[str, Any]:
    """``values`` (a run-file section, or its top level) with relative paths taken from folder ``base``."""
    base = Path(base)
    out = dict(values)
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name in PATH_OPTIONS or name in PATH_OR_HUB_OPTIONS:
            items = value if isinstance(value, list) else [value]
            resolved = [_resolve_path(v, base, hub=name in PATH_OR_HUB_OPTIONS) for v in items]
            out[key] = resolved if isinstance(value, list) else resolved[0]
    return out


def _resolve_path(value: Any, base: Path, hub: bool) -> Any:
    if not isinstance(value, str) or not value or Path(value).is_absolute() or value.startswith("~"):
        return value
    suffix = _AMOUNT_SUFFIX.search(value) if hub else None
    path = value[: suffix.start()] if suffix else value
    candidate = base / path
    if hub and not candidate.exists():
        return value
    # abspath, not resolve: a symlinked folder keeps the name the user gave it.
    return os.path.abspath(candidate) + (suffix.group(0) if suffix else "")


def run_file_folder(path: str | Path) -> Path:
    """The folder relative paths in run file ``path`` are taken from."""
    return Path(os.path.abspath(path)).parent


def section_values(path: str | Path, section: str, cls: type, values: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A run file's ``section`` as option values of ``cls``, keyed by field name and typed.

    Keys are option names (dashes or underscores). An unknown key, or a value of the wrong type, is
    a UsageError naming the file, the section and the key. Relative paths are taken from the run
    file's folder (``resolve_paths``). ``values`` stands in for the file's own section (``dpo run``
    passes sections it has already resolved).
    """
    if values is None:
        values = load_run_file(path).get(section) or {}
        if isinstance(values, dict):
            values = resolve_paths(values, run_file_folder(path))
    if not isinstance(values, dict):
        raise UsageError(f"{path}: section {section!r} must be a mapping of option names to values")
    known = {leaf.option_name: leaf for leaf in leaves(cls)}
    out = {}
    for key, value in values.items():
        leaf = known.get(str(key).replace("-", "_"))
        if leaf is None:
            raise UsageError(
                f"{path}: section {section!r} has unknown option {key!r}; "
                f"known: {', '.join(sorted(n.replace('_', '-') for n in known))}"
            )
        separator = leaf.field.metadata.get("separator")
        if separator and isinstance(value, list):
            value = separator.join(str(v) for v in value)
        try:
            out[leaf.name] = coerce(value, leaf.type)
        except ValueError as exc:
            raise UsageError(f"{path}: section {section!r}, key {key!r}: {exc}") from None
    return out


def coerce(value: Any, kind: Any) -> Any:
    """``value`` (as YAML parsed it) as the option type ``kind``; ValueError saying what was expected.

    Lenient where YAML is surprising: ``5e-7`` is a string to YAML (floats need a dot there) and
    ``save_every: 50`` an int for a string option.
    """
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, UnionType):
        if value is None and NoneType in args:
            return None
        inner = [a for a in args if a is not NoneType]
        return coerce(value, inner[0])
    if origin is tuple:
        items = value if isinstance(value, list) else [value]
        return tuple(coerce(v, args[0]) for v in items)
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"expected true or false, got {value!r}")
    if kind in (int, float):
        if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
            raise ValueError(f"expected a {'whole number' if kind is int else 'number'}, got {value!r}")
        try:
            number = float(value) if kind is float else _whole(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a {'whole number' if kind is int else 'number'}, got {value!r}") from None
        return number
    if kind is str:
        if isinstance(value, (list, dict)) or value is None:
            raise ValueError(f"expected a single value, got {value!r}")
        return str(value)
    return value


def _whole(value: Any) -> int:
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError
        return int(value)
    return int(str(value).strip())


# ------------------------------------------------------------------------------ options every stage has

RUN_PANEL = "Output and run control"


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageOptions:
    """What every stage takes besides its own options: none of it changes what is computed."""

    overwrite: bool = option(False, semantic=False, panel=RUN_PANEL, help=(
        "Replace a complete output that was made with a different fingerprint."))
    lock_timeout: float = option(600.0, semantic=False, check=positive, panel=RUN_PANEL, help=(
        "Seconds without a heartbeat after which another job's lock on --out is taken over."))
    quiet: bool = option(False, semantic=False, short="-q", panel=RUN_PANEL, help=(
        "Only warnings and errors; no progress bar."))
    verify_inputs: bool = option(True, semantic=False, flag="--verify-inputs/--no-verify", panel=RUN_PANEL, help=(
        "Check every input artifact's files against the sha256 in its manifest before using them; --no-verify "
        "checks only their sizes and row counts."))
