#!/usr/bin/env bash
# CI test of the Slurm scripts beside this file, run by a real Slurm: starts a single-node Slurm
# (Debian's slurmctld, slurmd and munge, configured for localhost, as root, everything under a
# temporary folder), submits scripts/slurm/submit.sh's job array and dependent merge over a
# folder of real images with random:tiny, and checks:
#   (a) the merged records and maps equal a single-process run of the same folder exactly
#       (every record field bit for bit, map and heatmap PNG bytes per input path);
#   (b) an array task cancelled mid-way (scancel) and submitted again resumes: the records it
#       had are kept, nothing is lost or scored twice, the merge equals a single process; the
#       merge that depended on the cancelled task never runs;
#   (c) a running task requeued (scontrol requeue) runs again, resumes, duplicates nothing;
#   (d) a merge over a failed, cancelled or missing shard is refused naming the shard;
#   (e) the exit codes Slurm records follow zsad's documented codes (0 all scored; 1 some
#       inputs failed, reported to Slurm as 0 by the task, as 1 by the merge; 2 fails the task).
#
#   ZSAD=target/release/zsad bash scripts/slurm/ci-test.sh
#
# Environment:
#   ZSAD                    zsad binary (default target/release/zsad, relative to the repo root)
#   ZSAD_SLURM_IMAGES       folder of real images (default ../shared/data/mvtec_ad/bottle; a
#                           relative path, like ZSAD's, is taken from the repo root)
#   ZSAD_SLURM_COUNT        images taken from it, spread over its files (default 48)
#   ZSAD_SLURM_BATCH        --batch-size of every run (default 1: see below)
#   ZSAD_SLURM_TIMEOUT      seconds for the whole test (default 900)
#   ZSAD_SLURM_EXPECT_MERGE_COVERAGE  1 (default): fail unless `zsad merge` itself refuses an incomplete
#                           shard set; 0: do not try; unset: try, and report either way
#   ZSAD_SLURM_KEEP=1       keep the temporary folder (logs, outputs) at the end
#
# Exactness and batches: zsad scores a batch of images in one model pass, and the last float
# bits of an image's score can depend on which images share its pass (zsad's own shard test
# allows 1e-6 for that). A shard batches other images together than a single process does, so
# "exactly equal" is only defined per image: every run here uses --batch-size 1. Threads do not
# matter (the single process uses all cores, each task one).
#
# Prints one `SKIP: ...` line and exits 0 only where Slurm cannot be installed or started (or,
# as the cargo tests do, where the images of ../shared are absent).
set -euo pipefail

if [ -z "${ZSAD_SLURM_UNDER_TIMEOUT:-}" ]; then
    # One bound for everything, so CI can never hang here; TERM runs the cleanup below.
    export ZSAD_SLURM_UNDER_TIMEOUT=1
    exec timeout -k 20 "${ZSAD_SLURM_TIMEOUT:-900}" bash "$0" "$@"
fi

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cd "$repo"
export LC_ALL=C
t_start=$(date +%s)
now_ms() { echo $(($(date +%s%N) / 1000000)); }
# secs FROM_MS [TO_MS]: seconds between two now_ms readings, one decimal.
secs() { awk -v a="$1" -v b="${2:-$(now_ms)}" 'BEGIN { printf "%.1f", (b - a) / 1000 }'; }

log() { echo "slurm: $*"; }
fail() {
    echo "slurm: FAIL: $*" >&2
    exit 1
}
skip() {
    echo "SKIP: slurm test: $*"
    exit 0
}
elapsed() { echo $(($(date +%s) - t_start)); }

ZSAD=${ZSAD:-target/release/zsad}
[ -x "$ZSAD" ] || fail "no zsad binary at $ZSAD (build it, or set ZSAD)"
ZSAD=$(cd "$(dirname "$ZSAD")" && pwd)/$(basename "$ZSAD")
export ZSAD
images=${ZSAD_SLURM_IMAGES:-../shared/data/mvtec_ad/bottle}
count=${ZSAD_SLURM_COUNT:-48}
batch=${ZSAD_SLURM_BATCH:-1}
[ -d "$images" ] || skip "no image folder $images (../shared is absent; set ZSAD_SLURM_IMAGES)"

