"""YAML run files: one section per stage, whose keys are that stage's option names.

``dpo tokenize --config run.yaml`` takes its defaults from the ``tokenize:`` section; flags given
on the command line override them. Keys may use dashes or underscores. An unknown key is an
error naming the file and the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
import yaml

from .errors import UsageError


def load_run_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping with one section per stage, got {type(data).__name__}")
    return data


def section_defaults(path: str | Path, section: str, command: Any) -> dict[str, Any]:
    """The ``section`` of a run file as click default values, checked against the command's options.

    ``command`` is a click or Typer command. Typer (0.29 here) vendors its own copy of click, whose
    classes are not click's, so options are recognised by ``param_type_name``, not isinstance.
    """
    data = load_run_file(path)
    values = data.get(section) or {}
    if not isinstance(values, dict):
        raise UsageError(f"{path}: section {section!r} must be a mapping of option names to values")
    known = {p.name: p for p in command.params if p.param_type_name == "option" and p.name != "config"}
    defaults = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise UsageError(
                f"{path}: section {section!r} has unknown option {key!r}; "
                f"known: {', '.join(sorted(n.replace('_', '-') for n in known))}"
            )
        if known[name].multiple and not isinstance(value, list):
            value = [value]
        defaults[name] = value
    return defaults


def config_callback(ctx: typer.Context, param: typer.CallbackParam, value: str | None) -> str | None:
    """Eager ``--config`` option: load the stage's section before the other options resolve.

    Errors are Typer's BadParameter (its vendored click's), which Typer turns into exit code 2.
    """
    if value:
        try:
            defaults = section_defaults(value, ctx.info_name or "", ctx.command)
        except UsageError as exc:
            raise typer.BadParameter(str(exc), ctx=ctx, param=param) from None
        ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value
