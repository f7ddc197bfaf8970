"""examples/slurm on a real Slurm: the chain that submit.sh submits, pre-empted the way a cluster does it.

examples/slurm/local-cluster.sh installs (apt-get) and starts a one-node Slurm on this machine;
the test is skipped, with the script's reason, where that cannot be done (not root, no apt-get).
Jobs get the resources such a node has: --nodes=1 --cpus-per-task=1 for every job, no GPUs
(DPO_<SCRIPT>_GPUS=0). Pre-emption is simulated with scancel: SIGUSR1 to the batch shell alone
(what --signal=B:USR1@120 sends before the time limit), and SIGTERM to every process of the job
(--full: what Slurm sends on pre-emption and at the time limit).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import HH_DATA, REPO, build_tiny_llama, dpo_env

pytestmark = pytest.mark.slow

SLURM = REPO / "examples" / "slurm"
CLUSTER = SLURM / "local-cluster.sh"
UNAVAILABLE = 69  # local-cluster.sh: this machine cannot run a Slurm
FIT = ("--nodes=1", "--cpus-per-task=1")
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("a local Slurm needs root: examples/slurm/local-cluster.sh installs and starts its daemons")
    # Test sessions on one machine share its one cluster: one at a time, and only the session that
    # started it stops it.
    with open(Path(tempfile.gettempdir()) / "dpo-local-slurm-test.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        was_running = subprocess.run([CLUSTER, "status"], capture_output=True).returncode == 0
        start = subprocess.run([CLUSTER, "start"], capture_output=True, text=True, timeout=600)
        if start.returncode == UNAVAILABLE:
            pytest.skip(start.stderr.strip().splitlines()[-1])
        assert start.returncode == 0, start.stderr
        try:
            yield
        finally:
            if not was_running:
                subprocess.run([CLUSTER, "stop"], check=True, capture_output=True, timeout=300)


def job(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], capture_output=True, text=True,
                         check=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def wait_until(condition, what: str, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f}s"
        time.sleep(0.2)
    return value


def last_step(train_dir: Path) -> int:
    metrics = train_dir / "metrics.jsonl"
    if not metrics.is_file():
        return 0
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.endswith("}")]
    return max(steps, default=0)


def preempt(job_id: str, signal: str, whom: str, out: Path) -> list[str]:
    """Signal the running job and wait until Slurm has requeued it; the locks it left in ``out``."""
    restarts = int(job(job_id)["Restarts"])
    subprocess.run(["scancel", f"--signal={signal}", whom, job_id], check=True)
    wait_until(lambda: (j := job(job_id))["JobState"] == "PENDING" and int(j["Restarts"]) == restarts + 1,
               f"requeue of job {job_id} after SIG{signal}", timeout=120)
    return sorted(p.name for p in out.glob(".dpo.lock*"))


def release(job_id: str) -> None:
    # Slurm holds a requeued job for two minutes (BeginTime). Released at once, it can be refused for
    # the credential its last run revoked; a few seconds later it starts.
    time.sleep(5)
    subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], check=True)


def submit(run_file: Path, *options: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", SLURM / "submit.sh", run_file, *FIT, *options], env=env, capture_output=True,
                          text=True, cwd=cwd, timeout=120)


STEPS = 96


def test_the_chain_survives_preemption_on_a_real_slurm(cluster, tmp_path):
    model = build_tiny_llama(tmp_path / "base", hidden=64)
    run = tmp_path / "run"
    # Four epochs, about 4 s: a resumed train still runs when the test signals it 3 steps later (with
    # one epoch, a resumed run finished its 13 remaining steps in half a second, before the signal came).
    train = {"max_steps": STEPS, "per_device_batch_size": 2, "learning_rate": 1e-3, "warmup_ratio": 0.0,
             "logging_steps": 1, "save_every": "100000"}
    spec = {
        "run_dir": str(run), "model": str(model),
        "tokenize": {"data": [f"{HH_DATA}:64"], "tokenizer": str(model), "eval_fraction": 0.25,
                     "max_seq_length": 128, "max_prompt_length": 64},
        # Small shards, one pair per forward: cache-ref takes seconds and commits often, so it can be
        # pre-empted after its first shard and still have work left.
        "cache-ref": {"batch_size": 1, "rows_per_shard": 4},
        "train": train,
        "export": {},
    }
    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump(spec))
    env = dpo_env(DPO_BIN=f"{sys.executable} -m dpo.cli", PYTHONPATH=str(REPO.parent),
                  DPO_CACHE_REF_GPUS="0", DPO_TRAIN_GPUS="0")

    # One job that asks for a GPU this cluster does not have: nothing of the chain is submitted.
    with_evaluate = tmp_path / "with-evaluate.yaml"
    with_evaluate.write_text(yaml.safe_dump({**spec, "evaluate": {}}))
    refused = submit(with_evaluate, "--gpus-per-node=0", env=env | {"DPO_EVALUATE_GPUS": "1"}, cwd=tmp_path)
    assert refused.returncode == 1, refused.stderr
    assert re.findall(r"step (\S+) cannot be submitted", refused.stderr) == ["evaluate"], refused.stderr
    assert "as job" not in refused.stderr
    assert subprocess.run(["squeue", "-h", "-o", "%Z"], capture_output=True, text=True,
                          check=True).stdout.count(str(tmp_path)) == 0

    submitted = submit(run_file, env=env, cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    ids = dict(re.findall(r"submitted (\S+) as job (\d+)", submitted.stderr))
    assert list(ids) == ["tokenize", "cache-ref", "train", "export"]
    logs = {step: tmp_path / f"dpo-{step}-{job_id}.out" for step, job_id in ids.items()}
    uninterrupted = None
    try:
        locks: dict[str, list[list[str]]] = {"cache-ref": [], "train": []}
        shards = wait_until(lambda: sorted((run / "ref-logps").glob("*/part-*.parquet")), "committed cache-ref shard")
        locks["cache-ref"].append(preempt(ids["cache-ref"], "USR1", "--batch", run / "ref-logps"))
        kept = {p: p.stat().st_mtime_ns for p in sorted((run / "ref-logps").glob("*/part-*.parquet"))}
        assert set(shards) <= set(kept)
        release(ids["cache-ref"])

        wait_until(lambda: (run / "ref-logps" / "manifest.json").is_file(), "cache-ref manifest")
        # The same training without interruption, from the same inputs, beside the chain.
        reference = tmp_path / "reference.yaml"
        reference.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "reference"), "train": {
            **train, "model": str(model), "tokenized": str(run / "tokenized"), "ref_cache": str(run / "ref-logps")}}))
        uninterrupted = subprocess.Popen([sys.executable, "-m", "dpo.cli", "run", "--config", reference],
                                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        wait_until(lambda: last_step(run / "train") >= 3, "train step 3")
        locks["train"].append(preempt(ids["train"], "USR1", "--batch", run / "train"))
        first_stop = last_step(run / "train")
        release(ids["train"])
        wait_until(lambda: last_step(run / "train") >= first_stop + 3, f"train step {first_stop + 3}")
        locks["train"].append(preempt(ids["train"], "TERM", "--full", run / "train"))
        release(ids["train"])

        wait_until(lambda: all(job(i)["JobState"] in FINISHED for i in ids.values())
                   or any(job(i)["JobState"] in FINISHED - {"COMPLETED"} for i in ids.values()), "end of the chain")
        output, _ = uninterrupted.communicate(timeout=300)
        assert uninterrupted.returncode == 0, output
    finally:
        subprocess.run(["scancel", *ids.values()], capture_output=True)
        if uninterrupted is not None and uninterrupted.poll() is None:
            uninterrupted.kill()

    text = {step: log.read_text() for step, log in logs.items()}
    jobs = {step: job(job_id) for step, job_id in ids.items()}
    assert {s: (j["JobState"], j["ExitCode"]) for s, j in jobs.items()} == {s: ("COMPLETED", "0:0") for s in ids}, text
    restarts = {s: int(j["Restarts"]) for s, j in jobs.items()}
    assert restarts == {"tokenize": 0, "cache-ref": 1, "train": 2, "export": 0}
    # --open-mode=append: the log of every attempt is kept, not only the last one's.
    for step, log in text.items():
        assert re.findall(r"\(job \d+, restart (\d+)\)", log) == [str(n) for n in range(restarts[step] + 1)], log
    # Every pre-empted step said it kept its work (exit 75) and had released its lock when it ended.
    exits = {step: re.findall(r"step \S+ pre-empted \(exit (\d+)", text[step]) for step in locks}
    preemptions = {step: list(zip(exits[step], locks[step])) for step in locks}
    assert preemptions == {"cache-ref": [("75", [])], "train": [("75", []), ("75", [])]}, [text[s] for s in locks]
    assert not list(run.rglob(".dpo.lock*"))
    # The requeued jobs resumed: cache-ref kept the shards committed before the signal, train
    # continued from its checkpoints with the losses of an uninterrupted run.
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert len(re.findall(r"resuming from step \d+", text["train"])) == 2, text["train"]
    a = [json.loads(line) for line in (tmp_path / "reference" / "train" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b] == [r["step"] for r in a] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=0, atol=1e-6)
    assert json.loads((run / "model" / "manifest.json").read_text())["kind"] == "model"
