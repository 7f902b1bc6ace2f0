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
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@1620
#SBATCH --output=pz-8b-%j.out
# Submit from the repository root. Checkpoints every train.save_interval steps. SLURM sends SIGUSR1
# 1620 s before the time limit (--signal=B:...: to the batch script, which passes it to the ranks; the
# early warning `megatron-pz plan` sizes for this config, a checkpoint's write time with margin; recompute
# it with your file system's preemption.save_bytes_per_s); the ranks write a checkpoint and the job
# requeues itself. On SIGTERM (scancel, preemption, a time limit without warning) the ranks write a
# checkpoint and exit 75; SLURM requeues a preempted job (--requeue). Resubmitting resumes from the latest
# checkpoint.
export CONFIG="${CONFIG:-examples/pretrainzero_qwen3_8b.yaml}"
source "${SLURM_SUBMIT_DIR:-.}/slurm/launch.sh"  # sbatch runs a spooled copy of this file
