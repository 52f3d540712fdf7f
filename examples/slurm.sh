#!/usr/bin/env bash
# Multi-node plait training under SLURM: one torchrun per node, torchrun starts one worker
# per GPU, and plait runs in place inside each worker (WORLD_SIZE is already set).
#
#   sbatch examples/slurm.sh gpt2-124m --set train.steps=2000
#
#SBATCH --job-name=plait
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}  # must be on a filesystem all nodes share
# The rendezvous store and gloo / NCCL listen on the cluster network, which must be trusted:
# name its private interface (e.g. ib0, eth1) so nothing listens on a public one.
if [[ -n "${CLUSTER_IFNAME:-}" ]]; then
  export GLOO_SOCKET_IFNAME="$CLUSTER_IFNAME" NCCL_SOCKET_IFNAME="$CLUSTER_IFNAME"
fi

# plait-c10d is torch's c10d rendezvous with a repair that lets a lost node rejoin (installed
# with plait; docs/resilience.md). MIN_NODES below SLURM_NNODES lets the job go on without a
# lost node and grow back when it returns; MAX_RESTARTS bounds the restarts after faults.
srun torchrun \
  --nnodes="${MIN_NODES:-$SLURM_NNODES}:$SLURM_NNODES" \
  --nproc-per-node="$GPUS_PER_NODE" \
  --rdzv-id="$SLURM_JOB_ID" \
  --rdzv-backend=plait-c10d \
  --rdzv-endpoint="$HEAD_NODE:29500" \
  --max-restarts="${MAX_RESTARTS:-3}" \
  -m plait train "$@" --run-dir "$RUN_DIR"
