"""The `dpo` command line: one command per stage, its options generated from the stage's config.

A stage's options are declared once, as fields of its config dataclass (pipeline/config.py); each
command here is built from those fields (flag, type, default, help, --help panel), reads the
matching section of ``--config`` as defaults under the flags, builds the config, calls the stage,
and maps the errors a user can act on to exit codes (see ``dpo --help``). Typer lives here alone.
"""

from __future__ import annotations

import inspect
import logging
import sys
import typing
from pathlib import Path
from types import NoneType, UnionType
from typing import Annotated, Any, Optional

import typer

from . import __version__
from .artifacts.errors import EXIT_CODES, DpoError, Interrupted, Preempted, Stopped, UsageError
from .artifacts.runner import CommandSignals, environment_error
from .pipeline import distributed
from .pipeline.config import RUN_PANEL, Leaf, StageOptions, from_mapping, leaves, section_values
from .pipeline.logs import setup_logging
from .stages import STAGES

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


def _flags_take_no_value() -> None:
    """--help shows an on/off flag as a flag: Typer (0.29) prints a "<bool>" value type beside every
    flag, --help included, as if it took a value."""
    option = getattr(getattr(typer, "core", None), "TyperOption", None)
    shown = getattr(option, "display_type_rich", None)
    if shown is None or getattr(shown, "_dpo_flags", False):
        return

    def display_type_rich(self, ctx):
        return None if getattr(self, "is_flag", False) and getattr(self, "count", False) is False else shown(self, ctx)

    display_type_rich._dpo_flags = True
    option.display_type_rich = display_type_rich


_flags_take_no_value()
VERBOSE = inspect.Parameter(
    "verbose", inspect.Parameter.KEYWORD_ONLY, default=False,
    annotation=Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.", rich_help_panel=RUN_PANEL)],
)


