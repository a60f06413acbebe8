#!/usr/bin/env bash
# The main job, end to end: train a small LM under FSDP2 on 4 processes with
# periodic sharded checkpoints, crash it, resume on 2 processes from the newest
# committed checkpoint, finish, and report. See --help.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LAUNCH=(bash "$ROOT/scripts/launch_multi_gpu.sh")

usage() {
    cat <<'EOF'
Usage: bash scripts/demo.sh [--out DIR] [--interrupt exit|kill] [--steps N]
                            [--save-every K] [--crash-at S] [--nproc-before N] [--nproc-after M]

  --out DIR         where checkpoints, logs and summaries go (default: out/demo)
  --interrupt MODE  exit: every rank calls os._exit(17) right after step S (default,
                          deterministic)
                    kill: the demo SIGKILLs torchrun and all its workers as soon as
                          rank 0 has logged step S (a real crash: it lands a few
                          steps later, possibly in the middle of a save)
  --steps N         total training steps (default 150)
  --save-every K    checkpoint period (default 25)
  --crash-at S      step of the interruption (default 90)
  --nproc-before N  processes before the crash (default 4)
  --nproc-after M   processes after the crash (default 2)

Runs on CPU with gloo, or with NCCL when there is a GPU per process. Takes about
a minute on an idle 2-core machine. Exit status is non-zero if the resumed run's
losses do not match those of the interrupted run.
EOF
}

out="$ROOT/out/demo"
interrupt=exit
steps=150
save_every=25
crash_at=90
n_before=4
n_after=2
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --out) out="${2:?}"; shift 2 ;;
        --interrupt) interrupt="${2:?}"; shift 2 ;;
        --steps) steps="${2:?}"; shift 2 ;;
        --save-every) save_every="${2:?}"; shift 2 ;;
        --crash-at) crash_at="${2:?}"; shift 2 ;;
        --nproc-before) n_before="${2:?}"; shift 2 ;;
        --nproc-after) n_after="${2:?}"; shift 2 ;;
        *) echo "demo.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
done
[[ "$interrupt" == exit || "$interrupt" == kill ]] || { echo "demo.sh: --interrupt must be exit or kill" >&2; exit 2; }
(( save_every > 0 && crash_at >= save_every && crash_at < steps )) || {
    echo "demo.sh: need 0 < --save-every <= --crash-at < --steps (a checkpoint must exist before the crash)" >&2
    exit 2
}

# Same interpreter choice as the launcher, for the report.
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -z "${VIRTUAL_ENV:-}" && -x "$ROOT/.venv/bin/python" ]]; then
        PYTHON="$ROOT/.venv/bin/python"
    else
        PYTHON="$(command -v python || command -v python3)"
    fi
fi
export PYTHON

ckpt="$out/ckpt"
rm -rf "$out"
mkdir -p "$out"
: >"$out/run1.log"
: >"$out/run2.log"
t_demo=$SECONDS

# Small enough for a 2-core CPU, big enough for the loss to fall from ln(1024)~6.9
# toward the Markov chain's floor. The global batch is fixed (8 sequences), so
# 4 and 2 ranks see exactly the same tokens per step.
common=(--ckpt-dir "$ckpt" --max-steps "$steps" --save-every "$save_every"
    --vocab 1024 --d-model 128 --n-layers 3 --n-heads 4 --seq-len 32 --global-batch 8
    --lr 1e-2 --warmup 10 --log-every 10 --seed 1234)

# SIGKILL torchrun ($1) and its workers. torchrun starts each worker in its own
# session, so signalling torchrun's process group would miss them: kill each
# worker's group (the worker and anything it forked), then torchrun. Prints the
# worker PIDs.
kill_tree() {
    local w workers
    workers="$(pgrep -P "$1" 2>/dev/null || ps -o pid= --ppid "$1" 2>/dev/null || true)"
    for w in $workers; do kill -KILL -- "-$w" 2>/dev/null || kill -KILL "$w" 2>/dev/null || true; done
    kill -KILL "$1" 2>/dev/null || true
    echo $workers
}
pid=""
# Ctrl-C must not leave 4 orphaned workers spinning on gloo.
trap '[[ -n "$pid" ]] && kill_tree "$pid" >/dev/null; exit 130' INT TERM

