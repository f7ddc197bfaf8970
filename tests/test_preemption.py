"""Pre-emption: SIGTERM/SIGUSR1 set a flag, and all ranks agree on stopping at the same step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from dpo.pipeline.preemption import PreemptionWatcher

from conftest import dpo_env


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_sets_the_flag_and_handlers_are_restored(sig):
    before = signal.getsignal(sig)
    with PreemptionWatcher() as watcher:
        assert not watcher.should_stop(None)
        os.kill(os.getpid(), sig)  # delivered before os.kill returns, to the main thread
        assert watcher.requested and watcher.should_stop(None)
        assert watcher.signal_name == sig.name
        os.kill(os.getpid(), sig)  # a second signal changes nothing (and does not kill us)
        assert watcher.signal_name == sig.name
    assert signal.getsignal(sig) is before


RANKS_AGREE = textwrap.dedent("""
    import os, signal, sys, json
    from dpo.pipeline.accel import build_accelerator
    from dpo.pipeline.preemption import PreemptionWatcher

    accelerator = build_accelerator()
    with PreemptionWatcher() as watcher:
        for step in range(1, 100):
            if step == 3 and accelerator.process_index == 1:
                os.kill(os.getpid(), signal.SIGUSR1)  # only rank 1 hears it
            if watcher.should_stop(accelerator):
                break
    # One file per rank: two ranks printing to one pipe can interleave on a line.
    with open(f"rank-{accelerator.process_index}.json", "w") as f:
        json.dump({"rank": accelerator.process_index, "stopped_at": step, "why": watcher.signal_name}, f)
    import torch.distributed
    torch.distributed.destroy_process_group()
""")


@pytest.mark.slow
def test_ranks_agree_on_stopping(tmp_path):
    script = tmp_path / "agree.py"
    script.write_text(RANKS_AGREE)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
        capture_output=True, text=True, timeout=300, env=dpo_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    rows = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert rows == [{"rank": 0, "stopped_at": 3, "why": "a stop signal on another rank"},
                    {"rank": 1, "stopped_at": 3, "why": "SIGUSR1"}]