def run_guarded(name: str, body, *, quiet: bool = False, verbose: bool = False):
    """Run a command body, turning a DpoError into its message and exit code (no traceback)."""
    setup_logging(quiet=quiet, verbose=verbose)
    try:
        with CommandSignals():
            return body()
    except Preempted as exc:
        # Not a failure: the work is saved and the scheduler requeues the job (exit 75).
        word = "interrupted" if isinstance(exc, Interrupted) else "pre-empted"
        typer.echo(f"dpo {name}: {word}: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except DpoError as exc:
        typer.echo(f"dpo {name}: error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except Exception as exc:
        translated = environment_error(exc)
        if translated is None:
            raise
        typer.echo(f"dpo {name}: error: {translated}", err=True)
        raise typer.Exit(translated.exit_code) from None
    except Stopped as stop:
        typer.echo(f"dpo {name}: stopped by {stop.signal_name} before it had anything to commit; rerun the same "
                   "command", err=True)
        raise typer.Exit(stop.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None
    finally:
        distributed.close()


# ------------------------------------------------------------------------------ options from config fields


def _cli_type(kind: Any) -> tuple[Any, bool]:
    """The Typer annotation for an option type, and whether it is repeatable."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, UnionType):
        inner, _ = _cli_type(next(a for a in args if a is not NoneType))
        return Optional[inner], False
    if origin is tuple:
        return list[args[0]], True
    return kind, False


def _parameter(leaf: Leaf) -> inspect.Parameter:
    kind, repeatable = _cli_type(leaf.type)
    decls = [leaf.flag_declaration]
    if leaf.type is bool and leaf.has_default and leaf.default and "/" not in decls[0]:
        decls = [f"{leaf.flag}/--no-{leaf.flag[2:]}"]
    if leaf.field.metadata.get("short"):
        decls.append(leaf.field.metadata["short"])
    shown = leaf.has_default and leaf.default not in (None, ())
    if leaf.field.metadata.get("argument"):
        info = typer.Argument(help=leaf.field.metadata["help"], show_default=shown, metavar=leaf.name.upper())
    else:
        info = typer.Option(*decls, help=leaf.field.metadata["help"], show_default=shown, rich_help_panel=leaf.panel)
    default = inspect.Parameter.empty
    if leaf.has_default:
        default = list(leaf.default) if repeatable else leaf.default
        if repeatable and not default:
            default, kind = None, Optional[kind]
    return inspect.Parameter(leaf.option_name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[kind, info])


def _ordered_leaves(config_cls: type) -> list[Leaf]:
    """The stage's own options first, the ones every stage has last."""
    common = {f.name for f in StageOptions.__dataclass_fields__.values()}
    found = leaves(config_cls)
    return [leaf for leaf in found if leaf.name not in common] + [leaf for leaf in found if leaf.name in common]


def _config_option(config_cls: type) -> inspect.Parameter:
    def load(ctx: typer.Context, param: typer.CallbackParam, value: Optional[Path]) -> Optional[Path]:
        """Eager: the stage's section of the run file becomes the defaults the flags override."""
        if value:
            try:
                values = section_values(value, ctx.info_name or "", config_cls)
            except UsageError as exc:
                raise typer.BadParameter(str(exc), ctx=ctx, param=param) from None
            by_option = {leaf.option_name: values[leaf.name] for leaf in leaves(config_cls) if leaf.name in values}
            defaults = {k: list(v) if isinstance(v, tuple) else v for k, v in by_option.items()}
            ctx.default_map = {**(ctx.default_map or {}), **defaults}
        return value

    info = typer.Option("--config", help="YAML run file; this stage reads its own section. Flags override it.",
                        callback=load, is_eager=True, show_default=False, rich_help_panel=RUN_PANEL)
    return inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[Optional[Path], info])


def register_stage(target: typer.Typer, name: str, config_cls: type, run, summary: str) -> None:
    """Add ``NAME`` to ``target``: its options are ``config_cls``'s fields; the body builds the config and runs it."""
    stage_leaves = _ordered_leaves(config_cls)
    params = [_parameter(leaf) for leaf in stage_leaves]
    first_common = next(i for i, leaf in enumerate(stage_leaves) if leaf.panel == RUN_PANEL)
    params[first_common:first_common] = [_config_option(config_cls)]
    params.append(VERBOSE)

    def command(**kwargs: Any) -> None:
        values = {}
        for leaf in stage_leaves:
            value = kwargs[leaf.option_name]
            values[leaf.name] = tuple(value or ()) if _cli_type(leaf.type)[1] else value
        run_guarded(name, lambda: run(from_mapping(config_cls, values)),
                    quiet=values.get("quiet", False), verbose=kwargs["verbose"])

    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = summary
    command.__name__ = name.replace("-", "_")
    target.command(name)(command)


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


for _stage in STAGES.values():
    register_stage(app, _stage.command, *_stage.load(), _stage.summary)


@app.command("run")
def run(
    config: Annotated[Path, typer.Option("--config", help="Run file: top-level run_dir and model, one section per step (see examples/demo.yaml).", show_default=False)],
    step: Annotated[Optional[list[str]], typer.Option("--step", help="Run only this step (repeatable): tokenize, cache-ref, train, export, evaluate-base, evaluate.", show_default=False)] = None,
    list_steps: Annotated[bool, typer.Option("--list-steps", help="Print the steps the run file has, in order, and exit (for job scripts).")] = False,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override one value of the run file, parsed as YAML (repeatable): SECTION.OPTION=VALUE, e.g. train.beta=0.05, or run_dir=PATH / model=PATH.", show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors; no progress bar.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
):
    """Run tokenize -> cache-ref -> train -> export -> evaluate in one job; complete steps are skipped."""
    from .stages import run as stage

    def body() -> int:
        overrides = tuple(set_ or ())
        if list_steps:
            typer.echo("\n".join(stage.steps_of(config, overrides)))
            return 0
        code, report = stage.run(stage.RunConfig(config=config, steps=tuple(step or ()), quiet=quiet,
                                                 overrides=overrides))
        if report is not None:
            typer.echo(f"report: {report}")
        return code

    code = run_guarded("run", body, quiet=quiet, verbose=verbose)
    if code:
        raise typer.Exit(code)


@app.command("status")
def status(
    path: Annotated[Path, typer.Argument(help="A run folder (from `dpo run`) or one artifact folder.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
):
    """Show each artifact (complete or partial), its fingerprint, inputs, key stats, and what runs next."""
    from .stages import status as stage

    run_guarded("status", lambda: typer.echo(stage.render(stage.status(path), as_json=as_json)))


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