# Keep the console readable: the full logs (torchrun's failure report after the
# crash included) stay in $out/*.log.
show() { grep --line-buffered -E '^\[train_lm\]|^launch_multi_gpu' || true; }
# Follow a log until the process writing it exits.
follow() { tail -n +1 -f --pid "$1" "$2" 2>/dev/null | show || true; }

echo "=== 1/3  train on $n_before processes, checkpoint every $save_every steps, crash at step $crash_at ($interrupt)"
if [[ "$interrupt" == exit ]]; then
    rc=0
    "${LAUNCH[@]}" --nproc-per-node "$n_before" "$ROOT/examples/train_lm.py" "${common[@]}" \
        --stop-after "$crash_at" --metrics-jsonl "$out/run1.jsonl" --summary-json "$out/run1.json" \
        >"$out/run1.log" 2>&1 &
    pid=$!
    follow "$pid" "$out/run1.log"
    wait "$pid" || rc=$?
    echo "--- run 1 exited with status $rc (a crash was expected)"
    [[ "$rc" -ne 0 ]] || { echo "demo.sh: run 1 finished instead of crashing" >&2; exit 1; }
else
    "${LAUNCH[@]}" --nproc-per-node "$n_before" "$ROOT/examples/train_lm.py" "${common[@]}" \
        --metrics-jsonl "$out/run1.jsonl" --summary-json "$out/run1.json" \
        >"$out/run1.log" 2>&1 &
    pid=$!  # the launcher execs torchrun, so this is torchrun's PID
    follow "$pid" "$out/run1.log" &
    tailer=$!
    # Rank 0 logs every step as it completes; the checkpoint of the last save
    # step before S was committed before step S ran.
    record="\"event\": \"step\", \"step\": $crash_at,"
    until grep -qF "$record" "$out/run1.jsonl" 2>/dev/null || ! kill -0 "$pid" 2>/dev/null; do
        sleep 0.1
    done
    grep -qF "$record" "$out/run1.jsonl" || {
        echo "demo.sh: run 1 ended before step $crash_at; see $out/run1.log" >&2
        exit 1
    }
    workers="$(kill_tree "$pid")"
    wait "$pid" 2>/dev/null || true
    wait "$tailer" 2>/dev/null || true
    echo "--- SIGKILLed torchrun (pid $pid) and its workers ($workers) once step $crash_at was done"
fi

echo
echo "=== checkpoints on disk after the crash (only those with manifest.json are committed)"
for d in "$ckpt"/step_* "$ckpt"/.[!.]*; do
    [[ -e "$d" ]] || continue
    if [[ -f "$d/manifest.json" ]]; then state=committed; else state=incomplete; fi
    printf '  %-32s %s\n' "$(basename "$d")" "$state"
done

echo
echo "=== 2/3  resume on $n_after processes from the newest committed checkpoint"
"${LAUNCH[@]}" --nproc-per-node "$n_after" "$ROOT/examples/train_lm.py" "${common[@]}" --resume \
    --metrics-jsonl "$out/run2.jsonl" --summary-json "$out/run2.json" >"$out/run2.log" 2>&1 &
pid=$!
follow "$pid" "$out/run2.log"
rc=0
wait "$pid" || rc=$?
if [[ "$rc" -ne 0 ]]; then
    echo "demo.sh: the resumed run failed (status $rc); last lines of $out/run2.log:" >&2
    tail -n 30 "$out/run2.log" >&2
    exit 1
fi

echo
echo "=== 3/3  report"
"$PYTHON" "$ROOT/scripts/demo_report.py" --out "$out" --interrupt "$interrupt"
echo
echo "demo finished in $(( SECONDS - t_demo ))s; logs, summaries and checkpoints in $out"
