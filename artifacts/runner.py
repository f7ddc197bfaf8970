"""The skeleton every stage shares: take the output, do the work, commit last, always let go.

    with StageRun("cache-ref", out, "ref-logps", fingerprint, overwrite=..., lock_timeout=...,
                  collective=COLLECTIVE) as run:
        if run.complete:
            return run.manifest           # same fingerprint: a no-op that says so
        ...                                # the work, with run.stop_requested() at safe points
        run.commit(manifest)               # manifest.json last: the artifact exists from here on

Entering: rank 0 takes the output's lock and decides what the folder is (fresh, a partial run to
resume, already complete, or refused); that decision, or rank 0's error, reaches every rank, so
no rank waits forever at a collective that a failed rank 0 never joins. SIGTERM and SIGUSR1 only
set a flag: ``stop_requested()`` (collective: every rank calls it at the same point) tells every
rank at once, and the stage then commits what it has and raises ``run.preempted(...)`` (exit 75).
Leaving, on every path (success, error, pre-emption, Ctrl-C): the lock is released and the signal
handlers restored.

The runner knows nothing of torch: ``collective`` is any object with ``world_size``, ``rank``,
``broadcast(obj)`` (rank 0's value on every rank), ``any(flag)`` (or over ranks) and ``barrier()``;
pipeline/distributed.py provides one over torch.distributed. ``inspect``, when given, looks at the
locked folder before it is prepared (train refuses checkpoints of another config there, naming what
differs, before a partial run of another fingerprint would be discarded).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, Protocol, TypeVar

from .errors import ArtifactError, DpoError, Interrupted, Preempted, Stopped, UsageError
from .faults import fault_point
from .lock import ArtifactLock
from .manifest import Manifest, read_manifest
from .output import Output, OutputState, commit_output, prepare_output

T = TypeVar("T")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
log = logging.getLogger(__name__)


class Collective(Protocol):
    world_size: int
    rank: int

    def broadcast(self, obj: Any) -> Any: ...

    def any(self, flag: bool) -> bool: ...

    def barrier(self) -> None: ...


class OneProcess:
    """The collective of a single process: every operation is local."""

    world_size = 1
    rank = 0

    def broadcast(self, obj: Any) -> Any:
        return obj

    def any(self, flag: bool) -> bool:
        return flag

    def barrier(self) -> None:
        pass


ONE_PROCESS = OneProcess()


def on_main(collective: Collective, fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result, or the DpoError it raised, to every rank.

    A bug on rank 0 keeps its traceback there and stops the other ranks with a DpoError that
    points at rank 0's log, instead of leaving them at the next collective until the timeout.
    """
    if collective.world_size <= 1:
        return fn()
    outcome: tuple[str, Any] = ("ok", None)
    if collective.rank == 0:
        try:
            outcome = ("ok", fn())
        except DpoError as exc:
            outcome = ("error", exc)
        except BaseException:
            collective.broadcast(("crash", None))
            raise
    status, value = collective.broadcast(outcome)
    if status == "error":
        raise value
    if status == "crash":
        raise DpoError("rank 0 failed (its traceback is in its log); stopping this rank too")
    return value