# A Slurm job or another cluster's settings around this test would leak into sbatch/squeue.
while IFS= read -r v; do unset "$v"; done < <(env | sed -n 's/^\(\(SLURM\|SBATCH\|SQUEUE\|SINFO\|SCONTROL\|SALLOC\|SRUN\)_[A-Za-z0-9_]*\)=.*/\1/p')

# ---------------------------------------------------------------------------------------------
# Install
need=()
for c in slurmctld slurmd sbatch munged jq; do
    command -v "$c" >/dev/null 2>&1 || need+=("$c")
done
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        skip "Slurm is not installed (${need[*]} missing) and cannot be (needs root and apt-get)"
    fi
    pkgs=(slurmctld slurmd slurm-client munge jq)
    export DEBIAN_FRONTEND=noninteractive
    if ! timeout 300 apt-get install -y -q --no-install-recommends "${pkgs[@]}" >/dev/null 2>&1; then
        timeout 300 apt-get update -q >/dev/null 2>&1 || true
        timeout 300 apt-get install -y -q --no-install-recommends "${pkgs[@]}" >/dev/null 2>&1 ||
            skip "Slurm cannot be installed (apt-get install ${pkgs[*]} failed)"
    fi
fi
[ "$(id -u)" = 0 ] || skip "the single-node Slurm runs its daemons as root; not root"

# ---------------------------------------------------------------------------------------------
# Start a single-node Slurm: everything under $T, ports and munge socket of its own, so that a
# Slurm or munge already on the machine is neither used nor disturbed.
T=$(mktemp -d "${TMPDIR:-/tmp}/zsad-slurm.XXXXXX")
T=$(cd "$T" && pwd -P)
chmod 755 "$T"
mkdir -p "$T/munge" "$T/state" "$T/spool" "$T/data"
chmod 700 "$T/munge"

