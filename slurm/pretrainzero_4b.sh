#!/usr/bin/env bash
# PretrainZero on Qwen3-4B-Base, 1 node x 8 H100: TP=2, DP=4.
# Submit: MODEL_DIR=/path/to/hf/model RUN_DIR=/shared/runs/pz-4b sbatch slurm/pretrainzero_4b.sh
#SBATCH --job-name=pz-4b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@1590
#SBATCH --output=pz-4b-%j.out
# Submit from the repository root. Checkpoints every train.save_interval steps. SLURM sends SIGUSR1
# 1590 s before the time limit (--signal=B:...: to the batch script, which passes it to the ranks; the
# early warning `megatron-pz plan` sizes for this config and for examples/rlp_qwen3_4b.yaml, whose EMA
# teacher makes the larger checkpoint: a checkpoint's write time with margin; recompute it with your file
# system's preemption.save_bytes_per_s); the ranks write a checkpoint and the job requeues itself. On
# SIGTERM (scancel, preemption, a time limit without warning) the ranks write a checkpoint and exit 75;
# SLURM requeues a preempted job (--requeue). Resubmitting resumes from the latest checkpoint.
export CONFIG="${CONFIG:-examples/pretrainzero_qwen3_4b.yaml}"
source "${SLURM_SUBMIT_DIR:-.}/slurm/launch.sh"  # sbatch runs a spooled copy of this file