class StopSignals:
    """SIGTERM, SIGUSR1 and SIGINT become a flag (nothing else is safe inside a signal handler).

    Slurm sends SIGTERM about 30 s (KillWait) before SIGKILL when a job is pre-empted, cancelled or
    reaches its time limit; ``sbatch --signal=USR1@120`` sends SIGUSR1 earlier, leaving time for a
    large checkpoint. Ctrl-C (SIGINT) stops the same way and exits 130; a second Ctrl-C stops at once
    (KeyboardInterrupt: the lock is still released, what was committed stays).
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
        self.signals = signals
        self.received: str | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and self.received == name:
            raise KeyboardInterrupt
        if self.received is None:
            self.received = name
            log.warning("received %s: stopping at the next safe point, then exiting with code %d%s", name,
                        exit_code_of(name), " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else "")

    def __enter__(self) -> StopSignals:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


def exit_code_of(signal_name: str | None) -> int:
    return Interrupted.exit_code if signal_name == "SIGINT" else Preempted.exit_code


class CommandSignals:
    """Stop signals for a whole command: outside a StageRun (reading and checking inputs before it, an
    upload after it) there is nothing to commit, so the command ends at once with the exit code a stop
    at a safe point would give (75, or 130 for Ctrl-C) instead of dying of the signal. Inside a StageRun
    its StopSignals take over, and hand back on leaving."""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        raise Stopped(name, exit_code_of(name))

    def __enter__(self) -> CommandSignals:
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


class StageRun:
    """One stage's hold on its output folder; see the module docstring."""

    def __init__(self, stage: str, out: str | os.PathLike, kind: str, fingerprint: str, *, overwrite: bool = False,
                 lock_timeout: float = 600.0, collective: Collective = ONE_PROCESS,
                 inputs: Sequence[tuple[str, str | os.PathLike | None]] = (), owns: Sequence[str] = (),
                 inspect: Callable[[Path], None] | None = None):
        self.stage = stage
        self.out = Path(out)
        self.kind = kind
        self.fingerprint = fingerprint
        self.overwrite = overwrite
        self.collective = collective
        self.inputs = inputs
        self.owns = owns
        self.inspect = inspect
        self.lock = ArtifactLock(self.out, lock_timeout)
        self.signals = StopSignals()
        self.output: Output | None = None
        self._locked = False

    @property
    def is_main(self) -> bool:
        return self.collective.rank == 0

    @property
    def state(self) -> OutputState | None:
        return self.output.state if self.output is not None else None

    @property
    def dir(self) -> Path:
        """Where the stage writes its files: ``out``, or the staging folder beside the artifact it replaces."""
        return self.output.dir

    @property
    def complete(self) -> bool:
        return self.state is OutputState.COMPLETE

    @property
    def resumed(self) -> bool:
        return self.state is OutputState.RESUME

    @property
    def manifest(self) -> Manifest:
        return read_manifest(self.out, self.kind)

    def __enter__(self) -> StageRun:
        self.signals.__enter__()
        try:
            self.output = on_main(self.collective, self._take)
        except BaseException:
            self._leave()
            raise
        if self.complete and self.is_main:
            log.info("%s is already a complete %s artifact with fingerprint %s: nothing to do",
                     self.out, self.kind, self.fingerprint)
        elif self.resumed and self.is_main:
            log.info("resuming the partial output in %s (fingerprint %s)", self.out, self.fingerprint)
        return self

    def _take(self) -> Output:
        try:
            check_out(self.out, self.inputs)
            self.lock.acquire()
            self._locked = True
            if self.inspect is not None and not self.overwrite:
                self.inspect(self.out)
            return prepare_output(self.out, self.kind, self.fingerprint, self.overwrite, self.owns)
        except OSError as exc:
            translated = environment_error(exc, self.out)
            if translated is None and exc.errno in _BAD_PATH:
                translated = UsageError(f"--out {self.out}: cannot create it ({exc.strerror}: {exc.filename})")
            if translated is None:
                raise
            raise translated from None

    @property
    def signalled(self) -> bool:
        """Whether this process received a stop signal (local: safe to ask anywhere, any number of times)."""
        return self.signals.received is not None

    def stop_requested(self) -> bool:
        """Whether any rank received a stop signal; collective, so call it at the same point on every rank."""
        fault_point("stop-check")
        stop = self.collective.any(self.signals.received is not None)
        if stop and self.signals.received is None:
            self.signals.received = "a stop signal on another rank"
        return stop

    def preempted(self, saved: str) -> Preempted:
        """The exception to raise once the stage has committed what it had (``saved`` says what): exit 75,
        or 130 after Ctrl-C."""
        error = Interrupted if self.signals.received == "SIGINT" else Preempted
        return error(f"stopped by {self.signals.received} {saved}; rerun the same command to resume")

    def commit(self, manifest: Manifest | None) -> None:
        """Write the manifest (rank 0's; other ranks pass None), then let every rank go on: none reports
        success before it exists."""
        if self.is_main:
            commit_output(self.out, manifest, self.dir, self.owns)
        self.collective.barrier()

    def __exit__(self, exc_type, exc, traceback) -> None:
        self._leave()
        translated = environment_error(exc, self.out) if exc is not None else None
        if translated is not None:
            raise translated from None

    def _leave(self) -> None:
        if self._locked:
            self.lock.release()
            self._locked = False
        self.signals.__exit__()


