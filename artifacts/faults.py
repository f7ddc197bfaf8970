"""Test-only crash points: SIGKILL this process (or send it a signal) at the N-th time it reaches a named point.

``DPO_TEST_FAULT=shard-write:3`` kills the process the third time any shard is half-written, which
is how the crash tests reach the moments that matter deterministically; ``DPO_TEST_FAULT=stop-check:2:TERM``
sends SIGTERM instead, so a pre-emption lands at a chosen moment without racing a timer, and
``DPO_TEST_FAULT=shard-write:2:ENOSPC`` raises that OSError there (a full disk where none can be mounted). Unset,
every point is a dictionary lookup and nothing else.

The points: ``shard-write`` (a Parquet shard written, not yet renamed into place), ``atomic-replace``
(any manifest, marker or journal written, not yet renamed), ``replace-artifact`` (an --overwrite swap:
the old manifest gone, its files not yet), ``checkpoint-save`` (a checkpoint's files written, its
manifest not yet), ``metrics-write`` (a metrics row half-written), ``export-save`` (the exported
weights written, the tokenizer, card and manifest not yet) and ``stop-check`` (a stage asking whether
it was told to stop, at one of its safe points).
"""

from __future__ import annotations

import errno
import os
import signal
from collections import Counter

FAULT_ENV = "DPO_TEST_FAULT"
_hits: Counter[str] = Counter()


def fault_point(name: str) -> None:
    wanted = os.environ.get(FAULT_ENV)
    if not wanted:
        return
    _hits[name] += 1  # every point is counted while one is armed: ``hits()`` after a run says how often each was reached
    if not wanted.startswith(name + ":"):
        return
    count, _, action = wanted[len(name) + 1:].partition(":")
    if _hits[name] != int(count):
        return
    if action.startswith("E"):
        code = getattr(errno, action)
        raise OSError(code, os.strerror(code))
    os.kill(os.getpid(), getattr(signal, "SIG" + action) if action else signal.SIGKILL)


def hits() -> dict[str, int]:
    """How often each point was reached in this process since ``reset`` (with ``DPO_TEST_FAULT`` set,
    e.g. to ``none:0``, which arms nothing)."""
    return dict(_hits)


def reset() -> None:
    """Forget the points reached so far (for a test that runs several stages in one process)."""
    _hits.clear()
