"""Logging and progress bars that suit both a terminal and a scheduler's log file."""

from __future__ import annotations

import logging
import os
import sys

from tqdm.auto import tqdm

from .distributed import rank


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time, not the stream it was created with.

    In-process callers (tests, `dpo run`) swap sys.stderr; a handler that kept the old one would
    write to a closed file.
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(quiet: bool = False, verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet or rank() != 0 else logging.INFO
    prefix = f"[rank {rank()}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for noisy in ("datasets", "transformers", "accelerate", "DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    # transformers draws its own bars (loading and saving weights) even into log files.
    if quiet or not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    # DeepSpeed warns on import that it fell back to the CPU; on a machine without CUDA that is
    # the expected case, so name the CPU accelerator up front.
    if "DS_ACCELERATOR" not in os.environ and not _cuda_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def progress(total: int | None, desc: str, unit: str = "it", quiet: bool = False, **kwargs) -> tqdm:
    """A bar with rate and ETA on a terminal; silent when stderr is a log file or with --quiet."""
    disable = quiet or rank() != 0 or not sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True, smoothing=0.1, **kwargs)
