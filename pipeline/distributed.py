"""Just enough torch.distributed for stages that split work by rank.

Works under ``torchrun --nproc_per_node N`` and ``accelerate launch --multi_gpu --num_processes N``
(both set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): NCCL when CUDA is there, gloo on CPU.
A single process (no WORLD_SIZE, or 1) never touches torch.distributed, so every helper here
degrades to the obvious single-process behaviour. torch is imported only where it is needed: the
CLI asks for the rank before any stage (and before torch) is loaded.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from typing import Any

# Ranks wait at barriers while others finish their share of the work; a skewed share on a big job
# can take hours, far beyond torch's 10-30 minute default. DPO_DIST_TIMEOUT_S overrides.
DEFAULT_TIMEOUT_S = 6 * 3600


def _initialized():
    """torch.distributed when a process group exists; None otherwise (without importing torch)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist
    return None


def world_size() -> int:
    dist = _initialized()
    return dist.get_world_size() if dist else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    dist = _initialized()
    return dist.get_rank() if dist else int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def device():
    """This rank's device: its own GPU by LOCAL_RANK, or the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def init() -> bool:
    """Join the process group when launched with WORLD_SIZE > 1; returns whether distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        timeout = dt.timedelta(seconds=float(os.environ.get("DPO_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S)))
        if torch.cuda.is_available():
            torch.cuda.set_device(device())
            dist.init_process_group("nccl", timeout=timeout, device_id=device())
        else:
            dist.init_process_group("gloo", timeout=timeout)
    return True


def close() -> None:
    """Tear the process group down: one left to interpreter shutdown can abort a finished process
    ("terminate called without an active exception")."""
    dist = _initialized()
    if dist is not None:
        dist.destroy_process_group()


class Collective:
    """The few collective operations the stage runner needs, over whatever process group exists.

    Implements artifacts.runner's collective protocol; with one process every call is local.
    """

    @property
    def world_size(self) -> int:
        return world_size()

    @property
    def rank(self) -> int:
        return rank()

    def broadcast(self, obj: Any) -> Any:
        dist = _initialized()
        if dist is None or dist.get_world_size() == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self._device())
        return box[0]

    def any(self, flag: bool) -> bool:
        dist = _initialized()
        if dist is None or dist.get_world_size() == 1:
            return flag
        import torch

        value = torch.tensor([1.0 if flag else 0.0], device=self._device())
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def barrier(self) -> None:
        dist = _initialized()
        if dist is not None and dist.get_world_size() > 1:
            dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        dist = _initialized()
        if dist is None or dist.get_world_size() == 1:
            return [obj]
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out

    @staticmethod
    def _device():
        # NCCL moves objects and flags through this rank's GPU; gloo through the CPU.
        dist = _initialized()
        return device() if dist is not None and dist.get_backend() == "nccl" else None


COLLECTIVE = Collective()
