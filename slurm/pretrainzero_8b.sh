#!/usr/bin/env bash
# PretrainZero on Qwen3-8B-Base, 2 nodes x 8 H100: TP=2, DP=8.
# Submit: MODEL_DIR=/path/to/hf/model RUN_DIR=/shared/runs/pz-8b sbatch slurm/pretrainzero_8b.sh
#SBATCH --job-name=pz-8b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --output=pz-8b-%j.out
# Submit from the repository root. Checkpoints every train.save_interval steps; on SIGTERM (time limit,
# pre-emption) or SIGUSR1 the ranks write a checkpoint at the end of the step and exit. Resubmitting
# (or the requeue) resumes from the latest checkpoint.
export CONFIG="${CONFIG:-examples/pretrainzero_qwen3_8b.yaml}"
source "${SLURM_SUBMIT_DIR:-.}/slurm/launch.sh"  # sbatch runs a spooled copy of this file
