#!/usr/bin/env bash
# PretrainZero on Qwen3-30B-A3B-Base (MoE, FP8), 4 nodes x 8 H100: TP=2 (+SP), PP=2, EP=8, DP=8.
# Submit: MODEL_DIR=/path/to/hf/model RUN_DIR=/shared/runs/pz-30b sbatch slurm/pretrainzero_30b.sh
#SBATCH --job-name=pz-30b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --output=pz-30b-%j.out
# Submit from the repository root. Checkpoints every train.save_interval steps; on SIGTERM (time limit,
# pre-emption) or SIGUSR1 the ranks write a checkpoint at the end of the step and exit. Resubmitting
# (or the requeue) resumes from the latest checkpoint.
export CONFIG="${CONFIG:-examples/pretrainzero_qwen3_30b_a3b.yaml}"
source "${SLURM_SUBMIT_DIR:-.}/slurm/launch.sh"  # sbatch runs a spooled copy of this file
