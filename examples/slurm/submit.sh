#!/bin/bash
# Submit the pipeline of a run file as one Slurm job per step, each starting only after the previous
# one succeeded (--dependency=afterok). A failed job cancels nothing by itself: its dependents stay
# pending with reason DependencyNeverSatisfied; fix the cause and run this script again: steps that
# are complete are skipped (they are no-ops), the others continue from what they committed.
#
#   examples/slurm/submit.sh run.yaml [extra sbatch options, e.g. --account=X --partition=Y]
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
        tokenize) echo tokenize.sbatch ;;
        cache-ref) echo cache_ref.sbatch ;;
        train) echo train.sbatch ;;
        export) echo export.sbatch ;;
        evaluate-base | evaluate) echo evaluate.sbatch ;;
        *) echo "unknown step $1" >&2; return 1 ;;
    esac
}

# The steps the run file has sections for, in pipeline order (no cache-ref for simpo, ...).
mapfile -t steps < <("${DPO[@]}" run --config "$DPO_RUN_FILE" --list-steps)
previous=""
for step in "${steps[@]}"; do
    script="$DPO_SLURM_DIR/$(script_of "$step")"
    if [[ ${DPO_SLURM_LOCAL:-0} == 1 ]]; then
        echo "== $step: $script" >&2
        DPO_STEP=$step bash "$script"
        continue
    fi
    args=(--parsable --job-name "dpo-$step" --export "ALL,DPO_STEP=$step")
    if [[ -n $previous ]]; then
        args+=(--dependency "afterok:$previous")
    fi
    job=$(sbatch "${args[@]}" "$@" "$script")
    previous=${job%%;*}  # --parsable prints "jobid" or "jobid;cluster"
    echo "submitted $step as job $previous" >&2
done
