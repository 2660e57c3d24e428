#!/usr/bin/env bash
# Train ADYOLOv5-Face across every node of a Slurm allocation: one `accelerate launch` per node,
# one training process per GPU (or PROCS_PER_NODE CPU processes), DeepSpeed ZeRO-2 by default.
#
#   sbatch slurm/train.sh [run.yaml] [key=value ...]          # from the repository root
#   sbatch --nodes=4 --gres=gpu:8 slurm/train.sh launch/configs/widerface_s.yaml epochs=300
#   sbatch --export=ALL,ACCELERATE_CONFIG=ds_configs/accelerate_zero3.yaml slurm/train.sh run.yaml
#
# Every default below can be overridden on the sbatch command line. Nothing here reads a user's
# own accelerate config. Before the time limit Slurm sends SIGUSR1: the trainer finishes its step,
# saves a checkpoint, and the job requeues itself and resumes from it (same job id, same run
# directory, same MLflow run).
#
#SBATCH --job-name=adyolo
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --requeue

set -euo pipefail

# Where things are; all overridable through the environment (sbatch --export=ALL,NAME=value).
ROOT=${ADYOLO_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
VENV=${ADYOLO_VENV:-$ROOT/.venv}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-ds_configs/accelerate_zero2.yaml}
PROCS_PER_NODE=${PROCS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
OUTPUT_DIR=${OUTPUT_DIR:-runs/slurm/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}
cd "$ROOT"

# The first argument is a run config unless it is an override.
CONFIG_ARGS=()
if [[ $# -gt 0 && "$1" != *=* ]]; then
    CONFIG_ARGS=(--config "$1")
    shift
fi
TRAIN_ARGS=("${CONFIG_ARGS[@]}" "output_dir=$OUTPUT_DIR" "$@")
if [[ -f "$OUTPUT_DIR/checkpoints/latest" ]]; then
    TRAIN_ARGS+=(--resume)  # a requeued job continues where the signal stopped it
fi

# Rank 0 runs on the first node; its address comes from Slurm (node names need not resolve).
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_IP=$(scontrol show node "$HEAD" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
MAIN_PORT=$((20000 + SLURM_JOB_ID % 20000))  # distinct per job on shared nodes
export ROOT VENV ACCELERATE_CONFIG PROCS_PER_NODE MAIN_IP MAIN_PORT

echo "adyolo: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST:" \
     "$SLURM_NNODES nodes x $PROCS_PER_NODE processes, head $HEAD ($MAIN_IP:$MAIN_PORT), output $OUTPUT_DIR"

preempted=0
on_warning() {
    preempted=1
    echo "adyolo: time limit or preemption near; asking the trainer to checkpoint"
    scancel --signal=TERM "$SLURM_JOB_ID"  # every process of the job's steps, not this shell
}
trap on_warning USR1

# One launcher task per node, with the job's CPUs per task: Slurm 22.05-23.02 job steps do not inherit
# --cpus-per-task, and without it every rank and loader worker of a node may share one core. Single
# quotes: SLURM_NODEID must expand inside each task, where it differs, not here in the batch shell.
CPUS=()
if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
    CPUS=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
fi
srun --kill-on-bad-exit=1 --ntasks-per-node=1 "${CPUS[@]}" bash -c '
    exec "$VENV/bin/python" launch/launch.py --config_file "$ACCELERATE_CONFIG" \
        --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID" \
        --num_processes $((SLURM_NNODES * PROCS_PER_NODE)) \
        --main_process_ip "$MAIN_IP" --main_process_port "$MAIN_PORT" \
        launch/train.py "$@"' adyolo-train "${TRAIN_ARGS[@]}" &
step=$!
status=0
wait "$step" || status=$?
while kill -0 "$step" 2>/dev/null; do  # a trapped signal interrupted wait: wait for the step again
    status=0
    wait "$step" || status=$?
done

if [[ $preempted == 1 && -f "$OUTPUT_DIR/checkpoints/latest" ]]; then
    echo "adyolo: checkpoint saved; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$status"
