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
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@4670
#SBATCH --output=pz-30b-async-%j.out
# Submit from the repository root. SLURM sends SIGUSR1 4670 s before the time limit (--signal=B:...: to
# the batch script, which passes it to the ranks; the early warning `megatron-pz plan` sizes for this
# config: only the 16 training ranks write the checkpoint, so a node writes twice what the colocated run's
# does; recompute it with your file system's preemption.save_bytes_per_s). On it, or on SIGTERM (scancel,
# preemption), the training ranks finish the step, wait for the batch in flight, write it into the
# checkpoint, stop the rollout ranks and exit 75; the job requeues itself on the early warning (SLURM
# requeues a preempted one) and resumes bit-exactly.
export CONFIG="${CONFIG:-examples/pretrainzero_qwen3_30b_a3b_async.yaml}"
source "${SLURM_SUBMIT_DIR:-.}/slurm/launch.sh"  # sbatch runs a spooled copy of this file
