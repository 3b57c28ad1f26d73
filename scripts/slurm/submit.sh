#!/usr/bin/env bash
# Submits zsad over a folder as a Slurm job array of SHARDS tasks (detect-array.sbatch) and the
# merge that runs once every task has succeeded (merge.sbatch, --dependency=afterok).
#
#   scripts/slurm/submit.sh [--tasks LIST] INPUT OUT_ROOT MODEL SHARDS [zsad detect options...]
#
#   --tasks LIST  submit only these array tasks (sbatch's --array syntax: 3 or 1,4 or 2-5) and a
#                 new merge after them: the way to run a cancelled, killed or failed shard again
#                 (it resumes from its records). Without it, all of 0..SHARDS-1.
#
# Environment: ZSAD, the zsad binary the tasks run (default: zsad on PATH; made absolute here);
# SBATCH_OPTS, extra sbatch options for both jobs, split on spaces (e.g. "--partition=cpu
# --cpus-per-task=8 --time=4:00:00"); the array's own throttle goes in --tasks (0-99%10).
# Logs: OUT_ROOT/logs/detect-<array job>_<task>.log and merge-<job>.log.
# Prints `array_job=ID` and `merge_job=ID` (lines a script can eval).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

tasks=
if [ "${1:-}" = --tasks ]; then
    tasks=${2:?--tasks needs a list}
    shift 2
fi
if [ $# -lt 4 ]; then
    sed -n '2,17p' "$0" >&2
    exit 2
fi
INPUT=$1 OUT_ROOT=$2 MODEL=$3 SHARDS=$4
shift 4
if ! [[ $SHARDS =~ ^[1-9][0-9]*$ ]]; then
    echo "submit.sh: SHARDS must be a positive integer, not '$SHARDS'" >&2
    exit 2
fi
[ -n "$tasks" ] || tasks=0-$((SHARDS - 1))

# The tasks run in this folder (sbatch's default working directory), so relative paths stay
# valid; the binary is made absolute so that a PATH set by a login shell does not matter.
ZSAD=${ZSAD:-zsad}
if [[ $ZSAD == */* ]]; then
    ZSAD=$(cd "$(dirname "$ZSAD")" && pwd)/$(basename "$ZSAD")
else
    ZSAD=$(command -v "$ZSAD") || { echo "submit.sh: $ZSAD is not on PATH (set ZSAD)" >&2; exit 2; }
fi
export ZSAD
[ -x "$ZSAD" ] || { echo "submit.sh: $ZSAD is not executable" >&2; exit 2; }

mkdir -p "$OUT_ROOT/logs"
# shellcheck disable=SC2206 # SBATCH_OPTS is a list of options split on spaces
opts=(${SBATCH_OPTS:-})

array_job=$(sbatch --parsable "${opts[@]}" --array="$tasks" \
    --output="$OUT_ROOT/logs/detect-%A_%a.log" \
    "$here/detect-array.sbatch" "$INPUT" "$OUT_ROOT" "$MODEL" "$SHARDS" "$@")
array_job=${array_job%%;*} # "id;cluster" on multi-cluster setups

# afterok: the merge starts when every task of the array exited 0 (detect-array.sbatch reports a
# shard with failed inputs as 0). If a task fails, is cancelled or times out, the merge can never
# run: --kill-on-invalid-dep cancels it at once instead of leaving it pending forever
# (DependencyNeverSatisfied); submit the task again with --tasks, which submits a new merge.
merge_job=$(sbatch --parsable "${opts[@]}" --dependency="afterok:$array_job" --kill-on-invalid-dep=yes \
    --output="$OUT_ROOT/logs/merge-%j.log" \
    "$here/merge.sbatch" "$OUT_ROOT" "$SHARDS")
merge_job=${merge_job%%;*}

echo "array_job=$array_job"
echo "merge_job=$merge_job"
