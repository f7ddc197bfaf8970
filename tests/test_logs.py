"""Progress in a batch job's log: with stderr not a terminal (every Slurm job) the bar is off and each
stage logs progress lines instead; with --quiet it logs none; transformers' bars never appear."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys

import pytest

from conftest import DEMO_MODEL, DPO, HH_DATA, dpo_env

from dpo.pipeline import logs
from dpo.pipeline.logs import Progress, duration

# "cache-ref: 64/127 pairs (50%), 212 pairs/s, elapsed 0:03, ETA 0:03"
PAIR_LINE = r"{stage}: [\d,]+/[\d,]+ {unit} \(\d+%\), [\d,.]+ {unit}/s, elapsed \d+:\d\d(, ETA \d+:\d\d)?$"


def test_duration_is_tqdm_style():
    assert duration(0) == "0:00" and duration(59.6) == "1:00" and duration(754) == "12:34"
    assert duration(3 * 3600 + 62) == "3:01:02"


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def records():
    handler, logger = _Records(), logging.getLogger("test.progress")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    # A CLI test run earlier in this worker may have set up dpo's root handler, which writes to
    # whatever sys.stderr is: the lines must reach only this handler for stderr to be judged.
    logger.propagate = False
    yield logger, handler.messages
    logger.removeHandler(handler)
    logger.propagate = True


def test_lines_every_five_percent_when_stderr_is_a_file(monkeypatch, records):
    logger, messages = records
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a TTY: the bar is off
    with Progress(200, "cache-ref", unit="pairs", logger=logger) as bar:
        assert not bar.active
        for _ in range(50):
            bar.update(4)
    assert len(messages) == 20  # one per 10 pairs done (5% of 200), the last at 100%
    assert all(re.match(PAIR_LINE.format(stage="cache-ref", unit="pairs"), m) for m in messages), messages
    assert messages[0].startswith("cache-ref: 12/200 pairs (6%)") and "ETA" in messages[0]
    assert messages[-1].startswith("cache-ref: 200/200 pairs (100%)") and "ETA" not in messages[-1]
    assert sys.stderr.getvalue() == ""  # no bar drawn into the log


def test_quiet_and_own_lines(monkeypatch, records):
    logger, messages = records
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with Progress(10, "tokenize", unit="pairs", quiet=True, logger=logger) as bar:
        bar.update(10)
        bar.line("not shown")
    assert messages == []
    with Progress(10, "train", unit="steps", log_every=None, initial=4, logger=logger) as bar:
        bar.update(3)  # no automatic lines: train writes its own
        bar.line("step 7/10 | loss 0.5")
        assert bar.eta(done=7) is not None and bar.eta(done=4) is None
    assert messages == ["step 7/10 | loss 0.5"]


def test_a_terminal_gets_the_bar_and_transformers_bars_are_off_under_it(monkeypatch, records):
    from transformers.utils import logging as hf_logging

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    logger, messages = records
    monkeypatch.setattr(sys, "stderr", Terminal())
    hf_logging.enable_progress_bar()
    with Progress(10, "evaluate", unit="pairs", logger=logger) as bar:
        assert bar.active and not hf_logging.is_progress_bar_enabled()
        bar.update(10)
        bar.line("only in a log file")
    assert hf_logging.is_progress_bar_enabled()  # restored
    assert messages == []
    assert "evaluate: 100%" in sys.stderr.getvalue() and "pairs/s" in sys.stderr.getvalue()


def test_logging_setup_leaves_transformers_unimported_and_its_bars_off_once_it_is():
    """Importing transformers costs a second; a stage opens its inputs (and starts hashing them)
    before it loads a model, so setting up logging must not import it to switch its bars off."""
    code = """
import sys
from dpo.pipeline.logs import setup_logging
setup_logging(quiet=True)
assert "transformers" not in sys.modules, "setup_logging imported transformers"
from transformers.utils import logging as hf_logging
from huggingface_hub.utils import are_progress_bars_disabled
assert not hf_logging.is_progress_bar_enabled() and are_progress_bars_disabled()
"""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr


def test_log_records_go_above_an_open_bar(monkeypatch):
    """A message logged while the bar is drawn is written through tqdm, which redraws the bar below it."""
    calls = []
    monkeypatch.setattr(logs.tqdm, "write", classmethod(lambda cls, s, file=None, **kw: calls.append(s)))
    logs.setup_logging()
    logging.getLogger("dpo.test").info("eval at step 10/30: eval/loss 0.69")
    assert len(calls) == 1 and calls[0].endswith("INFO dpo.test: eval at step 10/30: eval/loss 0.69")


def test_stages_log_progress_into_a_batch_log(tmp_path):
    """tokenize, cache-ref and evaluate run as in a Slurm job (stderr to a file): progress lines, no bars."""
    log_file = tmp_path / "slurm-123.out"
    commands = [
        # No prompt limit, as the default was: its drops keep the pairs (and the test's time) as few as it was sized.
        ["tokenize", "--data", f"{HH_DATA}:300", "--tokenizer", DEMO_MODEL, "--out", tmp_path / "tok",
         "--max-seq-length", "128", "--max-prompt-length", "0", "--eval-fraction", "0.2"],
        ["cache-ref", "--tokenized", tmp_path / "tok", "--model", DEMO_MODEL, "--out", tmp_path / "ref",
         "--batch-size", "4"],
        ["evaluate", "--model", DEMO_MODEL, "--tokenized", tmp_path / "tok", "--ref-cache", tmp_path / "ref",
         "--out", tmp_path / "eval", "--batch-size", "2", "--generate", "2", "--max-new-tokens", "4"],
    ]
    with open(log_file, "w") as log:
        for args in commands:
            subprocess.run([*DPO, *map(str, args)], stdout=log, stderr=log, env=dpo_env(), check=True, timeout=600)
    text = log_file.read_text()
    lines = [line.split(": ", 1)[1] for line in text.splitlines() if " INFO dpo." in line]
    for stage, unit in (("tokenize", "pairs"), ("cache-ref", "pairs"), ("evaluate", "pairs"), ("generate", "prompts")):
        mine = [line for line in lines if line.startswith(f"{stage}: ")]
        assert mine, (stage, text)
        assert all(re.match(PAIR_LINE.format(stage=stage, unit=unit), line) for line in mine), mine
        assert re.search(r"\(100%\)", mine[-1]), mine
    cache_lines = [line for line in lines if line.startswith("cache-ref: ")]
    assert len(cache_lines) >= 10  # every 5% of the pairs, in batches of 4
    # Neither tqdm's bars nor transformers' ("Loading weights", "Writing model shards") reach the log.
    for noise in ("Loading weights", "Writing model shards", "it/s]", "\r"):
        assert noise not in text, noise
    assert "pair/s" not in text
