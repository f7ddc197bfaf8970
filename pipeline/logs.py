"""Logging and progress that suit both a terminal and a scheduler's log file.

On a terminal a stage draws a tqdm bar; with stderr redirected (every Slurm job) the bar is off and
the same progress comes as log lines instead: every few percent of the work for tokenize, cache-ref
and evaluate, every ``--logging-steps`` for train (see ``Progress``). Log records are written
through ``tqdm.write``, so a message printed while a bar is drawn goes above the bar instead of
breaking it, and transformers' own bars ("Loading weights", "Writing model shards") are switched off
while one of ours is open or when stderr is not a terminal.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from tqdm.auto import tqdm

from .distributed import rank

# A pair-counting stage logs a line each time this much more of its total is done, or this many
# seconds after its last line if that comes first, and at the end.
LOG_EVERY = 0.05
LOG_SECONDS = 300.0


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

    def emit(self, record: logging.LogRecord) -> None:
        try:
            # Above any bar being drawn on this stream, which tqdm redraws below it.
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging's own contract: never raise from emit
            self.handleError(record)


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
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
        # transformers takes the Hub's setting when it is imported; importing it here only to switch
        # its bars off would add a second to every stage's start-up, before its inputs are opened.
        if "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
    # DeepSpeed warns on import that it fell back to the CPU; on a machine without CUDA that is
    # the expected case, so name the CPU accelerator up front.
    if "DS_ACCELERATOR" not in os.environ and not _cuda_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def duration(seconds: float) -> str:
    """``1:02:03`` or ``2:03`` (hours only when there are some), as tqdm writes elapsed and ETA."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _hf_bars(enabled: bool) -> bool:
    """Switch transformers' (and the Hub's) progress bars on or off; returns whether they were on."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    return was


class Progress:
    """A tqdm bar on a terminal; in a log file, a log line every ``log_every`` of the total.

    The bar is off with ``--quiet``, on ranks other than 0 and when stderr is not a terminal; in the
    last case (and only then) progress comes as INFO lines instead, from ``update`` for a stage that
    counts pairs (``cache-ref: 640/2,312 pairs (28%), 212 pairs/s, elapsed 0:03, ETA 0:08``) or from
    ``line`` for one that writes its own (train, every logging step). Rate and ETA count only this
    job's work, so a resumed run does not look faster than it is.
    """

    def __init__(self, total: int | None, desc: str, unit: str = "it", quiet: bool = False, initial: int = 0,
                 log_every: float | None = LOG_EVERY, logger: logging.Logger | None = None, **kwargs) -> None:
        main = rank() == 0 and not quiet
        self.total, self.desc, self.unit, self.initial = total, desc, unit, initial
        self.bar = tqdm(total=total, desc=desc, unit=unit, disable=not (main and sys.stderr.isatty()),
                        dynamic_ncols=True, smoothing=0.1, initial=initial, **kwargs)
        self.lines = main and self.bar.disable  # the bar is off, yet the user wants progress
        self.log = logger or logging.getLogger("dpo.progress")
        self.done = initial
        self.started = self.last_line = time.perf_counter()
        # None: the caller writes its own lines (``line``), ``update`` writes none.
        self.step = max(1, round((total or 0) * log_every)) if log_every else None
        self.next_line = initial + (self.step or 0)
        # transformers draws its own bars while loading and saving weights; under ours they would
        # interleave on a terminal, and in a log file they are noise.
        self._hf_was_on = _hf_bars(False) if (not self.bar.disable or self.lines) else None

    @property
    def active(self) -> bool:
        """Whether the bar is drawn (a terminal): callers then put their numbers in its postfix."""
        return not self.bar.disable

    def update(self, n: int = 1) -> None:
        self.bar.update(n)
        self.done += n
        if not (self.lines and self.step and self.total):
            return
        now = time.perf_counter()
        if self.done >= self.next_line or self.done >= self.total or now - self.last_line >= LOG_SECONDS:
            self.next_line = (self.done // self.step + 1) * self.step
            self.last_line = now
            self.log.info("%s", self.status())

    def status(self) -> str:
        """``DESC: done/total UNIT (p%), rate UNIT/s, elapsed, ETA`` for the work counted so far."""
        elapsed = time.perf_counter() - self.started
        rate = (self.done - self.initial) / elapsed if elapsed > 0 else 0.0
        text = f"{self.desc}: {self.done:,}/{self.total:,} {self.unit}"
        if self.total:
            text += f" ({100 * self.done / self.total:.0f}%)"
        text += f", {rate:,.{0 if rate >= 100 else 1}f} {self.unit}/s, elapsed {duration(elapsed)}"
        if self.total and rate > 0 and self.done < self.total:
            text += f", ETA {duration((self.total - self.done) / rate)}"
        return text

    def eta(self, done: int | None = None) -> float | None:
        """Seconds left at this job's rate so far (``done`` units of the total, by default what
        ``update`` counted), or None before any work is done."""
        done = self.done if done is None else done
        elapsed = time.perf_counter() - self.started
        if not self.total or done <= self.initial or elapsed <= 0:
            return None
        return (self.total - done) * elapsed / (done - self.initial)

    def line(self, text: str) -> None:
        """Log ``text`` when the bar is off (a log file): the caller's own progress line."""
        if self.lines:
            self.log.info("%s", text)

    def set_postfix(self, **values) -> None:
        self.bar.set_postfix(**values, refresh=False)

    def close(self) -> None:
        self.bar.close()
        if self._hf_was_on is not None:
            _hf_bars(self._hf_was_on)
            self._hf_was_on = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: int | None, desc: str, unit: str = "it", quiet: bool = False, **kwargs) -> Progress:
    """A bar with rate and ETA on a terminal; log lines every few percent when stderr is a log file;
    silent with --quiet."""
    return Progress(total, desc, unit, quiet, **kwargs)
