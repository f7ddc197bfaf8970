"""Graceful stop on pre-emption: SIGTERM or SIGUSR1 -> checkpoint at the next step boundary -> exit 75.

Slurm sends SIGTERM about 30 s (KillWait) before SIGKILL when a job is pre-empted, cancelled or hits
its time limit; ``sbatch --signal=USR1@120`` sends SIGUSR1 two minutes earlier, which leaves time
for a large checkpoint. The handler only sets a flag (nothing else is safe inside a signal handler);
the training loop asks ``should_stop`` once per optimizer step, which takes the max of the flag
over all ranks. A signal that reached one rank therefore stops every rank at the same step, and
they all enter the (collective) checkpoint save together instead of one waiting forever.

Exit code 75 (errors.Preempted, EX_TEMPFAIL) tells a requeue script "rerun me": the rerun resumes
from that checkpoint. Under torchrun / ``accelerate launch`` the launcher forwards SIGTERM to its
workers but reports a failure code of its own, so requeue on "a checkpoint newer than the last
start exists", or run one ``srun`` task per GPU with ``python -m dpo.cli train`` (each task then
exits 75).
"""

from __future__ import annotations

import logging
import signal
from types import FrameType

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionWatcher:
    """Context manager that turns SIGTERM/SIGUSR1 into a stop request; restores the old handlers on exit."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
        self.signals = signals
        self.signal_name: str | None = None
        self._previous: dict[signal.Signals, object] = {}

    @property
    def requested(self) -> bool:
        """True once this process received a stop signal (this rank only; see should_stop)."""
        return self.signal_name is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            log.warning("received %s: saving a checkpoint at the next step boundary, then exiting with code 75",
                        self.signal_name)

    def __enter__(self) -> PreemptionWatcher:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def should_stop(self, accelerator=None) -> bool:
        """Whether any rank got a stop signal; collective when there are several processes.

        Call it at the same point of every step on every rank (it is one tiny all-reduce).
        """
        if accelerator is None or accelerator.num_processes == 1:
            return self.requested
        import torch

        flag = torch.tensor([1.0 if self.requested else 0.0], device=accelerator.device)
        stop = bool(accelerator.reduce(flag, reduction="max").item() > 0)
        if stop and self.signal_name is None:
            self.signal_name = "a stop signal on another rank"
        return stop
