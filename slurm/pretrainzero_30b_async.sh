#!/usr/bin/env bash
# PretrainZero on Qwen3-30B-A3B-Base, rollouts on their own GPUs, one step off-policy: 4 nodes x 8 H100.
# Nodes 0-1 train (TP=2, PP=2, EP=8, DP=4), nodes 2-3 run 8 vLLM engines (TP 2): rollout.ranks=16, the job's
# last 16 ranks (launch.sh prints the split and refuses one that does not add up).
# Submit: MODEL_DIR=/path/to/hf/model RUN_DIR=/shared/runs/pz-30b-async sbatch slurm/pretrainzero_30b_async.sh
#SBATCH --job-name=pz-30b-async
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --output=pz-30b-async-%j.out
# Submit from the repository root. On SIGTERM (time limit, pre-emption) or SIGUSR1 the training ranks finish
# the step, wait for the batch in flight, write it into the checkpoint and stop the rollout ranks; the requeue
# (or a resubmission) resumes from there bit-exactly.
export CONFIG="${CONFIG:-examples/pretrainzero_qwen3_30b_a3b_async.yaml}"
source "${SLURM_SUBMIT_DIR:-.}/slurm/launch.sh"  # sbatch runs a spooled copy of this file
