"""Signals (issue 9): SIGTERM and SIGUSR1 stop every stage at its next safe point with exit 75, Ctrl-C
(SIGINT) the same way with exit 130; what was done is committed, the lock released, and the rerun
completes with what an uninterrupted run makes.

The signal lands at a chosen moment: ``DPO_TEST_FAULT=stop-check:N:TERM`` makes a stage send it to
itself the N-th time it asks whether to stop (artifacts/faults.py), in a forked child of the test
process. Signals from outside, to a whole process group as Ctrl-C and Slurm send them, are tested on a
real `dpo tokenize --num-proc 2` and its worker pool.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

import faultkit
from conftest import DEMO_MODEL, DPO, HH_DATA, dpo_env

pytestmark = pytest.mark.faults
CODES = {"TERM": 75, "USR1": 75, "INT": 130}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> faultkit.World:
    return faultkit.world(tmp_path_factory)


def compare(stage: str, got: Path, want: Path) -> None:
    assert faultkit.fingerprint(got) == faultkit.fingerprint(want)
    assert not faultkit.leftovers(got), faultkit.leftovers(got)
    if stage == "train":
        (steps, got_losses), (want_steps, want_losses) = zip(*faultkit.losses(got)), zip(*faultkit.losses(want))
        assert steps == want_steps and got_losses == pytest.approx(want_losses, abs=1e-6)
        assert faultkit.listed_sha256(got)["final/config.json"] == faultkit.listed_sha256(want)["final/config.json"]
    elif stage == "export":
        assert faultkit.listed_sha256(got)["model.safetensors"] == faultkit.listed_sha256(want)["model.safetensors"]
    elif stage == "evaluate":
        assert faultkit.listed_sha256(got)["pairs.parquet"] == faultkit.listed_sha256(want)["pairs.parquet"]
    else:
        assert faultkit.listed_sha256(got) == faultkit.listed_sha256(want)


# (stage, the stop check the signal arrives at, what the message says was kept)
STOPS = [("tokenize", 2, r"after committing 1 of 4 shards"), ("cache-ref", 2, r"after committing 2 of 4 shards"),
         ("train", 3, r"after step 3 and saved a checkpoint in .*step-00000003"),
         ("export", 1, r"before writing the export"), ("evaluate", 1, r"before the evaluation was complete")]


@pytest.mark.parametrize("sig", list(CODES))
@pytest.mark.parametrize("stage, n, kept", STOPS, ids=[s for s, _, _ in STOPS])
def test_a_signal_stops_the_stage_at_a_safe_point_and_the_rerun_completes(world, tmp_path, stage, n, kept, sig):
    out = tmp_path / stage
    argv = [*faultkit.stage_args(world, stage), "--out", out]
    inputs = faultkit.digest(world.root)
    code, err = faultkit.forked(argv, DPO_TEST_FAULT=f"stop-check:{n}:{sig}")
    assert code == CODES[sig], err[-3000:]
    assert f"received SIG{sig}" in err and f"stopped by SIG{sig} " in err and "Traceback" not in err, err[-3000:]
    assert re.search(kept, err), err[-3000:]
    assert not (out / "manifest.json").exists() and not list(out.glob(".dpo.lock*")), sorted(os.listdir(out))
    code, err = faultkit.forked(argv)
    assert code == 0, err[-3000:]
    reference = {"tokenize": world.tok, "cache-ref": world.ref, "train": world.train, "export": world.model,
                 "evaluate": world.eval}[stage]
    compare(stage, out, reference)
    assert faultkit.digest(world.root) == inputs


@pytest.mark.parametrize("sig", ["TERM", "INT"])
def test_dpo_run_stops_at_a_safe_point_and_resumes(world, tmp_path, sig):
    """`dpo run`: a signal during train's first checkpoint save; the steps before stay complete, train
    stops after its next step with a checkpoint, and the rerun skips what is complete."""
    run_file = tmp_path / "run.yaml"
    w = world.paths()
    run_file.write_text(json.dumps({
        "run_dir": str(tmp_path / "run"), "model": w["llama"],
        "tokenize": {"data": w["data"], "tokenizer": w["llama"], "max_seq_length": 96, "max_prompt_length": 48,
                     "eval_fraction": 0.25, "rows_per_shard": 12, "seed": 5},
        "cache-ref": {"rows_per_shard": 16},
        "train": {"max_steps": 4, "save_every": "2", "per_device_batch_size": 4, "logging_steps": 1,
                  "learning_rate": 1e-3, "warmup_ratio": 0.0},
        "export": {}, "evaluate": {"split": "eval"},
    }))
    code, err = faultkit.forked(["run", "--config", run_file, "-q"], DPO_TEST_FAULT=f"checkpoint-save:1:{sig}")
    assert code == CODES[sig] and "Traceback" not in err, err[-3000:]
    run_dir = tmp_path / "run"
    assert (run_dir / "ref-logps" / "manifest.json").is_file() and not (run_dir / "train" / "manifest.json").exists()
    assert sorted(p.name for p in (run_dir / "train" / "checkpoints").iterdir()) == ["step-00000002",
                                                                                     "step-00000003"]
    code, err = faultkit.forked(["run", "--config", run_file, "-q"])
    assert code == 0, err[-3000:]
    compare("train", run_dir / "train", world.train)
    # (evaluate's fingerprint differs from the world's: `dpo run` chains --train into it)
    assert faultkit.listed_sha256(run_dir / "eval")["pairs.parquet"] == faultkit.listed_sha256(world.eval)["pairs.parquet"]


def test_a_signal_before_the_stage_holds_its_output_ends_the_command_with_its_code(tmp_path):
    """Reading and checking inputs (hashing a large artifact takes minutes) comes before the output is
    taken: a stop signal there ends the command at once with 75 (130 for Ctrl-C), nothing written."""
    from typer.testing import CliRunner

    from dpo.cli import app

    tokenized = tmp_path / "tok"
    tokenized.mkdir()

    def reading(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("the signal did not stop the command")

    import dpo.stages.cache_ref as cache_ref

    original = cache_ref.ArtifactReader
    cache_ref.ArtifactReader = reading
    try:
        result = CliRunner().invoke(app, ["cache-ref", "--tokenized", str(tokenized), "--model", str(DEMO_MODEL),
                                          "--out", str(tmp_path / "out")])
    finally:
        cache_ref.ArtifactReader = original
    assert result.exit_code == 75 and "stopped by SIGTERM before it had anything to commit" in result.output
    assert not (tmp_path / "out").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "slurm-sigterm"])
def test_a_signal_to_the_process_group_of_tokenize_with_workers(tmp_path, sig):
    """Ctrl-C and Slurm signal every process of the job, the tokenizer workers included: the workers
    leave the stop to the main process (no worker tracebacks, no pool left waiting for a dead worker's
    chunk), which stops within a chunk, commits nothing half-done and exits 130 or 75; the rerun
    completes with the same shards as a run never interrupted."""
    out = tmp_path / "tok"
    args = ["tokenize", "--data", f"{HH_DATA}:600", "--tokenizer", DEMO_MODEL, "--out", out,
            "--rows-per-shard", "50", "--max-seq-length", "256", "--num-proc", "2", "-q"]
    proc = subprocess.Popen([*DPO, *map(str, args)], env=dpo_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    while not list((out / "train").glob("part-00000-of-*.parquet")) and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "tokenize ended before it could be signalled; " + proc.communicate()[1][-2000:]
    os.killpg(proc.pid, sig)
    try:
        _, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("tokenize did not stop within 60 s of the signal") from None
    assert proc.returncode == {signal.SIGINT: 130, signal.SIGTERM: 75}[sig], stderr[-3000:]
    assert "Traceback" not in stderr and "stopped by " + sig.name in stderr, stderr[-3000:]
    assert not (out / "manifest.json").exists() and not list(out.glob(".dpo.lock*"))
    committed = sorted(p.name for p in (out / "train").glob("part-*.parquet"))
    assert 1 <= len(committed) < int(committed[0].rsplit("-of-", 1)[1].split(".")[0])
    rerun = subprocess.run([*DPO, *map(str, args)], env=dpo_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    whole = tmp_path / "whole"
    args[args.index("--out") + 1] = whole
    subprocess.run([*DPO, *map(str, args)], env=dpo_env(), check=True, capture_output=True, timeout=600)
    assert faultkit.listed_sha256(out) == faultkit.listed_sha256(whole)
    assert faultkit.fingerprint(out) == faultkit.fingerprint(whole)
