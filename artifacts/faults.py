"""Test-only crash points: SIGKILL this process at the N-th time it reaches a named point.

``DPO_TEST_FAULT=shard-write:3`` kills the process the third time any shard is half-written, which
is how the crash tests reach the moments that matter (inside a shard write, a checkpoint save, a
manifest replace) deterministically. Unset, every point is a dictionary lookup and nothing else.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

FAULT_ENV = "DPO_TEST_FAULT"
_hits: Counter[str] = Counter()


def fault_point(name: str) -> None:
    wanted = os.environ.get(FAULT_ENV)
    if not wanted or not wanted.startswith(name + ":"):
        return
    _hits[name] += 1
    if _hits[name] == int(wanted.rsplit(":", 1)[1]):
        os.kill(os.getpid(), signal.SIGKILL)
