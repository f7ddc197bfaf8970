"""Pre-emption: SIGTERM/SIGUSR1 set a flag, and all ranks of a stage agree on stopping at the same step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from dpo.artifacts.runner import StageRun, StopSignals

from conftest import dpo_env


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_sets_the_flag_and_handlers_are_restored(sig):
    before = signal.getsignal(sig)
    with StopSignals() as signals:
        assert signals.received is None
        os.kill(os.getpid(), sig)  # delivered before os.kill returns, to the main thread
        assert signals.received == sig.name
        os.kill(os.getpid(), sig)  # a second signal changes nothing (and does not kill us)
        assert signals.received == sig.name
    assert signal.getsignal(sig) is before


def test_stage_run_stops_releases_the_lock_and_restores_handlers(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with StageRun("test", tmp_path / "out", "eval", "f" * 16) as run:
        assert (tmp_path / "out" / ".dpo.lock").is_file() and not run.stop_requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert run.signalled and run.stop_requested()
        error = run.preempted("after step 3")
    assert error.exit_code == 75 and str(error).startswith("stopped by SIGTERM after step 3")
    assert not (tmp_path / "out" / ".dpo.lock").exists()
    assert signal.getsignal(signal.SIGTERM) is before


RANKS_AGREE = textwrap.dedent("""
    import os, signal, sys, json
    from dpo.artifacts.runner import StageRun
    from dpo.pipeline import distributed
    from dpo.pipeline.accel import build_accelerator

    accelerator = build_accelerator()
    with StageRun("test", "out", "eval", "f" * 16, collective=distributed.COLLECTIVE) as run:
        for step in range(1, 100):
            if step == 3 and accelerator.process_index == 1:
                os.kill(os.getpid(), signal.SIGUSR1)  # only rank 1 hears it
            if run.stop_requested():
                break
    # One file per rank: two ranks printing to one pipe can interleave on a line.
    with open(f"rank-{accelerator.process_index}.json", "w") as f:
        json.dump({"rank": accelerator.process_index, "stopped_at": step, "why": run.signals.received}, f)
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
