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

    return wrapper


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


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
