#!/bin/bash
# Launch foldmesh.train on several nodes with SLURM: one torchrun per node, rendezvous on
# the first node of the allocation (torchrun's c10d backend). Arguments go to the trainer.
#
#   sbatch --nodes 16 --gpus-per-node 8 scripts/slurm_train.sh --config configs/paper/mixtral_8x22b.toml
#
# Restarts: --max-restarts lets torchrun restart all ranks after a failure; the trainer
# resumes from the newest complete checkpoint in checkpoint.dir (a shared filesystem).
#SBATCH --job-name=foldmesh
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${RDZV_PORT:-29500}

srun --kill-on-bad-exit=1 torchrun \
  --nnodes "$SLURM_JOB_NUM_NODES" \
  --nproc-per-node "$GPUS_PER_NODE" \
  --rdzv-id "$SLURM_JOB_ID" \
  --rdzv-backend c10d \
  --rdzv-endpoint "$HEAD_NODE:$PORT" \
  --max-restarts "${MAX_RESTARTS:-3}" \
  -m foldmesh.train "$@"
