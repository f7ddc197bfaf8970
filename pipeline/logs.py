"""Logging and progress bars that suit both a terminal and a scheduler's log file."""

from __future__ import annotations

import logging
import os
import sys

from tqdm.auto import tqdm


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def setup_logging(quiet: bool = False, verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet or rank() != 0 else logging.INFO
    prefix = f"[rank {rank()}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("datasets", "transformers", "accelerate", "DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def progress(total: int | None, desc: str, unit: str = "it", quiet: bool = False, **kwargs) -> tqdm:
    """A bar with rate and ETA on a terminal; silent when stderr is a log file or with --quiet."""
    disable = quiet or rank() != 0 or not sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True, smoothing=0.1, **kwargs)
