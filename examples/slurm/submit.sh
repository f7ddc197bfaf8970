#!/bin/bash
# Submit the pipeline of a run file as one Slurm job per step, each starting only after the previous
# one succeeded (--dependency=afterok). A failed job cancels nothing by itself: its dependents stay
# pending with reason DependencyNeverSatisfied; fix the cause and run this script again: steps that
# are complete are skipped (they are no-ops), the others continue from what they committed.
#
#   examples/slurm/submit.sh run.yaml [extra sbatch options for every job, e.g. --account=X --partition=Y]
#
# Every job is first checked with `sbatch --test-only`; if any cannot run on the cluster (a GPU
# request on a partition without GPUs, more CPUs than a node has) nothing is submitted, so a chain
# is never left half-submitted. GPUs per node of one script's jobs: DPO_<SCRIPT>_GPUS, e.g.
# DPO_EVALUATE_GPUS=0 (a CPU-only evaluate); --gpus-per-node=N among the options sets every job's.
#
# DPO_SLURM_LOCAL=1 runs the same scripts one after the other on this machine instead.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 RUN_FILE [sbatch options...]" >&2
    exit 2
fi
DPO_RUN_FILE=$(realpath "$1")
shift
DPO_SLURM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export DPO_RUN_FILE DPO_SLURM_DIR
read -r -a DPO <<< "${DPO_BIN:-dpo}"

script_of() {
    case $1 in
        tokenize) echo tokenize ;;
        cache-ref) echo cache_ref ;;
        train) echo train ;;
        export) echo export ;;
        evaluate-base | evaluate) echo evaluate ;;
        *) echo "unknown step $1" >&2; return 1 ;;
    esac
}

# The steps the run file has sections for, in pipeline order (no cache-ref for simpo, ...).
mapfile -t steps < <("${DPO[@]}" run --config "$DPO_RUN_FILE" --list-steps)
if [[ ${DPO_SLURM_LOCAL:-0} == 1 ]]; then
    for step in "${steps[@]}"; do
        script="$DPO_SLURM_DIR/$(script_of "$step").sbatch"
        echo "== $step: $script" >&2
        DPO_STEP=$step bash "$script"
    done
    exit 0
fi

# options STEP: the sbatch options of STEP's job, less the dependency (the job ids are not known yet).
options() {
    local name gpus
    name=$(script_of "$1")
    gpus=DPO_${name^^}_GPUS
    printf '%s\n' --job-name "dpo-$1" --export "ALL,DPO_STEP=$1" "${extra[@]}"
    # After the common options: one script's GPU count is more specific than every job's.
    if [[ -n ${!gpus:-} ]]; then
        printf '%s\n' "--gpus-per-node=${!gpus}"
    fi
    printf '%s\n' "$DPO_SLURM_DIR/$name.sbatch"
}
extra=("$@")

failed=0
for step in "${steps[@]}"; do
    mapfile -t args < <(options "$step")
    if ! report=$(sbatch --test-only "${args[@]}" 2>&1); then
        echo "step $step cannot be submitted: $report" >&2
        failed=1
    fi
done
if (( failed )); then
    echo "submitted nothing: change the resources of the steps above (options after the run file apply to every job, DPO_<SCRIPT>_GPUS to one script's)" >&2
    exit 1
fi

submitted=()
previous=""
for step in "${steps[@]}"; do
    mapfile -t args < <(options "$step")
    if [[ -n $previous ]]; then
        args=(--dependency "afterok:$previous" "${args[@]}")
    fi
    if ! job=$(sbatch --parsable "${args[@]}"); then
        # Passed --test-only, failed now (the controller, a limit reached meanwhile): no half chain.
        if (( ${#submitted[@]} )); then
            scancel "${submitted[@]}" || true
            echo "sbatch failed for step $step: cancelled the jobs submitted before it (${submitted[*]})" >&2
        fi
        exit 1
    fi
    previous=${job%%;*}  # --parsable prints "jobid" or "jobid;cluster"
    submitted+=("$previous")
    echo "submitted $step as job $previous" >&2
done