stop_slurm() {
    local rc=$?
    set +e
    if [ -n "${SLURM_CONF:-}" ] && [ -e "$T/slurmctld.pid" ]; then
        timeout 15 scancel --quiet --user=root >/dev/null 2>&1
        for _ in $(seq 30); do
            [ -z "$(timeout 5 squeue -h 2>/dev/null)" ] && break
            sleep 0.5
        done
    fi
    # Our daemons only, by the pids they wrote.
    for p in slurmd slurmctld munge/munged; do
        [ -s "$T/$p.pid" ] && kill "$(cat "$T/$p.pid")" 2>/dev/null
    done
    for p in slurmd slurmctld munge/munged; do
        for _ in $(seq 20); do
            [ -s "$T/$p.pid" ] && kill -0 "$(cat "$T/$p.pid")" 2>/dev/null || break
            sleep 0.25
        done
    done
    if [ "$rc" != 0 ] && [ -d "$T" ]; then
        echo "--- slurm logs ($T) ---" >&2
        tail -n 20 "$T"/slurmctld.log "$T"/slurmd.log 2>/dev/null >&2
        for f in "$T"/run-*/logs/*.log; do
            [ -f "$f" ] && { echo "== $f" >&2; tail -n 20 "$f" >&2; }
        done
    fi
    if [ "${ZSAD_SLURM_KEEP:-0}" = 1 ] || [ "$rc" != 0 ]; then
        echo "slurm: outputs and logs kept in $T" >&2
    else
        rm -rf "$T"
    fi
    exit "$rc"
}
trap stop_slurm EXIT
trap 'exit 143' TERM INT

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
ctld_port=
for p in 16817 26817 36817 46817; do
    if port_free "$p" && port_free $((p + 1)); then
        ctld_port=$p
        break
    fi
done
[ -n "$ctld_port" ] || skip "no free port pair for slurmctld and slurmd"

head -c 1024 /dev/urandom >"$T/munge/munge.key"
chmod 400 "$T/munge/munge.key"
timeout 20 munged --force --socket="$T/munge/socket" --key-file="$T/munge/munge.key" \
    --pid-file="$T/munge/munged.pid" --log-file="$T/munge/munged.log" \
    --seed-file="$T/munge/munged.seed" ||
    skip "munged does not start: $(tail -n 1 "$T/munge/munged.log" 2>/dev/null)"

# The node as slurmd sees it (CPUs, sockets, cores, memory), named localhost.
hw=$(timeout 20 slurmd -C | head -n 1 | sed 's/^NodeName=[^ ]* //') || skip "slurmd -C fails"
cat >"$T/slurm.conf" <<EOF
ClusterName=zsadci
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$((ctld_port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job waits this long before it may start again (default 120 s).
AuthInfo=socket=$T/munge/socket,cred_expire=10
StateSaveLocation=$T/state
SlurmdSpoolDir=$T/spool
SlurmctldPidFile=$T/slurmctld.pid
SlurmdPidFile=$T/slurmd.pid
SlurmctldLogFile=$T/slurmctld.log
SlurmdLogFile=$T/slurmd.log
# No cgroups: processes tracked by their parentage, no binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# Without accounting (no sacct) the finished jobs' states and exit codes are kept here too.
JobCompType=jobcomp/filetxt
JobCompLoc=$T/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
# Finished jobs stay visible to scontrol for the whole test.
MinJobAge=3600
KillWait=5
NodeName=localhost NodeAddr=127.0.0.1 $hw State=UNKNOWN
PartitionName=ci Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$T/slurm.conf
timeout 30 slurmctld -c || skip "slurmctld does not start: $(tail -n 3 "$T/slurmctld.log" 2>/dev/null | tr '\n' ' ')"
timeout 30 slurmd -N localhost || skip "slurmd does not start: $(tail -n 3 "$T/slurmd.log" 2>/dev/null | tr '\n' ' ')"
ok=
for _ in $(seq 120); do
    if [ "$(timeout 5 sinfo -h -n localhost -o %T 2>/dev/null)" = idle ]; then
        ok=1
        break
    fi
    sleep 0.5
done
[ -n "$ok" ] || skip "the Slurm node does not become idle: $(timeout 5 sinfo -h -o '%T %E' 2>&1 | tr '\n' ' ')"
log "single-node Slurm $(sinfo -V | awk '{print $2}') up ($hw) in $(elapsed) s"

# ---------------------------------------------------------------------------------------------
# Helpers

# A field of a job or array task (ID or ARRAY_TASK), e.g. `field 12_1 ExitCode`.
field() { timeout 30 scontrol -o show job "$1" | tr ' ' '\n' | sed -n "s/^$2=//p" | head -n 1; }

# Waits until the cluster has no job left (all of ours finished), at most $1 seconds.
wait_idle() {
    local deadline=$(($(date +%s) + $1))
    while [ -n "$(timeout 30 squeue -h -o %i)" ]; do
        [ "$(date +%s)" -lt "$deadline" ] || {
            timeout 30 squeue >&2
            fail "jobs still queued after $1 s"
        }
        sleep 0.25
    done
}

# expect_job ID STATE EXITCODE: what Slurm recorded.
expect_job() {
    local s e
    s=$(field "$1" JobState)
    e=$(field "$1" ExitCode)
    [ "$s" = "$2" ] && [ "$e" = "$3" ] || fail "job $1: Slurm recorded $s $e, expected $2 $3"
}

records() { if [ -f "$1/scores.jsonl" ]; then wc -l <"$1/scores.jsonl"; else echo 0; fi; }

# Every line of every record file is whole JSON, and no input has two records.
no_duplicates() {
    local d f
    for f in "$@"; do
        jq -e . "$f" >/dev/null 2>&1 || fail "$f: a line is not JSON (torn record)"
    done
    d=$(jq -r .path "$@" | sort | uniq -d)
    [ -z "$d" ] || fail "inputs recorded twice in $*: $(echo "$d" | head -n 3 | tr '\n' ' ')"
}

# same_results WANT GOT: GOT's records equal WANT's field for field (the map and heatmap file
# names aside, which merge may choose itself), each input's map and heatmap byte for byte, and
# the settings in run.json are the same (but the shard).
same_results() {
    local want=$1 got=$2 n d
    no_duplicates "$got/scores.jsonl"
    diff <(jq -r .path "$want/scores.jsonl" | sort) <(jq -r .path "$got/scores.jsonl" | sort) >"$T/paths.diff" ||
        fail "$got: other inputs than $want: $(head -n 4 "$T/paths.diff" | tr '\n' ' ')"
    n=$(jq -c 'select(has("error") | not)' "$want/scores.jsonl" | wc -l)
    diff <(jq -cS 'del(.map, .heatmap, .mask)' "$want/scores.jsonl" | sort) \
        <(jq -cS 'del(.map, .heatmap, .mask)' "$got/scores.jsonl" | sort) >"$T/records.diff" ||
        fail "$got: records differ from $want: $(head -n 2 "$T/records.diff" | cut -c1-300 | tr '\n' ' ')"
    # path -> map, heatmap in both, joined on path.
    join -t $'\t' \
        <(jq -r 'select(.map) | [.path, .map, .heatmap // ""] | @tsv' "$want/scores.jsonl" | sort -t $'\t' -k1,1) \
        <(jq -r 'select(.map) | [.path, .map, .heatmap // ""] | @tsv' "$got/scores.jsonl" | sort -t $'\t' -k1,1) \
        >"$T/files.tsv"
    [ "$(wc -l <"$T/files.tsv")" = "$n" ] || fail "$got: $n scored inputs expected with maps, $(wc -l <"$T/files.tsv") found"
    d=0
    while IFS=$'\t' read -r p wm wh gm gh; do
        cmp -s "$want/$wm" "$got/$gm" || { echo "slurm: map of $p differs: $want/$wm $got/$gm" >&2; d=$((d + 1)); }
        if [ -n "$wh" ]; then
            cmp -s "$want/$wh" "$got/$gh" || { echo "slurm: heatmap of $p differs: $want/$wh $got/$gh" >&2; d=$((d + 1)); }
        fi
    done <"$T/files.tsv"
    [ "$d" = 0 ] || fail "$got: $d map/heatmap files differ from $want"
    # run.json: the same settings (a merged run.json also repeats record_format_version inside
    # settings, which is not a setting).
    diff <(jq -S '.settings | del(.shard, .record_format_version)' "$want/run.json") \
        <(jq -S '.settings | del(.shard, .record_format_version)' "$got/run.json") >"$T/settings.diff" ||
        fail "$got/run.json: other settings than $want/run.json: $(head -n 6 "$T/settings.diff" | tr '\n' ' ')"
}

# submit ROOT INPUT [--tasks LIST]: submit.sh as a user runs it; sets array_job and merge_job.
submit() {
    local root=$1 input=$2
    shift 2
    local out
    out=$(SBATCH_OPTS="--cpus-per-task=1" timeout 60 bash "$here/submit.sh" "$@" "$input" "$root" random:tiny 3 --batch-size "$batch") ||
        fail "submit.sh failed: $out"
    eval "$out"
    [[ ${array_job:-} =~ ^[0-9]+$ && ${merge_job:-} =~ ^[0-9]+$ ]] || fail "submit.sh printed: $out"
}

# Waits until one array task of $1 is running with a record in ROOT/shard-K, stops its
# processes there (SIGSTOP, so that small, fast images cannot finish the shard before Slurm's
# signal arrives; Slurm sends SIGCONT before SIGTERM when it cancels or requeues) and prints K.
running_task_midway() {
    local array=$1 root=$2 deadline=$(($(date +%s) + 120)) k id pids
    while [ "$(date +%s)" -lt "$deadline" ]; do
        for k in 0 1 2; do
            if [ "$(records "$root/shard-$k")" -ge 1 ] && [ ! -e "$root/status/shard-$k.exit" ]; then
                id=$(timeout 30 squeue -h -j "${array}_$k" -t RUNNING -o %A 2>/dev/null) || id=
                [ -n "$id" ] || continue
                pids=$(timeout 30 scontrol listpids "$id" | awk 'NR > 1 { print $1 }')
                # shellcheck disable=SC2086 # a list of pids
                [ -n "$pids" ] && kill -STOP $pids 2>/dev/null || continue
                if [ -e "$root/status/shard-$k.exit" ]; then
                    # shellcheck disable=SC2086
                    kill -CONT $pids 2>/dev/null || true # finished meanwhile: not mid-way
                    continue
                fi
                echo "$k"
                return 0
            fi
        done
        sleep 0.02
    done
    fail "no task of array $array got mid-way within 120 s"
}

# The merge job $1 never ran: cancelled because its dependency can never be satisfied.
merge_never_ran() {
    local r
    expect_job "$1" CANCELLED 0:0
    r=$(field "$1" Reason)
    [ "$r" = DependencyNeverSatisfied ] || fail "merge job $1: reason $r, expected DependencyNeverSatisfied"
    [ ! -e "$2/logs/merge-$1.log" ] || fail "merge job $1 ran although a task failed: $2/logs/merge-$1.log"
}

# merge_refused ROOT K: merge.sbatch, run by hand, refuses the shard set naming shard K/3.
merge_refused() {
    local rc=0
    timeout 120 bash "$here/merge.sbatch" "$1" 3 >"$T/merge.out" 2>&1 || rc=$?
    [ "$rc" = 2 ] || fail "merge.sbatch over $1 with shard $2/3 $3: exit $rc, expected 2: $(cat "$T/merge.out")"
    grep -q "shard $2/3" "$T/merge.out" || fail "merge.sbatch's refusal does not name shard $2/3: $(cat "$T/merge.out")"
    [ ! -e "$1/merged" ] || fail "merge.sbatch wrote $1/merged although it refused"
    log "  merge.sbatch refuses shard $2/3 $3: $(grep "shard $2/3" "$T/merge.out" | head -n 1)"
}

# What zsad merge itself must do (see the report of issue 28): refuse shard folders that do not
# cover 0..N-1 exactly once, or one that did not finish, naming the shard. zsad 0.1.0 merges
# whatever it is given; merge.sbatch checks it before calling zsad. Assertive with
# ZSAD_SLURM_EXPECT_MERGE_COVERAGE=1, skipped with 0, otherwise reported either way.
check_zsad_merge_refuses_incomplete_shards() {
    local what=$1 shard=$2 rc=0
    shift 2
    [ "${ZSAD_SLURM_EXPECT_MERGE_COVERAGE:-}" = 0 ] && return 0
    rm -rf "$T/raw-merge"
    timeout 120 "$ZSAD" merge "$@" --out "$T/raw-merge" >"$T/raw-merge.out" 2>&1 || rc=$?
    if [ "$rc" != 0 ] && grep -Eq "$shard" "$T/raw-merge.out"; then
        log "  zsad merge refuses $what by itself (exit $rc): $(grep -E "$shard" "$T/raw-merge.out" | head -n 1)"
    elif [ "${ZSAD_SLURM_EXPECT_MERGE_COVERAGE:-1}" = 1 ]; then
        fail "zsad merge over $what: exit $rc, expected a refusal naming $shard: $(tail -n 2 "$T/raw-merge.out")"
    else
        log "  NOTE: zsad merge by itself accepts $what (exit $rc; $(tail -n 1 "$T/raw-merge.out")): only merge.sbatch's check refuses it"
    fi
}

# ---------------------------------------------------------------------------------------------
# Data: COUNT real images spread over the folder (masks left out), copied twice: `clean`, and
# `mixed` with one file that is not an image (zsad's exit 1: the input gets an error record).
mapfile -t files < <(cd "$images" && find . -type f \( -iname '*.png' -o -iname '*.jpg' -o -iname '*.jpeg' \
    -o -iname '*.bmp' -o -iname '*.tif' -o -iname '*.tiff' -o -iname '*.webp' \) \
    -not -path '*/ground_truth/*' -not -path '*/Masks/*' -not -name '*_mask.*' | LC_ALL=C sort)
[ "${#files[@]}" -ge 1 ] || skip "no images in $images"
[ "$count" -le "${#files[@]}" ] || count=${#files[@]}
for i in $(seq 0 $((count - 1))); do
    f=${files[$((i * ${#files[@]} / count))]#./}
    for set in clean mixed; do
        mkdir -p "$T/data/$set/$(dirname "$f")"
        cp "$images/$f" "$T/data/$set/$f"
    done
done
printf 'not an image, named like one\n' >"$T/data/mixed/not-an-image.png"
clean=$T/data/clean
mixed=$T/data/mixed
log "$count images from $images (mixed: + not-an-image.png), --batch-size $batch"

# Single-process references.
t0=$(now_ms)
rc=0
"$ZSAD" detect "$clean" --model random:tiny --out "$T/single-clean" --batch-size "$batch" --quiet || rc=$?
t_single=$(secs "$t0")
# 0, or 1 where the folder holds files zsad cannot read: the array must then report the same.
clean_rc=$rc
[ "$clean_rc" -le 1 ] || fail "single process over $clean: exit $rc"
rc=0
"$ZSAD" detect "$mixed" --model random:tiny --out "$T/single-mixed" --batch-size "$batch" --quiet || rc=$?
[ "$rc" = 1 ] || fail "single process over $mixed: exit $rc, expected 1 (one input is not an image)"
log "single process ($(nproc) threads): $count images in $t_single s (exit $clean_rc)"

# What Slurm records for a merge: zsad's code, 0 every input scored, 1 some failed.
merge_state() { if [ "$1" = 0 ]; then echo "COMPLETED 0:0"; else echo "FAILED 1:0"; fi; }

# ---------------------------------------------------------------------------------------------
log "(a) array of 3 shards + afterok merge over $clean"
A=$T/run-a
t0=$(now_ms)
submit "$A" "$clean"
a_array=$array_job a_merge=$merge_job
# The array's time: submission to the last task's end (status files are written as zsad ends).
while [ "$(find "$A/status" -name "*.exit" 2>/dev/null | wc -l)" -lt 3 ]; do
    if [ -z "$(timeout 30 squeue -h -j "$a_array" -o %i 2>/dev/null)" ]; then
        break
    fi
    sleep 0.1
done
t_array=$(secs "$t0")
wait_idle 300
t_all=$(secs "$t0")
worst=0
for k in 0 1 2; do
    expect_job "${a_array}_$k" COMPLETED 0:0
    code=$(cat "$A/status/shard-$k.exit")
    [ "$code" -le 1 ] || fail "(a) shard $k: zsad exited $code"
    [ "$code" -le "$worst" ] || worst=$code
done
[ "$worst" = "$clean_rc" ] || fail "(a) the shards' zsad exit statuses (worst $worst) differ from the single process's ($clean_rc)"
# shellcheck disable=SC2046 # two words: state and exit code
expect_job "$a_merge" $(merge_state "$clean_rc")
no_duplicates "$A"/shard-*/scores.jsonl
same_results "$T/single-clean" "$A/merged"
log "  3 tasks COMPLETED 0:0 (shards of $(records "$A/shard-0"), $(records "$A/shard-1"), $(records "$A/shard-2") images), merge $(merge_state "$clean_rc")"
log "  merged = single process: $(records "$A/merged") records, every field, map and heatmap identical"
log "array of 3 shards over $count images: $t_array s (merge done at $t_all s; 1 CPU per task, $(nproc) CPUs)"

# ---------------------------------------------------------------------------------------------
scenario_b() {
    log "(b) scancel of one array task mid-way, submitted again with submit.sh --tasks (over $mixed)"
    B=$T/run-b
    submit "$B" "$mixed"
    b_array=$array_job b_merge=$merge_job
    k=$(running_task_midway "$b_array" "$B")
    timeout 30 scancel "${b_array}_$k"
    wait_idle 300
    [ ! -e "$B/status/shard-$k.exit" ] ||
        fail "(b) task $k finished before the cancel reached it: use more images (ZSAD_SLURM_COUNT)"
    expect_job "${b_array}_$k" CANCELLED 0:15
    merge_never_ran "$b_merge" "$B"
    # The whole lines it wrote (a line cut by the kill, if any, is dropped by --resume).
    kept=$(records "$B/shard-$k")
    head -n "$kept" "$B/shard-$k/scores.jsonl" >"$T/b-kept.jsonl"
    no_duplicates "$T/b-kept.jsonl"
    touch "$T/b-resubmitted"
    log "  task $k CANCELLED 0:15 with $kept records, merge job $b_merge never ran (CANCELLED, DependencyNeverSatisfied)"
    # (d) a cancelled shard is refused by name.
    merge_refused "$B" "$k" "(cancelled mid-way)"
    others=()
    for j in 0 1 2; do [ "$j" = "$k" ] || others+=("$B/shard-$j"); done
    check_zsad_merge_refuses_incomplete_shards "a shard set without shard $k/3" "$k/3|shard-$k|shard $k" "${others[@]}"
    check_zsad_merge_refuses_incomplete_shards "shard $k/3 cancelled mid-way" "$k/3|shard-$k|shard $k" "$B"/shard-{0,1,2}

    sleep 1 # mtimes of the resumed run's files are later than the marker
    submit "$B" "$mixed" --tasks "$k"
    wait_idle 300
    expect_job "${array_job}_$k" COMPLETED 0:0
    no_duplicates "$B"/shard-*/scores.jsonl
    total=$(records "$B/shard-$k")
    [ "$total" -gt "$kept" ] || fail "(b) task $k had already finished when it was cancelled ($kept records then, $total now): use more images (ZSAD_SLURM_COUNT)"
    # Resumed: the records it had are kept as they were, their maps not written again.
    cmp -s <(head -n "$kept" "$B/shard-$k/scores.jsonl" | jq -cS .) <(jq -cS . "$T/b-kept.jsonl") ||
        fail "(b) shard $k: the records written before the cancel changed"
    rewritten=$(head -n "$kept" "$B/shard-$k/scores.jsonl" | jq -r 'select(.map) | .map' |
        while read -r m; do if [ "$B/shard-$k/$m" -nt "$T/b-resubmitted" ]; then echo "$m"; fi; done | wc -l)
    [ "$rewritten" = 0 ] || fail "(b) shard $k: $rewritten maps scored before the cancel were written again"
    # (e) the shard with the non-image file: zsad exited 1, the task reported 0 so the merge ran,
    # and the merge exits 1.
    bad=$(grep -l 'not-an-image.png' "$B"/shard-*/scores.jsonl | head -n 1)
    bad=$(basename "$(dirname "$bad")")
    [ "$(cat "$B/status/$bad.exit")" = 1 ] || fail "(b) $bad has the failed input but zsad exited $(cat "$B/status/$bad.exit")"
    grep -q "exit 1, some inputs failed" "$B"/logs/detect-*_"${bad#shard-}".log || fail "(b) $bad: its log does not say exit 1"
    expect_job "$merge_job" FAILED 1:0
    grep -q 'some inputs failed' "$B/logs/merge-$merge_job.log" || fail "(b) the merge log does not say some inputs failed"
    same_results "$T/single-mixed" "$B/merged"
    log "  resubmitted task $k resumed from its $kept records: $total now, none twice, none rewritten"
    log "  $bad: zsad exit 1 (not-an-image.png), task COMPLETED 0:0; merge FAILED 1:0 (some inputs failed)"
    log "  merged = single process (exit 1 run): $(records "$B/merged") records identical, maps identical"
}

scenario_c() {
    log "(c) scontrol requeue of a running task (over $clean)"
    C=$T/run-c
    submit "$C" "$clean"
    k=$(running_task_midway "$array_job" "$C")
    before=$(records "$C/shard-$k")
    timeout 30 scontrol requeue "$(timeout 30 squeue -h -j "${array_job}_$k" -o %A)"
    t0=$(date +%s)
    wait_idle 300
    expect_job "${array_job}_$k" COMPLETED 0:0
    restarts=$(field "${array_job}_$k" Restarts)
    [ "$restarts" = 1 ] || fail "(c) task $k: Restarts=$restarts, expected 1"
    log_c=$C/logs/detect-${array_job}_$k.log
    grep -q 'restart 0' "$log_c" && grep -q 'restart 1' "$log_c" ||
        fail "(c) $log_c does not hold both attempts (--open-mode=append): $(cat "$log_c")"
    grep -q 'DUE TO JOB REQUEUE' "$log_c" || fail "(c) $log_c does not show the requeue"
    # shellcheck disable=SC2046
    expect_job "$merge_job" $(merge_state "$clean_rc")
    no_duplicates "$C"/shard-*/scores.jsonl
    same_results "$T/single-clean" "$C/merged"
    log "  task $k requeued after $before records, ran again $(($(date +%s) - t0)) s later at most (Restarts=1, both attempts in its log), resumed: no record twice; merge $(merge_state "$clean_rc"), merged = single process"
}

# (b) and (c) catch a task with some of its records written: that needs shards of several images.
if [ "$count" -lt 24 ]; then
    log "NOTE: (b) and (c) need at least 24 images to catch a task mid-way ($count here): not run"
else
    scenario_b
    scenario_c
fi

# ---------------------------------------------------------------------------------------------
log "(d) a task that fails (zsad exit 2) and a missing shard (over $clean)"
D=$T/run-d
# OUT_ROOT reused with other settings: task 2's --resume refuses to add records made otherwise.
mkdir -p "$D"
rc=0
"$ZSAD" detect "$clean" --model random:tiny --shard 2/3 --out "$D/shard-2" --batch-size "$batch" \
    --heatmaps none --quiet || rc=$?
[ "$rc" -le 1 ] || fail "(d) preparing shard-2 with other settings: exit $rc"
submit "$D" "$clean"
wait_idle 300
expect_job "${array_job}_0" COMPLETED 0:0
expect_job "${array_job}_1" COMPLETED 0:0
expect_job "${array_job}_2" FAILED 2:0
[ "$(cat "$D/status/shard-2.exit")" = 2 ] || fail "(d) shard 2: status $(cat "$D/status/shard-2.exit"), expected 2"
grep -q 'zsad: error' "$D/logs/detect-${array_job}_2.log" || fail "(d) task 2's log has no zsad error"
merge_never_ran "$merge_job" "$D"
log "  task 2 FAILED 2:0 ($(grep -m1 'zsad: error' "$D/logs/detect-${array_job}_2.log" | cut -c1-120)...), merge never ran"
merge_refused "$D" 2 "(zsad exited 2)"
check_zsad_merge_refuses_incomplete_shards "a shard set without shard 2/3" "2/3|shard-2|shard 2" "$D/shard-0" "$D/shard-1"
rm -rf "$D/shard-2" "$D/status/shard-2.exit"
merge_refused "$D" 2 "(missing)"
# The complete set of (a), merged as if there were 4 shards: shard 3/4 missing, and shards
# 0..2 are not quarters.
merge_refused_n4=0
timeout 120 bash "$here/merge.sbatch" "$A" 4 >"$T/merge.out" 2>&1 || merge_refused_n4=$?
[ "$merge_refused_n4" = 2 ] && grep -q 'shard 3/4' "$T/merge.out" && grep -q 'is not shard 0/4' "$T/merge.out" ||
    fail "merge.sbatch over 3 shards as 4: exit $merge_refused_n4: $(cat "$T/merge.out")"
log "  merge.sbatch over 3 shards called 4: refused (shard 3/4 missing, run.json is not shard 0/4)"

log "all Slurm checks passed in $(elapsed) s"
