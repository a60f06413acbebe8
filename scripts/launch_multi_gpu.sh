#!/usr/bin/env bash
# Launch a training script on one or many nodes through torchrun, choosing the
# collective backend from the hardware. See --help.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
    cat <<'EOF'
Usage: scripts/launch_multi_gpu.sh [launcher options] SCRIPT.py [script args...]

Runs SCRIPT.py under torchrun (python -m torch.distributed.run) from the active
Python (override with $PYTHON). Everything after SCRIPT.py goes to the script.

Launcher options:
  --nproc-per-node N   processes on this node (default: number of visible GPUs,
                       or 2 when there is no GPU)
  --nnodes N           number of nodes (default 1)
  --node-rank R        rank of this node, 0..nnodes-1 (default 0)
  --master-addr HOST   address of node 0 (required when --nnodes > 1)
  --master-port PORT   port on node 0 (default: a free port chosen by torchrun
                       on one node; 29500 on many nodes)
  --backend B          auto | nccl | gloo (default auto: nccl when there is a
                       GPU for every local process, gloo on CPU otherwise)
  -h, --help           show this text

The chosen backend reaches the script as $SHARDCKPT_BACKEND. On CPU the launcher
sets OMP_NUM_THREADS=1 (unless already set) so that N processes do not fight
over the cores. The repository root is put on PYTHONPATH so `import shardckpt`
works without installing it.

Examples:
  # one node, all GPUs (or 2 CPU processes on a machine without GPUs)
  scripts/launch_multi_gpu.sh examples/train_lm.py --max-steps 200
  # 4 CPU processes with gloo
  scripts/launch_multi_gpu.sh --nproc-per-node 4 --backend gloo examples/train_lm.py
  # two nodes with 8 GPUs each; run on both, with --node-rank 0 and 1
  scripts/launch_multi_gpu.sh --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 \
      --nproc-per-node 8 examples/train_lm.py --ckpt-dir /shared/ckpt
EOF
}

die() {
    echo "launch_multi_gpu.sh: $*" >&2
    exit 2
}

nproc_per_node=""
nnodes=1
node_rank=0
master_addr=""
master_port=""
backend="${SHARDCKPT_BACKEND:-auto}"

while [[ $# -gt 0 ]]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --nproc-per-node | --nproc_per_node) nproc_per_node="${2:?--nproc-per-node needs a value}"; shift 2 ;;
        --nproc-per-node=* | --nproc_per_node=*) nproc_per_node="${1#*=}"; shift ;;
        --nnodes) nnodes="${2:?--nnodes needs a value}"; shift 2 ;;
        --nnodes=*) nnodes="${1#*=}"; shift ;;
        --node-rank | --node_rank) node_rank="${2:?--node-rank needs a value}"; shift 2 ;;
        --node-rank=* | --node_rank=*) node_rank="${1#*=}"; shift ;;
        --master-addr | --master_addr) master_addr="${2:?--master-addr needs a value}"; shift 2 ;;
        --master-addr=* | --master_addr=*) master_addr="${1#*=}"; shift ;;
        --master-port | --master_port) master_port="${2:?--master-port needs a value}"; shift 2 ;;
        --master-port=* | --master_port=*) master_port="${1#*=}"; shift ;;
        --backend) backend="${2:?--backend needs a value}"; shift 2 ;;
        --backend=*) backend="${1#*=}"; shift ;;
        --) shift; break ;;
        -*) die "unknown launcher option '$1' (see --help)" ;;
        *) break ;;
    esac
done

[[ $# -ge 1 ]] || { usage >&2; die "no training script given"; }
script="$1"
shift
[[ -f "$script" ]] || die "training script '$script' not found"

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }
is_uint "$nnodes" && [[ "$nnodes" -ge 1 ]] || die "--nnodes must be a positive integer, got '$nnodes'"
is_uint "$node_rank" && [[ "$node_rank" -lt "$nnodes" ]] || die "--node-rank must be in 0..$((nnodes - 1)), got '$node_rank'"
[[ -z "$master_port" ]] || is_uint "$master_port" || die "--master-port must be a number, got '$master_port'"

# Interpreter: $PYTHON, else the active one; fall back to the repository's venv
# so that `bash scripts/demo.sh` works without activating anything first.
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -z "${VIRTUAL_ENV:-}" && -x "$ROOT/.venv/bin/python" ]]; then
        PYTHON="$ROOT/.venv/bin/python"
    elif command -v python >/dev/null 2>&1; then
        PYTHON=python
    else
        PYTHON=python3
    fi
fi

# Count the GPUs this process may use. CUDA_VISIBLE_DEVICES wins over
# nvidia-smi, which lists every GPU in the machine regardless of it.
count_gpus() {
    if [[ -n "${CUDA_VISIBLE_DEVICES+x}" ]]; then
        if [[ -z "$CUDA_VISIBLE_DEVICES" || "$CUDA_VISIBLE_DEVICES" == "-1" ]]; then
            echo 0
        else
            awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES"
        fi
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        # No driver tool: ask torch (slower, but covers containers without nvidia-smi).
        "$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0
    fi
}
gpus="$(count_gpus)"
is_uint "$gpus" || gpus=0

if [[ -z "$nproc_per_node" ]]; then
    if [[ "$gpus" -gt 0 ]]; then nproc_per_node="$gpus"; else nproc_per_node=2; fi
fi
is_uint "$nproc_per_node" && [[ "$nproc_per_node" -ge 1 ]] || die "--nproc-per-node must be a positive integer, got '$nproc_per_node'"

case "$backend" in
    auto)
        # NCCL refuses two ranks on one GPU, so fall back to gloo on CPU rather
        # than fail when more processes than GPUs are asked for.
        if [[ "$gpus" -ge "$nproc_per_node" ]]; then
            backend=nccl
        else
            backend=gloo
            if [[ "$gpus" -gt 0 ]]; then
                echo "launch_multi_gpu.sh: $nproc_per_node processes > $gpus GPUs: using gloo on CPU" >&2
            fi
        fi
        ;;
    nccl)
        [[ "$gpus" -ge "$nproc_per_node" ]] || die "--backend nccl needs a GPU per process ($nproc_per_node processes, $gpus GPUs)"
        ;;
    gloo) ;;
    *) die "--backend must be auto, nccl or gloo, got '$backend'" ;;
esac
export SHARDCKPT_BACKEND="$backend"

# torchrun would set this to 1 anyway (with a warning); on CPU oversubscribed
# intra-op threads make gloo ranks on shared cores far slower.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

torchrun_args=(--nproc-per-node "$nproc_per_node" --max-restarts 0)
if [[ "$nnodes" -eq 1 && -z "$master_addr" && -z "$master_port" ]]; then
    # Rendezvous on a free local port: two jobs on one machine never collide.
    torchrun_args+=(--standalone)
else
    [[ "$nnodes" -eq 1 || -n "$master_addr" ]] || die "--master-addr is required when --nnodes > 1"
    torchrun_args+=(--nnodes "$nnodes" --node-rank "$node_rank"
        --master-addr "${master_addr:-127.0.0.1}" --master-port "${master_port:-29500}")
fi

echo "launch_multi_gpu.sh: backend=$backend nnodes=$nnodes node_rank=$node_rank nproc_per_node=$nproc_per_node gpus=$gpus python=$PYTHON" >&2
# exec: the caller's PID is torchrun's, so a supervisor (or scripts/demo.sh) can
# signal it directly.
exec "$PYTHON" -m torch.distributed.run "${torchrun_args[@]}" "$script" "$@"
