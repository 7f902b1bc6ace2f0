#!/usr/bin/env bash
# PretrainZero on SmolLM3-3B-Base (100-step Random RLPT cold start, PZ §4.1), 1 node x 8 H100: TP=1, DP=8.
# Submit: MODEL_DIR=/path/to/SmolLM3-3B-Base RUN_DIR=/shared/runs/pz-3b DATA_DIR=/path/to/smollm3/passages \
#   sbatch slurm/pretrainzero_3b.sh   (DATA_DIR preprocessed with SmolLM3's tokenizer)
#SBATCH --job-name=pz-3b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@1170
#SBATCH --output=pz-3b-%j.out
# Submit from the repository root. Checkpoints every train.save_interval steps. SLURM sends SIGUSR1
# 1170 s before the time limit (--signal=B:...: to the batch script, which passes it to the ranks; the
# early warning `megatron-pz plan` sizes for this config, a checkpoint's write time with margin; recompute
# it with your file system's preemption.save_bytes_per_s); the ranks write a checkpoint and the job
# requeues itself. On SIGTERM (scancel, preemption, a time limit without warning) the ranks write a
# checkpoint and exit 75; SLURM requeues a preempted job (--requeue). Resubmitting resumes from the latest
# checkpoint, in the objective phase of its step.
export CONFIG="${CONFIG:-examples/pretrainzero_smollm3_3b.yaml}"
source "${SLURM_SUBMIT_DIR:-.}/slurm/launch.sh"  # sbatch runs a spooled copy of this file
