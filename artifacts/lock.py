"""One writer per artifact directory, with a heartbeat so a dead holder's lock can be taken over.

The lock file names its holder (host, pid, since) and carries a heartbeat the holder refreshes
from a background thread. A lock whose heartbeat is older than ``timeout`` belongs to a job that
died (pre-empted, node lost); it is taken over whatever host held it, because re-queued jobs land
on other nodes. Takeover renames the stale file away first: rename is atomic, so of two jobs that
race for a stale lock exactly one wins.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from .errors import ArtifactError, LockHeldError

LOCK_NAME = ".dpo.lock"
log = logging.getLogger(__name__)


def _now() -> float:
    return time.time()


def _number(value) -> float | None:
    """A finite number from a lock record, or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value in (
            float("inf"), float("-inf")):
        return None
    return float(value)


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="seconds")


class ArtifactLock:
    def __init__(self, directory: str | os.PathLike, timeout_s: float = 600.0):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.timeout_s = timeout_s
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.since = 0.0

    def _record(self) -> dict:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "token": self.token,
            "since": self.since,
            "heartbeat": _now(),
        }

    def _read(self, path: Path | None = None) -> dict | None:
        """The holder's record, or None when there is no lock file. A file that is not a whole record of
        ours (a holder mid-write or killed mid-write, or anything else under that name) is judged by its age."""
        path = path or self.path
        try:
            record = json.loads(path.read_bytes().decode("utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            record = None
        if isinstance(record, dict) and _number(record.get("heartbeat")) is not None:
            record["since"] = _number(record.get("since")) or 0.0
            return record
        try:
            modified = path.stat().st_mtime
        except FileNotFoundError:
            return None
        return {"heartbeat": modified, "host": "?", "pid": "?", "since": 0.0, "unreadable": True}

    def acquire(self) -> ArtifactLock:
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.path.is_dir() and not self.path.is_symlink():
            raise ArtifactError(f"{self.path} is a folder, not a lock file dpo wrote; remove it to let dpo use "
                                f"{self.directory}")
        self.since = _now()
        for _ in range(100):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder is None:
                    continue
                age = _now() - _number(holder.get("heartbeat"))
                reason = self._stale_reason(holder)
                if reason is None and holder.get("unreadable"):
                    raise LockHeldError(
                        f"{self.path} is not a lock record dpo can read (a job writing it, or not dpo's), modified "
                        f"{age:.0f}s ago. It is taken over once older than --lock-timeout ({self.timeout_s:.0f}s); "
                        "delete it if no job is writing this folder"
                    )
                if reason is None:
                    raise LockHeldError(
                        f"{self.directory} is being written by another job: host {holder.get('host')}, "
                        f"pid {holder.get('pid')}, since {_iso(float(holder.get('since') or 0))}, "
                        f"last heartbeat {age:.0f}s ago. If that job is dead, wait until its heartbeat "
                        f"is older than --lock-timeout ({self.timeout_s:.0f}s) or delete {self.path}"
                    )
                stale = self.path.with_name(f"{LOCK_NAME}.stale-{self.token}")
                try:
                    os.rename(self.path, stale)
                except FileNotFoundError:
                    continue  # another job took it over first; try again and meet its lock
                moved = self._read(stale)
                if moved is not None and self._stale_reason(moved) is None:
                    # Between our look and our rename another job took the stale lock over and
                    # wrote its own: we moved a live lock. Put it back (unless a third job already
                    # holds the name) and meet it on the next try.
                    try:
                        os.link(stale, self.path)
                    except FileExistsError:
                        pass
                    stale.unlink(missing_ok=True)
                    continue
                log.warning(
                    "taking over the lock of %s from host %s pid %s: %s",
                    self.directory, holder.get("host"), holder.get("pid"), reason,
                )
                stale.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self._record(), f)
            self._start_heartbeat()
            return self
        raise LockHeldError(f"{self.path}: could not take the lock (contended)")

    def _stale_reason(self, holder: dict) -> str | None:
        """Why ``holder``'s lock may be taken over, or None while it is live."""
        age = _now() - _number(holder.get("heartbeat"))
        if age > self.timeout_s:
            return f"its heartbeat is {age:.0f}s old (--lock-timeout {self.timeout_s:.0f}s)"
        # A job killed on this very host (SIGKILL, OOM) need not be waited for: its pid is gone.
        pid = holder.get("pid")
        if holder.get("host") == socket.gethostname() and isinstance(pid, int) and pid != os.getpid():
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return f"its process {pid} on this host no longer exists"
            except PermissionError:
                pass  # alive, owned by another user
        return None

    def _still_ours(self) -> bool:
        holder = self._read()
        return holder is not None and holder.get("token") == self.token

    @property
    def _tmp(self) -> Path:
        return self.path.with_name(f"{LOCK_NAME}.{self.token}.tmp")

    def _beat(self) -> None:
        interval = max(0.5, min(30.0, self.timeout_s / 4))
        failing = False
        while not self._stop.wait(interval):
            if not self._still_ours():
                log.error("lost the lock of %s to another job", self.directory)
                return
            try:
                self._tmp.write_text(json.dumps(self._record()))
                os.replace(self._tmp, self.path)
                failing = False
            except OSError as exc:
                # A full disk must not kill the heartbeat (the stage itself reports it); a lock that
                # stays unrefreshed past --lock-timeout may be taken over, as after a crash.
                if not failing:
                    log.warning("could not refresh the lock of %s (%s); retrying", self.directory, exc)
                failing = True

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="dpo-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._still_ours():
            self.path.unlink(missing_ok=True)
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ArtifactLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
