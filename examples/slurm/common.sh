# shellcheck shell=bash
# Sourced by every stage script: how dpo is launched, signal forwarding, and requeue on pre-emption.
#
# Environment (submit.sh sets the first two; sbatch passes the submitting shell's environment on):
#   DPO_RUN_FILE        the run YAML (same file as `dpo run --config`); required
#   DPO_SLURM_DIR       this folder (Slurm runs a copy of the batch script, so $0 does not point here)
#   DPO_BIN             how to start dpo in single-process steps (default: dpo; e.g. "python -m dpo.cli")
#   DPO_ACCELERATE      how to start accelerate for multi-process steps (default: accelerate launch)
#   DPO_SLURM_LOCAL=1   run on this machine without srun/sbatch (a workstation, or a CPU test)
#   DPO_MAX_REQUEUES    give up after this many requeues of one job (default 20)
#
# Pre-emption: Slurm signals the batch shell (USR1 two minutes early with --signal=B:USR1@120,
# TERM on pre-emption or at the time limit). The trap forwards it to the running step; every stage
# stops at its next safe point (train: a checkpoint at the step boundary; cache-ref and tokenize: the
# last committed shard), releases the lock of its output and exits 75. Exit 75 is what requeues the
# job, whatever the stage; `dpo run` then continues where it stopped: finished steps are skipped,
# train resumes from its newest checkpoint.
set -euo pipefail

: "${DPO_RUN_FILE:?set DPO_RUN_FILE to the run YAML (examples/slurm/submit.sh does)}"
# shellcheck disable=SC2034  # DPO and ACCELERATE are used by the stage scripts that source this file
read -r -a DPO <<< "${DPO_BIN:-dpo}"
# shellcheck disable=SC2034
read -r -a ACCELERATE <<< "${DPO_ACCELERATE:-accelerate launch}"
DPO_SLURM_LOCAL=${DPO_SLURM_LOCAL:-0}
DPO_MAX_REQUEUES=${DPO_MAX_REQUEUES:-20}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# torchrun (under accelerate launch) handles TERM but not USR1 by default (USR1 would kill it and
# orphan the workers), and SIGKILLs its workers 30 s after forwarding a signal. These are its
# --signals-to-handle and --shutdown-timeout options, read from the environment: forward USR1 too,
# and give the checkpoint save the time that --signal=B:USR1@120 leaves.
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
export PET_SHUTDOWN_TIMEOUT=${PET_SHUTDOWN_TIMEOUT:-110}

stop_signal=""
child=""

forward_signal() {
    stop_signal=$1
    echo "dpo-slurm: received SIG$1, forwarding it to the running step (pid ${child:-none})" >&2
    if [[ -n $child ]]; then
        kill -s "$1" "$child" 2>/dev/null || true
    fi
}
trap 'forward_signal USR1' USR1
trap 'forward_signal TERM' TERM

# launch CMD...: run CMD in the background and wait for it, so that the traps above run while it
# works (bash defers traps until a foreground child ends). On one node CMD runs here, in the batch
# step, not under srun: Slurm's own pre-emption and time limit send SIGTERM to every process of the
# job, and an srun that gets SIGTERM kills its tasks at once ("srun: forcing job termination"), so
# nothing could be saved. Across nodes srun is needed (one task per node; see train.sbatch).
launch() {
    if [[ $DPO_SLURM_LOCAL == 1 || ${SLURM_NNODES:-1} == 1 ]]; then
        "$@" &
    else
        srun --kill-on-bad-exit=1 "$@" &
    fi
    child=$!
    while kill -0 "$child" 2>/dev/null; do
        wait "$child" || true  # returns early when a trapped signal arrives; the step is still finishing
    done
    local rc=0
    wait "$child" || rc=$?
    child=""
    return "$rc"
}

# run_step STEP DPO_COMMAND...: `DPO_COMMAND run --config RUN_FILE --step STEP`, requeued if pre-empted.
run_step() {
    local step=$1 rc=0
    shift
    echo "dpo-slurm: step $step of $DPO_RUN_FILE on $(hostname) (job ${SLURM_JOB_ID:-local}, restart ${SLURM_RESTART_COUNT:-0})" >&2
    launch "$@" run --config "$DPO_RUN_FILE" --step "$step" || rc=$?
    if [[ $rc == 0 ]]; then
        return 0
    fi
    # 75: the step kept what it did and asks to be rerun. A launcher (torchrun) that forwarded our
    # signal reports its own failure code instead, hence the signal check.
    if [[ $rc == 75 ]]; then
        requeue "$step" "$rc"
    fi
    if [[ -n $stop_signal ]]; then
        echo "dpo-slurm: step $step exited $rc, not 75, after SIG$stop_signal: a launcher's own code, or the step died of the signal and may have left its lock for the requeued job to take over" >&2
        requeue "$step" "$rc"
    fi
    echo "dpo-slurm: step $step failed with exit code $rc" >&2
    exit "$rc"
}

requeue() {
    local step=$1 rc=$2
    if [[ $DPO_SLURM_LOCAL == 1 ]]; then
        echo "dpo-slurm: step $step stopped (exit $rc${stop_signal:+, SIG$stop_signal}); rerun this script to resume" >&2
        exit 75
    fi
    if (( ${SLURM_RESTART_COUNT:-0} >= DPO_MAX_REQUEUES )); then
        echo "dpo-slurm: step $step pre-empted, but the job was already requeued $DPO_MAX_REQUEUES times; giving up" >&2
        exit 75
    fi
    echo "dpo-slurm: step $step pre-empted (exit $rc${stop_signal:+, SIG$stop_signal}); requeueing job $SLURM_JOB_ID" >&2
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
}

# Processes to start on this node: DPO_GPUS_PER_NODE when set, else the GPUs Slurm gave this job
# (none: one process on CPU; the node's other GPUs are not ours even if nvidia-smi lists them),
# else, without Slurm, the GPUs nvidia-smi lists, else 1.
gpus_per_node() {
    local gpus
    if [[ -n ${DPO_GPUS_PER_NODE:-} ]]; then
        gpus=$DPO_GPUS_PER_NODE
    elif [[ $DPO_SLURM_LOCAL != 1 ]]; then
        gpus=${SLURM_GPUS_ON_NODE:-0}
    elif command -v nvidia-smi > /dev/null; then
        gpus=$(nvidia-smi -L | wc -l)
    else
        gpus=1
    fi
    echo $(( gpus > 1 ? gpus : 1 ))
}