def check_out(out: Path, inputs: Sequence[tuple[str, str | os.PathLike | None]]) -> None:
    """Refuse an --out that is a file or lies under one, or that is, contains or lies inside an input:
    before anything is created, so nothing of the user's is touched."""
    for parent in [out, *out.parents]:
        if parent.exists() and not parent.is_dir():
            where = "is a file" if parent == out else f"lies under the file {parent}"
            raise UsageError(f"--out {out} {where}; --out must be a folder (new, empty, or one dpo wrote)")
        if parent.is_symlink() and not parent.exists():
            where = "is" if parent == out else f"lies under {parent},"
            raise UsageError(f"--out {out} {where} a symbolic link to {os.readlink(parent)}, which does not exist; "
                             "create its target or choose another --out")
    here = Path(os.path.realpath(out))
    for flag, path in inputs:
        if path is None or not os.path.exists(path):
            continue
        there = Path(os.path.realpath(path))
        relation = ("is" if here == there else "lies inside" if there in here.parents
                    else "contains" if here in there.parents else None)
        if relation:
            raise UsageError(
                f"--out {out} {relation} the input {flag} {path}: the stage would write over what it reads. "
                "Choose an --out outside every input"
            )


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_NOT_PERMITTED = (errno.EACCES, errno.EPERM, errno.EROFS)
# How writers that raise no OSError word a full disk: safetensors ("I/O error: No space left on device (os
# error 28)"), Arrow, and others that pass the C library's message on.
_DISK_FULL_WORDS = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")
# torch.save's C++ writer reports a failed write as a RuntimeError without an errno: "unexpected pos 576
# vs 534" (a short write), "PytorchStreamWriter failed writing file ..."
_TORCH_WRITER_WORDS = ("inline_container", "PytorchStreamWriter", "file write failed")
_BAD_PATH = (errno.ENAMETOOLONG, errno.ENOENT, errno.ELOOP, errno.ENOTDIR)  # a path that cannot be a folder


def environment_error(exc: BaseException, out: Path | None = None) -> DpoError | None:
    """A full disk or a path the process may not use, as the error a user can act on (or None)."""
    for cause in _chain(exc):
        if isinstance(cause, OSError) and cause.errno in _DISK_FULL:
            return _disk_full(out, cause)
        if isinstance(cause, OSError) and cause.errno in _NOT_PERMITTED:
            action = "write" if out is not None and _under(cause.filename, out) else "use"
            return UsageError(f"{cause.filename or out}: {cause.strerror}; dpo needs to {action} it")
        if not isinstance(cause, OSError) and any(words in str(cause) for words in _DISK_FULL_WORDS):
            return _disk_full(out, cause)
    # The torch writer does not say why: judge by the disk itself.
    if out is not None and isinstance(exc, RuntimeError) and any(w in str(exc) for w in _TORCH_WRITER_WORDS) \
            and _free_bytes(out) < (1 << 20):
        return _disk_full(out, exc)
    return None


def _disk_full(out: Path | None, cause: BaseException) -> ArtifactError:
    filename = getattr(cause, "filename", None)
    where = (f"the device that holds {out}" if out is not None and (not filename or _under(filename, out))
             else f"the device that holds {filename}" if filename else "the device")
    return ArtifactError(
        f"no space left on {where} ({type(cause).__name__}: {cause}). Nothing was committed: free some space and "
        "rerun the same command, which continues from what was already committed"
    )


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _under(filename: Any, out: Path) -> bool:
    if not filename:
        return True
    try:
        return Path(os.path.realpath(filename)).is_relative_to(os.path.realpath(out))
    except (OSError, ValueError):
        return False


def _free_bytes(path: Path) -> int:
    for candidate in [path, *path.parents]:
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return 1 << 40
