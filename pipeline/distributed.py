"""Just enough torch.distributed for stages that split work by rank.

Works under ``torchrun --nproc_per_node N`` and ``accelerate launch --multi_gpu --num_processes N``
(both set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): NCCL when CUDA is there, gloo on CPU.
A single process (no WORLD_SIZE, or 1) never touches torch.distributed, so every helper here
degrades to the obvious single-process behaviour.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .errors import DpoError

T = TypeVar("T")

# Ranks wait at barriers while others finish their share of the work; a skewed share on a big job
# can take hours, far beyond torch's 10-30 minute default. DPO_DIST_TIMEOUT_S overrides.
DEFAULT_TIMEOUT_S = 6 * 3600


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    """This rank's device: its own GPU by LOCAL_RANK, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def init() -> bool:
    """Join the process group when launched with WORLD_SIZE > 1; returns whether distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        timeout = dt.timedelta(seconds=float(os.environ.get("DPO_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S)))
        if torch.cuda.is_available():
            torch.cuda.set_device(device())
            dist.init_process_group("nccl", timeout=timeout, device_id=device())
        else:
            dist.init_process_group("gloo", timeout=timeout)
    return True


def close() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (picklable objects)."""
    if world_size() <= 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order."""
    if world_size() <= 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result, or the DpoError it raised, to every rank.

    Without this, a user error found on rank 0 (output locked, fingerprint mismatch) would leave
    the other ranks waiting at the next collective until the timeout.
    """
    if world_size() <= 1:
        return fn()
    outcome: tuple[str, Any] = ("ok", None)
    if is_main():
        try:
            outcome = ("ok", fn())
        except DpoError as exc:
            outcome = ("error", exc)
        except BaseException:
            broadcast_object(("crash", None))
            raise
    status, value = broadcast_object(outcome)
    if status == "error":
        raise value
    if status == "crash":
        raise DpoError("rank 0 failed (its traceback is in its log); stopping this rank too")
    return value
