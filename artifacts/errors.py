"""Errors a user can act on, each mapped by the CLI to a documented exit code.

They live at the bottom of the stack (the artifact layer raises them too), so every layer above
imports them from here. Anything that is not a DpoError is a bug in dpo and keeps its traceback.
"""

from __future__ import annotations


class DpoError(Exception):
    exit_code = 1


class UsageError(DpoError):
    """A flag, config file or combination of options that cannot work."""

    exit_code = 2


class DataError(DpoError):
    """A malformed input record; the message names the file, the line or row, and the field."""

    exit_code = 2


class ArtifactError(DpoError):
    """A missing, incomplete, corrupt or mismatched artifact directory."""

    exit_code = 3


class LockHeldError(DpoError):
    """Another live job is writing the same artifact directory."""

    exit_code = 4


class PushError(DpoError):
    """The Hub upload failed after the local export was committed; rerunning retries the upload."""

    exit_code = 5


class Preempted(DpoError):
    """Stopped on SIGTERM/SIGUSR1 after committing its work; rerunning the same command resumes.

    75 is EX_TEMPFAIL from sysexits.h: "try again later", which is what a requeue does.
    """

    exit_code = 75


class Interrupted(Preempted):
    """Stopped on Ctrl-C (SIGINT) the same way, after committing its work; 128 + SIGINT, as a shell reports it."""

    exit_code = 130


class Stopped(BaseException):
    """A stop signal that arrived where a stage holds nothing to commit (before it took its output, or after it
    let go): the command ends at once. A BaseException, like KeyboardInterrupt, so that no ``except
    Exception`` on the way turns it into another error."""

    def __init__(self, signal_name: str, exit_code: int):
        super().__init__(signal_name)
        self.signal_name = signal_name
        self.exit_code = exit_code


EXIT_CODES = {
    0: "success, or a no-op because the output is already complete",
    1: "internal error (a bug: please report it with the traceback)",
    2: "bad input: options, config file or a malformed data record",
    3: "artifact problem: missing, incomplete, corrupt or from other inputs; or no space left on the device",
    4: "the output directory is locked by another live job",
    5: "the Hugging Face Hub upload failed (the local export is complete; rerun to retry)",
    75: "pre-empted (SIGTERM/SIGUSR1): what was done is committed; rerun to resume",
    130: "interrupted (Ctrl-C): the lock is released; rerun to resume",
}
